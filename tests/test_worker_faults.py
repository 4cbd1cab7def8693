"""Issue 13, the worker side and the reading side: cases 1, 3, 6 and 9, each a test of its own.

Real workers and real child processes; deadlines, never sleeps, as synchronisation.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psutil
import pytest

import psjobs
from psjobs import JobState

from .conftest import wait_until

DEADLINE = 30.0


# --- case 1: finalizers that print, log or warn; async def targets -----------------------------

class Noisy:
    """An output object whose finalizer prints: it runs inside the worker's batching."""

    def __init__(self, i: int) -> None:
        self.i = i

    def __del__(self) -> None:
        print(f"bye {self.i}")


def noisy_items(n: int) -> Iterator[Noisy]:
    for i in range(n):
        yield Noisy(i)


def cyclic_garbage_that_logs(n: int) -> int:
    class Cycle:
        def __init__(self, i: int) -> None:
            self.i = i
            self.me = self

        def __del__(self) -> None:
            logging.warning("collected %d", self.i)

    for i in range(n):
        Cycle(i)
        print(i)
    return n


def test_case1_a_printing_finalizer_never_hangs_a_process_worker(session: psjobs.Session) -> None:
    job = session.start_job(noisy_items, 20_000)
    assert job.wait(DEADLINE), f"{job!r} hung (a finalizer printed inside the worker's batching)"
    assert job.state is JobState.COMPLETED
    assert len(session.receive_job(job)) == 20_000
    printed = {record.message for record in job.child_jobs[0].information}
    assert printed == {f"bye {i}" for i in range(20_000)}  # every finalizer's line, once


def test_case1_cyclic_garbage_whose_finalizer_logs_never_hangs_a_process_worker(session: psjobs.Session) -> None:
    job = session.start_job(cyclic_garbage_that_logs, 20_000)
    assert job.wait(DEADLINE), f"{job!r} hung (a finalizer logged inside the worker's batching)"
    assert job.state is JobState.COMPLETED
    assert session.receive_job(job) == [20_000]
    child = job.child_jobs[0]
    assert [r.message for r in child.information] == [str(i) for i in range(20_000)]
    logged = [r.message for r in child.warning]
    assert len(logged) == len(set(logged)) > 0 and all(m.startswith("collected ") for m in logged)


async def doubled(x: int) -> int:
    import asyncio

    await asyncio.sleep(0.001)
    return 2 * x


async def counted(n: int) -> AsyncIterator[int]:
    import asyncio

    for i in range(n):
        await asyncio.sleep(0)
        yield i


async def awaits_forever(path: str) -> None:
    import asyncio

    psjobs.write_output("awaiting")
    try:
        await asyncio.sleep(1000)
    finally:
        with open(path, "w") as f:
            f.write("cleaned up")


def start(session: psjobs.Session, kind: str, target: Any, *args: Any) -> psjobs.Job:
    return session.start_job(target, *args) if kind == "process" else session.start_thread_job(target, *args)


@pytest.mark.parametrize("kind", ["process", "thread"])
def test_case1_an_async_def_target_is_run_to_its_end(session: psjobs.Session, kind: str) -> None:
    job = start(session, kind, doubled, 21)
    assert job.wait(DEADLINE), f"{job!r} stayed {job.state} (its coroutine was never run)"
    assert job.state is JobState.COMPLETED
    assert session.receive_job(job) == [42]  # the value, not an un-awaited coroutine
    agen = start(session, kind, counted, 1000)
    assert agen.wait(DEADLINE)
    assert session.receive_job(agen) == list(range(1000))  # an async generator streams like a generator


@pytest.mark.parametrize("kind", ["process", "thread"])
def test_case1_a_stop_ends_an_awaiting_coroutine_and_its_finally_runs(session: psjobs.Session, kind: str,
                                                                      tmp_path: Any) -> None:
    marker = tmp_path / "finally"
    job = start(session, kind, awaits_forever, str(marker))
    wait_until(lambda: session.receive_job(job, keep=True) == ["awaiting"], what="the coroutine to await")
    began = time.monotonic()
    session.stop_job(job)
    assert job.state is JobState.STOPPED
    assert time.monotonic() - began < 1.5  # within the grace (2 s), not after the kill
    assert marker.read_text() == "cleaned up"


# --- case 3: a dead worker is noticed while its own child holds its descriptors ----------------

def forks_then(how: str, pidfile: str) -> int:
    pid = os.fork()
    if pid == 0:  # the child: holds the worker's socket and fd 1/2 pipes, and sleeps
        time.sleep(300)
        os._exit(0)
    with open(pidfile, "w") as f:
        f.write(str(pid))
    if how == "killed":
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "exits":
        os._exit(4)
    return 7


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize(("how", "state", "exit_code", "says"), [
    ("killed", JobState.FAILED, None, "was killed by SIGKILL"),
    ("exits", JobState.FAILED, 4, "exited with status 4"),
    ("returns", JobState.COMPLETED, None, None),
])
def test_case3_a_dead_worker_ends_its_job_though_its_child_holds_its_descriptors(
        session: psjobs.Session, tmp_path: Any, how: str, state: JobState, exit_code: int | None,
        says: str | None) -> None:
    pidfile = tmp_path / "child"
    job = session.start_job(forks_then, how, str(pidfile))
    assert job.wait(10), f"{job!r} stayed {job.state} while the worker's child held its descriptors"
    child = job.child_jobs[0]
    assert child.state is state
    assert child.exit_code == exit_code
    if says is not None:
        assert says in str(child.job_state_info.reason)
    else:
        assert session.receive_job(job) == [7]
    grandchild = int(pidfile.read_text())
    wait_until(lambda: gone(grandchild), what="the worker's child to be killed with the job's group")


