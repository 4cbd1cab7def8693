"""Queues for every job kind (issue 15): groups with a parallel limit, pause/resume, after=, delay=,
retries=, restart_job, and wildcards that never match child jobs. Real processes and threads;
concurrency is counted from inside the jobs (marker files), never inferred from timing."""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from datetime import datetime, timedelta
from pathlib import Path

import pytest

import psjobs
from psjobs import JobState

from .conftest import wait_until

# Each run leaves a file named after its shell's pid while it runs, and prints how many such files
# it saw (itself included): the most jobs of the group it ever saw running at once.
_COUNT = 'touch "$1/$$"; ls "$1" | wc -l; sleep 0.3; rm "$1/$$"'


@pytest.mark.parametrize("kind", ["process", "thread"])
def test_group_of_parallel_2_never_runs_3(session: psjobs.Session, tmp_path: Path, kind: str) -> None:
    session.configure_group("build", parallel=2)
    start = session.start_job if kind == "process" else session.start_thread_job
    jobs = [start(_COUNT, str(tmp_path), group="build") for _ in range(6)]
    waiting = [j for j in jobs if j.state is JobState.NOT_STARTED and "slot in group 'build'" in j.status_message]
    assert waiting, [(j.state, j.status_message) for j in jobs]
    assert session.wait_job(jobs, timeout=30)
    seen = [int(line) for j in jobs for line in j.output]
    assert all(j.state is JobState.COMPLETED for j in jobs)
    assert len(seen) == 6 and max(seen) <= 2, seen
    assert [g["name"] for g in session.get_group()] == ["build"]


def test_a_waiting_job_is_not_started_and_says_why(session: psjobs.Session) -> None:
    session.configure_group("one", parallel=1)
    gate = threading.Event()
    first = session.start_thread_job(gate.wait, 20, group="one")
    second = session.start_job("echo second", group="one")
    wait_until(lambda: first.state is JobState.RUNNING, what="the first job to run")
    assert second.state is JobState.NOT_STARTED
    assert second.child_jobs[0].state is JobState.NOT_STARTED
    assert second.status_message == "waiting for a slot in group 'one' (parallel=1)"
    assert session.get_group("one") == [{"name": "one", "parallel": 1, "paused": False, "running": 1,
                                         "waiting": 1}]
    gate.set()
    assert session.wait_job(second, timeout=20)
    assert second.state is JobState.COMPLETED and second.output == ["second"]
    assert second.status_message == ""


def test_a_thread_job_held_by_the_thread_throttle_says_so(session: psjobs.Session) -> None:
    session.configure_group("roomy", parallel=5)
    gate = threading.Event()
    why = "waiting for a thread slot (thread_throttle_limit=1)"
    try:
        first = session.start_thread_job(gate.wait, 20, throttle_limit=1)
        queued = session.start_thread_job(lambda: "queued")
        grouped = session.start_thread_job(lambda: "grouped", group="roomy")  # its group has room
        assert queued.state is JobState.NOT_STARTED and queued.status_message == why
        wait_until(lambda: grouped.status_message == why, 10, "the grouped job to wait for a thread slot")
        assert grouped.state is JobState.NOT_STARTED and first.status_message == ""
    finally:
        gate.set()
    assert session.wait_job([first, queued, grouped], timeout=20)
    assert queued.output == ["queued"] and grouped.output == ["grouped"]
    assert [first.status_message, queued.status_message, grouped.status_message] == ["", "", ""]


def test_raising_the_limit_starts_waiting_jobs(session: psjobs.Session) -> None:
    session.configure_group("g", parallel=1)
    gate = threading.Event()
    try:
        first = session.start_thread_job(gate.wait, 20, group="g")
        second = session.start_thread_job(lambda: "ran", group="g")
        wait_until(lambda: first.state is JobState.RUNNING, what="the first job to run")
        assert second.state is JobState.NOT_STARTED
        session.configure_group("g", parallel=2)
        assert session.wait_job(second, timeout=10) and second.output == ["ran"]
        assert first.state is JobState.RUNNING
    finally:
        gate.set()


