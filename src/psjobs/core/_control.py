"""The verbs that reach a running job's backend: stop (the stop policy), suspend/resume, send_input.

::

    stop_jobs:  under the lock: every unfinished leaf Event.STOP (queued ones are Stopped at once),
                stop requested on it and its parents, parents re-derived
                then, without the lock: backend.stop(port, grace) for each leaf that ran
                then wait (grace + the backends' stop_slack: 2 s to reap a killed process,
                none for a thread) for every job
                to end: backend.nudge(port) while waiting,
                a StopTimeoutWarning and a status message for what did not end
    pause_jobs: check every leaf first (a refusal changes nothing), then per leaf
                Event.SUSPEND (the request) + backend.suspend(port), or backend.resume(port);
                the backend confirms through port.suspended() / port.resumed()
    send_input: backend.send_input(port, text); the backend reports port.unblocked()

Which backend runs a leaf is its port's ``kind``; what a backend can do is its class flags.
"""

from __future__ import annotations

import time
import warnings
from typing import TYPE_CHECKING

from .._errors import JobStateError, StopTimeoutWarning
from ._backend import STUCK_STOP
from ._port import JobPort
from ._pshost import describe_job
from ._state import Event, JobState

if TYPE_CHECKING:
    from ._backend import Backend
    from ._job import Job
    from ._session import Session


def _backend_of(session: Session, leaf: Job) -> tuple[Backend | None, JobPort | None]:
    port = JobPort.of(leaf)
    if port is None:
        return None, None
    return session._backends.get(port.kind), port


def send_input(session: Session, leaf: Job, text: str) -> None:
    """Answer the prompt of ``leaf``, a Blocked leaf job."""
    backend, port = _backend_of(session, leaf)
    if backend is None or port is None or not backend.can_send_input:
        raise JobStateError(f"send_input: {describe_job(leaf)} runs where input cannot be sent")
    backend.send_input(port, text)


def pause_jobs(session: Session, selected: list[Job], verb: str) -> list[Job]:
    """``verb`` is "suspend" or "resume": every leaf of ``selected`` that can change, or a refusal."""
    work: list[tuple[Backend, JobPort]] = []
    for job in selected:
        for leaf in job._leaves():
            if leaf.state.is_finished:
                continue
            backend, port = _backend_of(session, leaf)
            # A kind that cannot pause refuses a suspend in every unfinished state: accepted while
            # the job waited for a throttle slot, it changed nothing and ran unpaused (issue 13, 10).
            refused = backend is None or port is None or not backend.can_pause
            if verb == "suspend" and leaf.state not in (JobState.RUNNING, JobState.BLOCKED) and not refused:
                continue
            if verb == "resume" and leaf.state not in (JobState.SUSPENDED, JobState.SUSPENDING):
                continue
            if refused or backend is None or port is None:
                done = {"suspend": "suspended", "resume": "resumed"}[verb]
                raise JobStateError(f"{verb}_job: {describe_job(leaf)} is a {leaf.job_type or job.job_type} "
                                    f"which cannot be {done} (Python cannot pause a thread from outside); "
                                    f"use stop_job, or run it with start_job")
            work.append((backend, port))
    for backend, port in work:  # checked them all first: a refusal changes nothing
        if verb == "suspend":
            with session._cond:
                session._all[port.job_id]._apply(Event.SUSPEND)  # requested; the backend confirms
            backend.suspend(port)
        else:
            backend.resume(port)
    return selected


STALL = 0.5  # seconds a 0.1 s wait may overrun before the overrun is taken for a stall (see _stalled)


def _stalled(overrun: float) -> float:
    """The time to add to a stop's deadline after a wait that overran by ``overrun`` seconds.

    A wait that overruns by more than STALL means nothing ran here meanwhile: a full collection
    of a big heap or a C call holding the GIL, or a machine too busy to run this process. The
    work did not run either, so it could not stop: that time is not counted against the grace
    period (issue 13: a stop raised just before such a stall landed right after it, yet stop_job
    had given up, warned, and returned the job Stopping).
    """
    return overrun if overrun > STALL else 0.0


def stop_jobs(session: Session, selected: list[Job], grace: float, removing: bool = False) -> None:
    """Stop the work of ``selected`` for real and return when it is over (or warn after the grace).

    ``removing``: remove_job(force=True) asks, and drops the jobs whatever this warns about."""
    to_signal: list[tuple[Backend, JobPort]] = []
    with session._cond:
        for job in selected:
            if job._state.is_finished:
                continue
            for leaf in job._leaves():
                if leaf._state.is_finished:
                    continue
                was = leaf._state
                leaf._stop_requested = True
                node = leaf._parent
                while node is not None:
                    node._stop_requested = True
                    node = node._parent
                leaf._apply(Event.STOP)
                if was is JobState.NOT_STARTED:  # it waits no more (a slot, a dependency, a delay)
                    leaf.status_message = job.status_message = ""
                backend, port = _backend_of(session, leaf)
                # A queued job is Stopped at once; a backend whose queue lives elsewhere (a
                # cluster's scheduler) still has to hear of it, so the work never starts.
                if port is not None and backend is not None \
                        and (was is not JobState.NOT_STARTED or backend.stops_unstarted):
                    to_signal.append((backend, port))
            for node in [job, *job._leaves()]:
                if node._children:
                    node._rederive(time.time())
    for backend, port in to_signal:
        backend.stop(port, grace)
    # Each backend ends its work within the grace period (a process is killed then, and gets its
    # backend's stop_slack to be reaped); only a thread stuck where Python cannot interrupt it may
    # outlast it, and we say so at the end of the grace period (API.md 5, docs/guide.md).
    deadline = time.monotonic() + grace + max((b.stop_slack for b, _ in to_signal), default=0.0)
    with session._cond:
        while True:
            pending = [j for j in selected if not j._state.is_finished]
            if not pending:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            asleep = time.monotonic()
            session._cond.wait(min(remaining, 0.1))
            deadline += _stalled(time.monotonic() - asleep - min(remaining, 0.1))
            for backend, port in to_signal:
                if not port.finished:
                    backend.nudge(port)  # a stop raised in a thread can be lost (ThreadBackend.nudge)
        why: dict[int, str] = {}
        for job in pending:
            for leaf in job._leaves():
                if not leaf._state.is_finished:
                    backend, _ = _backend_of(session, leaf)
                    why.setdefault(job.id, STUCK_STOP if backend is None else backend.stuck_stop)
                    if not leaf.status_message:
                        leaf.status_message = f"stop requested {grace:g}s ago; {why[job.id]}"
            if job._children and not job.status_message:  # the job the user named says it too
                job.status_message = f"stop requested {grace:g}s ago; {why.get(job.id, STUCK_STOP)}"
    for job in pending:
        if removing:
            warnings.warn(f"remove_job: {describe_job(job)} did not stop within {grace:g}s: "
                          f"{why.get(job.id, STUCK_STOP)}. It is removed now; what it writes from now on "
                          f"is dropped", StopTimeoutWarning, stacklevel=4)
            continue
        warnings.warn(f"stop_job: {describe_job(job)} did not stop within {grace:g}s: "
                      f"{why.get(job.id, STUCK_STOP)}. See job.status_message; remove it later with "
                      f"remove_job({job.id}, force=True)", StopTimeoutWarning, stacklevel=4)
