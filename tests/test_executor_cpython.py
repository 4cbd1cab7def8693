"""CPython's executor tests (Lib/test/test_concurrent_futures), ported to ``psjobs.Executor``.

Adapted scenario by scenario from CPython's test suite (PSF licence, © Python Software Foundation).
Every scenario runs for ``kind="process"`` and ``kind="thread"`` (the ``executor`` fixture), with
five workers as there. Where CPython waits on a ``threading.Event`` (or a manager's, for processes)
these tests wait on a file (``gate``), which both kinds can see; where CPython sleeps to keep a call
busy, a call waits on a gate the test opens at its end.

Scenarios ported: executor.py (submit, submit_keyword, map, map_exception, map_timeout,
shutdown_race_issue12456, no_stale_references, max_workers_negative), test_as_completed.py
(no_timeout, future_times_out, duplicate_futures, correct_timeout_exception_msg), test_wait.py
(20369, first_completed, first_completed_some_already_completed, first_exception,
first_exception_some_already_complete, first_exception_one_already_failed, all_completed,
timeout, pending_calls_race), test_shutdown.py (run_after_shutdown, interpreter_shutdown,
submit_after_interpreter_shutdown, hang_issue12364, cancel_futures, hang_gh83386, hang_gh94440,
context_manager_shutdown, del_shutdown, shutdown_no_wait, cancel_futures_wait_false, gh_132969
without max_tasks_per_child, threads/processes_terminate as "no job runs after shutdown"),
test_process_pool.py (map_chunksize, traceback, traceback_when_child_process_terminates_abruptly,
killed_child, saturation), test_thread_pool.py (map_submits_without_iteration, default_workers,
saturation, executor_map_current_future_cancel), test_deadlock.py (an error or a crash while
pickling, unpickling or running a call fails that call's future only; an unpicklable result comes
back as a ``psjobs.Snapshot``, psjobs' stand-in, where CPython fails the future).

Scenarios that cannot apply, and why:
- executor.py test_free_reference, test_as_completed test_free_reference_yielded_future: a job
  keeps its output until it is removed (that is what ``future.job.output`` is), so a result is
  referenced by the session's job table; the second tests the stdlib's own as_completed on bare
  Futures, not an executor.
- test_process_pool idle_process_reuse_*, max_tasks_per_child*, stranded/unreplaceable worker
  exits, test_ressources_gced_in_workers, sysconf, max_workers_too_large (Windows): psjobs runs
  each call in a fresh process forked from its warm fork server, so there is no pool of reused
  workers to count, limit or replace; mp_context and max_tasks_per_child are not parameters.
- test_process_pool broken_process_pool_traceback and killed_child's "every later submit raises
  BrokenProcessPool": a killed process fails only its own call (ported as such in killed_child);
  the executor is never broken.
- terminate_workers / kill_workers (3.14): not part of psjobs' contract; cancel the futures
  instead (each stops its job for real).
- test_thread_pool idle_thread_reuse, thread_names_*, test_shutdown threads_terminate's count of
  ``_threads``: psjobs' thread jobs run on the session's thread pool (``psjobs-thread-N``), whose
  threads are private; ported as "no job of the executor runs after shutdown".
- test_thread_pool hang_global_shutdown_lock and process_fork_from_a_threadpool: about
  multiprocessing's fork context inside a ThreadPoolExecutor, not about an executor's contract.
- test_init.py (initializer, initargs): not parameters of psjobs.Executor (API.md 8.1); start jobs
  with ``init=`` for that.
- test_future.py: unit tests of concurrent.futures.Future itself, which psjobs' futures subclass
  unchanged except ``cancel`` (tested in tests/test_futures.py).
- test_interpreter_pool.py: InterpreterPoolExecutor (3.14) has no psjobs kind.
"""

from __future__ import annotations

import concurrent.futures as futures
import contextlib
import os
import pickle
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import psjobs

from .conftest import wait_until

WORKERS = 5


# --- calls: module level, so that a process job can ship them by reference --------------------------

