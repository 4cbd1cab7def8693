"""A wait for one process job looks at it for a moment before it sleeps (wait_job, job.result()).

::

    waiter --start_job--> worker runs the job --DONE--> session's I/O thread --state, notify--> waiter
    (spin: the waiter looks at the state, GIL let go between looks, for up to SPIN_S; then it sleeps)
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._job import Job


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the CPUs this process may run on
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# How long a wait for one job looks at it before it sleeps. Its end comes through two other
# threads (worker, then the session's I/O thread), and a thread that sleeps leaves its CPU idle:
# on the virtual machine measured (Firecracker, no cpuidle driver), waking an idle CPU took
# ~0.13 ms (perf sched: 128-131 us from the waking to the run), a quarter of a process job's
# start -> result (bench/FINDINGS.md, sixteenth session). A waiter that looks for 0.3 ms keeps
# its CPU awake for the end of a short job; a longer job costs it 0.3 ms of CPU once.
# Not with one CPU: the looking would only delay the threads it waits for. Only for a process
# job: a thread job's end comes from a thread of this process, which the looking slowed (thread
# job start -> result 85-92 us against 71-83, load 0.5-0.9); an SSH or Dask job takes longer.
SPIN_S = 0.0003 if _cpus() > 1 else 0.0


def _kind(job: Job) -> str | None:
    """The job's kind, or its only child's (a start_job's job is a parent with one leaf)."""
    children = job._children
    return job._kind if not children or len(children) != 1 else children[0]._kind


def spin(job: Job, finished: bool = False, limit: float | None = None) -> None:
    """Look at ``job`` for up to SPIN_S (or ``limit`` seconds, if less), letting go of the GIL
    between looks, until it is done (persistent; or finished, with ``finished``). Without the
    session lock: a state is read whole, and the caller looks again under the lock."""
    wait = SPIN_S if limit is None else min(SPIN_S, limit)
    if wait <= 0 or _kind(job) != "process":
        return
    end = time.perf_counter() + wait
    while not (job._state.is_finished if finished else job._state.is_persistent):
        if time.perf_counter() >= end:
            return
        time.sleep(0)  # lets the I/O thread, which reports the end, take the GIL
