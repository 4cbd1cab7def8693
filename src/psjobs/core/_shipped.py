"""Jobs the session host starts for a client: as the client would have started them.

::

    psjobs.connect() session --pickle_call (cloudpickle, in the client)--> start_call request (base64)
        --> host handler --> start_shipped(session, payload) --> JobSpec(CALL, payload set)
        --> the "process" backend: the payload goes unopened to a worker of the same user
    psjobs start / connect()'s commands --start request--> start_for_client(session, command)
        --> the "process" backend (a thread job's: the "thread" backend), which runs it with Popen

The session that runs it never unpickles the payload (the host's promise: it runs no code a
client sends inside itself); only the job's worker process does, as for any process job.

Both carry the client's umask (``spec.options["umask"]``): a job gets the umask of the shell that
started it, not the host's, as it gets that shell's environment and directory. The backends set it
in the command's process or the call's worker; nothing else reads it. A thread job's callable would
have to share the host's umask (one per process), but a client never starts one: the command has
no callables and connect() refuses thread jobs.

A client's command also keeps the bytes of its output that are not UTF-8 (``spec.options
["output_errors"]``, see worker/_procs.text), so `psjobs receive` writes them as they were.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ._sched import make_when
from ._spec import CALL, JobSpec, check_directory, make_env, make_spec
from ._tree import check_name

if TYPE_CHECKING:
    from ._job import Job
    from ._session import Session


def start_shipped(session: Session, payload: bytes, *, command: str, name: str | None, cwd: str,
                  env: dict[str, str] | None, sys_path: list[str] | None, umask: int | None = None,
                  shape: str | None = None) -> Job:
    """Start a BackgroundJob from ``pickle_call`` bytes made by another process.

    ``command`` is the job's readable text (made where the callable was); ``sys_path`` is the
    caller's ``sys.path``, so a callable pickled by reference imports in the worker as it did there;
    ``shape`` is what its result() makes of the output, as the caller saw the callable (shape_of):
    a generator's items, else its value.
    """
    spec = JobSpec(CALL, None, command=command, payload=payload, cwd=cwd, env=env)
    options: dict[str, Any] = {}
    if sys_path is not None:
        options["sys_path"] = list(sys_path)
    if umask is not None:
        options["umask"] = umask
    if shape is not None:
        options["shape"] = shape  # read by shape_of (this job's and a restart's), before a journal is made
    if options:
        spec.options = options
    return session._start_tree("process", spec, job_type="BackgroundJob", name=name)


def start_for_client(session: Session, target: str | list[str], *, thread: bool, umask: int | None,
                     name: str | None, working_directory: str | None, env: Mapping[str, str | None] | None,
                     input: Iterable[Any] | None = None, group: str | None = None, after: Any = None,
                     delay: Any = None, retries: int = 0) -> Job:
    """A command a client starts: ``session.start_job(target, ...)``, or with ``thread``
    ``session.start_thread_job(target, ...)`` (``env`` ignored: a thread job has the session's),
    with the same checks and messages, run with the client's ``umask`` (None: the session's).
    A thread job's command is a process of its own too, so it gets the umask as well."""
    verb = "start_thread_job" if thread else "start_job"
    check_name(verb, name)
    when = make_when(session, verb, group, after, delay, retries)
    spec = make_spec(target, (), {}, input=input, verb=verb)
    spec.cwd = check_directory(verb, working_directory)
    if not thread:
        spec.env = make_env(verb, env)
    if spec.input is not None:
        spec.input = list(spec.input)
    # The bytes of its output that are not UTF-8 are kept (as lone surrogates): the command writes
    # them back as they were, --json and connect() show U+FFFD, as a session's own jobs have it.
    spec.options = {"output_errors": "surrogateescape"}
    if umask is not None:
        spec.options["umask"] = umask
    if thread:
        return session._start_tree("thread", spec, job_type="ThreadJob", name=name, parent=False, when=when)
    return session._start_tree("process", spec, job_type="BackgroundJob", name=name, when=when)
