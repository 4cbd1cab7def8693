"""Failure injection on process jobs: whatever the worker does, its job ends with a clear reason,
within a deadline, and the session goes on serving other jobs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import psjobs
from psjobs import JobState

from .conftest import wait_until

DEADLINE = 20


def _abort() -> None:
    os.abort()


def _exit3() -> None:
    os._exit(3)


def _raise() -> None:
    raise RuntimeError("raised while unpickling")


class CrashOnUnpickle:
    def __reduce__(self) -> Any:
        return (_abort, ())


class ExitOnUnpickle:
    def __reduce__(self) -> Any:
        return (_exit3, ())


class RaiseOnUnpickle:
    def __reduce__(self) -> Any:
        return (_raise, ())


class CrashOnPickle:
    def __reduce__(self) -> Any:
        os.abort()


class ExitOnPickle:
    def __reduce__(self) -> Any:
        os._exit(4)


class RaiseOnPickle:
    answer = 42

    def __init__(self) -> None:
        self.size = 3

    def __reduce__(self) -> Any:
        raise TypeError("this object refuses to be pickled")

    def __repr__(self) -> str:
        return "<RaiseOnPickle size=3>"


def identity(x: Any) -> Any:
    return x


def make(cls: type) -> Any:
    return cls()


def finished(job: psjobs.Job) -> psjobs.Job:
    assert job.wait(DEADLINE), f"{job!r} did not finish within {DEADLINE}s"
    return job.child_jobs[0]


def test_crash_while_unpickling_arguments(session: psjobs.Session) -> None:
    child = finished(session.start_job(identity, CrashOnUnpickle()))
    assert child.state is JobState.FAILED
    assert "killed by SIGABRT" in str(child.job_state_info.reason)
    assert isinstance(child.job_state_info.reason, psjobs.WorkerError)


def test_exit_while_unpickling_arguments(session: psjobs.Session) -> None:
    child = finished(session.start_job(identity, ExitOnUnpickle()))
    assert child.state is JobState.FAILED
    assert "exited with status 3" in str(child.job_state_info.reason)


def test_raise_while_unpickling_arguments(session: psjobs.Session) -> None:
    child = finished(session.start_job(identity, RaiseOnUnpickle()))
    assert child.state is JobState.FAILED
    reason = child.job_state_info.reason
    assert "could not unpickle" in str(reason) and "raised while unpickling" in str(reason)


def test_raise_while_pickling_arguments_is_refused_before_a_job_exists(session: psjobs.Session) -> None:
    with pytest.raises(TypeError, match="cannot be sent to another process"):
        session.start_job(identity, RaiseOnPickle())
    assert session.get_job() == []


@pytest.mark.parametrize(("target", "expected"), [
    (os.abort, "killed by SIGABRT"),
    (lambda: os._exit(5), "exited with status 5"),
    (lambda: os.kill(os.getpid(), signal.SIGSEGV), "killed by SIGSEGV"),
])
def test_worker_dies_while_running(session: psjobs.Session, target: Any, expected: str) -> None:
    child = finished(session.start_job(target))
    assert child.state is JobState.FAILED
    assert expected in str(child.job_state_info.reason)
    assert "before it reported the end of the job" in str(child.job_state_info.reason)


def test_raise_while_running_keeps_the_remote_traceback(session: psjobs.Session) -> None:
    def deep() -> None:
        def inner() -> None:
            raise KeyError("missing")
        inner()

    child = finished(session.start_job(deep))
    reason = child.job_state_info.reason
    assert isinstance(reason, KeyError)
    assert isinstance(reason.__cause__, psjobs.RemoteTraceback)
    assert "in inner" in str(reason.__cause__)


def test_crash_while_pickling_the_result(session: psjobs.Session) -> None:
    child = finished(session.start_job(make, CrashOnPickle))
    assert child.state is JobState.FAILED
    assert "killed by SIGABRT" in str(child.job_state_info.reason)


def test_exit_while_pickling_the_result(session: psjobs.Session) -> None:
    child = finished(session.start_job(make, ExitOnPickle))
    assert child.state is JobState.FAILED
    assert "exited with status 4" in str(child.job_state_info.reason)


def test_raise_while_pickling_the_result_gives_a_snapshot(session: psjobs.Session) -> None:
    job = session.start_job(make, RaiseOnPickle)
    finished(job)
    assert job.state is JobState.COMPLETED
    (snap,) = job.receive()
    assert isinstance(snap, psjobs.Snapshot)
    assert snap.type_name.endswith("RaiseOnPickle")
    assert snap.repr == "<RaiseOnPickle size=3>"
    assert snap.size == 3 and snap.answer == 42
    assert "refuses to be pickled" in snap.error


def test_unpicklable_builtin_result_and_exception(session: psjobs.Session) -> None:
    import threading

    def lock_and_fail() -> Any:
        psjobs.write_output(threading.Lock())

        class Weird(Exception):
            def __reduce__(self) -> Any:
                raise TypeError("no")

        raise Weird("odd failure")

    job = session.start_job(lock_and_fail)
    child = finished(job)
    (snap,) = job.receive()
    assert isinstance(snap, psjobs.Snapshot) and "lock" in snap.type_name.lower()
    reason = child.job_state_info.reason
    assert child.state is JobState.FAILED
    assert "odd failure" in str(reason)


def test_sigkill_of_the_worker(session: psjobs.Session) -> None:
    def forever() -> None:
        import time

        while True:
            time.sleep(0.05)

    job = session.start_job(forever)
    child = job.child_jobs[0]
    wait_until(lambda: child.pid is not None and child.state is JobState.RUNNING, what="the worker")
    assert child.pid is not None
    os.kill(child.pid, signal.SIGKILL)
    finished(job)
    assert child.state is JobState.FAILED
    assert "killed by SIGKILL" in str(child.job_state_info.reason)
    assert job.state is JobState.FAILED


def test_100_mib_on_stdout_and_stderr_at_once(session: psjobs.Session) -> None:
    # 100 lines of 1 MiB on each stream, written concurrently by two processes of the job.
    cmd = ("head -c 104857600 /dev/zero | tr '\\0' o | fold -w 1048576 & "
           "head -c 104857600 /dev/zero | tr '\\0' e | fold -w 1048576 >&2; wait")
    job = session.start_job(cmd)
    child = finished(job)
    assert child.state is JobState.COMPLETED
    out = job.receive(error_action="silentlycontinue")
    assert len(out) == 100 and all(len(line) == 1048576 and set(line) == {"o"} for line in out)
    errs = child.error
    assert len(errs) == 100 and all(len(r.message) == 1048576 for r in errs)


def test_100_mib_from_a_callable_through_fd_1_and_2(session: psjobs.Session) -> None:
    def flood() -> str:
        chunk = b"x" * 1048575 + b"\n"
        for _ in range(100):
            os.write(1, chunk)
            os.write(2, chunk)
        return "done"

    job = session.start_job(flood)
    child = finished(job)
    assert child.state is JobState.COMPLETED
    assert len(child.information) == 100 and len(child.error) == 100
    assert job.receive(error_action="ignore")[-1] == "done"


def test_a_flooding_worker_can_be_stopped_and_the_session_stays_responsive(session: psjobs.Session) -> None:
    def firehose():  # type: ignore[no-untyped-def]
        i = 0
        while True:
            yield i
            i += 1

    job = session.start_job(firehose)
    wait_until(lambda: len(job.child_jobs[0].output) > 10_000, what="a flood of items")
    quick = session.start_thread_job(lambda: 42)
    assert quick.wait(DEADLINE) and quick.receive() == [42]
    session.stop_job(job)
    assert job.state is JobState.STOPPED
    items = job.receive()
    assert items == list(range(len(items)))  # nothing lost or reordered before the stop


def test_fork_server_death_loses_no_job(session: psjobs.Session) -> None:
    first = session.start_job(lambda: 1)
    assert first.wait(DEADLINE) and first.receive() == [1]
    backend: Any = session._backends["process"]
    server = backend._server
    os.kill(server.proc.pid, signal.SIGKILL)
    wait_until(lambda: not server.alive, what="the session to notice the dead fork server")
    jobs = [session.start_job(lambda i=i: i * 2) for i in range(5)]
    assert session.wait_job(jobs, timeout=DEADLINE) == jobs
    assert [j.receive() for j in jobs] == [[0], [2], [4], [6], [8]]
    assert backend._server is not server and backend._server.alive


def _held_spares(session: psjobs.Session, n: int) -> list[int]:
    """The pids of the warm spares the session holds (waits until it holds ``n``)."""
    backend: Any = session._backends["process"]
    wait_until(lambda: len(backend._server.spares) >= n, what=f"{n} warm spares")
    return [pid for pid, _ in backend._server.spares]


def test_dead_spares_are_skipped(session: psjobs.Session) -> None:
    assert session.start_job(lambda: 1).wait(DEADLINE)  # starts the fork server
    import psutil

    pids = _held_spares(session, 2)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not any(psutil.pid_exists(pid) for pid in pids), what="the spares to be reaped")
    jobs = [session.start_job(lambda i=i: i) for i in range(4)]
    assert session.wait_job(jobs, timeout=DEADLINE) == jobs
    assert [j.receive() for j in jobs] == [[0], [1], [2], [3]]


def test_a_spare_killed_with_its_job_fails_the_job(session: psjobs.Session) -> None:
    """The job reached the spare, which died before it read it: the job fails and says why."""
    assert session.start_job(lambda: 1).wait(DEADLINE)
    pid = _held_spares(session, 1)[0]
    os.kill(pid, signal.SIGSTOP)  # it cannot take the job, nor say that it did
    job = session.start_job(lambda: 1)
    assert job.child_jobs[0].pid == pid
    os.kill(pid, signal.SIGKILL)
    assert job.wait(DEADLINE)
    assert job.state is JobState.FAILED
    assert "SIGKILL" in str(job.child_jobs[0].job_state_info.reason)


@pytest.mark.parametrize("spares", ["0", "1"])
def test_jobs_run_with_few_or_no_warm_spares(monkeypatch: pytest.MonkeyPatch, spares: str) -> None:
    """PSJOBS_SPARES=0: every job is forked on request; 1: most wait for the next spare or fork."""
    monkeypatch.setenv("PSJOBS_SPARES", spares)
    with psjobs.Session() as s:
        jobs = [s.start_job(lambda i=i: i + 1) for i in range(10)]
        assert s.wait_job(jobs, timeout=DEADLINE) == jobs
        assert [j.receive() for j in jobs] == [[i + 1] for i in range(10)]
        if spares == "0":
            assert not s._backends["process"]._server.spares  # type: ignore[attr-defined]


def test_spawn_fallback_runs_jobs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PSJOBS_START_METHOD", "spawn")
    with psjobs.Session() as s:
        job = s.start_job(lambda: (sys.version_info[:2], os.environ.get("PYTHONPATH")))
        assert job.wait(DEADLINE)
        # A fresh interpreter needs psjobs on its path, but the job sees the caller's PYTHONPATH.
        assert job.receive() == [(tuple(sys.version_info[:2]), os.environ.get("PYTHONPATH"))]
        slow = s.start_job("sleep 30")
        s.stop_job(slow)
        assert slow.state is JobState.STOPPED


def _orphans_since(t0: float) -> list[int]:
    import psutil

    out = []
    for p in psutil.process_iter(["ppid", "cmdline", "create_time"]):
        info = p.info
        if info["ppid"] == 1 and info["create_time"] >= t0 - 1 and "psjobs.worker._forkserver" in " ".join(
                info["cmdline"] or []):
            out.append(p.pid)
    return out


def test_stop_before_the_fork_then_close_leaves_no_orphan() -> None:
    """A job stopped before its worker exists, then the session closed at once (found by bench/)."""
    import time

    def busy() -> None:
        while True:
            try:
                sum(range(1000))
            except Exception:
                pass

    t0 = time.time()
    for _ in range(3):
        s = psjobs.Session(stop_grace=1)
        job = s.start_job(busy)
        s.stop_job(job)
        s.close()
    wait_until(lambda: not _orphans_since(t0), timeout=10, what="no orphaned worker")


def test_the_fork_server_imports_the_psjobs_the_session_runs(tmp_path: Path) -> None:
    """A psjobs run from a copied source tree (not the installed one) runs its jobs with that copy."""
    import shutil

    shutil.copytree(Path(psjobs.__file__).parent, tmp_path / "psjobs",
                    ignore=shutil.ignore_patterns("__pycache__"))
    # Loaded from its files, not found on sys.path: the fork server must be told where it is.
    code = ("import importlib.util, sys\n"
            "spec = importlib.util.spec_from_file_location('psjobs', sys.argv[1] + '/psjobs/__init__.py',\n"
            "                                              submodule_search_locations=[sys.argv[1] + '/psjobs'])\n"
            "psjobs = sys.modules['psjobs'] = importlib.util.module_from_spec(spec)\n"
            "spec.loader.exec_module(psjobs)\n"
            "with psjobs.Session() as s:\n"
            "    job = s.start_job(lambda: __import__('psjobs').__file__)\n"
            "    print(psjobs.__file__); print(job.receive(wait=True, timeout=30)[0])\n")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                          timeout=60, cwd="/")
    assert done.returncode == 0, done.stderr
    session_side, worker_side = done.stdout.split()
    assert session_side.startswith(str(tmp_path)) and worker_side == session_side, done.stdout
