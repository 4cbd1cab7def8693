"""Issue 12, the library half: memory stays within a window whatever a job prints, long lines are
split in linear time, and a receive consumes only what it returns."""

from __future__ import annotations

import inspect
import os
import signal
import stat
import sys
import threading
import time
from typing import Any

import psutil
import pytest

import psjobs
from psjobs._records import Record
from psjobs.core._pshost import Host
from psjobs.core._receive import _wait_in
from psjobs.core._spill import WINDOW
from psjobs.worker._procs import MAX_LINE

from .conftest import wait_until

pytestmark = pytest.mark.timeout(180)

_LINE = 200  # bytes a line, newline included
_MAKE_LINES = "import sys\nw = sys.stdout.write\nfor i in range(int(sys.argv[1])): w(f'{i:010d}' + 'x' * 189 + '\\n')"


def _expected(n: int) -> list[str]:
    return [f"{i:010d}" + "x" * 189 for i in range(n)]


def _rss() -> int:
    return int(psutil.Process().memory_info().rss)


def _warm(session: psjobs.Session) -> None:
    job = session.start_job("true")
    job.wait(30)
    session.remove_job(job)


def test_memory_stays_flat_while_a_job_prints_64_mb_nobody_receives(session: psjobs.Session) -> None:
    _warm(session)
    n = (64 << 20) // _LINE
    before = _rss()
    job = session.start_job([sys.executable, "-c", _MAKE_LINES, str(n)])
    peak = before
    while not job.wait(timeout=0.05):
        peak = max(peak, _rss())
    peak = max(peak, _rss())
    assert job.state is psjobs.JobState.COMPLETED
    assert session._spill.held <= WINDOW  # what stays in memory once the job is done
    # Without the window the session held ~64 MB of text in ~330 k records: ~150 MB more.
    assert peak - before < 40 << 20, f"the session grew by {(peak - before) >> 20} MiB"
    out = session.receive_job(job)
    assert out == _expected(n)  # every byte, in order
    assert job.output[-1] == out[-1]  # the stream lists still hold every record


def test_spill_files_are_private_and_deleted_with_the_job_and_the_session(session: psjobs.Session) -> None:
    n = (3 * WINDOW) // _LINE * 4
    job = session.start_job([sys.executable, "-c", _MAKE_LINES, str(n)])
    assert job.wait(60)
    spill = session._spill
    directory = spill.directory
    assert directory is not None
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    files = os.listdir(directory)
    assert files
    for name in files:
        assert stat.S_IMODE(os.stat(os.path.join(directory, name)).st_mode) == 0o600
    assert session.receive_job(job, keep=True) == _expected(n)
    session.remove_job(job)
    assert os.listdir(directory) == [".lock"]  # held while the session lives: see the killed-session test
    other = session.start_job([sys.executable, "-c", _MAKE_LINES, str(n)])
    assert other.wait(60)
    assert set(os.listdir(directory)) - {".lock"}
    session.close()
    assert not os.path.exists(directory)