def mul(x: int, y: int) -> int:
    return x * y


def capture(*args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return args, kwargs


def wait_for(path: str) -> None:
    """Block until the file ``path`` exists: CPython's ``event.wait()`` for threads and processes."""
    while not os.path.exists(path):
        time.sleep(0.005)


def wait_and_raise(path: str) -> None:
    wait_for(path)
    raise Exception("this is an exception")


def sleep_then(t: float, value: Any = None) -> Any:
    # Short sleeps: a thread job is stopped between Python instructions, not inside a long
    # time.sleep (docs/guide.md).
    deadline = time.monotonic() + t
    while time.monotonic() < deadline:
        time.sleep(0.01)
    return value


def write_after(t: float, path: str, text: str) -> None:
    sleep_then(t)
    Path(path).write_text(text)


def raise_runtime() -> None:
    raise RuntimeError(123)  # some comment


def failing_task(n: int) -> int:
    raise ValueError("failing task")


def good_task(n: int) -> int:
    sleep_then(0.1 * n)
    return n


def note_running(directory: str, n: int) -> int:
    # Each call leaves a file while it runs: the test counts how many run at once.
    mine = Path(directory, f"{n}.running")
    mine.touch()
    try:
        wait_for(str(Path(directory, "go")))
        return len(list(Path(directory).glob("*.running")))
    finally:
        mine.unlink()


class MyObject:
    def my_method(self) -> None:
        pass


class ErrorAtPickle:
    """Raises while pickled (CPython test_deadlock: error at task pickle)."""

    def __reduce__(self) -> Any:
        raise pickle.PicklingError("error at pickle")


def _exit_now(code: int) -> None:
    os._exit(code)


class ExitAtUnpickle:
    """Ends the process that unpickles it (CPython test_deadlock: exit at task unpickle)."""

    def __reduce__(self) -> Any:
        return _exit_now, (3,)


def return_unpicklable() -> Any:
    return threading.Lock()


# --- fixtures -----------------------------------------------------------------------------------------

@pytest.fixture(params=["process", "thread"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def session() -> Iterator[psjobs.Session]:
    s = psjobs.Session(stop_grace=2.0)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def executor(kind: str, session: psjobs.Session) -> Iterator[psjobs.Executor]:
    ex = psjobs.Executor(kind, max_workers=WORKERS, session=session)
    try:
        yield ex
    finally:
        ex.shutdown(wait=True)


@pytest.fixture
def gate(tmp_path: Path) -> Iterator[str]:
    """A file the calls wait for; opened at the end whatever happened, so no call outlives the test."""
    path = str(tmp_path / "gate")
    try:
        yield path
    finally:
        Path(path).touch()


def open_gate(path: str) -> None:
    Path(path).touch()


def done_future(result: Any = None, exception: BaseException | None = None) -> futures.Future[Any]:
    f: futures.Future[Any] = futures.Future()
    if exception is not None:
        f.set_exception(exception)
    else:
        f.set_result(result)
    return f


def cancelled_future(notified: bool) -> futures.Future[Any]:
    f: futures.Future[Any] = futures.Future()
    f.cancel()
    if notified:
        f.set_running_or_notify_cancel()
    return f


def running_future() -> futures.Future[Any]:
    f: futures.Future[Any] = futures.Future()
    f.set_running_or_notify_cancel()
    return f


# --- executor.py ----------------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_submit(executor: psjobs.Executor) -> None:
    future = executor.submit(pow, 2, 8)
    assert future.result(timeout=30) == 256
    assert isinstance(future, futures.Future)
    assert future.job is not None and future.job.state is psjobs.JobState.COMPLETED  # type: ignore[attr-defined]


@pytest.mark.timeout(60)
def test_submit_keyword(executor: psjobs.Executor) -> None:
    assert executor.submit(mul, 2, y=8).result(timeout=30) == 16
    # The call's own keywords never meet the start verbs' (name=, input=, self=, fn=...).
    assert executor.submit(capture, 1, self=2, fn=3, name=4).result(timeout=30) == \
        ((1,), {"self": 2, "fn": 3, "name": 4})
    with pytest.raises(TypeError):
        executor.submit(fn=capture, arg=1)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        executor.submit(arg=1)  # type: ignore[call-arg]


@pytest.mark.timeout(60)
def test_map(executor: psjobs.Executor) -> None:
    expected = list(map(pow, range(10), range(10)))
    assert list(executor.map(pow, range(10), range(10), timeout=30)) == expected
    assert list(executor.map(pow, range(10), range(10), chunksize=3, timeout=30)) == expected


@pytest.mark.timeout(60)
def test_map_exception(executor: psjobs.Executor) -> None:
    results = executor.map(divmod, [1, 1, 1, 1], [2, 3, 0, 5], timeout=30)
    assert next(results) == (0, 1)
    assert next(results) == (0, 1)
    with pytest.raises(ZeroDivisionError):
        next(results)


@pytest.mark.timeout(60)
def test_map_timeout(executor: psjobs.Executor, gate: str) -> None:
    results = []
    with pytest.raises(futures.TimeoutError):
        here = os.path.dirname(gate)  # exists: those calls return at once
        for r in executor.map(wait_for, [here, here, gate], timeout=2):
            results.append(r)
    assert results == [None, None]
    open_gate(gate)  # the call given up on runs on, as in CPython: the fixture's shutdown waits for it


@pytest.mark.timeout(60)
def test_shutdown_race_issue12456(executor: psjobs.Executor) -> None:
    executor.map(str, [2] * (WORKERS + 1))
    executor.shutdown()


@pytest.mark.timeout(60)
def test_no_stale_references(executor: psjobs.Executor) -> None:
    my_object = MyObject()
    collected = threading.Event()
    ref = weakref.ref(my_object, lambda _: collected.set())
    executor.submit(my_object.my_method).result(timeout=30)
    del my_object
    assert collected.wait(10), "the executor or its job kept the submitted callable alive"
    assert ref() is None


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind_name", ["process", "thread"])
def test_max_workers_negative(kind_name: str) -> None:
    for number in (0, -1):
        with pytest.raises(ValueError, match="max_workers must be greater than 0"):
            psjobs.Executor(kind_name, max_workers=number)


# --- test_as_completed.py --------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_as_completed_no_timeout(executor: psjobs.Executor) -> None:
    already = [cancelled_future(True), done_future(exception=OSError()), done_future(42)]
    f1, f2 = executor.submit(mul, 2, 21), executor.submit(mul, 7, 6)
    assert set(futures.as_completed([*already, f1, f2], timeout=30)) == {*already, f1, f2}
    assert f1.result() == f2.result() == 42


@pytest.mark.timeout(60)
def test_as_completed_future_times_out(executor: psjobs.Executor, gate: str) -> None:
    already = {cancelled_future(True), done_future(exception=OSError()), done_future(42)}
    for timeout in (0, 0.1):
        busy = executor.submit(wait_for, gate)
        completed = set()
        with pytest.raises(futures.TimeoutError):
            for f in futures.as_completed(already | {busy}, timeout):
                completed.add(f)
        assert completed == already


@pytest.mark.timeout(60)
def test_as_completed_duplicate_futures(executor: psjobs.Executor) -> None:
    future1 = executor.submit(sleep_then, 0.2)
    completed = list(futures.as_completed([future1] * 3, timeout=30))
    assert completed == [future1]


@pytest.mark.timeout(30)
def test_as_completed_correct_timeout_exception_msg(executor: psjobs.Executor, gate: str) -> None:
    pending = executor.submit(wait_for, gate)
    fs = [cancelled_future(True), pending, running_future(), done_future(42)]
    with pytest.raises(futures.TimeoutError) as info:
        list(futures.as_completed(fs, timeout=0))
    assert str(info.value) == "2 (of 4) futures unfinished"


# --- test_wait.py -------------------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_wait_20369(executor: psjobs.Executor) -> None:
    future = executor.submit(mul, 1, 2)
    done, not_done = futures.wait([future, future], timeout=30, return_when=futures.ALL_COMPLETED)
    assert done == {future} and not_done == set()


@pytest.mark.timeout(60)
def test_wait_first_completed(executor: psjobs.Executor, gate: str) -> None:
    cancelled = cancelled_future(False)
    future1 = executor.submit(mul, 21, 2)
    future2 = executor.submit(wait_for, gate)
    done, not_done = futures.wait([cancelled, future1, future2], timeout=30, return_when=futures.FIRST_COMPLETED)
    assert done == {future1}
    assert not_done == {cancelled, future2}
    open_gate(gate)
    future2.result(timeout=30)


@pytest.mark.timeout(60)
def test_wait_first_completed_some_already_completed(executor: psjobs.Executor, gate: str) -> None:
    already = {cancelled_future(True), done_future(42)}
    future1 = executor.submit(wait_for, gate)
    finished, pending = futures.wait([*already, future1], timeout=30, return_when=futures.FIRST_COMPLETED)
    assert finished == already and pending == {future1}
    open_gate(gate)
    future1.result(timeout=30)


@pytest.mark.timeout(60)
def test_wait_first_exception(executor: psjobs.Executor, tmp_path: Path, gate: str) -> None:
    gate1 = str(tmp_path / "gate1")
    future1 = executor.submit(mul, 2, 21)
    future2 = executor.submit(wait_and_raise, gate1)
    future3 = executor.submit(wait_for, gate)

    def open_after_future1() -> None:  # future1 is done before future2 fails
        future1.result(timeout=30)
        open_gate(gate1)

    t = threading.Thread(target=open_after_future1)
    t.start()
    try:
        finished, pending = futures.wait([future1, future2, future3], timeout=30,
                                         return_when=futures.FIRST_EXCEPTION)
        assert finished == {future1, future2} and pending == {future3}
    finally:
        t.join(30)
        open_gate(gate1)
    open_gate(gate)
    future3.result(timeout=30)


@pytest.mark.timeout(60)
def test_wait_first_exception_some_already_complete(executor: psjobs.Executor, gate: str) -> None:
    success, cancelled, notified = done_future(42), cancelled_future(False), cancelled_future(True)
    future1 = executor.submit(divmod, 21, 0)
    future2 = executor.submit(wait_for, gate)
    finished, pending = futures.wait([success, cancelled, notified, future1, future2], timeout=30,
                                     return_when=futures.FIRST_EXCEPTION)
    assert finished == {success, notified, future1}
    assert pending == {cancelled, future2}
    open_gate(gate)
    future2.result(timeout=30)


@pytest.mark.timeout(60)
def test_wait_first_exception_one_already_failed(executor: psjobs.Executor, gate: str) -> None:
    failed = done_future(exception=OSError())
    future1 = executor.submit(wait_for, gate)
    finished, pending = futures.wait([failed, future1], timeout=30, return_when=futures.FIRST_EXCEPTION)
    assert finished == {failed} and pending == {future1}
    open_gate(gate)
    future1.result(timeout=30)


@pytest.mark.timeout(60)
def test_wait_all_completed(executor: psjobs.Executor) -> None:
    already = {done_future(42), cancelled_future(True), done_future(exception=OSError())}
    future1 = executor.submit(divmod, 2, 0)
    future2 = executor.submit(mul, 2, 21)
    finished, pending = futures.wait([*already, future1, future2], timeout=30, return_when=futures.ALL_COMPLETED)
    assert finished == {*already, future1, future2} and pending == set()


@pytest.mark.timeout(60)
def test_wait_timeout(executor: psjobs.Executor, gate: str) -> None:
    already = {cancelled_future(True), done_future(exception=OSError()), done_future(42)}
    future = executor.submit(wait_for, gate)
    finished, pending = futures.wait([*already, future], timeout=0.05, return_when=futures.ALL_COMPLETED)
    assert finished == already and pending == {future}
    open_gate(gate)
    future.result(timeout=30)


@pytest.mark.timeout(120)
def test_wait_pending_calls_race(session: psjobs.Session, gate: str) -> None:
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        with psjobs.Executor("thread", max_workers=WORKERS, session=session) as executor:
            fs = {executor.submit(wait_for, gate) for _ in range(100)}
            open_gate(gate)
            done, pending = futures.wait(fs, timeout=60, return_when=futures.ALL_COMPLETED)
    finally:
        sys.setswitchinterval(old)
    assert done == fs and not pending


# --- test_shutdown.py ------------------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_run_after_shutdown(executor: psjobs.Executor) -> None:
    executor.shutdown()
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        executor.submit(pow, 2, 5)


def run_script(code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(code))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), *sys.path])}
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=env,
                          cwd=tmp_path)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("ending", ["exit", "shutdown(wait=False)", "shutdown(wait=False, cancel_futures=True)"])
