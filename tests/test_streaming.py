"""Partial results: receiving repeatedly while a job streams loses and doubles nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import psjobs

N = 100_000


def produce(n: int):  # type: ignore[no-untyped-def]
    for i in range(n):
        yield i
        if i % 10_000 == 0:
            psjobs.write_verbose(f"{i} done")  # other streams interleaved, not received as output


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_repeated_receive_while_streaming_is_exact(session: psjobs.Session, kind: str) -> None:
    job = session.start_thread_job(produce, N) if kind == "thread" else session.start_job(produce, N)
    got: list[Any] = []
    calls = 0
    while not job.state.is_finished or job.has_more_data:
        got.extend(job.receive())
        calls += 1
    assert job.state is psjobs.JobState.COMPLETED
    assert got == list(range(N))
    assert calls > 1  # it really was received in parts
    assert job.receive() == []
    assert len(job.output) == N  # and the stream list still holds everything


def hundred_then_wait(flag: str) -> Iterator[Any]:
    # SIGALRM blocked: the worker's 1 ms timer cannot send a batch, only the count of items can.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    yield from range(100)
    deadline = time.monotonic() + 30
    while not os.path.exists(flag) and time.monotonic() < deadline:
        time.sleep(0.005)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGALRM})
    yield "after"


def write_then_block(how: str) -> None:
    """Write one record, then block in a system call until the job is stopped."""
    r, _w = os.pipe()  # nobody writes to it: os.read blocks
    if how == "first timer signal lost":
        # The batch timer's first signal taken before any handler runs, as when it lands right
        # before the job enters a blocking call: only a later one can send the batch.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        psjobs.write_output("x")
        signal.sigwait({signal.SIGALRM})
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGALRM})
    else:
        psjobs.write_output("x")
    if how == "subprocess.run":
        subprocess.run(["sleep", "60"], check=False)  # waits in waitpid
    else:
        os.read(r, 1)


@pytest.mark.parametrize("how", ["os.read", "subprocess.run", "first timer signal lost"])
def test_a_record_written_before_a_blocking_call_arrives_while_the_call_runs(
        session: psjobs.Session, how: str) -> None:
    # The worker's batch timer must reach the job inside the call: a record written right before
    # a minute in subprocess.run() or a read reached the session a minute later (the kernel
    # restarted the interrupted call without telling Python), or never when the timer's one
    # signal came just before the call began.
    job = session.start_job(write_then_block, how)
    got: list[Any] = []
    deadline = time.monotonic() + 20
    while not got and time.monotonic() < deadline and not job.state.is_finished:
        got.extend(job.receive(wait=True, timeout=0.1))
    try:
        assert got == ["x"], f"nothing received while the job blocked ({how}); {job!r}"
        assert not job.state.is_finished
    finally:
        session.stop_job(job)


def print_then_return() -> int:
    print("line")
    print("partial", end="")  # no newline: flushed when the job ends
    return 42


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_printed_lines_and_the_returned_value_come_in_the_same_order_from_every_kind(
        session: psjobs.Session, kind: str) -> None:
    start = session.start_thread_job if kind == "thread" else session.start_job
    job = start(print_then_return)
    assert session.wait_job(job, timeout=30) == [job]
    got = [(int(stream), str(payload) if stream != psjobs.Stream.OUTPUT else payload)
           for _leaf, stream, payload, _t in session.read_entries(job)]
    info = int(psjobs.Stream.INFORMATION)
    assert got == [(info, "line"), (int(psjobs.Stream.OUTPUT), 42), (info, "partial")]


def test_a_process_jobs_first_hundred_items_leave_at_once(session: psjobs.Session, tmp_path: Path) -> None:
    """A flood's first batch is small (worker/_batching.FIRST_ITEMS): the reader sees the stream
    begin without waiting for a thousand items or the batch timer."""
    flag = tmp_path / "seen"
    job = session.start_job(hundred_then_wait, str(flag))
    got: list[Any] = []
    deadline = time.monotonic() + 20
    while len(got) < 100 and time.monotonic() < deadline:
        got.extend(job.receive(wait=True, timeout=0.05))
    assert got == list(range(100)), f"{len(got)} items seen while the job waited for them; {job!r}"
    flag.touch()
    assert job.receive(wait=True, timeout=60) == ["after"]
    assert job.state is psjobs.JobState.COMPLETED


def test_receive_wait_follows_the_stream(session: psjobs.Session) -> None:
    job = session.start_job(produce, N)
    assert job.receive(wait=True, timeout=60) == list(range(N))


def test_waiting_readers_of_a_thread_job_get_it_whole_and_leave_no_trace(session: psjobs.Session) -> None:
    """Readers that wait on a busy thread job (its records hand them the GIL, core/_port): a keeping
    one and then a consuming one get every item, in order; once they are done, or one is dropped
    half-way, the session counts no follower."""
    job = session.start_thread_job(produce, N)
    kept = [p for _, s, p, _ in session.read_entries(job, keep=True, wait=True, timeout=60)
            if s is psjobs.Stream.OUTPUT]
    assert job.receive(wait=True, timeout=60) == list(range(N)) == kept
    dropped = session.read_entries(session.start_thread_job(produce, N), wait=True, timeout=60)
    next(dropped)
    dropped.close()
    assert session._followed == {}


def test_two_jobs_received_together_keep_per_job_order(session: psjobs.Session) -> None:
    a = session.start_job(produce, 5000)
    b = session.start_thread_job(produce, 5000)
    out = session.receive_job([a, b], wait=True, records=True)
    by_job: dict[int, list[Any]] = {}
    for rec in out:
        by_job.setdefault(rec.job.id, []).append(rec.value)
    assert by_job == {a.child_jobs[0].id: list(range(5000)), b.id: list(range(5000))}


def big_values() -> Any:
    """Large bytes and bytearray values (they travel out of band) between small ones."""
    yield b"a" * (2 << 20)
    yield 1
    yield bytearray(b"b" * (1 << 20))
    yield {"small": b"c"}
    yield b"d" * 10


def test_large_bytes_values_arrive_whole_in_order_with_their_types(session: psjobs.Session) -> None:
    job = session.start_job(big_values)
    assert job.wait(30)
    got = job.receive()
    assert got == [b"a" * (2 << 20), 1, bytearray(b"b" * (1 << 20)), {"small": b"c"}, b"d" * 10]
    assert [type(v) for v in got] == [bytes, int, bytearray, dict, bytes]


def big_and_unpicklable() -> Any:
    import threading

    yield b"x" * (2 << 20)
    yield threading.Lock()  # in the same batch, a value that cannot be pickled


def test_a_large_value_next_to_an_unpicklable_one_still_arrives(session: psjobs.Session) -> None:
    job = session.start_job(big_and_unpicklable)
    assert job.wait(30)
    got = job.receive()
    assert got[0] == b"x" * (2 << 20)
    assert isinstance(got[1], psjobs.Snapshot)  # a readable stand-in, not a crash


def nested_buffers() -> Any:
    return {"blob": bytearray(b"n" * (2 << 20)), "small": bytearray(b"s"), "list": [b"t" * (2 << 20)]}


def test_large_buffers_at_any_depth_arrive_whole(session: psjobs.Session) -> None:
    job = session.start_job(nested_buffers)
    assert job.wait(30)
    (got,) = job.receive()
    assert got == {"blob": bytearray(b"n" * (2 << 20)), "small": bytearray(b"s"), "list": [b"t" * (2 << 20)]}
    assert type(got["blob"]) is bytearray and type(got["list"][0]) is bytes


def numpy_arrays() -> Any:
    import numpy as np

    return {"big": np.arange(1_000_000, dtype=np.float64), "strided": np.arange(600_000)[::2]}


def test_numpy_arrays_come_back_equal_and_writable(session: psjobs.Session) -> None:
    np = pytest.importorskip("numpy")
    job = session.start_job(numpy_arrays)
    assert job.wait(30)
    (got,) = job.receive()
    assert np.array_equal(got["big"], np.arange(1_000_000, dtype=np.float64))
    assert np.array_equal(got["strided"], np.arange(600_000)[::2])  # not contiguous: in band
    got["big"][0] = 42.0  # a view of what the session received, but the user's to change
