"""Every verb over both local job kinds, through one parametrized fixture."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import pytest

import psjobs
from psjobs import JobState

from .conftest import wait_until

KINDS = ["thread", "process"]


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def start(session: psjobs.Session, kind: str) -> Callable[..., psjobs.Job]:
    def _start(target: Any, *args: Any, **kwargs: Any) -> psjobs.Job:
        if kind == "thread":
            return session.start_thread_job(target, *args, **kwargs)
        return session.start_job(target, *args, **kwargs)

    return _start


def leaf(job: psjobs.Job) -> psjobs.Job:
    return job.child_jobs[0] if job.child_jobs else job


def add(a: int, b: int) -> int:
    return a + b


def count(n: int, pause: float = 0.0):  # type: ignore[no-untyped-def]
    for i in range(n):
        if pause:
            time.sleep(pause)
        yield i


def gated(path: str, n: int):  # type: ignore[no-untyped-def]
    """Yield n items, then wait until ``path`` exists, then yield n more."""
    yield from range(n)
    while not os.path.exists(path):
        time.sleep(0.005)
    yield from range(n, 2 * n)


def fail(message: str) -> None:
    raise ValueError(message)


def chatty() -> str:
    psjobs.write_output(1)
    print("hello from the job")
    psjobs.write_warning("careful")
    psjobs.write_error("a non-terminating error")
    psjobs.write_verbose("details")
    psjobs.write_debug("more details")
    psjobs.write_information({"key": "value"})
    psjobs.write_progress("copying", "file 1 of 2", 50)
    psjobs.write_output(2)
    return "done"


def sleeper(seconds: float) -> str:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.01)
    return "slept"


def test_start_returns_at_once_and_completes(start: Callable[..., psjobs.Job], kind: str) -> None:
    job = start(add, 2, b=3)
    assert job.job_type == ("ThreadJob" if kind == "thread" else "BackgroundJob")
    assert job.location == "localhost"
    assert job.command == "add"
    assert job.wait(10)
    assert job.state is JobState.COMPLETED
    assert job.receive() == [5]
    assert job.has_more_data is False
    assert job.begin_time is not None and job.end_time is not None
    assert job.begin_time <= job.end_time


def test_process_job_is_parent_with_one_child(session: psjobs.Session) -> None:
    job = session.start_job(add, 1, 1)
    assert job.state is JobState.RUNNING  # the parent is Running from the moment it is returned
    (child,) = job.child_jobs
    assert child.id == job.id + 1
    assert child.parent is job
    assert job.name == f"Job{job.id}" and child.name == f"Job{child.id}"
    job.wait(10)
    assert child.state is JobState.COMPLETED
    assert child.output == [2]
    assert job.output == [2]


def test_ids_grow_across_kinds_and_sessions(session: psjobs.Session) -> None:
    a = session.start_thread_job(add, 1, 1)
    other = psjobs.Session()
    try:
        b = other.start_thread_job(add, 1, 1)
        c = session.start_job(add, 1, 1)
        assert a.id < b.id < c.id < c.child_jobs[0].id
        b.wait(10)
    finally:
        other.close()
    c.wait(10)


def test_generator_items_stream_while_running(start: Callable[..., psjobs.Job], tmp_path: Any) -> None:
    gate = tmp_path / "gate"
    job = start(gated, str(gate), 3)
    got: list[Any] = []
    wait_until(lambda: got.extend(job.receive()) or len(got) >= 3, what="the first three items")
    assert got == [0, 1, 2]
    assert not job.state.is_finished
    assert job.has_more_data
    gate.write_text("go")
    assert job.wait(10)
    assert job.receive() == [3, 4, 5]
    assert job.receive() == []


def test_keep_reads_without_moving_the_cursor(start: Callable[..., psjobs.Job]) -> None:
    job = start(count, 4)
    job.wait(10)
    assert job.receive(keep=True) == [0, 1, 2, 3]
    assert job.receive(keep=True) == [0, 1, 2, 3]
    assert job.has_more_data
    assert job.receive() == [0, 1, 2, 3]
    assert job.receive() == []
    assert not job.has_more_data
    assert job.output == [0, 1, 2, 3]  # receiving never empties the stream lists


def test_streams_in_production_order(start: Callable[..., psjobs.Job], capsys: pytest.CaptureFixture[str]) -> None:
    job = start(chatty)
    job.wait(10)
    times = [t for _, _, _, t in job.session.read_entries(job, keep=True)]
    assert times == sorted(times)
    # records=True says where and when each value came from
    recs = job.receive(keep=True, records=True)
    assert [r.value for r in recs] == [1, 2, "done"]
    assert all(r.job is leaf(job) and isinstance(r.time, datetime) for r in recs)
    out = job.receive()
    assert out == [1, 2, "done"]
    lf = leaf(job)
    assert [str(r) for r in lf.information] == ["hello from the job", "{'key': 'value'}"]
    assert lf.information[1].data == {"key": "value"}
    assert [r.message for r in lf.warning] == ["careful"]
    assert [r.message for r in lf.error] == ["a non-terminating error"]
    assert [r.message for r in lf.verbose] == ["details"]
    assert [r.message for r in lf.debug] == ["more details"]
    (p,) = lf.progress
    assert (p.activity, p.status, p.percent_complete, p.completed) == ("copying", "file 1 of 2", 50, False)
    assert job.state is JobState.COMPLETED  # write_error does not fail a job
    captured = capsys.readouterr()
    assert "hello from the job" in captured.out
    assert "WARNING: careful" in captured.err
    assert "a non-terminating error" in captured.err
    assert "details" not in captured.err  # verbose and debug are shown only when asked for


def test_verbose_session_shows_verbose(kind: str, capsys: pytest.CaptureFixture[str]) -> None:
    with psjobs.Session(verbose=True, debug=True) as s:
        job = s.start_thread_job(chatty) if kind == "thread" else s.start_job(chatty)
        job.wait(10)
        job.receive()
    err = capsys.readouterr().err
    assert "VERBOSE: details" in err and "DEBUG: more details" in err


def test_failed_job_reason_every_receive(start: Callable[..., psjobs.Job], kind: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    job = start(fail, "MyError")
    job.wait(10)
    assert job.state is JobState.FAILED
    reason = leaf(job).job_state_info.reason
    assert isinstance(reason, ValueError) and str(reason) == "MyError"
    if kind == "process":
        assert job.job_state_info.reason is None  # as PowerShell: the parent's own reason is null
        assert "raise ValueError(message)" in str(reason.__cause__)  # the remote traceback
    assert job.has_more_data is False
    for _ in range(2):
        assert job.receive() == []
        assert "MyError" in capsys.readouterr().err


def test_error_action_stop_raises_with_everything(start: Callable[..., psjobs.Job]) -> None:
    def work():  # type: ignore[no-untyped-def]
        yield 1
        raise RuntimeError("boom")

    job = start(work)
    job.wait(10)
    with pytest.raises(psjobs.JobFailedError) as info:
        job.receive(error_action="stop")
    assert info.value.output == [1]
    assert isinstance(info.value.reason, RuntimeError)
    assert f"Job {job.id}" in str(info.value)


def test_receive_wait_with_timeout_returns_partial(start: Callable[..., psjobs.Job], tmp_path: Any) -> None:
    gate = tmp_path / "gate"
    job = start(gated, str(gate), 2)
    wait_until(lambda: len(job.output) == 2, what="the first two items")
    got = job.receive(wait=True, timeout=0.5)  # returns at the timeout with what came, job still running
    assert got == [0, 1]
    assert not job.state.is_finished
    gate.write_text("go")
    assert job.receive(wait=True, timeout=10) == [2, 3]
    assert job.state is JobState.COMPLETED


def test_receive_wait_keep_and_auto_remove(start: Callable[..., psjobs.Job], session: psjobs.Session) -> None:
    job = start(count, 3)
    assert job.receive(wait=True, keep=True) == [0, 1, 2]
    assert job.receive(wait=True, auto_remove=True) == [0, 1, 2]
    with pytest.raises(psjobs.JobNotFoundError):
        session.get_job(job.id)


def test_receive_argument_errors(session: psjobs.Session) -> None:
    job = session.start_thread_job(add, 1, 1)
    with pytest.raises(ValueError, match="auto_remove"):
        session.receive_job(job, auto_remove=True)
    with pytest.raises(ValueError, match="error_action"):
        session.receive_job(job, error_action="explode")
    with pytest.raises(ValueError, match="timeout"):
        session.receive_job(job, wait=True, timeout=-1)
    job.wait(10)


def test_no_recurse_on_parent_returns_nothing(session: psjobs.Session) -> None:
    job = session.start_job(add, 1, 2)
    job.wait(10)
    assert session.receive_job(job, no_recurse=True) == []
    assert session.receive_job(job.child_jobs[0], no_recurse=True) == [3]
    assert session.receive_job(job) == []  # parent and child share one read position


def test_wait_timeout_returns_nothing_and_job_goes_on(start: Callable[..., psjobs.Job],
                                                    session: psjobs.Session) -> None:
    job = start(sleeper, 30)
    t0 = time.monotonic()
    assert session.wait_job(job, timeout=0.2) == []
    assert time.monotonic() - t0 < 5
    assert job.state is JobState.RUNNING
    session.stop_job(job)
    assert job.state is JobState.STOPPED


def test_wait_any_returns_first_done_in_input_order(start: Callable[..., psjobs.Job],
                                                    session: psjobs.Session) -> None:
    slow = start(sleeper, 30)
    quick1 = start(add, 1, 1)
    quick2 = start(add, 2, 2)
    quick2.wait(10)
    quick1.wait(10)
    assert session.wait_job([slow, quick2, quick1], any=True) == [quick2]
    assert session.wait_job([quick1, quick2]) == [quick1, quick2]
    assert session.wait_job([slow, quick1], state="Completed") == [quick1]
    session.stop_job(slow)


def test_stop_ends_work_and_keeps_data(start: Callable[..., psjobs.Job], session: psjobs.Session,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    job = start(count, 10**9, 0.001)
    wait_until(lambda: len(job.receive(keep=True)) > 2, what="some items")
    assert session.stop_job(job) == []
    assert job.state is JobState.STOPPED
    assert leaf(job).state is JobState.STOPPED
    data = job.receive()
    assert data[:3] == [0, 1, 2]
    assert "failed" not in capsys.readouterr().err  # a stopped job has no failure to report
    # stop on a finished job is a no-op; pass_thru returns it
    assert session.stop_job(job, pass_thru=True) == [job]


def test_stop_requested_is_seen_inside(start: Callable[..., psjobs.Job], session: psjobs.Session) -> None:
    def polite():  # type: ignore[no-untyped-def]
        n = 0
        try:
            while True:
                n += 1
                if n % 1000 == 0:
                    psjobs.write_output(n)
        finally:
            psjobs.write_warning(f"cleaned up, stop_requested={psjobs.stop_requested()}")

    job = start(polite)
    wait_until(lambda: job.receive(keep=True), what="the job to produce")
    session.stop_job(job)
    assert job.state is JobState.STOPPED
    assert [r.message for r in leaf(job).warning] == ["cleaned up, stop_requested=True"]


def test_a_thread_job_stopped_while_it_writes_never_hangs_the_session() -> None:
    """The stop lands anywhere in a tight write_output loop, psjobs' own code included (it
    once landed inside Condition.__enter__ after the lock was taken: the session hung; and in the
    thread runner's own epilogue, which killed the worker thread before the job ended). The grace
    period is the default 5 s: the stop is raised at once, and the test is about never hanging."""
    import threading

    def tight() -> None:
        n = 0
        try:
            while True:
                n += 1
                psjobs.write_output(n)
        finally:
            psjobs.write_warning("cleaned up")

    for _ in range(100):
        with psjobs.Session() as s:
            job = s.start_thread_job(tight)
            wait_until(lambda job=job: job.output, what="the first item")  # type: ignore[misc]
            stopper = threading.Thread(target=s.stop_job, args=(job,), daemon=True)
            stopper.start()
            stopper.join(10)
            assert not stopper.is_alive(), "stop_job hung"
            assert job.state is JobState.STOPPED, _where_the_threads_are(job)
            assert [r.message for r in job.warning] == ["cleaned up"]


def _where_the_threads_are(job: psjobs.Job) -> str:
    """What a full-suite failure of the test above needs to be understood (issue 13: its cause is
    not known, and it never failed alone): the job's state and status, and every psjobs thread's stack."""
    import sys
    import threading
    import traceback

    names = {t.ident: t.name for t in threading.enumerate()}
    stacks = [f"--- {names.get(ident, ident)}\n{''.join(traceback.format_stack(frame))}"
              for ident, frame in sys._current_frames().items() if "psjobs" in str(names.get(ident, ""))]
    return f"{job.state} {job.status_message!r}\n" + "\n".join(stacks)


@pytest.mark.timeout(60)
def test_a_stall_of_the_whole_process_does_not_count_against_a_thread_jobs_stop() -> None:
    """A thread job's stop raised just before the process stalls (nothing runs: a full collection
    of a big heap, a C call holding the GIL, a machine too busy) lands as soon as the job runs
    again: stop_job does not count the stall against the grace period, and the job's finally
    block writes as usual (issue 13: it once gave up, warned, and dropped the cleanup's writes)."""
    import ctypes
    import sys
    import threading
    import traceback
    import warnings

    gate = threading.Lock()
    hold = threading.Event()
    arrived = threading.Event()

    def writer() -> None:
        n = 0
        try:
            while True:
                n += 1
                if hold.is_set():
                    arrived.set()
                    with gate:  # held by the test: the job waits here, in C, where no stop lands
                        pass
                psjobs.write_output(n)
        finally:
            psjobs.write_warning("cleaned up")

    def stop_job_waits(stopper: threading.Thread) -> bool:
        frame = sys._current_frames().get(stopper.ident or 0)
        names = [f.name for f in traceback.extract_stack(frame)] if frame is not None else []
        return "stop_jobs" in names and names[-1] == "wait"

    grace = 0.2
    with psjobs.Session(stop_grace=grace) as s, warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        gate.acquire()
        job = s.start_thread_job(writer)
        wait_until(lambda: job.output, what="the first item")
        hold.set()
        assert arrived.wait(10), "the job to reach the gate"  # it waits there now
        stopper = threading.Thread(target=s.stop_job, args=(job,), daemon=True)
        stopper.start()
        wait_until(lambda: stop_job_waits(stopper), what="stop_job to wait for the job")
        gate.release()
        # The whole process stalls for longer than the grace period: libc's usleep called
        # holding the GIL (ctypes.PyDLL), so that no thread runs.
        ctypes.PyDLL(None).usleep(int((grace + 1.0) * 1e6))
        stopper.join(30)
        assert not stopper.is_alive(), "stop_job hung"
        assert job.state is JobState.STOPPED
        assert [r.message for r in job.warning] == ["cleaned up"]
    assert not [w for w in seen if issubclass(w.category, psjobs.StopTimeoutWarning)]


def test_stopped_job_cannot_be_swallowed_by_except_exception(start: Callable[..., psjobs.Job],
                                                            session: psjobs.Session) -> None:
    def stubborn() -> None:
        while True:
            try:
                sum(range(1000))
            except Exception:
                pass

    job = start(stubborn)
    wait_until(lambda: job.state is JobState.RUNNING or leaf(job).state is JobState.RUNNING,
               what="the job to run")
    session.stop_job(job)
    assert job.state is JobState.STOPPED


def test_remove_needs_finished_or_force(start: Callable[..., psjobs.Job], session: psjobs.Session) -> None:
    job = start(sleeper, 30)
    with pytest.raises(psjobs.JobNotFinishedError) as info:
        session.remove_job(job)
    msg = str(info.value)
    assert f"Job {job.id}" in msg and str(job.state) in msg and "force=True" in msg
    assert job in session.get_job()
    session.remove_job(job, force=True)
    assert job.state is JobState.STOPPED
    assert job not in session.get_job()
    with pytest.raises(psjobs.JobNotFoundError):
        session.get_job(job.id)
    with pytest.raises(psjobs.JobNotFoundError, match="removed"):
        session.receive_job(job)


def test_remove_child_raises(session: psjobs.Session) -> None:
    job = session.start_job(add, 1, 1)
    job.wait(10)
    child = job.child_jobs[0]
    with pytest.raises(psjobs.JobStateError, match="child"):
        session.remove_job(child.id)
    # but the other verbs work on a child
    assert session.get_job(child.id) == [child]
    assert session.wait_job(child.id) == [child]
    assert session.receive_job(child.id) == [2]
    session.remove_job(job)


def test_methods_mirror_verbs(start: Callable[..., psjobs.Job]) -> None:
    job = start(count, 2)
    assert job.wait(10) is True
    assert job.receive(keep=True) == [0, 1]
    job.stop()
    job.remove()
    assert job not in job.session.get_job()


def test_input_feeds_the_job(start: Callable[..., psjobs.Job]) -> None:
    def doubler():  # type: ignore[no-untyped-def]
        for item in psjobs.job_input():
            yield item * 2

    job = start(doubler, input=[1, 2, 3])
    job.wait(10)
    assert job.receive() == [2, 4, 6]


def test_init_runs_first_and_its_failure_fails_the_job(start: Callable[..., psjobs.Job]) -> None:
    def init() -> None:
        print("initialising")

    job = start(add, 1, 2, init=init)
    job.wait(10)
    assert job.receive() == [3]
    assert [r.message for r in leaf(job).information] == ["initialising"]

    def bad_init() -> None:
        raise ImportError("no such module")

    job = start(add, 1, 2, init=bad_init)
    job.wait(10)
    assert job.state is JobState.FAILED
    assert isinstance(leaf(job).job_state_info.reason, ImportError)
    assert job.output == []


def test_sys_exit(start: Callable[..., psjobs.Job]) -> None:
    import sys

    ok = start(sys.exit, 0)
    bad = start(sys.exit, 3)
    ok.wait(10)
    bad.wait(10)
    assert ok.state is JobState.COMPLETED
    assert bad.state is JobState.FAILED
    assert leaf(bad).exit_code == 3
    assert "sys.exit(3)" in str(leaf(bad).job_state_info.reason)


@pytest.mark.filterwarnings("default")  # a thread job shares the process's warning filters
def test_warnings_and_logging_go_to_their_streams(start: Callable[..., psjobs.Job]) -> None:
    def noisy() -> None:
        import logging
        import warnings

        warnings.warn("deprecated thing", UserWarning, stacklevel=1)
        logging.getLogger("app").error("logged error")

    job = start(noisy)
    job.wait(10)
    lf = leaf(job)
    assert "deprecated thing" in [r.message for r in lf.warning]
    assert "logged error" in [r.message for r in lf.error]


@pytest.mark.parametrize("target", ["echo one; echo two; echo oops >&2; exit 4", ["sh", "-c", "echo one; exit 4"]])
def test_command_jobs(start: Callable[..., psjobs.Job], target: Any) -> None:
    job = start(target)
    job.wait(10)
    assert job.state is JobState.FAILED
    assert leaf(job).exit_code == 4
    assert job.exit_code == 4
    assert job.receive()[0] == "one"
    assert "status 4" in str(leaf(job).job_state_info.reason)


def test_command_arguments_are_positional_parameters(start: Callable[..., psjobs.Job]) -> None:
    job = start('printf "%s\\n" "$1" "$2"', "a b; rm -rf /", "$HOME")
    job.wait(10)
    assert job.receive() == ["a b; rm -rf /", "$HOME"]
    assert job.state is JobState.COMPLETED and job.exit_code == 0


def test_command_input_and_working_directory(session: psjobs.Session, tmp_path: Any) -> None:
    job = session.start_job("cat; pwd; echo $GREETING", input=["x", "y"], working_directory=tmp_path,
                            env={"GREETING": "bonjour"})
    job.wait(10)
    assert job.receive() == ["x", "y", str(tmp_path), "bonjour"]


def test_working_directory_defaults_to_caller_cwd_at_start(session: psjobs.Session, tmp_path: Any,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    job = session.start_job(os.getcwd)
    monkeypatch.chdir("/")
    job.wait(10)
    assert job.receive() == [str(tmp_path)]


def getenv(name: str) -> str | None:
    return os.environ.get(name)


def test_env_reaches_callable_jobs(session: psjobs.Session) -> None:
    job = session.start_job(getenv, "PSJOBS_TEST_VAR", env={"PSJOBS_TEST_VAR": "42"})
    job.wait(10)
    assert job.receive() == ["42"]


def test_env_none_removes_a_variable_for_a_callable_and_a_command(session: psjobs.Session,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/guide.md: `env=` is added to the caller's environment; `None` removes a variable."""
    monkeypatch.setenv("PSJOBS_TEST_DROP", "present")
    call = session.start_job(getenv, "PSJOBS_TEST_DROP", env={"PSJOBS_TEST_DROP": None})
    command = session.start_job('echo "[${PSJOBS_TEST_DROP-unset}]"', env={"PSJOBS_TEST_DROP": None})
    kept = session.start_job('echo "[${PSJOBS_TEST_DROP-unset}]"')
    assert session.wait_job([call, command, kept], timeout=30) == [call, command, kept]
    assert call.receive() == [] and command.receive() == ["[unset]"] and kept.receive() == ["[present]"]


def test_the_default_stop_grace_is_five_seconds() -> None:
    """docs/guide.md and Session's docstring: stop_grace is 5 s by default."""
    with psjobs.Session() as s:
        assert s.stop_grace == 5.0


def environment(*names: str) -> dict[str, str | None]:
    return {name: os.environ.get(name) for name in names}


def test_callable_jobs_see_the_callers_environment_when_they_start(session: psjobs.Session,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Set, changed and removed variables reach the next job; psjobs' own PYTHONPATH never does."""
    names = ("PSJOBS_TEST_LATE", "PSJOBS_TEST_GONE", "PYTHONPATH")
    monkeypatch.setenv("PSJOBS_TEST_GONE", "here")
    first = session.start_job(environment, *names)  # starts the fork server with this environment
    assert first.wait(10)
    assert first.receive() == [environment(*names)]
    monkeypatch.setenv("PSJOBS_TEST_LATE", "set after the fork server started")
    monkeypatch.delenv("PSJOBS_TEST_GONE")
    second = session.start_job(environment, *names)
    assert second.wait(10)
    assert second.receive() == [{"PSJOBS_TEST_LATE": "set after the fork server started",
                                 "PSJOBS_TEST_GONE": None, "PYTHONPATH": os.environ.get("PYTHONPATH")}]


def test_a_change_to_the_environment_while_the_first_job_starts_reaches_the_next_job(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The first process job of a session takes the environment its fork server starts with. A
    variable another thread sets at that very moment is either in it or seen as a change: the next
    job has it either way (the environment and the token compared against it were two reads, and a
    change between them was taken for no change: the next job ran without the variable)."""
    from psjobs.backends.process import _backend

    real = _backend.environ_now
    changed: list[bool] = []

    def another_thread_sets_it_now() -> Any:
        if not changed:
            changed.append(True)
            os.environ["PSJOBS_TEST_RACE"] = "set while the first job started"
        return real()

    monkeypatch.delenv("PSJOBS_TEST_RACE", raising=False)
    monkeypatch.setattr(_backend, "environ_now", another_thread_sets_it_now)
    try:
        with psjobs.Session() as s:
            first = s.start_job(environment, "PSJOBS_TEST_RACE")
            assert first.wait(30)
            second = s.start_job(environment, "PSJOBS_TEST_RACE")
            assert second.wait(30)
            assert changed
            assert second.receive() == [{"PSJOBS_TEST_RACE": "set while the first job started"}]
    finally:
        os.environ.pop("PSJOBS_TEST_RACE", None)


def test_process_jobs_started_from_many_threads_at_once(session: psjobs.Session) -> None:
    """Each starting thread registers its job with the session's I/O loop itself."""
    import threading

    jobs: list[psjobs.Job] = []
    lock = threading.Lock()

    def starter(base: int) -> None:
        for i in range(base, base + 20):
            job = session.start_job(add, i, 1) if i % 4 else session.start_job(["echo", str(i + 1)])
            with lock:
                jobs.append(job)

    threads = [threading.Thread(target=starter, args=(n * 100,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(jobs) == 120
    assert len(session.wait_job(jobs, timeout=60)) == 120
    got = sorted(int(job.receive()[0]) for job in jobs)
    assert got == sorted(n * 100 + i + 1 for n in range(6) for i in range(20))
    assert all(job.state is JobState.COMPLETED for job in jobs)


def test_bad_arguments_raise_before_a_job_exists(session: psjobs.Session, tmp_path: Any) -> None:
    cases: list[tuple[Callable[[], Any], type[Exception]]] = [
        (lambda: session.start_job(42), TypeError),
        (lambda: session.start_job(""), ValueError),
        (lambda: session.start_job([]), ValueError),
        (lambda: session.start_job("ls", foo=1), TypeError),
        (lambda: session.start_job(add, 1, 2, working_directory=""), ValueError),
        (lambda: session.start_job(add, 1, 2, working_directory=" "), ValueError),
        (lambda: session.start_job(add, 1, 2, working_directory=tmp_path / "missing"), FileNotFoundError),
        (lambda: session.start_job(add, 1, 2, env={"A": 1}), TypeError),
        (lambda: session.start_job(add, 1, 2, input=5), TypeError),
        (lambda: session.start_job(add, 1, 2, name=5), TypeError),
        (lambda: session.start_job(add, _Unpicklable(), 2), TypeError),
        (lambda: session.start_thread_job(add, 1, 2, throttle_limit=0), ValueError),
        (lambda: session.start_thread_job(add, 1, 2, init=3), TypeError),
    ]
    for call, exc in cases:
        with pytest.raises(exc):
            call()
    assert session.get_job() == []


class _Unpicklable:
    def __reduce__(self) -> Any:
        raise TypeError("cannot pickle this")


def test_get_job_filters(session: psjobs.Session) -> None:
    a = session.start_thread_job(add, 1, 1, name="alpha")
    b = session.start_job(add, 1, 2, name="beta")
    c = session.start_thread_job(sleeper, 30, name="Gamma-long")
    session.wait_job([a, b])
    assert session.get_job() == [a, b, c]
    assert session.get_job(b.id) == [b]
    assert session.get_job([a.id, c.id]) == [a, c]
    assert session.get_job(name="ALPHA") == [a]
    assert session.get_job(name="*a*") == [a, b, c]
    assert session.get_job(name="nomatch*") == []
    with pytest.raises(psjobs.JobNotFoundError, match="nomatch"):
        session.get_job(name="nomatch")
    with pytest.raises(psjobs.JobNotFoundError, match="12345678"):
        session.get_job(12345678)
    assert session.get_job(instance_id=b.instance_id) == [b]
    assert session.get_job(instance_id=str(b.instance_id)) == [b]
    with pytest.raises(psjobs.JobNotFoundError):
        session.get_job(instance_id=uuid.uuid4())
    assert session.get_job(state="Running") == [c]
    assert session.get_job(state=JobState.COMPLETED) == [a, b]
    assert session.get_job(command="ADD") == [a, b]
    assert session.get_job(command=" sle* ") == [c]
    assert session.get_job(include_child_jobs=True) == [a, b, b.child_jobs[0], c]
    assert session.get_job(child_job_state="Completed") == [a, b, b.child_jobs[0], c]
    assert session.get_job(has_more_data=False) == []
    b.receive()
    assert session.get_job(has_more_data=False) == [b]
    assert session.get_job(newest=1) == [c]  # unfinished counts as newest
    assert set(session.get_job(newest=2)) in ({b, c}, {a, c})
    later = datetime.now() + timedelta(seconds=60)
    assert session.get_job(before=later) == [a, b]
    assert session.get_job(after=later) == []
    with pytest.raises(ValueError):
        session.get_job(state="Sleeping")
    session.stop_job(c)


def test_selectors_in_verbs(session: psjobs.Session) -> None:
    a = session.start_thread_job(add, 1, 1, name="first")
    b = session.start_thread_job(add, 2, 2, name="second")
    session.wait_job([a, b])
    assert session.receive_job("fir*") == [2]
    assert session.receive_job(b.instance_id) == [4]
    with pytest.raises(TypeError):
        session.receive_job(True)
    with pytest.raises(TypeError):
        session.receive_job(3.5)
    session.remove_job(["first", b.id])
    assert session.get_job() == []


def test_jobs_of_another_session_are_refused(session: psjobs.Session) -> None:
    job = session.start_thread_job(add, 1, 1)
    with psjobs.Session() as other, pytest.raises(psjobs.JobNotFoundError, match="another session"):
        other.receive_job(job)
    job.wait(10)


def test_repr_and_table(session: psjobs.Session) -> None:
    job = session.start_job(sleeper, 30, name="backup")
    wait_until(lambda: job.child_jobs[0].pid is not None, what="the worker's pid")
    text = repr(job.child_jobs[0])
    assert text.startswith(f"<Job {job.child_jobs[0].id} 'Job{job.child_jobs[0].id}' Running localhost pid=")
    assert repr(job) == f"<Job {job.id} 'backup' Running localhost>"
    table = repr(session.get_job())
    lines = table.splitlines()
    assert lines[0].split() == ["Id", "Name", "PSJobTypeName", "State", "HasMoreData", "Location", "Command"]
    assert lines[2].split() == [str(job.id), "backup", "BackgroundJob", "Running", "True", "localhost", "sleeper"]
    assert psjobs.format_table([job]) == table
    session.stop_job(job)


def test_idle_thread_workers_end_and_new_jobs_still_run() -> None:
    """A session's worker threads end after ~2 s without work (nothing left running that nobody
    can see), the throttle holds while they are reused, and a job started after they ended runs."""
    import threading

    def workers() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name.startswith("psjobs-thread-") and t.is_alive()]

    before = set(workers())  # other sessions' workers, ending on their own clock
    with psjobs.Session(thread_throttle_limit=3) as s:
        gate = threading.Event()
        busy = [s.start_thread_job(gate.wait, 30) for _ in range(5)]
        wait_until(lambda: sum(j.state is JobState.RUNNING for j in busy) == 3, what="3 jobs running")
        assert sum(j.state is JobState.NOT_STARTED for j in busy) == 2  # the throttle
        mine = set(workers()) - before
        assert len(mine) == 3, mine
        gate.set()
        assert s.wait_job(busy, timeout=10) == busy
        wait_until(lambda: not (set(workers()) & mine), 15, "the idle workers to end")
        job = s.start_thread_job(lambda: 42)
        assert job.wait(10) and job.receive() == [42]
    wait_until(lambda: not (set(workers()) - before), 10, "the workers of a closed session to end")
