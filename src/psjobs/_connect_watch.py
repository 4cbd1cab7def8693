"""The watcher of a connected session: it asks the host about the jobs someone waits on, so that
their futures, callbacks and ``await`` see them change, as an in-process session's backend would
report it.

::

    result(), as_future, await job, as_completed, a callback (core/_future)
        --> Job._watched() on an unfinished HostJob --> Watcher.watch(job)
    psjobs-connect-watch thread (one per HostSession, while something is watched):
        WaitRequest(the watched ids, any=True, timeout=ROUND) --> the host's wait_job
        --> HostSession._adopt(views): a changed mirror fires its Watch (state and done callbacks)
            and notifies the session's condition (result() wakes), as Job._set_state does

A HostJob's state changes only when it is asked for (HostJob._now): nobody asks while a thread waits
on the session's condition or a callback waits for a state change. The thread ends when no
unfinished job is watched (no waiter in result(), no callback left), or once the session is closed;
the next watch starts another.

``Watcher.lock`` guards the watched jobs and the thread; the session lock is taken under it,
briefly, and it is never taken under the session lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._connect import HostJob

#: seconds one wait in the host lasts at most: how soon a new watch or a close() is noticed (a new
#: watch wakes an idle round at once), and how often a job's changes short of its end are asked for
ROUND = 1.0


class Watcher:
    """Who is watched in one HostSession, and the thread that asks the host about them: ``cond`` is
    the session's condition, ``ask(jobs, timeout)`` a round (HostSession.watch_round: True if a
    state changed)."""

    def __init__(self, cond: threading.Condition, ask: Callable[[list[HostJob], float], bool]) -> None:
        self.cond = cond
        self.ask = ask
        self.lock = threading.Lock()
        self.jobs: dict[int, HostJob] = {}
        self.waiters: dict[int, int] = {}  # threads in result() (core/_future._wait_finished), by job id
        self.thread: threading.Thread | None = None
        self.closed = False
        self.wake = threading.Event()  # a new watch, or close(): an idle round ends at once

    def watch(self, job: HostJob, waiters: int = 0) -> None:
        """Ask the host about ``job`` until it is finished or nothing waits on it; ``waiters``: +1 a
        thread begins to wait in result(), -1 it is done (called outside the session lock)."""
        with self.lock:
            if waiters:
                count = self.waiters.get(job.id, 0) + waiters
                if count > 0:
                    self.waiters[job.id] = count
                else:
                    self.waiters.pop(job.id, None)
            if waiters < 0 or self.closed:
                return
            if self.jobs.get(job.id) is not job:
                self.jobs[job.id] = job
                self.wake.set()
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="psjobs-connect-watch", daemon=True)
                self.thread.start()

    def close(self, timeout: float) -> None:
        """End the thread (the session is closed): it returns within a round; wait up to ``timeout``."""
        with self.lock:
            self.closed = True
            thread = self.thread
        self.wake.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _wanted(self) -> list[HostJob]:
        """The watched jobs still worth asking about; the thread is let go when there are none."""
        with self.lock:
            with self.cond:
                wanted = [job for job in self.jobs.values() if job.followed(job.id in self.waiters)]
            self.jobs = {job.id: job for job in wanted}
            if not wanted or self.closed:
                self.thread = None
                return []
            self.wake.clear()  # a watch from now on wakes the idle wait below
            return wanted

    def _run(self) -> None:
        try:
            while True:
                wanted = self._wanted()
                if not wanted:
                    return
                began = time.monotonic()
                try:
                    asked = self.ask(wanted, ROUND)
                except Exception:  # a bug must not leave every waiter of the session waiting for ever
                    logging.getLogger("psjobs").exception("psjobs: a round of psjobs-connect-watch failed; it goes on")
                    asked = False
                if not asked:  # e.g. a Suspended job: the host's wait returns at once
                    self.wake.wait(max(0.0, ROUND - (time.monotonic() - began)))
        finally:
            with self.lock:
                if self.thread is threading.current_thread():
                    self.thread = None  # ended by anything else: the next watch starts another
