"""Stopping code that runs in a thread: a flag, then JobStopped raised in that thread.

::

    session (stop_job) or Dask (stop_tasks) --request()--> flag set; if the thread is in the job's
        code: JobStopped raised there at its next bytecode (_compat.set_async_exc)
    the job's thread: enter() before the job's code, leave() after (takes back a pending stop, so
        it never lands in psjobs' or Dask's own code)
    a stop raised inside a GC callback or __del__ is dropped by Python: the unraisable hook marks
        it lost; the job's next write raises it (take_lost) and nudge() raises it again at once;
        nudge() also raises again one lost some other way, NUDGE_AFTER after the last raise

Used by thread jobs and Dask tasks: one copy, with the better of what each had (the thread
job's re-raise of a lost stop and its nudge; the Dask task's idempotent request and its thread
id taken under the lock). A thread inside ``time.sleep`` or a C call cannot be interrupted this
way: the stop lands when it returns to Python.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

from .._compat import current_exception, set_async_exc, take_back_async_exc
from .._errors import JobStopped

NUDGE_AFTER = 0.25  # seconds after a stop before it may be raised again (see nudge)


class ThreadStopper:
    """The stop state of one job running in one thread; thread-safe."""

    __slots__ = ("in_user", "injected", "injected_at", "lock", "lost", "stop", "thread_id")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.stop = False          # asked to stop (what stop_requested() says)
        self.in_user = False       # the thread runs the job's own code: a stop may be raised there
        self.injected = False      # a JobStopped is pending or was raised and not taken back
        self.injected_at = 0.0
        self.lost = False          # Python dropped the stop raised (see _unraisable): raise it again
        self.thread_id: int | None = None

    def enter(self) -> None:
        """The job's code starts in this thread; raises JobStopped if a stop came first."""
        with self.lock:
            self.thread_id = threading.get_ident()
            self.in_user = True
        if self.stop:
            raise JobStopped()

    def leave(self) -> None:
        """The job's code is over (idempotent; in the job's thread, as run_guarded calls it): a
        stop raised at its very end is taken back."""
        with self.lock:
            self.in_user = False
            # _stopping holds this thread only while a stop is injected (see inject)
            if self.injected and self.thread_id is not None:
                _stopping.pop(self.thread_id, None)
                take_back_async_exc()
                self.injected = False

    def stopping(self) -> bool:
        return self.stop

    def request(self) -> bool:
        """Set the flag and raise JobStopped in the job's code; True the first time only."""
        with self.lock:
            first = not self.stop
            self.stop = True
            if self.in_user and not self.injected and self.thread_id is not None:
                self.inject()
        return first

    def nudge(self) -> None:
        """Raise a stop again if the first one was lost, which Python allows: raised while the
        thread ran a garbage collector callback or a ``__del__``, it is printed and ignored
        (seen: in WeakSet's callback). Not while the thread handles it (cleaning up in a
        ``finally``, even in a nested exception), and not sooner than NUDGE_AFTER after the last."""
        if not self.stop or self.thread_id is None:
            return
        # One Python said it dropped is raised again at once; one lost unseen, after NUDGE_AFTER
        # (before that it may still be pending: raised twice, the second would cut its handler).
        if (not self.lost and time.monotonic() - self.injected_at < NUDGE_AFTER) or handling_stop(self.thread_id):
            return
        with self.lock:
            if self.in_user:
                self.lost = False
                self.inject()

    def take_lost(self) -> bool:
        """True (once) if Python dropped the stop raised and the job's code runs: the caller, a
        write of the job's, raises JobStopped itself, where it cannot be dropped."""
        if not self.lost:
            return False
        with self.lock:
            if not self.lost or not self.in_user:
                return False
            self.lost = False
            return True

    def shield(self) -> bool:
        """No stop raised from now until unshield() (a process being started must be noted
        first); returns what unshield needs."""
        with self.lock:
            shielded = self.in_user
            self.in_user = False
        return shielded

    def unshield(self, shielded: bool) -> bool:
        """Undo shield(); True if a stop is pending, which the caller acts on."""
        with self.lock:
            self.in_user = shielded
            return self.stop

    def inject(self) -> None:
        # With self.lock held, in user code.
        assert self.thread_id is not None
        set_async_exc(self.thread_id, JobStopped)
        self.injected = True
        self.injected_at = time.monotonic()
        _stopping[self.thread_id] = self
        if sys.unraisablehook is not _unraisable:  # (again, if someone replaced it since)
            global _previous_hook
            _previous_hook = sys.unraisablehook
            sys.unraisablehook = _unraisable


_stopping: dict[int, ThreadStopper] = {}  # thread id -> the job a stop was raised in
_previous_hook = sys.unraisablehook


def _unraisable(unraisable: Any) -> None:
    """A stop raised while the thread ran a garbage collector callback or a ``__del__`` is
    dropped by Python, which calls this hook: mark it lost (it is not an error to report).

    Not raised again from here: it would land in this hook, at its next instruction, and be
    dropped too (seen in a full run of the suite: hypothesis leaves a GC callback installed, a
    stop landed there, the hook's raise was lost, and the job ran on until nudge raised it again a
    quarter of a second later). No lock either: this runs inside a collection, which may have
    started while this thread held the stopper's lock.
    """
    if isinstance(unraisable.exc_value, JobStopped):
        stopper = _stopping.get(threading.get_ident())
        if stopper is not None:
            stopper.lost = True
            return
    _previous_hook(unraisable)


def handling_stop(thread_id: int) -> bool:
    """Whether that thread is handling a JobStopped, or an exception raised while it did."""
    exc = current_exception(thread_id)
    while exc is not None:
        if isinstance(exc, JobStopped):
            return True
        exc = exc.__context__
    return False
