"""Jobs as futures (API.md 8.1): every Job method on every kind, asyncio, as_completed, Executor extras.

::

    kind fixture (tests/test_kinds: thread, process, command, ssh, ssh-callable, dask)
        --> the standard jobs (counts, fails, until_stopped, chatty)
        --> result / exception / done / running / cancelled / cancel / callbacks / as_future /
            await / stream / astream / as_completed / async verbs, through the public API only
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import itertools
import logging
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

import psjobs
from psjobs import Job, JobState

from .conftest import wait_until
from .test_kinds import COMMANDS, Kind, dask_client, kind, kind_env, sshd_server  # noqa: F401

pytestmark = pytest.mark.timeout(120)


def value_of_chatty(adapter: Kind) -> Any:
    # chatty() returns 1 (a callable's value) or prints "1" (a command's lines, as a list)
    return adapter.chatty_output if adapter.bodies is COMMANDS else adapter.chatty_output[0]


# --- each Job method, on every kind -------------------------------------------------------------

def test_result_is_the_value_and_leaves_the_output_unread(kind: Kind) -> None:  # noqa: F811
    job = kind.counts()
    assert job.result(timeout=60) == kind.counted  # a generator's items, or a command's lines
    assert job.done() and not job.running() and not job.cancelled()
    assert job.exception() is None
    assert job.receive() == kind.counted  # result() did not move the receive cursor
    assert kind.chatty().result(timeout=60) == value_of_chatty(kind)


def test_result_raises_the_reason_of_a_failed_job(kind: Kind) -> None:  # noqa: F811
    job = kind.fails()
    with pytest.raises(kind.failure, match=kind.failure_text):
        job.result(timeout=60)
    exc = job.exception(timeout=0)
    assert isinstance(exc, kind.failure)
    if kind.failure_traceback == "remote":
        assert isinstance(exc.__cause__, psjobs.RemoteTraceback)
    assert job.done() and not job.cancelled()


def test_result_times_out_then_cancel_stops_the_job(kind: Kind) -> None:  # noqa: F811
    job = kind.until_stopped()
    with pytest.raises(TimeoutError, match="goes on"):
        job.result(timeout=0.05)
    kind.wait_until_running(job)
    assert job.running() and not job.done()
    assert job.cancel() is True
    assert job.cancelled() and job.done() and job.state is JobState.STOPPED
    with pytest.raises(cf.CancelledError):
        job.result()
    with pytest.raises(cf.CancelledError):
        job.exception()
    assert job.cancel() is False  # already finished


def test_done_and_state_callbacks_run_outside_the_lock(kind: Kind) -> None:  # noqa: F811
    changes: list[tuple[JobState, JobState]] = []
    done: list[Job] = []
    seen_from_callback: list[int] = []
    job = kind.until_stopped()
    job.add_state_callback(lambda j, old, new: changes.append((old, new)))

    def on_done(j: Job) -> None:
        # A verb from inside the callback: it would deadlock if the session lock were held.
        seen_from_callback.append(len(kind.session.get_job()))
        done.append(j)

    job.add_done_callback(on_done)
    kind.wait_until_running(job)
    job.stop()
    wait_until(lambda: done == [job], 30, "the done callback")
    wait_until(lambda: changes and changes[-1][1] is JobState.STOPPED, 30, "the last state change")
    assert seen_from_callback == [1]
    for (_, new), (old, _) in itertools.pairwise(changes):
        assert new is old  # every change is reported, in order
    assert JobState.STOPPING in [new for _, new in changes]
    # On a finished job, at once, in this thread.
    threads: list[threading.Thread] = []
    job.add_done_callback(lambda j: threads.append(threading.current_thread()))
    assert threads == [threading.current_thread()]


def test_as_future_follows_the_job(kind: Kind) -> None:  # noqa: F811
    job = kind.counts()
    future = job.as_future()
    assert isinstance(future, cf.Future) and future.job is job
    done, _ = cf.wait([future], timeout=60)
    assert done == {future} and future.result() == kind.counted
    failing = kind.fails().as_future()
    assert isinstance(failing.exception(timeout=60), kind.failure)
    running = kind.until_stopped()
    kind.wait_until_running(running)
    future = running.as_future()
    assert future.running()
    assert future.cancel() is True  # stops the job for real
    assert future.cancelled() and running.state is JobState.STOPPED

    async def wrapped() -> Any:
        return await asyncio.wrap_future(kind.counts().as_future())

    assert asyncio.run(wrapped()) == kind.counted


def test_await_astream_and_the_async_verbs(kind: Kind) -> None:  # noqa: F811
    async def main() -> tuple[Any, ...]:
        value = await kind.counts()
        streamed = [item async for item in kind.counts().astream(timeout=60)]
        job = kind.counts()
        waited = await psjobs.async_wait_job(job, timeout=60)
        received = await psjobs.async_receive_job(kind.counts(), wait=True, timeout=60)
        return value, streamed, waited == [job], received

    value, streamed, waited, received = asyncio.run(main())
    assert value == streamed == received == kind.counted
    assert waited


def test_stream_yields_items_as_they_arrive(kind: Kind) -> None:  # noqa: F811
    job = kind.until_stopped()
    items = job.stream(timeout=60)
    assert next(items) == "started"  # while the job still runs
    assert job.running()
    job.stop()
    assert list(items) == []  # ends with the job
    job = kind.counts()
    assert list(job.stream(timeout=60)) == kind.counted
    assert job.receive() == []  # consumed, as receive_job does


def test_as_completed_yields_jobs_as_they_finish(kind: Kind) -> None:  # noqa: F811
    slow, quick = kind.until_stopped(), kind.counts()
    finished = psjobs.as_completed([slow, quick], timeout=60)
    assert next(finished) is quick
    with pytest.raises(TimeoutError, match=r"1 \(of 2\) jobs unfinished"):
        list(psjobs.as_completed([slow, quick], timeout=0.05))
    slow.stop()
    assert list(finished) == [slow]


# --- asyncio: the loop runs on, and no thread per waiter -----------------------------------------

@pytest.mark.parametrize("start", ["thread", "process"])
def test_the_event_loop_keeps_ticking_while_it_awaits_a_job(session: psjobs.Session, start: str) -> None:
    async def main() -> tuple[Any, int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        starter = session.start_thread_job if start == "thread" else session.start_job
        value = await starter(slow_value, 0.5)
        task.cancel()
        return value, ticks

    value, ticks = asyncio.run(main())
    assert value == 42
    assert ticks >= 10, f"the loop ticked {ticks} times in 0.5 s: awaiting the job blocked it"


def slow_value(t: float) -> int:
    deadline = time.monotonic() + t
    while time.monotonic() < deadline:
        time.sleep(0.01)
    return 42


def wait_for_file(path: str) -> str:
    while not Path(path).exists():
        time.sleep(0.005)
    return path


def test_awaiting_many_jobs_starts_no_thread_per_waiter(tmp_path: Path) -> None:
    session = psjobs.Session(stop_grace=2.0)
    gate = str(tmp_path / "gate")
    try:
        jobs = [session.start_job(wait_for_file, gate) for _ in range(20)]
        wait_until(lambda: all(j.child_jobs[0].state is JobState.RUNNING for j in jobs), 60, "20 running jobs")

        async def main() -> tuple[list[Any], int]:
            gathered = asyncio.gather(*jobs)
            await asyncio.sleep(0.2)  # every waiter registered; count the threads now
            count = threading.active_count()
            Path(gate).touch()
            return await gathered, count

        before = threading.active_count()
        values, during = asyncio.run(main())
        assert values == [gate] * 20
        assert during <= before + 1, "more than the one callbacks thread was started for 20 waiters"
    finally:
        Path(gate).touch()
        session.close()


def test_a_failing_callback_is_logged_and_the_others_run(session: psjobs.Session,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    ran: list[str] = []

    def bad(job: Job) -> None:
        raise RuntimeError("callback bug")

    job = session.start_thread_job(slow_value, 0.1)
    with caplog.at_level(logging.ERROR, logger="psjobs"):
        job.add_done_callback(bad)
        job.add_done_callback(lambda j: ran.append("next"))
        job.wait(30)
        wait_until(lambda: ran == ["next"], 30, "the callback after the failing one")
    assert any("callback bug" in (r.exc_text or "") or (r.exc_info and "callback bug" in str(r.exc_info[1]))
               for r in caplog.records)


def test_remove_callback_forgets_it(session: psjobs.Session) -> None:
    calls: list[Job] = []
    job = session.start_thread_job(slow_value, 0.1)
    job.add_done_callback(calls.append)
    job.remove_callback(calls.append)
    sentinel: list[Job] = []
    job.add_done_callback(sentinel.append)
    job.wait(30)
    wait_until(lambda: sentinel == [job], 30, "the remaining callback")
    assert calls == []


# --- values of parents, and the Executor's own promises ---------------------------------------------

@pytest.mark.dask
def test_a_fan_out_result_is_the_list_of_its_childrens_values(dask_client: Any) -> None:  # noqa: F811
    session = psjobs.Session(stop_grace=2.0)
    try:
        job = session.start_cluster_job(lambda x: x * x, for_each=[1, 2, 3], cluster=dask_client)
        assert job.result(timeout=60) == [1, 4, 9]
    finally:
        session.close()


def chatty_call(x: int) -> int:
    print("working on", x)
    psjobs.write_warning(f"careful with {x}")
    return x + 1


def heartbeat(path: str) -> None:
    while True:
        with open(path, "a") as f:
            f.write(".")
        time.sleep(0.01)


@pytest.mark.parametrize("kind_name", ["process", "thread"])
def test_executor_futures_carry_their_job_and_cancel_stops_it(session: psjobs.Session, kind_name: str,
                                                              tmp_path: Path) -> None:
    with psjobs.Executor(kind_name, max_workers=2, session=session) as ex:
        future = ex.submit(chatty_call, 1)
        assert future.result(timeout=60) == 2
        job = future.job
        assert [str(r) for r in job.information] == ["working on 1"]
        assert [str(r) for r in job.warning] == ["careful with 1"]
        beats = tmp_path / "beats"
        running = ex.submit(heartbeat, str(beats))
        wait_until(lambda: beats.exists() and beats.stat().st_size > 3, 30, "the heartbeat")
        assert running.cancel() is True
        assert running.cancelled() and running.job.state is JobState.STOPPED
        size = beats.stat().st_size
        time.sleep(0.2)  # the check itself: the work must not go on after the stop
        assert beats.stat().st_size == size, "the cancelled call still runs"


def test_executor_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="kind must be"):
        psjobs.Executor("fiber")
    with pytest.raises(ValueError, match="not both"):
        psjobs.Executor(computer_name="a", cluster="tcp://127.0.0.1:1")
    with pytest.raises(TypeError, match="max_workers"):
        psjobs.Executor(max_workers=1.5)  # type: ignore[arg-type]


def test_executor_raises_a_low_thread_throttle_to_max_workers(session: psjobs.Session) -> None:
    assert session.thread_throttle_limit == 5
    with psjobs.Executor("thread", max_workers=8, session=session) as ex:
        assert ex.submit(pow, 2, 3).result(timeout=30) == 8
    assert session.thread_throttle_limit == 8


@pytest.mark.ssh
def test_executor_on_a_remote_computer(sshd_server: Any) -> None:  # noqa: F811
    session = psjobs.Session(stop_grace=2.0)
    try:
        psjobs.configure_ssh(session, config=str(sshd_server.ssh_config), python=sys.executable)
        with psjobs.Executor(computer_name=["127.0.0.1"], session=session, max_workers=2) as ex:
            future = ex.submit(pow, 2, 10)
            assert future.result(timeout=60) == 1024
            assert future.job.job_type == "RemoteJob"
    finally:
        session.close()


@pytest.mark.dask
def test_executor_on_a_cluster(dask_client: Any) -> None:  # noqa: F811
    session = psjobs.Session(stop_grace=2.0)
    try:
        with psjobs.Executor(cluster=dask_client, session=session, max_workers=2) as ex:
            assert list(ex.map(pow, [2, 3], [3, 2], timeout=60)) == [8, 9]
    finally:
        session.close()


def test_a_job_returned_by_a_job_is_its_output_not_awaited(session: psjobs.Session) -> None:
    inner = session.start_thread_job(slow_value, 0.01)
    outer = session.start_thread_job(lambda: inner)
    assert outer.result(timeout=30) is inner  # a Job is awaitable, but a returned Job is a value


def test_a_callables_value_is_its_last_output_item(session: psjobs.Session) -> None:
    # As docs/futures.md says: write_output items, then return None: the last written item.
    def writes() -> None:
        psjobs.write_output("a")
        psjobs.write_output("b")

    assert session.start_thread_job(writes).result(timeout=30) == "b"
    assert session.start_thread_job(lambda: None).result(timeout=30) is None


@pytest.mark.ssh
def test_executor_spreads_calls_over_its_computers(sshd_server: Any) -> None:  # noqa: F811
    session = psjobs.Session(stop_grace=2.0)
    try:
        psjobs.configure_ssh(session, config=str(sshd_server.ssh_config), python=sys.executable)
        with psjobs.Executor(computer_name=["127.0.0.1", "127.0.0.2"], session=session, max_workers=2) as ex:
            futures = [ex.submit(pow, 2, n) for n in range(4)]
            assert [f.result(timeout=60) for f in futures] == [1, 2, 4, 8]
            assert [f.job.location for f in futures] == ["127.0.0.1", "127.0.0.2"] * 2
    finally:
        session.close()


def test_cancelling_the_future_of_a_queued_job_stops_the_job(session: psjobs.Session, tmp_path: Path) -> None:
    session.thread_throttle_limit = 1
    gate = str(tmp_path / "gate")
    busy = session.start_thread_job(wait_for_file, gate)
    queued = session.start_thread_job(slow_value, 0.01)
    assert queued.state is JobState.NOT_STARTED  # waits for a throttle slot
    future = queued.as_future()
    assert not future.running()
    assert future.cancel() is True
    assert future.cancelled() and queued.state is JobState.STOPPED
    Path(gate).touch()
    assert busy.result(timeout=30) == gate


# --- callbacks that block, map's clean-up, a cancel racing a start, removed jobs ----------------------

def test_a_done_callback_waiting_for_another_future_holds_up_no_future(session: psjobs.Session,
                                                                       tmp_path: Path) -> None:
    # ThreadPoolExecutor allows a callback that waits for another future's result; psjobs settles
    # futures, awaits and its Executor on a thread of its own, never behind such a callback.
    gate, a_gate = str(tmp_path / "gate"), str(tmp_path / "a_gate")
    entered: list[Future] = []
    got: list[Any] = []
    with psjobs.Executor("thread", max_workers=2, session=session) as ex:
        a = ex.submit(wait_for_file, a_gate)  # not done before its callback is added: else it runs here
        b = ex.submit(wait_for_file, gate)

        def waits_for_b(f: Future) -> None:
            entered.append(f)
            got.append(b.result(timeout=60))

        a.add_done_callback(waits_for_b)
        Path(a_gate).touch()
        wait_until(lambda: entered == [a], 30, "a's callback to wait for b")
        assert ex.submit(pow, 2, 3).result(timeout=30) == 8  # settled and pumped meanwhile
        job = session.start_thread_job(slow_value, 0.05)

        async def awaits() -> Any:
            return await asyncio.wait_for(job, 30)

        assert asyncio.run(awaits()) == 42  # an unrelated await
        assert list(psjobs.as_completed([session.start_thread_job(slow_value, 0.01)], timeout=30))
        Path(gate).touch()
        assert b.result(timeout=30) == gate
        wait_until(lambda: got == [gate], 30, "a's callback to get b's value")
        ran_in: list[threading.Thread] = []
        b.add_done_callback(lambda f: ran_in.append(threading.current_thread()))
        assert ran_in == [threading.current_thread()]  # on a done future: at once, here, as any Future


def test_a_user_callback_that_blocks_does_not_hold_up_the_others(session: psjobs.Session, tmp_path: Path,
                                                                 no_stray_threads: None) -> None:
    release = threading.Event()
    later: list[Job] = []
    gate = str(tmp_path / "gate")
    first = session.start_thread_job(wait_for_file, gate)
    first.add_done_callback(lambda j: release.wait(60))  # before it finishes: else it runs here
    Path(gate).touch()
    first.wait(30)
    second = session.start_thread_job(slow_value, 0.01)
    second.add_done_callback(later.append)
    try:
        # In order, but one that blocks hands the queue on after 0.2 s (docs/futures.md).
        wait_until(lambda: later == [second], 30, "the callback after the blocked one")
    finally:
        release.set()  # and then no psjobs thread is left (no_stray_threads)


class _Cancels:
    """An argument that cancels its own future while it is pickled, which happens while its job is
    being started: as a signal handler that cancels every future might, in the starting thread."""

    def __init__(self) -> None:
        self.future: Future | None = None

    def __reduce__(self) -> Any:
        assert self.future is not None
        self.future.cancel()
        return (int, ())


def forever_with(_: Any) -> None:
    while True:
        time.sleep(0.01)


@pytest.mark.parametrize("kind_name", ["process", "thread"])
def test_executor_map_clean_up_withdraws_only_the_calls_not_started(session: psjobs.Session,
                                                                   kind_name: str) -> None:
    # As the standard executors' map: on a timeout TimeoutError comes on time, the running calls
    # go on (a thread call in a long time.sleep could not even be stopped before it returns), and
    # the queued one never runs.
    with psjobs.Executor(kind_name, max_workers=2, session=session) as ex:
        start = time.monotonic()
        with pytest.raises(cf.TimeoutError):
            list(ex.map(time.sleep, [1.5, 1.5, 1.5], timeout=0.2))
        assert time.monotonic() - start < 1.2, "map's TimeoutError waited for a running call"
        jobs = session.get_job()
        assert len(jobs) == 2 and not any(j.state is JobState.STOPPED for j in jobs)
    assert [j.state for j in session.get_job()] == [JobState.COMPLETED] * 2


@pytest.mark.parametrize("kind_name", ["process", "thread"])
def test_dropping_a_map_iterator_leaves_the_running_call_running(session: psjobs.Session, kind_name: str,
                                                                 tmp_path: Path) -> None:
    gate = str(tmp_path / "gate")
    with psjobs.Executor(kind_name, max_workers=1, session=session) as ex:
        results = ex.map(wait_for_file, [str(tmp_path), gate, gate])
        assert next(results) == str(tmp_path)
        wait_until(lambda: len(session.get_job()) == 2 and session.get_job()[1].running(), 30,
                   "the second call running")
        del results  # its clean-up withdraws the third call, and does not stop the second
        running = session.get_job()[1]
        assert running.running()
        Path(gate).touch()
        assert running.result(timeout=30) == gate
    assert len(session.get_job()) == 2  # the third never ran


@pytest.mark.parametrize("kind_name", ["process", "thread"])
def test_a_future_that_just_reported_running_can_be_cancelled(session: psjobs.Session, kind_name: str) -> None:
    # Its Executor marks a call running, then starts its job: cancel() in between must still stop
    # the call. Each loop submits while the previous call's slot is not free yet, so the call is
    # started on psjobs' thread while this one watches it: the window is hit within a few loops.
    with psjobs.Executor(kind_name, max_workers=1, session=session) as ex:
        for _ in range(20):
            future = ex.submit(forever_with, None)
            deadline = time.monotonic() + 30
            while not future.running():  # no sleep: the window is short
                assert time.monotonic() < deadline, "the call never started"
            assert future.cancel() is True
            assert future.cancelled() and future.job is not None and future.job.state is JobState.STOPPED


def test_a_cancel_from_within_its_own_start_does_not_hang(session: psjobs.Session, tmp_path: Path) -> None:
    gate = str(tmp_path / "gate")
    with psjobs.Executor("process", max_workers=1, session=session) as ex:
        busy = ex.submit(wait_for_file, gate)
        arg = _Cancels()
        future = ex.submit(forever_with, arg)  # queued: started (and pickled) once busy is done
        arg.future = future
        Path(gate).touch()
        assert busy.result(timeout=30) == gate
        wait_until(future.done, 30, "the future cancelled")
        assert future.cancelled()
        wait_until(lambda: future.job is not None and future.job.state is JobState.STOPPED, 30,
                   "its job stopped")


def test_the_value_of_a_removed_job_is_an_error_not_none(session: psjobs.Session) -> None:
    job = session.start_thread_job(lambda: 42)
    kept = job.as_future()
    assert kept.result(timeout=30) == 42
    assert session.receive_job(job, wait=True, timeout=30, auto_remove=True) == [42]
    gone = rf"Job {job.id} '.*' is Completed but was removed .* job\.result\(\) before removing"
    with pytest.raises(psjobs.JobStateError, match="^result: " + gone):
        job.result()
    with pytest.raises(psjobs.JobStateError, match="^exception: " + gone):
        job.exception()  # not None: that would promise a value
    with pytest.raises(psjobs.JobStateError, match="^await job: " + gone):
        asyncio.run(_await(job))
    assert isinstance(job.as_future().exception(timeout=30), psjobs.JobStateError)
    assert kept.result() == 42  # a future keeps the value it took before the removal
    items = session.start_thread_job(countdown, 2)
    items.wait(30)
    session.remove_job(items)
    with pytest.raises(psjobs.JobStateError, match="removed"):
        items.result()


async def _await(job: Job) -> Any:
    return await job


def countdown(n: int) -> Iterator[int]:
    yield from range(n, 0, -1)


def test_the_future_of_a_job_not_started_runs_when_the_job_starts(session: psjobs.Session,
                                                                   tmp_path: Path) -> None:
    session.thread_throttle_limit = 1
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    busy = session.start_thread_job(wait_for_file, first)
    queued = session.start_thread_job(wait_for_file, second)
    future = queued.as_future()
    assert queued.state is JobState.NOT_STARTED and not future.running()
    Path(first).touch()
    assert busy.result(timeout=30) == first
    wait_until(future.running, 30, "the future running once its job runs")
    assert queued.running() and not future.done()
    Path(second).touch()
    assert future.result(timeout=30) == second
