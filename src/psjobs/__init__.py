"""psjobs: PowerShell-style background jobs for Python.

Start work in the background and get the prompt back at once; then list the jobs, receive partial
results while they run, wait (with a timeout), stop, remove, and read why a job failed. The same
verbs drive work in a thread, in another process, and on remote computers over SSH::

    import psjobs
    job = psjobs.start_job("sleep 1; echo done")
    psjobs.get_job()                 # the Get-Job table
    psjobs.wait_job(job, timeout=5)
    psjobs.receive_job(job)          # ['done']
"""

from ._api import (
    as_completed,
    async_receive_job,
    async_wait_job,
    configure_group,
    configure_ssh,
    connect,
    default_session,
    get_group,
    get_job,
    invoke_command,
    pause_group,
    receive_job,
    remove_job,
    restart_job,
    resume_group,
    resume_job,
    start_cluster_job,
    start_job,
    start_thread_job,
    stop_job,
    suspend_job,
    wait_job,
)
from ._errors import (
    ExitStatusError,
    HostKeyError,
    JobBlockedError,
    JobFailedError,
    JobNotFinishedError,
    JobNotFoundError,
    JobStateError,
    JobStopped,
    ProtocolError,
    PsJobsError,
    PsJobsWarning,
    RemoteConnectionError,
    RemoteError,
    RemoteTraceback,
    RemoteVersionError,
    StopTimeoutWarning,
    WorkerError,
)
from ._executor import Executor
from ._inside import (
    job_input,
    read_host,
    stop_requested,
    write_debug,
    write_error,
    write_information,
    write_output,
    write_progress,
    write_verbose,
    write_warning,
)
from ._records import (
    ErrorRecord,
    InformationRecord,
    OutputRecord,
    ProgressRecord,
    Record,
    Snapshot,
    Stream,
)
from ._version import __version__ as __version__
from .backends.ssh._backend import SSHOptions
from .core._format import JobList, format_table
from .core._job import Job, JobStateInfo
from .core._pshost import Host
from .core._session import Session
from .core._state import JobState


def load_ipython_extension(ip: object) -> None:
    """``%load_ext psjobs``: the IPython extension (see psjobs.ipython), imported only now."""
    from .ipython import load_ipython_extension as load

    load(ip)


def unload_ipython_extension(ip: object) -> None:
    """``%unload_ext psjobs``."""
    from .ipython import unload_ipython_extension as unload

    unload(ip)


__all__ = [
    "ErrorRecord",
    "Executor",
    "ExitStatusError",
    "Host",
    "HostKeyError",
    "InformationRecord",
    "Job",
    "JobBlockedError",
    "JobFailedError",
    "JobList",
    "JobNotFinishedError",
    "JobNotFoundError",
    "JobState",
    "JobStateError",
    "JobStateInfo",
    "JobStopped",
    "OutputRecord",
    "ProgressRecord",
    "ProtocolError",
    "PsJobsError",
    "PsJobsWarning",
    "Record",
    "RemoteConnectionError",
    "RemoteError",
    "RemoteTraceback",
    "RemoteVersionError",
    "SSHOptions",
    "Session",
    "Snapshot",
    "StopTimeoutWarning",
    "Stream",
    "WorkerError",
    "as_completed",
    "async_receive_job",
    "async_wait_job",
    "configure_group",
    "configure_ssh",
    "connect",
    "default_session",
    "format_table",
    "get_group",
    "get_job",
    "invoke_command",
    "job_input",
    "load_ipython_extension",
    "pause_group",
    "read_host",
    "receive_job",
    "remove_job",
    "restart_job",
    "resume_group",
    "resume_job",
    "start_cluster_job",
    "start_job",
    "start_thread_job",
    "stop_job",
    "stop_requested",
    "suspend_job",
    "unload_ipython_extension",
    "wait_job",
    "write_debug",
    "write_error",
    "write_information",
    "write_output",
    "write_progress",
    "write_verbose",
    "write_warning",
]

# One public face: objects say they come from psjobs, not from its private modules.
for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("psjobs."):
        try:
            _obj.__module__ = "psjobs"
        except (AttributeError, TypeError):
            pass
del _name, _obj