def test_case3_the_session_closes_the_pipes_a_finished_job_s_child_still_held(session: psjobs.Session,
                                                                               tmp_path: Any) -> None:
    """The job ends at its DONE, while its child still holds fd 1 and 2 open: the session takes
    what they hold, tells the end, then closes its read ends (not left open for each such job)."""
    def pipes() -> int:
        count = 0
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                count += os.readlink(f"/proc/self/fd/{fd}").startswith("pipe:")
        return count

    def one(n: int) -> None:
        pidfile = tmp_path / f"child{n}"
        job = session.start_job(forks_then, "returns", str(pidfile))
        assert job.wait(10) and job.state is JobState.COMPLETED
        assert session.receive_job(job) == [7]
        session.remove_job(job)
        grandchild = int(pidfile.read_text())
        wait_until(lambda: gone(grandchild), what="the worker's child to be killed with the job's group")

    one(0)
    before = pipes()
    for n in range(1, 6):
        one(n)
    assert pipes() == before


def writes_then_dies() -> None:
    os.write(1, b"last words\n")
    os.write(2, b"and an error without its newline")
    os.kill(os.getpid(), signal.SIGKILL)


def test_case3_what_a_killed_worker_wrote_to_fd_1_and_2_is_kept(session: psjobs.Session) -> None:
    """Its end of stream, its exit and its pipes' last bytes come together: the lines are in the
    job whichever the session reads first."""
    for _ in range(20):
        job = session.start_job(writes_then_dies)
        assert session.wait_job(job, timeout=DEADLINE) == [job]
        assert job.state is JobState.FAILED and "killed by SIGKILL" in str(job.child_jobs[0].reason)
        assert [str(r) for r in job.information] == ["last words"]
        assert [str(r) for r in job.error] == ["and an error without its newline"]
        session.remove_job(job)


# --- case 6: concurrent receives get each item exactly once -----------------------------------

def numbers(n: int) -> Iterator[int]:
    yield from range(n)


@pytest.mark.parametrize("wait", [True, False], ids=["wait", "nowait"])
@pytest.mark.parametrize("kind", ["process", "thread", "command"])
def test_case6_concurrent_receives_get_each_item_exactly_once(session: psjobs.Session, kind: str,
                                                              wait: bool) -> None:
    n = 200_000
    if kind == "process":
        job = session.start_job(numbers, n)
    elif kind == "thread":
        job = session.start_thread_job(numbers, n)
    else:
        job = session.start_job(["seq", "0", str(n - 1)])
    got: list[list[Any]] = [[] for _ in range(4)]

    def receive(k: int) -> None:
        if wait:
            got[k] = session.receive_job(job, wait=True, timeout=DEADLINE)
            return
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            finished = job.state.is_finished
            got[k] += session.receive_job(job)
            if finished and not job.has_more_data:
                return

    threads = [threading.Thread(target=receive, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE + 5)
    every = sorted(int(item) for items in got for item in items)
    assert every == list(range(n))  # each item once in total: none twice, none lost
    for items in got:  # and each receive got its items in production order
        assert [int(x) for x in items] == sorted(int(x) for x in items)


# --- case 9: the end of a job's output, its exit status, clear reasons --------------------------

def floods_then_exits(n: int, status: int) -> Iterator[int]:
    yield from range(n)
    print("last words")
    os._exit(status)


def test_case9_every_record_before_os_exit_arrives(session: psjobs.Session) -> None:
    job = session.start_job(floods_then_exits, 100_000, 0)
    assert job.wait(DEADLINE)
    assert session.receive_job(job) == list(range(100_000))  # the last batch too
    child = job.child_jobs[0]
    assert [r.message for r in child.information] == ["last words"]
    assert child.exit_code == 0


def test_case9_the_status_of_os_exit_is_the_exit_code(session: psjobs.Session) -> None:
    job = session.start_job(floods_then_exits, 10, 3)
    assert job.wait(DEADLINE)
    child = job.child_jobs[0]
    assert child.state is JobState.FAILED
    assert child.exit_code == 3 and job.exit_code == 3
    assert "exited with status 3" in str(child.job_state_info.reason)
    assert session.receive_job(job) == list(range(10))


def yields_too_much() -> Iterator[Any]:
    yield "before"
    yield b"\0" * (psjobs_max_frame() + 1)
    yield "after"


def psjobs_max_frame() -> int:
    from psjobs.worker._wire import MAX_FRAME

    return MAX_FRAME


def test_case9_an_item_over_the_frame_limit_fails_the_job_saying_so(session: psjobs.Session) -> None:
    job = session.start_job(yields_too_much)
    assert job.wait(60)
    child = job.child_jobs[0]
    assert child.state is JobState.FAILED
    reason = str(child.job_state_info.reason)
    assert "over the" in reason and "frame limit" in reason and "bytes" in reason, reason
    assert "status 70" not in reason
    assert session.receive_job(job) == ["before", "after"]  # the rest still arrives


def test_case9_a_nul_byte_in_env_is_refused_saying_so(session: psjobs.Session) -> None:
    """Refused before any job exists (case 7's rule), naming the variable: never a worker's status 70."""
    with pytest.raises(ValueError, match="NUL") as info:
        session.start_job(numbers, 3, env={"PSJOBS_TEST_BAD": "a\0b"})
    assert "PSJOBS_TEST_BAD" in str(info.value)
    assert session.get_job() == []
