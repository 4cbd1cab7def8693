"""A process job whose call was pickled elsewhere: the session host runs what a connected client sent.

::

    psjobs.connect() session --pickle_call (cloudpickle, in the client)--> start_call request (base64)
        --> host handler --> start_shipped(session, payload) --> JobSpec(CALL, payload set)
        --> the "process" backend: the payload goes unopened to a worker of the same user

The session that runs it never unpickles the payload (the host's promise: it runs no code a
client sends inside itself); only the job's worker process does, as for any process job.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._spec import CALL, JobSpec

if TYPE_CHECKING:
    from ._job import Job
    from ._session import Session


def start_shipped(session: Session, payload: bytes, *, command: str, name: str | None, cwd: str,
                  env: dict[str, str] | None, sys_path: list[str] | None) -> Job:
    """Start a BackgroundJob from ``pickle_call`` bytes made by another process.

    ``command`` is the job's readable text (made where the callable was); ``sys_path`` is the
    caller's ``sys.path``, so a callable pickled by reference imports in the worker as it did there.
    """
    spec = JobSpec(CALL, None, command=command, payload=payload, cwd=cwd, env=env)
    if sys_path is not None:
        spec.options = {"sys_path": list(sys_path)}
    return session._start_tree("process", spec, job_type="BackgroundJob", name=name)