def test_pause_and_resume_a_group(session: psjobs.Session) -> None:
    session.configure_group("nightly", parallel=3)
    session.pause_group("nightly")
    job = session.start_job("echo resumed", group="nightly")
    assert job.state is JobState.NOT_STARTED
    assert "group 'nightly' is paused" in job.status_message
    assert session.wait_job(job, timeout=0.3) == []  # it stays waiting while the group is paused
    assert job.state is JobState.NOT_STARTED
    assert session.get_group("nightly")[0]["paused"] is True
    session.resume_group("nightly")
    assert session.wait_job(job, timeout=20)
    assert job.output == ["resumed"]


def test_stopping_a_waiting_job_never_runs_it(session: psjobs.Session, tmp_path: Path) -> None:
    session.configure_group("p", parallel=1)
    session.pause_group("p")
    marker = tmp_path / "ran"
    job = session.start_job(f"touch {marker}", group="p")
    delayed = session.start_thread_job(marker.touch, delay=30)
    assert "is paused" in job.status_message and delayed.status_message.endswith("(delay)")
    session.stop_job([job, delayed])
    assert job.state is JobState.STOPPED and delayed.state is JobState.STOPPED
    # what it waited for is over: no "waiting: group 'p' is paused" on a Stopped job
    assert [job.status_message, job.child_jobs[0].status_message, delayed.status_message] == ["", "", ""]
    session.resume_group("p")
    after = session.start_job("echo next", group="p")  # the group goes on past the stopped one
    assert session.wait_job(after, timeout=20)
    assert not marker.exists()


