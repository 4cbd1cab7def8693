"""The fork server's warm spares and workers prepared ahead (issue 18).

A spare that takes a job does not wake the server on the job's path: the server counts it a spare
until it exits, so it forks no new spare while the job runs, and tops up after. A worker forked on
request (no spare left) switches on a runtime the server prepared once: its print, warnings,
logging and stop behave as a spare's, while the server keeps its own streams and warnings.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

import psjobs

from .conftest import wait_until

pytestmark = pytest.mark.timeout(120)


def _server(session: psjobs.Session) -> psutil.Process:
    server = session._backends["process"]._server
    assert server is not None
    return psutil.Process(server.proc.pid)


def _spare_pids(session: psjobs.Session) -> list[int]:
    return [pid for pid, _ in session._backends["process"]._server.spares]


def _wait_for(path: str) -> int:
    """A job that runs until ``path`` exists (the test's workload, polled inside the worker)."""
    while not os.path.exists(path):
        time.sleep(0.005)
    return os.getpid()


def test_a_spare_that_takes_a_job_makes_the_server_fork_no_spare_until_the_job_ends(tmp_path: Path) -> None:
    flag = str(tmp_path / "go")
    with psjobs.Session() as s:
        assert s.start_job(lambda: 1).wait(30)
        wait_until(lambda: len(_spare_pids(s)) == 2, 30, "two warm spares")
        server = _server(s)
        spares = _spare_pids(s)
        # The first job may have run in a worker forked on request (its spares were not ready yet),
        # which can still be exiting: the server's children are only the spares once it is gone.
        wait_until(lambda: sorted(c.pid for c in server.children()) == sorted(spares), 30,
                   "the first job's worker to exit")
        job = s.start_job(_wait_for, flag)
        wait_until(lambda: job.state is psjobs.JobState.RUNNING, 30, "the job to run")
        # The job went to the first spare, and the server did not hear of it: for a while (what
        # used to be a few milliseconds) it forks nothing, since it still counts two spares.
        observed_until = time.monotonic() + 0.5
        while time.monotonic() < observed_until:
            assert sorted(c.pid for c in server.children()) == sorted(spares), "a spare was forked while the job ran"
            time.sleep(0.02)
        Path(flag).touch()
        assert job.wait(30)
        assert s.receive_job(job) == [spares[0]]
        # Once the worker has exited, the server tops up: two spares again, one of them new.
        wait_until(lambda: len(_spare_pids(s)) == 2 and spares[0] not in [c.pid for c in server.children()],
                   30, "the server to top up its spares after the job's exit")
        assert set(_spare_pids(s)) - set(spares)


def _speaks() -> str:
    import logging
    import warnings

    print("printed")
    warnings.warn("warned", stacklevel=1)
    logging.getLogger("job").debug("debugged")
    return "stop" if signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN) else "no stop"