def test_interpreter_shutdown(kind: str, ending: str, tmp_path: Path) -> None:
    # test_interpreter_shutdown, test_hang_gh83386, test_cancel_futures_wait_false: the interpreter
    # exits with a call still running; it is finished first (as the standard executors' atexit
    # join does), not stopped by the session's own exit. What the call prints goes to its job's
    # information stream, so the scenario checks a file the call writes instead of stdout.
    out = tmp_path / "apple"
    stop = "" if ending == "exit" else f"t.{ending}"
    proc = run_script(f"""
        import psjobs
        from tests.test_executor_cpython import write_after
        if __name__ == "__main__":
            t = psjobs.Executor({kind!r}, max_workers=5)
            t.submit(write_after, 1.0, {str(out)!r}, "apple")
            {stop}
        """, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert out.read_text() == "apple"


@pytest.mark.timeout(90)
def test_submit_after_interpreter_shutdown(kind: str, tmp_path: Path) -> None:
    proc = run_script(f"""
        import atexit
        import psjobs

        @atexit.register
        def run_last():
            try:
                t.submit(id, None)
            except RuntimeError:
                print("runtime-error")
                raise

        if __name__ == "__main__":
            t = psjobs.Executor({kind!r}, max_workers=5)
            t.submit(id, 42).result()
        """, tmp_path)
    assert "RuntimeError: cannot schedule new futures" in proc.stderr
    assert proc.stdout.strip() == "runtime-error"


@pytest.mark.timeout(120)
def test_hang_issue12364(executor: psjobs.Executor) -> None:
    fs = [executor.submit(sleep_then, 0.1) for _ in range(50)]
    executor.shutdown()
    for f in fs:
        f.result(timeout=0)


@pytest.mark.timeout(120)
def test_cancel_futures(executor: psjobs.Executor) -> None:
    fs = [executor.submit(sleep_then, 0.1) for _ in range(50)]
    executor.shutdown(cancel_futures=True)
    cancelled = [f for f in fs if f.cancelled()]
    assert len(cancelled) > 20
    others = [f for f in fs if not f.cancelled()]
    assert others  # the running ones are left to finish
    for f in others:
        assert f.done() and f.exception(timeout=0) is None


@pytest.mark.timeout(60)
def test_hang_gh94440(kind: str, session: psjobs.Session) -> None:
    executor = psjobs.Executor(kind, max_workers=1, session=session)
    executor.submit(int).result(timeout=30)
    executor.submit(int).cancel()
    done = threading.Event()
    t = threading.Thread(target=lambda: (executor.shutdown(wait=True), done.set()))
    t.start()
    assert done.wait(10), "shutdown(wait=True) hung after a submit that was cancelled at once"
    t.join()


@pytest.mark.timeout(60)
def test_context_manager_shutdown(kind: str, session: psjobs.Session) -> None:
    with psjobs.Executor(kind, max_workers=5, session=session) as e:
        assert list(e.map(abs, range(-5, 5), timeout=30)) == [5, 4, 3, 2, 1, 0, 1, 2, 3, 4]
    assert all(j.state.is_finished for j in session.get_job())


@pytest.mark.timeout(60)
def test_del_shutdown(kind: str, session: psjobs.Session) -> None:
    executor = psjobs.Executor(kind, max_workers=5, session=session)
    results = executor.map(abs, range(-5, 5), timeout=30)
    del executor
    assert list(results) == [abs(v) for v in range(-5, 5)]


@pytest.mark.timeout(60)
def test_shutdown_no_wait(kind: str, session: psjobs.Session) -> None:
    executor = psjobs.Executor(kind, max_workers=5, session=session)
    results = executor.map(abs, range(-5, 5), timeout=30)
    executor.shutdown(wait=False)
    assert list(results) == [abs(v) for v in range(-5, 5)]


@pytest.mark.timeout(60)
def test_workers_terminate(executor: psjobs.Executor, session: psjobs.Session, gate: str) -> None:
    # threads_terminate / processes_terminate: once shutdown returns, none of its calls runs.
    fs = [executor.submit(wait_for, gate) for _ in range(3)]
    wait_until(lambda: all(f.running() for f in fs), 30, "three running calls")
    open_gate(gate)
    executor.shutdown()
    assert all(f.done() for f in fs)
    assert [j for j in session.get_job() if not j.state.is_finished] == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", [2, 4])
def test_shutdown_gh_132969(kind: str, session: psjobs.Session, workers: int) -> None:
    executor = psjobs.Executor(kind, max_workers=workers, session=session)
    f1 = executor.submit(good_task, 1)
    f2 = executor.submit(failing_task, 2)
    f3 = executor.submit(good_task, 3)
    result = 0
    with contextlib.suppress(ValueError):
        result += f1.result(timeout=30)
        result += f2.result(timeout=30)
        result += f3.result(timeout=30)
    executor.shutdown(wait=False)
    assert result == 1
    assert f3.result(timeout=30) == 3  # the executor is not broken by a failed call


# --- test_process_pool.py -----------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_map_chunksize(executor: psjobs.Executor) -> None:
    ref = list(map(pow, range(40), range(40)))
    for size in (6, 50, 40):
        assert list(executor.map(pow, range(40), range(40), chunksize=size, timeout=30)) == ref
    with pytest.raises(ValueError):
        list(executor.map(pow, range(40), range(40), chunksize=-1))


@pytest.mark.timeout(60)
def test_traceback(executor: psjobs.Executor, kind: str, capsys: pytest.CaptureFixture[str]) -> None:
    future = executor.submit(raise_runtime)
    with pytest.raises(RuntimeError) as info:
        future.result(timeout=30)
    exc = info.value
    assert type(exc) is RuntimeError and exc.args == (123,)
    if kind == "process":
        # The worker's traceback text rides as __cause__ (CPython: _RemoteTraceback).
        assert isinstance(exc.__cause__, psjobs.RemoteTraceback)
        assert "raise RuntimeError(123)  # some comment" in str(exc.__cause__)
    try:
        raise exc
    except RuntimeError:
        sys.excepthook(*sys.exc_info())
    assert "raise RuntimeError(123)  # some comment" in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_traceback_when_child_process_terminates_abruptly(session: psjobs.Session) -> None:
    with psjobs.Executor("process", max_workers=1, session=session) as executor:
        future = executor.submit(os._exit, 99)
        exc = future.exception(timeout=30)
    assert exc is not None and "99" in str(exc)


@pytest.mark.timeout(60)
def test_killed_child(session: psjobs.Session, gate: str) -> None:
    # CPython: a killed worker breaks the whole pool. psjobs: it fails that call alone.
    with psjobs.Executor("process", max_workers=2, session=session) as executor:
        future = executor.submit(wait_for, gate)
        wait_until(lambda: future.job is not None and future.job.child_jobs[0].pid is not None, 30,
                   "the call's process")
        os.kill(future.job.child_jobs[0].pid, 9)
        assert isinstance(future.exception(timeout=30), psjobs.PsJobsError)
        assert executor.submit(pow, 2, 8).result(timeout=30) == 256


@pytest.mark.timeout(120)
def test_saturation(executor: psjobs.Executor, tmp_path: Path) -> None:
    # CPython counts the pool's workers; here: never more than max_workers calls at once.
    fs = [executor.submit(note_running, str(tmp_path), n) for n in range(3 * WORKERS)]
    wait_until(lambda: sum(f.running() for f in fs) == WORKERS, 30, "max_workers calls running")
    wait_until(lambda: len(list(tmp_path.glob("*.running"))) == WORKERS, 30, "their files")
    assert sum(f.running() for f in fs) == WORKERS
    open_gate(str(tmp_path / "go"))
    assert max(f.result(timeout=60) for f in fs) <= WORKERS


# --- test_thread_pool.py ------------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_map_submits_without_iteration(executor: psjobs.Executor, tmp_path: Path) -> None:
    executor.map(write_after, [0] * 10, [str(tmp_path / str(n)) for n in range(10)], ["x"] * 10)
    executor.shutdown(wait=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(str(n) for n in range(10))


@pytest.mark.timeout(30)
def test_default_workers() -> None:
    cpus = os.cpu_count() or 1
    assert psjobs.Executor("thread").max_workers == min(32, cpus + 4)
    assert psjobs.Executor("process").max_workers == cpus


@pytest.mark.timeout(60)
def test_executor_map_current_future_cancel(kind: str, session: psjobs.Session, tmp_path: Path,
                                            gate: str) -> None:
    log = tmp_path / "log"

    with psjobs.Executor(kind, max_workers=1, session=session) as pool:
        fut = pool.submit(write_after, 0, str(log), "first")
        fut.result(timeout=30)
        busy = pool.submit(wait_for, gate)  # saturates the pool
        with contextlib.closing(pool.map(write_after, [0, 0], [str(log)] * 2, ["second", "third"],
                                         timeout=0)) as gen, pytest.raises(futures.TimeoutError):
            next(gen)
        open_gate(gate)
        busy.result(timeout=30)
    # "second" was cancelled by the TimeoutError, "third" because it was still queued.
    assert log.read_text() == "first"


# --- test_deadlock.py: errors and crashes at each step of a call fail that call only -----------------------

@pytest.mark.timeout(60)
def test_error_at_task_pickle(session: psjobs.Session) -> None:
    with psjobs.Executor("process", max_workers=2, session=session) as executor:
        # psjobs pickles a call when it starts its job: the TypeError that start_job raises for
        # an unpicklable argument, with the PicklingError as its cause, fails this future.
        future = executor.submit(id, ErrorAtPickle())
        with pytest.raises(TypeError, match="cannot be sent to another process") as info:
            future.result(timeout=30)
        assert isinstance(info.value.__cause__, pickle.PicklingError)
        assert executor.submit(pow, 2, 8).result(timeout=30) == 256


@pytest.mark.timeout(60)
def test_exit_at_task_unpickle(session: psjobs.Session) -> None:
    with psjobs.Executor("process", max_workers=2, session=session) as executor:
        future = executor.submit(id, ExitAtUnpickle())
        assert isinstance(future.exception(timeout=30), psjobs.PsJobsError)
        assert executor.submit(pow, 2, 8).result(timeout=30) == 256


@pytest.mark.timeout(60)
def test_exit_during_call(session: psjobs.Session) -> None:
    with psjobs.Executor("process", max_workers=2, session=session) as executor:
        future = executor.submit(_exit_now, 1)
        assert isinstance(future.exception(timeout=30), psjobs.PsJobsError)
        assert executor.submit(pow, 2, 8).result(timeout=30) == 256


@pytest.mark.timeout(60)
def test_error_at_result_pickle(session: psjobs.Session) -> None:
    with psjobs.Executor("process", max_workers=2, session=session) as executor:
        # CPython fails the future; psjobs gives a readable stand-in of what could not come back.
        future = executor.submit(return_unpicklable)
        snapshot = future.result(timeout=30)
        assert isinstance(snapshot, psjobs.Snapshot) and "lock" in snapshot.type_name.lower()
        assert executor.submit(pow, 2, 8).result(timeout=30) == 256