def test_a_failed_dependency_fails_its_dependents_without_running_them(session: psjobs.Session,
                                                                       tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    gate = threading.Event()
    first = session.start_thread_job(lambda: gate.wait(20) and 1 / 0)
    second = session.start_job(f"touch {marker}", after=[first])
    third = session.start_thread_job(marker.touch, after=second)  # a chain: fails too
    wait_until(lambda: first.state is JobState.RUNNING, what="the dependency to run")
    assert second.state is JobState.NOT_STARTED
    # The scheduler's thread rewrites the message when it wakes on the dependency's change, a moment
    # after it: "(NotStarted)" may still be there when first has just started.
    wait_until(lambda: second.status_message
               == f"waiting for Job {first.id} {first.name!r} (Running) to complete",
               what="the dependent's message to name the dependency Running")
    gate.set()
    assert session.wait_job([first, second, third], timeout=20)
    assert first.state is JobState.FAILED
    assert second.state is JobState.FAILED and third.state is JobState.FAILED
    assert f"runs after Job {first.id}" in str(second.reason)
    assert f"restart_job({second.id})" in str(second.reason)
    assert f"runs after Job {second.id}" in str(third.reason)
    # it waits no more: no "waiting for Job N 'JobN' (Running) to complete" on a Failed job
    assert [second.status_message, second.child_jobs[0].status_message, third.status_message] == ["", "", ""]
    assert not marker.exists()
    assert second.attempts == 0


def test_a_dependents_message_names_its_dependency_running_once_the_scheduler_started_it(
        session: psjobs.Session) -> None:
    # The scheduler's own thread starts the delayed job, then looks at the held ones before that job
    # reports itself running: the dependent said "(NotStarted)" until the scheduler's next wake-up,
    # up to a minute later (a CI run caught it), since a job's start woke no one.
    gate = threading.Event()
    first = session.start_thread_job(gate.wait, 20, delay=0.2)
    second = session.start_thread_job(lambda: None, after=first)
    try:
        wait_until(lambda: first.state is JobState.RUNNING, what="the delayed job to run")
        wait_until(lambda: second.status_message
                   == f"waiting for Job {first.id} {first.name!r} (Running) to complete", 5,
                   f"the dependent's message to name the dependency Running, not {second.status_message!r}")
    finally:
        gate.set()
    assert session.wait_job([first, second], timeout=20) == [first, second]


def test_a_stopped_dependency_fails_its_dependent(session: psjobs.Session) -> None:
    first = session.start_job("sleep 30")
    second = session.start_job("echo never", after=first)
    session.stop_job(first)
    assert session.wait_job(second, timeout=20)
    assert second.state is JobState.FAILED and "did not complete" in str(second.reason)


def test_after_runs_once_every_dependency_completed(session: psjobs.Session) -> None:
    a = session.start_job("sleep 0.2; echo a")
    b = session.start_thread_job(lambda: "b")
    c = session.start_job("echo c", after=[a, b.id])
    assert session.wait_job(c, timeout=20)
    assert c.state is JobState.COMPLETED
    assert a.end_time is not None and c.begin_time is not None and c.begin_time >= a.end_time


def test_retries_run_a_failing_call_again_and_keep_every_run(session: psjobs.Session) -> None:
    runs: list[int] = []

    def flaky() -> str:
        runs.append(1)
        psjobs.write_output(f"run {len(runs)}")
        if len(runs) < 3:
            raise RuntimeError(f"flaky {len(runs)}")
        return "ok"

    job = session.start_thread_job(flaky, retries=5)
    assert session.wait_job(job, timeout=20)
    assert job.state is JobState.COMPLETED
    assert job.attempts == 3
    assert job.output == ["run 1", "run 2", "run 3", "ok"]
    assert [str(w) for w in job.warning] == [
        "attempt 1 of 6 failed (RuntimeError: flaky 1); running it again",
        "attempt 2 of 6 failed (RuntimeError: flaky 2); running it again"]


@pytest.mark.parametrize("given", ["a one-pass iterator", "a list"])
def test_a_retried_thread_job_reads_all_its_input_again(session: psjobs.Session, given: str) -> None:
    runs: list[list[int]] = []

    def reader() -> list[int]:
        got = list(psjobs.job_input())
        runs.append(got)
        if len(runs) == 1:
            raise ValueError("first run fails")
        return got

    items = iter([1, 2, 3]) if given == "a one-pass iterator" else [1, 2, 3]
    job = session.start_thread_job(reader, input=items, retries=1)
    assert session.wait_job(job, timeout=20)
    assert job.state is JobState.COMPLETED and job.attempts == 2
    assert job.output == [[1, 2, 3]] and runs == [[1, 2, 3], [1, 2, 3]]  # the retry did not read []
    again = session.restart_job(job)  # it kept the list: a restart reads it all too
    assert session.wait_job(again, timeout=20) and again.output == [[1, 2, 3]]


def test_retries_of_a_command_end_failed_with_every_run_kept(session: psjobs.Session) -> None:
    job = session.start_job('echo "try"; exit 3', retries=2)
    assert session.wait_job(job, timeout=20)
    assert job.state is JobState.FAILED and job.exit_code == 3
    assert job.attempts == 3 and job.child_jobs[0].attempts == 3
    assert job.output == ["try", "try", "try"]
    assert len(job.warning) == 2


def test_a_stop_is_never_retried(session: psjobs.Session) -> None:
    job = session.start_job("sleep 30", retries=3)
    wait_until(lambda: job.child_jobs[0].state is JobState.RUNNING, what="the job to run")
    session.stop_job(job)
    assert job.state is JobState.STOPPED and job.attempts == 1


def test_delay_in_seconds_and_as_a_datetime(session: psjobs.Session) -> None:
    t0 = time.time()
    job = session.start_job("echo late", delay=0.5)
    assert job.state is JobState.NOT_STARTED and job.status_message.endswith("(delay)")
    at = session.start_thread_job(lambda: "at", delay=datetime.now() + timedelta(seconds=0.3))
    assert session.wait_job([job, at], timeout=20)
    assert job.output == ["late"] and at.output == ["at"]
    assert job.begin_time is not None and job.begin_time.timestamp() >= t0 + 0.5
    assert at.begin_time is not None and at.begin_time.timestamp() >= t0 + 0.3


def test_restart_makes_a_new_job_with_the_same_target_and_options(session: psjobs.Session) -> None:
    session.configure_group("r", parallel=1)
    first = session.start_job("echo $1", "again", name="echoer", group="r")
    assert session.wait_job(first, timeout=20)
    again = psjobs.Session.restart_job(session, first)
    assert again.id > first.id and again.name == "echoer"
    assert session.wait_job(again, timeout=20)
    assert again.output == ["again"] and first.output == ["again"]
    running = session.start_job("sleep 30")
    with pytest.raises(psjobs.JobNotFinishedError, match=f"stop_job\\({running.id}\\)"):
        session.restart_job(running)
    with pytest.raises(psjobs.JobStateError, match="is a child job"):
        session.restart_job(first.child_jobs[0])


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_restart_of_an_executor_job_says_why_it_cannot(session: psjobs.Session, kind: str) -> None:
    with psjobs.Executor(kind, session=session) as ex:
        future = ex.submit(pow, 2, 3)
        assert future.result(timeout=20) == 8
    job = future.job
    with pytest.raises(psjobs.JobStateError, match=f"Job {job.id} .*ran a call for an Executor.*submit") as info:
        session.restart_job(job)
    assert "restored from storage" not in str(info.value)  # it was not: the Executor let go of it


def test_restart_of_a_restored_job_says_its_target_was_not_kept(session: psjobs.Session) -> None:
    from psjobs.core import Job
    from psjobs.core._journal import MemoryJournal

    # as the session host loads its jobs of an earlier run (host/_journal.restore)
    old = Job.restored(session, 41, parent=None, name="old", job_type="BackgroundJob", command="echo old",
                       location="localhost", computer_name=None, state=JobState.COMPLETED, reason=None,
                       exit_code=0, begin=1.0, end=2.0, instance_id=uuid.uuid4(), pid=None,
                       journal=MemoryJournal())
    session.restore_jobs([old])
    with pytest.raises(psjobs.JobStateError, match=r"Job 41 'old' .*restored from storage.*start_job"):
        session.restart_job(41)


def test_scheduling_options_are_checked_before_a_job_exists(session: psjobs.Session) -> None:
    gone = session.start_thread_job(lambda: None)
    session.wait_job(gone)
    session.remove_job(gone)
    bad = [
        ({"group": "nope"}, ValueError, "no group 'nope'.*configure_group"),
        ({"group": 3}, TypeError, "group name must be a str"),
        ({"retries": -1}, ValueError, "retries must be a whole number"),
        ({"retries": True}, ValueError, "retries must be a whole number"),
        ({"delay": math.nan}, ValueError, "delay must be finite"),
        ({"delay": -1}, ValueError, "delay must be finite"),
        ({"delay": "soon"}, ValueError, "delay must be finite"),
        ({"delay": math.inf}, ValueError, "after 9998-12-31.*delay must be finite"),
        ({"delay": 1e12}, ValueError, "after 9998-12-31"),  # the year 33715: raised by the scheduler
        ({"delay": 10**400}, ValueError, "after 9998-12-31"),
        ({"delay": datetime.max}, ValueError, "before the year 9999"),
        ({"after": gone}, ValueError, "not a job of this session"),
        ({"after": 999_999}, psjobs.JobNotFoundError, "999999"),
    ]
    for kwargs, error, match in bad:
        with pytest.raises(error, match=match):
            session.start_job("echo no", **kwargs)
        with pytest.raises(error, match=match):
            session.start_thread_job(lambda: None, **kwargs)
    assert session.get_job() == []
    for name in ["", "has space", "-dash", "x" * 65]:
        with pytest.raises(ValueError, match="group name"):
            session.configure_group(name)
    with pytest.raises(ValueError, match="parallel must be"):
        session.configure_group("ok", parallel=0)
    with pytest.raises(ValueError, match="no group 'missing'"):
        session.pause_group("missing")


def test_after_the_id_or_name_of_a_removed_job_is_not_found(session: psjobs.Session) -> None:
    gone = session.start_thread_job(lambda: None, name="gone")
    session.wait_job(gone, timeout=20)
    session.remove_job(gone)
    says = rf"cannot find a job (with the id {gone.id}|named 'gone'); .*get_job\(\)"
    for after in (gone.id, "gone", [gone.id]):
        with pytest.raises(psjobs.JobNotFoundError, match=says) as info:
            session.start_job("echo no", after=after)
        assert isinstance(info.value, LookupError)  # as every verb says of an id that matches no job
    with pytest.raises(ValueError, match=f"Job {gone.id} 'gone'.*removed"):  # the Job object itself
        session.start_job("echo no", after=gone)
    assert session.get_job() == []


def test_module_verbs_schedule_on_the_default_session(default_session: psjobs.Session) -> None:
    psjobs.configure_group("mod", parallel=1)
    psjobs.pause_group("mod")
    job = psjobs.start_thread_job(lambda: "mod", group="mod", retries=1)
    assert job.state is JobState.NOT_STARTED
    psjobs.resume_group("mod")
    assert psjobs.wait_job(job, timeout=10)
    assert psjobs.get_group("mod")[0]["running"] == 0
    again = psjobs.restart_job(job.id)
    assert psjobs.wait_job(again, timeout=10) and again.output == ["mod"]


def test_wildcards_never_match_child_jobs(session: psjobs.Session) -> None:
    jobs = [session.start_job("echo hi") for _ in range(3)]
    session.wait_job(jobs, timeout=20)
    assert session.get_job(name="*") == jobs
    assert session.get_job(name="Job*") == jobs
    child = jobs[0].child_jobs[0]
    assert session.get_job(name=child.name) == [child]  # an exact name still finds a child
    session.stop_job("*")
    session.remove_job("*")
    assert session.get_job() == []


def test_wildcard_remove_on_the_module_verbs(default_session: psjobs.Session) -> None:
    job = psjobs.start_job("echo x")
    psjobs.wait_job(job, timeout=20)
    psjobs.remove_job("*")
    assert psjobs.get_job() == []


def _fail_once(flag: str) -> str:
    import os

    if not os.path.exists(flag):
        open(flag, "w").close()
        raise ValueError("first run")
    return "second run"


def test_retries_of_a_process_call(session: psjobs.Session, tmp_path: Path) -> None:
    job = session.start_job(_fail_once, str(tmp_path / "flag"), retries=1)
    assert session.wait_job(job, timeout=30)
    assert job.state is JobState.COMPLETED and job.attempts == 2
    assert job.output == ["second run"]
    assert "ValueError: first run" in str(job.warning[0])


def test_resuming_a_group_starts_as_many_as_its_limit_at_once(session: psjobs.Session) -> None:
    session.configure_group("wide", parallel=3)
    session.pause_group("wide")
    gate = threading.Event()
    try:
        jobs = [session.start_thread_job(gate.wait, 20, group="wide") for _ in range(5)]
        session.resume_group("wide")
        wait_until(lambda: sum(j.state is JobState.RUNNING for j in jobs) == 3, 10, "three jobs running")
        assert [j.state for j in jobs[3:]] == [JobState.NOT_STARTED] * 2
        assert session.get_group("wide")[0]["waiting"] == 2
    finally:
        gate.set()
    assert session.wait_job(jobs, timeout=20)


def test_the_scheduler_thread_ends_when_nothing_waits(session: psjobs.Session) -> None:
    def sched_threads() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "psjobs-sched"]

    session.configure_group("idle", parallel=1)
    session.pause_group("idle")
    held = session.start_job("echo never", group="idle", retries=2)
    assert sched_threads()
    session.stop_job(held)
    done = session.start_thread_job(lambda: 1, retries=1, delay=0.05)
    assert session.wait_job(done, timeout=10)
    wait_until(lambda: not sched_threads(), 10, "the psjobs-sched thread to end")


