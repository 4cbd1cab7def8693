"""psjobs: PowerShell-style background jobs for Python.

Start work in the background and get the prompt back at once; then list the jobs, receive partial
results while they run, wait (with a timeout), stop, remove, and read why a job failed. The same
verbs drive work in a thread, in another process, and on remote computers over SSH::

    import psjobs
    job = psjobs.start_job("sleep 1; echo done")
    psjobs.get_job()                 # the Get-Job table
    psjobs.wait_job(job, timeout=5)
    psjobs.receive_job(job)          # ['done']

``import psjobs`` loads only the bottom layer (errors, records): each public name is imported from
its private module on first use (PEP 562 ``__getattr__`` over ``_EXPORTS``), so the ``psjobs``
command and the fork server, which import parts of the package, do not pay for all of it.
To add a public name, add one line for it in each of three places, each kept sorted: the
``TYPE_CHECKING`` imports (what type checkers read), ``_EXPORTS`` (name -> module, what runs) and
``__all__``. tests/test_startup.py checks that the three agree.
"""

import sys as _sys
import typing as _typing
from importlib import import_module as _import_module

from . import _errors, _records  # noqa: F401  (cheap, and named in tracebacks: published at once, below)
from ._version import __version__ as __version__

if _typing.TYPE_CHECKING:  # what type checkers and editors read; at run time, __getattr__ imports on first use
    from ._api import (
        as_completed,
        async_receive_job,
        async_wait_job,
        configure_group,
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
    from ._api_ssh import configure_ssh
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
    from .backends.ssh._backend import SSHOptions
    from .core._format import JobList, format_table
    from .core._job import Job, JobStateInfo
    from .core._pshost import Host
    from .core._session import Session
    from .core._state import JobState

# Every public name -> the private module that defines it, imported on first use (PEP 562), so
# `import psjobs` costs the bottom layer only and the `psjobs` command or a fork server that imports
# psjobs.host or psjobs.worker does not pay for the core and the backends.
_EXPORTS: dict[str, str] = {
    "ErrorRecord": "._records",
    "Executor": "._executor",
    "ExitStatusError": "._errors",
    "Host": ".core._pshost",
    "HostKeyError": "._errors",
    "InformationRecord": "._records",
    "Job": ".core._job",
    "JobBlockedError": "._errors",
    "JobFailedError": "._errors",
    "JobList": ".core._format",
    "JobNotFinishedError": "._errors",
    "JobNotFoundError": "._errors",
    "JobState": ".core._state",
    "JobStateError": "._errors",
    "JobStateInfo": ".core._job",
    "JobStopped": "._errors",
    "OutputRecord": "._records",
    "ProgressRecord": "._records",
    "ProtocolError": "._errors",
    "PsJobsError": "._errors",
    "PsJobsWarning": "._errors",
    "Record": "._records",
    "RemoteConnectionError": "._errors",
    "RemoteError": "._errors",
    "RemoteTraceback": "._errors",
    "RemoteVersionError": "._errors",
    "SSHOptions": ".backends.ssh._backend",
    "Session": ".core._session",
    "Snapshot": "._records",
    "StopTimeoutWarning": "._errors",
    "Stream": "._records",
    "WorkerError": "._errors",
    "as_completed": "._api",
    "async_receive_job": "._api",
    "async_wait_job": "._api",
    "configure_group": "._api",
    "configure_ssh": "._api_ssh",
    "connect": "._api",
    "default_session": "._api",
    "format_table": ".core._format",
    "get_group": "._api",
    "get_job": "._api",
    "invoke_command": "._api",
    "job_input": "._inside",
    "pause_group": "._api",
    "read_host": "._inside",
    "receive_job": "._api",
    "remove_job": "._api",
    "restart_job": "._api",
    "resume_group": "._api",
    "resume_job": "._api",
    "start_cluster_job": "._api",
    "start_job": "._api",
    "start_thread_job": "._api",
    "stop_job": "._api",
    "stop_requested": "._inside",
    "suspend_job": "._api",
    "wait_job": "._api",
    "write_debug": "._inside",
    "write_error": "._inside",
    "write_information": "._inside",
    "write_output": "._inside",
    "write_progress": "._inside",
    "write_verbose": "._inside",
    "write_warning": "._inside",
}


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

_MISSING = object()


def _publish() -> None:
    """Bind here every public name whose module is loaded, saying it comes from psjobs (one public
    face: ``psjobs.Job``, not ``psjobs.core._job.Job``, in reprs, tracebacks and pickles)."""
    scope = globals()
    for name, where in _EXPORTS.items():
        module = _sys.modules.get(__name__ + where)
        if name in scope or module is None:
            continue
        obj = getattr(module, name, _MISSING)  # a module still being imported may not have it yet
        if obj is _MISSING:
            continue
        if getattr(obj, "__module__", "").startswith("psjobs."):
            try:
                obj.__module__ = "psjobs"
            except (AttributeError, TypeError):
                pass
        scope[name] = obj


def __getattr__(name: str) -> _typing.Any:
    where = _EXPORTS.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    _import_module(where, __name__)
    _publish()  # the names of every module that import loaded, not only this one
    return globals()[name]


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


_publish()
