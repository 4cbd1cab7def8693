"""The seam between the session and the places work runs.

A backend does four things; it never sets a job's state itself. It reports what happened by
calling :func:`report` (an Event) and :func:`deliver` (records), and the job applies them through
its transition table. Optional backends (ssh, dask) are imported by name only when first used, so
``import psjobs`` stays light.
"""

from __future__ import annotations

import importlib
import time
from typing import TYPE_CHECKING, Any, Protocol

from ._state import Event

if TYPE_CHECKING:
    from ._job import Entry, Job
    from ._session import Session
    from ._spec import JobSpec


class Backend(Protocol):
    """What every job kind provides."""

    def prepare(self, spec: JobSpec) -> None:
        """Check and serialize the spec in the caller, so a bad argument raises before a job exists."""

    def start(self, job: Job, spec: JobSpec) -> None:
        """Begin the work of a leaf job; return at once."""

    def stop(self, job: Job, grace: float) -> None:
        """Ask the work to stop; end it for good after ``grace`` seconds. Return at once."""

    def forget(self, job: Job) -> None:
        """The job was removed: drop every reference to it."""

    def close(self) -> None:
        """The session is closing: free workers, threads and connections."""


_BACKENDS = {
    "thread": "psjobs.backends._thread:ThreadBackend",
    "process": "psjobs.backends.process._backend:ProcessBackend",
    "ssh": "psjobs.backends.ssh._backend:SSHBackend",
    "dask": "psjobs.backends.dask._backend:DaskBackend",
}


def load_backend(kind: str, session: Session) -> Backend:
    module, _, name = _BACKENDS[kind].partition(":")
    cls = getattr(importlib.import_module(module), name)
    backend: Backend = cls(session)
    return backend


def report(job: Job, event: Event, *, reason: BaseException | None = None,
           exit_code: int | None = None) -> None:
    """A backend says ``event`` happened to ``job``."""
    with job.session._cond:
        job._apply(event, reason=reason, exit_code=exit_code, now=time.time())


def deliver(job: Job, entries: list[Entry]) -> None:
    """A backend hands over records of ``job``, in production order."""
    with job.session._cond:
        job._extend(entries)


def block(job: Job, prompt: str) -> None:
    """The job's code asks for input: it is Blocked until someone answers ``prompt``."""
    with job.session._cond:
        job.prompt = prompt
        job.status_message = f"waiting for input: {prompt!r}"
        job._apply(Event.BLOCK)


def unblock(job: Job) -> None:
    """The job's prompt was answered: it runs again."""
    with job.session._cond:
        job.prompt = None
        job.status_message = ""
        job._apply(Event.UNBLOCK)


def finish(job: Job, entries: list[Entry], event: Event, *, reason: BaseException | None = None,
           exit_code: int | None = None) -> None:
    """The last records and the end, in one step, so no reader sees the end before the tail."""
    with job.session._cond:
        job._extend(entries)
        job._apply(event, reason=reason, exit_code=exit_code)


class NullPrepare:
    """For backends that have nothing to check ahead."""

    def prepare(self, spec: Any) -> None:
        return None
