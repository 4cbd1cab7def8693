"""PowerShell's edge cases (powershell-jobs.md section 10) as they apply to thread and process jobs.

Covered here or in test_verbs.py:
  1, 2  receive twice / keep then receive: test_verbs.test_keep_reads_without_moving_the_cursor,
        test_failed_job_reason_every_receive (a failed job re-reports its reason every time)
  3     stream lists keep everything after receive: test_keep_... (psjobs keeps them for thread
        jobs too: the contract says receiving never empties them)
  4     has_more_data of a running job with no output: test_has_more_data_while_running (True for
        both kinds, as the contract says; PowerShell's thread jobs say False)
  5, 6  throw fails, write_error does not: test_verbs.test_failed_job_reason_every_receive,
        test_streams_in_production_order
  8     wait timeout returns nothing: test_verbs.test_wait_timeout_returns_nothing_and_job_goes_on
  9     wait timeout=0: test_wait_timeout_zero (psjobs returns the jobs that are done; PowerShell's
        timer wins the race and returns nothing even then, which helps nobody)
  10    wait any: first done in input order: test_verbs.test_wait_any_returns_first_done_in_input_order
  11    stop a finished job: test_verbs.test_stop_ends_work_and_keeps_data
  12    remove running without/with force: test_verbs.test_remove_needs_finished_or_force
  14    remove a child refused, other verbs on a child work: test_verbs.test_remove_child_raises
  15    input: one job gets all items: test_verbs.test_input_feeds_the_job
  17    ids jump by two for process jobs: test_verbs.test_process_job_is_parent_with_one_child
  18    newest sorted by id: test_newest_is_sorted_by_id
  19    no_recurse on a process job returns nothing: test_verbs.test_no_recurse_on_parent_returns_nothing
  20    throttle applies to queued jobs, per session: test_throttle_*
  21    stopping a queued thread job leaves it Stopped (PowerShell later turns it Failed):
        test_stop_queued_thread_job
  22    a non-zero exit fails the job and keeps the status: test_verbs.test_sys_exit,
        test_command_jobs (PowerShell completes it and drops the status)
  28    where output came from: test_verbs.test_streams_in_production_order (records=True)
  29    working directory is the caller's at start: test_verbs.test_working_directory_defaults_...
  30    a failure never raises from receive by default: test_failed_job_reason_every_receive
  31    a failed child and a stop: the parent is Failed: test_state.test_parent_precedence
  33    an init that fails fails the job: test_verbs.test_init_runs_first_and_its_failure_fails_the_job

Left out, and why:
  7     Read-Host / Blocked: covered with the Blocked state's own tests (test_blocked.py)
  13    remove_job has no state= selector (select with get_job(state=...) and pass force=True)
  16, 24, 25, 26, 27  pipeline parameter binding, script files, Select -First, StreamingHost:
        no equivalent in Python's call model
  23    the & operator: the IPython extension's tests
  32    PSTaskJob: the Dask fan-out's tests
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import psjobs
from psjobs import JobState

from .conftest import wait_until


def test_has_more_data_while_running(session: psjobs.Session) -> None:
    gate = threading.Event()
    t = session.start_thread_job(gate.wait, 30)
    p = session.start_job("sleep 30")
    assert t.has_more_data and p.has_more_data
    gate.set()
    t.wait(10)
    session.stop_job(p)


def test_wait_timeout_zero(session: psjobs.Session) -> None:
    done = session.start_thread_job(lambda: 1)
    done.wait(10)
    running = session.start_job("sleep 30")
    assert session.wait_job([done], timeout=0) == [done]
    assert session.wait_job([done, running], timeout=0) == []
    assert session.wait_job([done, running], any=True, timeout=0) == [done]
    session.stop_job(running)


def test_newest_is_sorted_by_id(session: psjobs.Session) -> None:
    jobs = [session.start_thread_job(lambda: 1) for _ in range(4)]
    session.wait_job(jobs)
    newest = session.get_job(newest=3)
    assert [j.id for j in newest] == sorted(j.id for j in newest)
    assert len(newest) == 3


def test_throttle_limit_queues_thread_jobs(session: psjobs.Session) -> None:
    gate = threading.Event()
    s = psjobs.Session(thread_throttle_limit=1)
    try:
        first = s.start_thread_job(gate.wait, 30)
        second = s.start_thread_job(lambda: "second")
        wait_until(lambda: first.state is JobState.RUNNING, what="the first job")
        assert second.state is JobState.NOT_STARTED
        assert second.has_more_data
        # Raising the limit applies to jobs already queued, as in PowerShell...
        third = s.start_thread_job(lambda: "third", throttle_limit=2)
        assert s.thread_throttle_limit == 2
        assert second.wait(10) and second.receive() == ["second"]
        assert third.wait(10)
        # ...but only in this session: another session keeps its own limit.
        assert session.thread_throttle_limit == 5
    finally:
        gate.set()
        s.close()


def test_stop_queued_thread_job(session: psjobs.Session) -> None:
    gate = threading.Event()
    s = psjobs.Session(thread_throttle_limit=1)
    try:
        ran = []
        blocker = s.start_thread_job(gate.wait, 30)
        queued = s.start_thread_job(lambda: ran.append(1))
        wait_until(lambda: blocker.state is JobState.RUNNING, what="the blocker")
        s.stop_job(queued)
        assert queued.state is JobState.STOPPED
        gate.set()
        blocker.wait(10)
        time.sleep(0.05)  # give a wrongly dequeued job the chance to run (not synchronisation)
        assert queued.state is JobState.STOPPED and ran == []
    finally:
        gate.set()
        s.close()


def test_a_closed_session_refuses_every_kind_it_has_run() -> None:
    """close() ends the session for every kind, also those whose backend is already loaded: a
    start raises JobStateError and leaves no job behind (it used to fail a command job, raise a
    raw ValueError for a callable, leave a job Running for good, or run a thread job)."""
    s = psjobs.Session()
    assert s.start_job("true").wait(30)
    assert s.start_job(len, "ab").wait(30)
    assert s.start_thread_job(len, "ab").wait(30)
    before = [j.id for j in s.get_job()]
    s.close()
    for start in (lambda: s.start_job("true"), lambda: s.start_job(len, "ab"),
                  lambda: s.start_thread_job(len, "ab"), lambda: s.start_job("true", delay=0.1)):
        with pytest.raises(psjobs.JobStateError, match=r"session is closed; create a new psjobs\.Session"):
            start()
    assert [j.id for j in s.get_job()] == before


def test_a_thread_jobs_callable_gets_its_own_working_directory_keyword(session: psjobs.Session) -> None:
    """A thread shares the process's directory, so start_thread_job has no working_directory of
    its own for a callable (API.md 1): the keyword is the target's, as any other; a command still
    runs in the directory given."""
    def where(working_directory: str) -> str:
        return working_directory

    job = session.start_thread_job(where, working_directory="/usr")
    assert job.wait(30) and job.state is JobState.COMPLETED and job.output == ["/usr"]
    command = session.start_thread_job("pwd", working_directory="/usr")
    assert command.wait(30) and command.output == ["/usr"]


def test_a_process_job_reads_its_input_at_start_and_a_thread_job_as_it_goes(session: psjobs.Session) -> None:
    """docs/guide.md: start_job reads `input` whole before it returns (it travels with the job);
    start_thread_job returns while its producer still waits."""
    read: list[int] = []

    def produce(gate: threading.Event | None) -> Iterator[int]:
        for i in range(3):
            if gate is not None:
                assert gate.wait(30)
            read.append(i)
            yield i

    job = session.start_job("cat", input=produce(None))
    assert read == [0, 1, 2]
    assert job.wait(30) and job.output == ["0", "1", "2"]
    read.clear()
    gate = threading.Event()
    thread_job = session.start_thread_job(lambda: list(psjobs.job_input()), input=produce(gate))
    assert read == [] and not thread_job.wait(0)
    gate.set()
    assert thread_job.wait(30) and thread_job.output == [[0, 1, 2]] and read == [0, 1, 2]


def test_remove_with_force_of_a_job_stuck_in_a_c_call_warns_in_remove_jobs_words() -> None:
    """A thread job stuck where Python cannot interrupt it outlasts the grace period; remove_job
    (force=True) removes it anyway, and its warning says so (not stop_job's "remove it later")."""
    gate = threading.Event()
    with psjobs.Session(stop_grace=0.3) as s:
        job = s.start_thread_job(gate.wait, 60)  # a lock acquire in C: a stop lands when it returns
        wait_until(lambda: job.state is JobState.RUNNING, what="the job to run")
        try:
            with pytest.warns(psjobs.StopTimeoutWarning) as seen:
                s.remove_job(job, force=True)
            text = str(seen[0].message)
            assert text.startswith(f"remove_job: Job {job.id} ") and "It is removed now" in text
            assert "remove it later" not in text and s.get_job() == []
        finally:
            gate.set()
        wait_until(lambda: job.state is JobState.STOPPED, what="the stop to land when the call returned")


def test_a_warning_hook_that_chains_to_psjobs_one_shows_warnings_outside_jobs() -> None:
    """A warnings.showwarning hook set after a thread job ran wraps psjobs' router and calls it
    back (the usual chaining idiom); once the next job installs the router again, a warning
    outside any job is shown once, not a RecursionError."""
    import subprocess
    import sys

    code = """
import warnings, psjobs
psjobs.start_thread_job(lambda: 1).wait(30)
prev = warnings.showwarning
warnings.showwarning = lambda *a: (print("chained hook", flush=True), prev(*a))
psjobs.start_thread_job(lambda: 1).wait(30)
warnings.warn("outside any job")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "chained hook\n" and done.stderr.count("UserWarning: outside any job") == 1


def _wait_for_file(path: str, data: bytes) -> int:
    import os
    import time

    while not os.path.exists(path):
        time.sleep(0.01)
    return len(data)


def test_a_running_process_job_holds_its_pickled_arguments_once(session: psjobs.Session, tmp_path: Path) -> None:
    """The job frame sent to the worker is let go once sent: an empty slice of it kept the whole
    frame (a large argument's pickled copy, on top of the one kept for restart_job) for as long
    as the job ran."""
    import tracemalloc

    gate = str(tmp_path / "go")
    data = b"x" * (40 << 20)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        job = session.start_job(_wait_for_file, gate, data)
        wait_until(lambda: job.state is JobState.RUNNING, what="the job to run")
        wait_until(lambda: tracemalloc.get_traced_memory()[0] - before < 60 << 20, 10,
                   "the sent job frame to be let go (one pickled copy of 40 MB stays, for restart_job)")
    finally:
        tracemalloc.stop()
        open(gate, "w").close()
    assert job.wait(30) and job.output == [40 << 20]