def test_a_long_line_is_split_into_capped_records_in_linear_time(session: psjobs.Session) -> None:
    size = 64 << 20
    started = time.monotonic()
    job = session.start_job(f"head -c {size} /dev/zero | tr '\\0' x")
    assert job.wait(60)
    out = session.receive_job(job)
    took = time.monotonic() - started
    assert [len(piece) for piece in out] == [MAX_LINE] * (size // MAX_LINE)
    assert set("".join(out)) == {"x"}
    assert took < 15, f"a 64 MiB line took {took:.1f} s (it took 22 s when joining was quadratic)"


def _print_long(chars: int) -> None:
    print("y" * (chars // 2), end="")
    print("y" * (chars - chars // 2))


def test_a_long_printed_line_is_split_too(session: psjobs.Session) -> None:
    from psjobs._inside import MAX_LINE_CHARS

    job = session.start_job(_print_long, 3 * MAX_LINE_CHARS + 5)
    assert job.wait(60)
    pieces = [r.message for r in job.information]
    assert [len(p) for p in pieces] == [MAX_LINE_CHARS] * 3 + [5]


def test_a_long_line_is_cut_between_characters(session: psjobs.Session) -> None:
    text = "é€😀" * ((3 * MAX_LINE) // 9 + 1000)  # 9 bytes a round: cuts would fall inside characters
    code = f"import sys; sys.stdout.write({text[:3]!r} * {len(text) // 3}); sys.stdout.flush()"
    job = session.start_job([sys.executable, "-c", code])
    assert job.wait(60)
    out = session.receive_job(job)
    assert len(out) == 4
    assert all(len(piece.encode()) <= MAX_LINE for piece in out)
    assert "".join(out) == text  # no character broken, none replaced


def _count_then_wait(n: int) -> Any:
    for i in range(n):
        yield i
        if i % 1000 == 999:
            time.sleep(0.005)  # pace the job, so that items arrive while the receive waits
    time.sleep(120)  # so a receive that waits is ended only by the interrupt (the test stops it)


class _Interrupter:
    """Sends SIGINT to the main thread once it is in a receive and ``at_least`` items arrived."""

    def __init__(self, job: psjobs.Job, n: int, at_least: int) -> None:
        self.armed = threading.Event()
        main = threading.main_thread().ident
        assert main is not None

        def run() -> None:
            self.armed.wait(60)
            at_arm = _arrived(job)  # one item more, and the main thread waits in its receive
            wait_until(lambda: (_arrived(job) >= at_least and _arrived(job) > at_arm) or _arrived(job) == n,
                       timeout=60, what="items to arrive")
            signal.pthread_kill(main, signal.SIGINT)

        self.thread = threading.Thread(target=run)
        self.thread.start()


def _arrived(job: psjobs.Job) -> int:
    return len(job.child_jobs[0]._journal or ())


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="needs the main thread")
def test_ctrl_c_during_receive_wait_leaves_what_was_not_returned(session: psjobs.Session) -> None:
    n = 300_000
    job = session.start_job(_count_then_wait, n)
    got: list[int] = []
    for step in (1, 2, 3):
        got += session.receive_job(job)  # some now, without waiting
        interrupter = _Interrupter(job, n, n * step // 4)
        try:
            with pytest.raises(KeyboardInterrupt):
                interrupter.armed.set()
                session.receive_job(job, wait=True)  # ends only by the interrupt
        finally:
            interrupter.thread.join()
    wait_until(lambda: _arrived(job) == n, timeout=60, what="every item")
    got += session.receive_job(job)
    session.stop_job(job)
    assert len(got) == n, f"{n - len(got)} items lost" if len(got) < n else f"{len(got) - n} duplicated"
    assert got == list(range(n))


class _FailingHost(Host):
    """Fails to show the first information record it is given (a broken stdout)."""

    def __init__(self) -> None:
        super().__init__()
        self.failed = False
        self.shown: list[str] = []

    def write_record(self, job: psjobs.Job, record: Record) -> None:
        if not self.failed:
            self.failed = True
            raise BrokenPipeError("stdout is closed")
        self.shown.append(record.message)


def _talk() -> Any:
    for i in range(50):
        yield i
        print(f"line {i}")


def test_an_exception_inside_receive_leaves_what_was_not_returned() -> None:
    host = _FailingHost()
    with psjobs.Session(host=host) as session:
        job = session.start_job(_talk)
        assert job.wait(60)
        with pytest.raises(BrokenPipeError):
            session.receive_job(job)
        assert session.receive_job(job) == list(range(50))  # nothing consumed by the failed call
        assert host.shown == [f"line {i}" for i in range(50)]
        assert session.receive_job(job) == []


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="needs the main thread")
def test_concurrent_receives_with_interrupts_give_each_item_exactly_once(session: psjobs.Session) -> None:
    n = 300_000
    job = session.start_job(_count_then_wait, n)
    theirs: list[int] = []
    stop = threading.Event()

    def other() -> None:
        while not stop.is_set():
            theirs.extend(session.receive_job(job, wait=True, timeout=0.01))

    reader = threading.Thread(target=other)
    reader.start()
    try:
        for step in (1, 2, 3):
            interrupter = _Interrupter(job, n, n * step // 4)
            try:
                with pytest.raises(KeyboardInterrupt):
                    interrupter.armed.set()
                    session.receive_job(job, wait=True)  # everything it took is given back
            finally:
                interrupter.thread.join()
        wait_until(lambda: _arrived(job) == n, timeout=60, what="every item")
        wait_until(lambda: len(theirs) == n, timeout=30, what="the other reader to take everything")
    finally:
        stop.set()
        reader.join()
        session.stop_job(job)
    assert sorted(theirs) == list(range(n)), "an item was lost or received twice"


class _Unpicklable:
    def __init__(self, i: int) -> None:
        self.i = i
        self.lock = threading.Lock()


def _mixed(n: int) -> Any:
    for i in range(n):
        psjobs.write_output("y" * 1000)
        psjobs.write_output(_Unpicklable(i))


def test_values_that_cannot_be_pickled_stay_in_memory(session: psjobs.Session) -> None:
    n = (2 * WINDOW) // 1000
    job = session.start_thread_job(_mixed, n)
    assert job.wait(60)
    out = session.receive_job(job)
    assert session._spill.directory is not None  # the strings went to disk...
    assert out[0::2] == ["y" * 1000] * n
    assert [o.i for o in out[1::2]] == list(range(n))  # ...the objects with locks stayed


def test_a_job_with_few_records_keeps_them_in_a_plain_list(session: psjobs.Session) -> None:
    from psjobs.core._journal import SMALL, MemoryJournal
    from psjobs.core._spill import SpillJournal

    few = session.start_thread_job(lambda: [psjobs.write_output(i) for i in range(SMALL)] and None)
    many = session.start_thread_job(lambda: [psjobs.write_output(i) for i in range(SMALL + 1)] and None)
    assert few.wait(30) and many.wait(30)
    assert type(few._journal) is MemoryJournal
    assert type(many._journal) is SpillJournal
    assert few.receive() == list(range(SMALL)) and many.receive() == list(range(SMALL + 1))


def test_spill_files_go_with_the_interpreter_and_the_closed_session_says_so(tmp_path: Any) -> None:
    code = f"""
import sys, psjobs
session = psjobs.Session()
job = session.start_job([sys.executable, "-c", {_MAKE_LINES!r}, "100000"])
job.wait(60)
print(session._spill.directory, flush=True)
session.close()
try:
    session.receive_job(job)
except psjobs.PsJobsError as exc:
    print(type(exc).__name__, exc)
other = psjobs.Session()
job = other.start_job([sys.executable, "-c", {_MAKE_LINES!r}, "100000"])
job.wait(60)
print(other._spill.directory, flush=True)
"""  # the second session is never closed: its files go at exit
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    first, error, second = out.stdout.splitlines()
    assert not os.path.exists(first) and not os.path.exists(second)
    assert error.startswith("JobStateError") and "deleted" in error and "keep the session open" in error


def test_the_spill_files_of_a_killed_session_are_deleted_by_the_next_one(tmp_path: Any) -> None:
    """A session killed with SIGKILL runs no exit hook: its spilled records stay in the temporary
    directory until the next session of this user spills, which deletes them (and never a live
    session's)."""
    import subprocess

    code = f"""
import os, sys, psjobs
session = psjobs.Session()
job = session.start_job([sys.executable, "-c", {_MAKE_LINES!r}, "100000"])
job.wait(60)
print(session._spill.directory, flush=True)
if sys.argv[1] == "kill":
    os.kill(os.getpid(), 9)
sys.stdin.read()  # the live one waits until the test is done with it
"""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    killed = subprocess.run([sys.executable, "-c", code, "kill"], capture_output=True, text=True, timeout=120, env=env)
    assert killed.returncode == -signal.SIGKILL
    dead = killed.stdout.strip()
    assert os.listdir(dead)  # the records it spilled are still there
    live = subprocess.Popen([sys.executable, "-c", code, "wait"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)
    try:
        assert live.stdout is not None
        mine = live.stdout.readline().strip()  # this session spilled, and so looks for dead ones
        assert mine and os.path.isdir(mine)
        wait_until(lambda: not os.path.exists(dead), 30, "the killed session's spill files to go")
        killed_again = subprocess.run([sys.executable, "-c", code, "kill"], capture_output=True, text=True,
                                      timeout=120, env=env)
        assert os.path.isdir(mine)  # a live session's stays: it holds its lock
        assert os.path.isdir(killed_again.stdout.strip())  # (a third session would delete this one)
    finally:
        live.communicate("", timeout=60)


def test_the_memory_bench_runs() -> None:
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root / "src"), str(root), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-m", "bench.memory", "--quick"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=150)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "read back, in order" in out.stdout and "MISSES" not in out.stdout


def test_only_the_process_that_made_spill_files_deletes_them_at_exit(tmp_path: Any) -> None:
    from psjobs.core._spill import _remove

    directory = tmp_path / "spill"
    directory.mkdir()
    _remove(str(directory), os.getpid() + 1)  # a forked child's exit hook
    assert directory.exists()
    _remove(str(directory), os.getpid())
    assert not directory.exists()


def test_records_stay_in_memory_when_they_cannot_be_written(session: psjobs.Session, tmp_path: Any,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    session._spill.directory = str(tmp_path / "missing")  # every write fails: no such directory
    n = (3 * WINDOW) // _LINE * 2
    with caplog.at_level("WARNING", logger="psjobs"):
        job = session.start_job([sys.executable, "-c", _MAKE_LINES, str(n)])
        assert job.wait(60)
    assert session.receive_job(job) == _expected(n)  # nothing lost
    warned = [r.getMessage() for r in caplog.records if "could not write" in r.getMessage()]
    assert warned and f"Job {job.child_jobs[0].id}" in warned[0] and "stay in memory" in warned[0]


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="needs the main thread")
def test_ctrl_c_while_another_thread_holds_the_lock_leaves_the_session_working(session: psjobs.Session) -> None:
    # CPython's Condition.wait, interrupted while taking the lock back, raised without it: the
    # receive's `with` then released the other thread's lock ("release unlocked lock" there).
    job = session.start_job(_count_then_wait, 10)
    wait_until(lambda: _arrived(job) == 10, timeout=60, what="the items")
    assert session.receive_job(job) == list(range(10))
    main = threading.main_thread().ident
    assert main is not None
    errors: list[BaseException] = []

    lines, first = inspect.getsourcelines(_wait_in)
    waiting = first + next(i for i, line in enumerate(lines) if "waiter.acquire(True" in line)
    retaking = first + next(i for i, line in enumerate(lines) if "lock.acquire()" in line)

    def at(line: int) -> bool:
        frame = sys._current_frames().get(main)
        return frame is not None and frame.f_code is _wait_in.__code__ and frame.f_lineno == line

    def holder() -> None:
        try:
            wait_until(lambda: at(waiting), timeout=30, what="the receive to wait")
            with session._lock:
                session._cond.notify_all()  # the receive wakes, and must wait for this lock
                wait_until(lambda: at(retaking), timeout=30, what="the receive to take the lock back")
                signal.pthread_kill(main, signal.SIGINT)  # lands while it is blocked on the lock
                wait_until(lambda: at(retaking) and sys._current_frames()[main].f_locals["interrupted"],
                           timeout=30, what="the interrupt to land")
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            session.receive_job(job, wait=True)
    finally:
        thread.join()
    assert errors == []
    assert not session._lock.locked()
    session.stop_job(job)  # the session still works
    assert job.state is psjobs.JobState.STOPPED


def test_a_thread_jobs_streamed_records_are_counted_exactly_and_released_on_removal(
        session: psjobs.Session) -> None:
    # JobPort.record adds a thread job's records to its SpillJournal itself (not through
    # SpillJournal.append): the window's count must still be the records' own estimate, to the
    # byte, or the session would spill too early (or never) and drift upward job after job.
    from psjobs.core._spill import cost

    values: list[Any] = ["é" * 300, b"x" * 1000, 12345678901234567890, [1, 2, 3], "a", 7, None, 2.5]

    def produce() -> Any:
        for i in range(400):
            yield values[i % len(values)]
            psjobs.write_warning(f"line {i}")

    before = session._spill.held
    job = session.start_thread_job(produce)
    assert job.wait(60)
    entries = job._journal.read(0, len(job._journal))  # type: ignore[union-attr]
    assert len(entries) == 800
    assert session._spill.held - before == cost(entries)
    assert session.receive_job(job) == values * 50
    session.remove_job(job)
    assert session._spill.held == before  # nothing of it counted any more


class _BigInt(int):
    def __sizeof__(self) -> int:
        return 5000  # an override: only sys.getsizeof sees it


def test_the_window_counts_every_batch_as_getsizeof_does() -> None:
    # cost() sizes a batch of one flat type by that type's __sizeof__ (cheaper than getsizeof): it
    # must count what getsizeof counts, for every such type and for the batches it leaves to getsizeof.
    from psjobs.core._spill import _ENTRY, cost

    batches: list[list[Any]] = [[1, 2**70, -5], [2.5, 0.0], ["a", "é" * 50, "€"], [b"", b"x" * 99],
                                [True, False], [None, None], [_BigInt(3), _BigInt(4)], [1, "a", None],
                                [[1, 2], (3,)], [int, str], [Record(psjobs.Stream.WARNING, "m", 1.0)]]
    for values in batches:
        entries = [(0, v, 1.0) for v in values]
        assert cost(entries) == sum(_ENTRY + sys.getsizeof(v) for v in values), values


def test_a_spill_pass_sizes_again_what_a_stopped_record_left_uneven(session: psjobs.Session) -> None:
    # A journal keeps each in-memory entry's size for the spill pass; a stop raised into a thread
    # job between a record's two appends (JobPort.record) leaves one size too many. The pass must
    # then size the entries itself: blocks in order, nothing lost, the window's count unchanged.
    from psjobs.core import _spill

    values = [f"v{i}" * (i % 7) for i in range(3000)]
    job = session.start_thread_job(lambda: [psjobs.write_output(v) for v in values] and None)
    assert job.wait(timeout=30)
    journal = job._journal
    assert isinstance(journal, _spill.SpillJournal)
    journal._sizes.insert(5, 12345)  # what the stop left: a size without its entry
    spill = session._spill
    held, window, counted = spill.held, spill.window, journal._bytes
    try:
        spill.window = 0  # the pass writes every in-memory entry
        with spill.lock:
            spill._pass()
    finally:
        spill.window = window
    assert journal._starts and journal._mem_at[1] == [] and journal._sizes == []
    assert journal._bytes == 0 and spill.held == held - counted  # released as it was counted
    assert job.receive() == values


@pytest.mark.timeout(60)
def test_spilled_blocks_are_bounded_and_read_back_in_order(session: psjobs.Session) -> None:
    """A spill writes blocks of at most 4,096 entries, ending at the latest at the entry that brings
    one to 1 MiB (so a read of one position unpickles about that much at most); mixed small and big
    values come back whole and in order."""
    from psjobs.core import _spill

    values: list[Any] = [("x" * (300_000 if i % 997 == 0 else i % 50)) for i in range(30_000)]
    job = session.start_thread_job(lambda: [psjobs.write_output(v) for v in values] and None)
    assert job.wait(timeout=30)
    journal = job._journal
    assert isinstance(journal, _spill.SpillJournal) and journal._starts
    starts = [*journal._starts, None]
    for k, (start, length) in enumerate(zip(journal._starts, journal._lens, strict=True)):
        end = starts[k + 1]
        if end is not None:
            count = end - start
            assert 1 <= count <= _spill._BLOCK_ENTRIES
            sizes = [_spill._ENTRY + sys.getsizeof(v) for v in values[start:end]]
            assert sum(sizes[:-1]) < _spill._BLOCK_BYTES, (start, count)
        assert length > 0
    assert job.receive() == values


def test_a_spill_directory_whose_lock_is_held_is_kept_whatever_its_pid(tmp_path: Any,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A session in another pid namespace (a container sharing /tmp) can have a pid that is dead
    here: its lock, not its pid, says it lives."""
    import subprocess
    import tempfile

    from psjobs.core import _spill

    gone = subprocess.Popen(["true"])  # its pid: no process has it once it is reaped
    gone.wait()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    directory = tmp_path / f"psjobs-spill-{gone.pid}-abc"
    directory.mkdir(mode=0o700)
    fd = _spill._hold(str(directory))
    try:
        _spill._prune_dead()
        assert directory.is_dir()
    finally:
        os.close(fd)  # the session ends
    _spill._prune_dead()
    assert not directory.exists()


def test_a_spill_pass_writes_the_oldest_records_and_keeps_the_newest_in_memory(session: psjobs.Session) -> None:
    """Past the window, a pass writes a journal's oldest records until memory is back to about half
    the window, not the whole journal: the newest, which a reader that keeps up has not taken yet,
    stay in memory, and every record still comes back in order."""
    from psjobs.core import _spill

    values = list(range(100_000, 130_000))
    job = session.start_thread_job(lambda: (v for v in values))
    assert job.wait(timeout=60)
    journal = job._journal
    assert isinstance(journal, _spill.SpillJournal) and journal._mem_at[0] == 0  # all in memory
    spill = session._spill
    window = spill.window
    try:
        spill.window = spill.held - 1  # just past it: one pass
        spill.relieve()
        base, mem = journal._mem_at
        assert base > 0 and mem, "some records on disk, the newest in memory"
        assert [e[1] for e in mem] == values[base:], "what stays in memory is the newest"
        half = spill.window // 2
        assert half * 0.9 <= spill.held <= half, (spill.held, half)
    finally:
        spill.window = window
    assert [e[1] for e in journal.read(0, len(journal))] == values
    assert job.receive() == values