@pytest.mark.parametrize("spares", ["0", "2"])
def test_a_worker_forked_on_request_speaks_as_a_spare_s(spares: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PSJOBS_SPARES", spares)  # 0: every job is forked on request
    with psjobs.Session() as s:
        for _ in range(3):
            job = s.start_job(_speaks)
            assert job.wait(30)
            assert job.state is psjobs.JobState.COMPLETED, job.job_state_info.reason
            assert s.receive_job(job) == ["stop"]
            assert [str(r) for r in job.information] == ["printed"]
            assert [str(r) for r in job.warning] == ["warned"]
            assert [str(r) for r in job.debug] == ["debugged"]


def test_a_worker_forked_on_request_stops_at_once() -> None:
    with psjobs.Session() as s:
        jobs = [s.start_job(time.sleep, 60) for _ in range(4)]  # more than the spares: forks on request
        wait_until(lambda: all(j.state is psjobs.JobState.RUNNING for j in jobs), 30, "the jobs to run")
        t = time.monotonic()
        s.stop_job(jobs)
        assert all(j.state is psjobs.JobState.STOPPED for j in jobs)
        assert time.monotonic() - t < s.stop_grace + 5


_QUIET = textwrap.dedent("""
    import psjobs
    def speak():
        return 1
    with psjobs.Session() as s:
        jobs = [s.start_job(speak) for _ in range(6)]
        assert all(j.wait(30) for j in jobs)
        assert s.receive_job(jobs) == [1] * 6
""")


def test_the_fork_server_writes_nothing_to_the_session_s_stderr() -> None:
    # It prepares the workers' runtime (print and warnings routers, a DEBUG root logger) but keeps
    # its own: a warning of its own (a ResourceWarning at its exit) must not reach the caller.
    out = subprocess.run([sys.executable, "-c", _QUIET], capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr
    assert out.stderr == "" and out.stdout == ""


def _descriptors() -> dict[str, list[str]]:
    """What this worker holds: the socket and pipe targets of its descriptors, fd 1 and 2 apart."""
    held: dict[str, list[str]] = {"sockets": [], "pipes": [], "stdio": []}
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # the directory listing's own descriptor, closed by now
        if name in ("1", "2"):
            held["stdio"].append(target)
        elif target.startswith("socket:"):
            held["sockets"].append(target)
        elif target.startswith("pipe:"):
            held["pipes"].append(target)
    return held


def test_workers_forked_together_hold_no_descriptor_of_another_job(monkeypatch: pytest.MonkeyPatch) -> None:
    # Requests read together are forked in a row: each worker must close the descriptors of the
    # requests behind it (their job sockets and fd 1/2 pipes), or one job could hold another's.
    monkeypatch.setenv("PSJOBS_SPARES", "0")
    with psjobs.Session() as s:
        jobs = [s.start_job(_descriptors) for _ in range(40)]
        assert len(s.wait_job(jobs, timeout=60)) == len(jobs)
        held = [s.receive_job(job)[0] for job in jobs]
    for h in held:
        assert len(h["sockets"]) == 1, h  # its own channel to the session
        assert h["pipes"] == [], h        # only fd 1 and 2, the pipes the session reads
        assert len(set(h["stdio"])) == 2, h
    mine = [h["sockets"][0] for h in held]
    assert len(set(mine)) == len(mine)


def _caught_signals(pid: int) -> set[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            mask = int(line.split()[1], 16)
            return {n for n in range(1, 65) if mask >> (n - 1) & 1}
    raise AssertionError("no SigCgt line")


def test_the_fork_server_keeps_its_own_signal_handlers() -> None:
    # prepare_ahead installs a worker's handlers (SIGTERM raises JobStopped, SIGALRM flushes a
    # batch) only to take them back: a SIGTERM still ends the server, and no timer can fire there.
    with psjobs.Session() as s:
        assert s.start_job(lambda: 1).wait(30)
        caught = _caught_signals(_server(s).pid)
    assert signal.SIGTERM not in caught and signal.SIGALRM not in caught
    assert signal.SIGINT in caught and signal.SIGCHLD in caught  # its own: Ctrl+C is the session's


def _has_colorsys_in_worker() -> bool:
    import sys

    return "colorsys" in sys.modules


@pytest.mark.parametrize("preload", ["1", "0"])
def test_the_server_preloads_the_modules_of_callables_pickled_by_reference_unless_opted_out(
        preload: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/guide.md: the modules of callables pickled by reference are imported by the fork
    server when it is idle, so the next spares have them (PSJOBS_PRELOAD=0 opts out)."""
    import colorsys

    monkeypatch.setenv("PSJOBS_PRELOAD", preload)
    with psjobs.Session() as s:
        first = s.start_job(colorsys.rgb_to_hsv, 0.2, 0.4, 0.4)  # by reference: colorsys is imported in its worker
        assert first.wait(30) and first.state is psjobs.JobState.COMPLETED
        seen: list[bool] = []

        def later_worker_has_it() -> bool:
            job = s.start_job(_has_colorsys_in_worker)
            assert job.wait(30)
            seen.append(bool(job.receive()[0]))
            return seen[-1]

        if preload == "1":
            wait_until(later_worker_has_it, 30, "a later worker to start with colorsys imported")
        else:
            for _ in range(8):  # spares made before and after the first job, and workers forked on request
                assert not later_worker_has_it()
