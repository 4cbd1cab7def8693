"""The seam between the session and the places work runs: one Backend interface, a registry by name.

::

    Session verb --make_spec--> backend.prepare(spec)   checks and serializes: raises before a job exists
                 --------------> backend.plan(spec)     the leaves it needs (one per computer, item...)
                 Session makes the Jobs, their ids and one JobPort per leaf
                 --------------> backend.start(ports, spec)   returns at once; reports through the ports
    stop_job  ------------------> backend.stop(port, grace)  (nudge(port) while it has not ended)
    remove_job -----------------> backend.forget(port)
    Session.close --------------> backend.close()

A backend never sets a job's state: it reports through its :class:`~._port.JobPort`. Optional
abilities are class flags (``can_pause``, ``can_send_input``, ``stops_unstarted``, ``stop_slack``,
and ``stuck_stop``, what a stop that outlasts its grace period says), not methods probed with
getattr. Backends are found by name in a registry of ``"module:Class"`` strings and imported only
when first used, so ``import psjobs`` stays light and the core imports no backend.
"""

from __future__ import annotations

import abc
import importlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from ._port import JobPort
    from ._session import Session
    from ._spec import JobSpec


@dataclass(frozen=True)
class Place:
    """Where one leaf job runs, as the table shows it before it starts."""

    location: str = "localhost"
    computer_name: str | None = None


@dataclass(frozen=True)
class Plan:
    """The leaves a start needs, one per place, and the parent's location."""

    places: Sequence[Place] = (Place("localhost", "localhost"),)
    location: str = "localhost"
    #: the parent's location follows where its leaves report they run (a cluster's workers)
    follow_where: bool = False


_LOCAL = Plan()


STUCK_STOP = "the work cannot be interrupted where it is (a long C call?) and ends Stopped when it returns"


class Backend(abc.ABC):
    """What every job kind provides. One instance per session and kind, made on first use."""

    #: suspend(port) and resume(port) work (the work can be paused from outside)
    can_pause: ClassVar[bool] = False
    #: send_input(port, text) answers a Blocked job's prompt
    can_send_input: ClassVar[bool] = False
    #: a job stopped while it waited NotStarted must still be told (its queue lives elsewhere)
    stops_unstarted: ClassVar[bool] = False
    #: seconds stop_job waits past the grace period for work killed at its end to be reaped and
    #: report (a process's exit, its last records), or a stop raised in a thread to land
    stop_slack: ClassVar[float] = 2.0
    #: why a job of this kind can still run after stop_job's wait (its status message and the
    #: StopTimeoutWarning say it)
    stuck_stop: ClassVar[str] = STUCK_STOP

    def __init__(self, session: Session) -> None:
        self.session = session

    def prepare(self, spec: JobSpec) -> None:  # noqa: B027 - most backends have nothing to check
        """Check and serialize the spec in the caller, so a bad argument raises before a job exists.

        The verb's own options for this backend are in ``spec.options``.
        """

    def plan(self, spec: JobSpec) -> Plan:
        """The leaves this start needs (default: one, on this computer)."""
        return _LOCAL  # one made for all: a frozen dataclass costs ~2 us to build on a job's start path

    @abc.abstractmethod
    def start(self, ports: list[JobPort], spec: JobSpec) -> None:
        """Begin the work of these leaf jobs (NotStarted until they report started); return at once."""

    @abc.abstractmethod
    def stop(self, port: JobPort, grace: float) -> None:
        """Ask the work to stop; end it for good after ``grace`` seconds. Return at once."""

    def nudge(self, port: JobPort) -> None:  # noqa: B027 - only thread jobs can lose a stop
        """A stop was asked for and the job has not ended yet (called every 0.1 s while stop_job waits)."""

    def can_rerun(self, port: JobPort) -> bool:
        """True once a job that ended holds nothing of this backend any more, so ``start`` may run it
        again (``retries=N``); a backend whose reports of a run come after its end says so here."""
        return True

    def forget(self, port: JobPort) -> None:  # noqa: B027 - nothing kept per job by default
        """The job was removed: drop every reference to it."""

    def close(self) -> None:  # noqa: B027 - nothing to free by default
        """The session is closing: free workers, threads and connections."""

    # --- optional abilities (see the class flags) -----------------------------------------------
    def suspend(self, port: JobPort) -> None:
        """Pause the work (the session made the job Suspending); report ``port.suspended()``."""
        raise NotImplementedError(f"{type(self).__name__} cannot suspend a job")

    def resume(self, port: JobPort) -> None:
        """Let the work run again; report ``port.resumed()``."""
        raise NotImplementedError(f"{type(self).__name__} cannot resume a job")

    def send_input(self, port: JobPort, text: str) -> None:
        """Answer the job's prompt; report ``port.unblocked()``."""
        raise NotImplementedError(f"{type(self).__name__} cannot send input to a job")


_REGISTRY: dict[str, str | type[Backend]] = {
    "thread": "psjobs.backends._thread:ThreadBackend",
    "process": "psjobs.backends.process._backend:ProcessBackend",
    "ssh": "psjobs.backends.ssh._backend:SSHBackend",
    "dask": "psjobs.backends.dask._backend:DaskBackend",
}
_registry_lock = threading.Lock()


def register_backend(kind: str, backend: str | type[Backend]) -> None:
    """Make ``kind`` name ``backend``: a Backend class, or ``"module:Class"`` imported on first use."""
    if not isinstance(kind, str) or not kind:
        raise TypeError(f"register_backend: kind must be a non-empty str, not {kind!r}")
    with _registry_lock:
        _REGISTRY[kind] = backend


def unregister_backend(kind: str) -> None:
    """Forget ``kind`` (sessions that made one keep it until they close)."""
    with _registry_lock:
        _REGISTRY.pop(kind, None)


def backend_class(kind: str) -> type[Backend]:
    """The Backend class registered as ``kind``, imported now if it was given by name."""
    with _registry_lock:
        entry = _REGISTRY.get(kind)
    if entry is None:
        raise KeyError(f"no backend is registered as {kind!r}")
    if isinstance(entry, str):
        module, _, name = entry.partition(":")
        cls: Any = getattr(importlib.import_module(module), name)
        return cls  # type: ignore[no-any-return]
    return entry


def load_backend(kind: str, session: Session) -> Backend:
    from ._fork import track

    track(session)  # a session with a backend has something a forked child must not touch
    return backend_class(kind)(session)