def test_a_far_off_delay_holds_up_no_other_job(session: psjobs.Session) -> None:
    # A wait past threading.TIMEOUT_MAX (~292 years) killed the scheduler's thread: every later
    # delayed, grouped or retried job then stayed NotStarted for good.
    far = [session.start_thread_job(lambda: "far", delay=datetime(2400, 1, 1)),
           session.start_job("echo far", delay=1e10)]
    soon = session.start_thread_job(lambda: "soon", delay=0.1)
    assert session.wait_job(soon, timeout=20) and soon.output == ["soon"]
    assert [j.state for j in far] == [JobState.NOT_STARTED] * 2
    assert far[0].status_message == "waiting until 2400-01-01 00:00:00 (delay)"  # a far day is shown
    session.configure_group("after-far", parallel=1)
    grouped = session.start_job("echo grouped", group="after-far")
    assert session.wait_job(grouped, timeout=20) and grouped.output == ["grouped"]


def test_a_failed_pass_of_the_scheduler_is_logged_and_it_goes_on(session: psjobs.Session,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    from psjobs.core._sched import Scheduler

    scan = Scheduler._scan_locked
    failures = []

    def bug_once(self: Scheduler, now: float) -> object:  # what a bug in psjobs itself looks like
        if not failures:
            failures.append(1)
            raise RuntimeError("a bug in the scheduler")
        return scan(self, now)

    monkeypatch.setattr(Scheduler, "_scan_locked", bug_once)
    with caplog.at_level(logging.ERROR, logger="psjobs"):
        job = session.start_thread_job(lambda: "ran", delay=0.05)
        assert session.wait_job(job, timeout=20) and job.output == ["ran"]
    assert failures
    [record] = [r for r in caplog.records if "psjobs-sched" in r.getMessage()]
    assert record.exc_info is not None and str(record.exc_info[1]) == "a bug in the scheduler"


def test_a_held_job_the_scheduler_cannot_check_fails_alone(session: psjobs.Session,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    from psjobs.core import _sched

    check = _sched._waiting_for

    def bug_for_one(sched: _sched.Scheduler, when: _sched.When, now: float, taken: dict[str, int]) -> str:
        if when.retries == 7:  # the bad job's mark
            raise OverflowError("a bug in the scheduler")
        return check(sched, when, now, taken)

    session.configure_group("g", parallel=1)
    monkeypatch.setattr(_sched, "_waiting_for", bug_for_one)
    with caplog.at_level(logging.ERROR, logger="psjobs"):
        bad = session.start_job("echo never", group="g", retries=7)
        good = session.start_thread_job(lambda: "ran", group="g")
        assert session.wait_job([bad, good], timeout=20)
    assert good.output == ["ran"]
    assert bad.state is JobState.FAILED and bad.attempts == 0 and bad.output == []
    assert f"restart_job({bad.id})" in str(bad.reason) and "OverflowError" in str(bad.reason)
    assert any("could not check" in r.getMessage() for r in caplog.records)


def test_a_finish_callback_that_exits_does_not_end_the_scheduler(session: psjobs.Session,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    import sys

    first = session.start_thread_job(lambda: 1)
    with caplog.at_level(logging.ERROR, logger="psjobs"):
        session.on_finished(first, lambda job: sys.exit(3))  # a PSJOBS_CALLBACK may call sys.exit
        wait_until(lambda: any("finish callback" in r.getMessage() for r in caplog.records), 20,
                   "the callback's exit to be logged")
    later = session.start_thread_job(lambda: "later", delay=0.05)
    assert session.wait_job(later, timeout=20) and later.output == ["later"]
