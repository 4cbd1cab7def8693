"""A wait for one process job looks at it for up to 0.3 ms before it sleeps (core/_spin): never
longer, never past the wait's timeout, and a job that ends while it looks is seen at once."""

from __future__ import annotations

import time

import pytest

import psjobs
from psjobs.core import _spin

pytestmark = pytest.mark.timeout(60)


def test_waiting_for_a_long_process_job_does_not_keep_the_cpu(session: psjobs.Session) -> None:
    # The waiting thread's own CPU time: 0.3 ms of looking, then asleep until the end. A wait
    # that kept looking would cost ~the job's 0.5 s; 50 ms leaves room for a loaded machine.
    for wait in ("wait_job", "result"):
        job = session.start_job(time.sleep, 0.5)
        used = time.thread_time()
        if wait == "wait_job":
            assert session.wait_job(job, timeout=30) == [job]
        else:
            assert job.result(timeout=30) is None
        used = time.thread_time() - used
        assert job.state is psjobs.JobState.COMPLETED
        assert used < 0.05, f"{wait} used {used * 1000:.1f} ms of CPU for a job that slept 0.5 s"


def test_a_wait_with_no_time_left_does_not_look(session: psjobs.Session) -> None:
    job = session.start_job(time.sleep, 5)
    try:
        assert session.wait_job(job, timeout=0) == []
        assert job.state is psjobs.JobState.RUNNING or job.state is psjobs.JobState.NOT_STARTED
    finally:
        session.stop_job(job)


def test_a_short_job_is_seen_done_by_the_looking_wait(session: psjobs.Session) -> None:
    # Short jobs end while the waiter looks (a process job's start -> result is ~0.6 ms here):
    # what the wait returns is the finished job, with its output, every time.
    for n in range(20):
        job = session.start_job(abs, -n)
        assert session.wait_job(job, timeout=30) == [job]
        assert job.state is psjobs.JobState.COMPLETED
        assert job.receive() == [n]


def test_only_process_jobs_look_and_only_with_two_cpus(session: psjobs.Session) -> None:
    # A thread job's end comes from this process (looking slowed it), an SSH or Dask job's takes
    # milliseconds; with one CPU the looking would hold up the very threads it waits for.
    assert (_spin.SPIN_S > 0) == (_spin._cpus() > 1)
    assert _spin.SPIN_S in (0.0, 0.0003)  # the 0.3 ms the guide states
    jobs = [session.start_job(abs, -1), session.start_thread_job(abs, -1), session.start_job(["true"])]
    assert [_spin._kind(job) for job in jobs] == ["process", "thread", "process"]  # a command is a process job
    session.wait_job(jobs, timeout=30)
