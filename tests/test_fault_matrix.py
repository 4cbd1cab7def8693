"""The fault-injection matrix (issue 13): every fault on every job kind ends the job in a finished
state whose reason names the cause, with every record the job produced before the fault delivered.

::

    CELLS: (kind, fault) --pytest_generate_tests--> kind_env (module scope: an sshd, a cluster)
        |                                           + the fault, one test per cell
        v
    body: writes its pid, yields 1 and 2, then the fault (or waits for the test to inject it:
          a SIGKILL or a SIGSTOP of the worker, the fork server, sshd's session, the Dask worker
          or scheduler)
        v
    check: finished within DEADLINE; the leaf's state and reason (a text naming the cause);
           output == [1, 2] (a command's: ["1", "2"]); conftest: no process of it left

Kinds: thread, process, command (a shell line as a process job), ssh (a shell line over SSH),
ssh-callable (a Python callable over SSH), dask (a callable on a Dask cluster).

Faults: raise (an exception while running; a command's non-zero exit), exit (``sys.exit(3)``),
os_exit (``os._exit(3)``), crash (``os.abort()``; a command's ``kill -SEGV $$``), pickle (an
argument that raises while pickled: refused before a job exists), unpickle (an argument that
raises while unpickled in the worker), result (a value that raises while pickled: a Snapshot),
kill_worker (SIGKILL of the process that runs the job), kill_server (SIGKILL of what stands between
the session and the worker: the fork server, sshd's session process, the Dask scheduler), freeze
(SIGSTOP of that same peer: the fork server, sshd's session process; for a worker, a stop).

Cells that cannot apply, and why (CELLS lists every other one):

- thread with os_exit, crash, kill_worker, kill_server, freeze: a thread job runs in the session's
  own process, so ending or freezing its "worker" ends or freezes the session itself (that no job
  outlives its session is case 4's test, tests/test_trees.py); with pickle, unpickle, result:
  nothing of a thread job is pickled.
- command and ssh (shell lines) with exit and os_exit: a shell's exit is its status, the raise
  cell; with pickle, unpickle, result: a command's arguments and output are text.
- dask with freeze: a frozen Dask worker is noticed by the scheduler only after its worker-ttl
  (5 minutes by default), and psjobs follows the scheduler's word; that is Dask's timeout.

What kill_server and freeze hit: process and command, the fork server (a command the server
started dies with it, saying so; a worker, and a command the session started itself into a cgroup
under the server's, outlive it and a stop still ends them; a frozen server is replaced and the new
job runs); ssh and ssh-callable, sshd's session process (the connection
drops, or its keepalives go unanswered); dask, the scheduler, run as a `dask scheduler` process
of the test's own (a LocalCluster's scheduler lives in this test process).

A Dask task that calls os._exit or os.abort ends its worker process, whose batched stream to the
scheduler still holds the last records: the worker's hooks ship them and wait for the scheduler to
log them first (once lost in a race), and the reason names the call.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

import psjobs
from psjobs import JobState
from psjobs.backends.process import _direct

from .clusters import local_client as make_client
from .conftest import wait_until

DEADLINE = 60.0


# --- job bodies: module level, so that every kind can ship them --------------------------------

def _pid(path: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(path + ".tmp", path)


def then_fault(fault: str, path: str) -> Iterator[int]:
    yield 1
    yield 2
    _pid(path)
    if fault == "raise":
        raise ValueError("fault: raised while running")
    if fault == "exit":
        sys.exit(3)
    if fault == "os_exit":
        os._exit(3)
    if fault == "crash":
        os.abort()
    while True:  # until the test kills or freezes something
        time.sleep(0.01)


def _raise_on_unpickle() -> None:
    raise RuntimeError("fault: raised while unpickling")


class RaiseOnUnpickle:
    def __reduce__(self) -> Any:
        return (_raise_on_unpickle, ())


class RaiseOnPickle:
    def __reduce__(self) -> Any:
        raise TypeError("fault: refuses to be pickled")

    def __repr__(self) -> str:
        return "<RaiseOnPickle>"


def with_argument(value: Any) -> Iterator[Any]:
    yield 1
    yield 2
    yield value


def with_result() -> Iterator[Any]:
    yield 1
    yield 2
    yield RaiseOnPickle()


SHELL = {
    "raise": 'echo 1; echo 2; echo $$ > "$1"; exit 3',
    "crash": 'echo 1; echo 2; echo $$ > "$1"; kill -SEGV $$',
    "wait": 'echo 1; echo 2; echo $$ > "$1"; while :; do sleep 0.05; done',
}


# --- the matrix -------------------------------------------------------------------------------------

CALLABLE_FAULTS = ["raise", "exit", "os_exit", "crash", "pickle", "unpickle", "result", "kill_worker"]
CELLS: list[tuple[str, str]] = [
    ("thread", "raise"), ("thread", "exit"),
    *[("process", f) for f in [*CALLABLE_FAULTS, "kill_server", "freeze"]],
    *[("command", f) for f in ["raise", "crash", "kill_worker", "kill_server", "freeze"]],
    *[("ssh", f) for f in ["raise", "crash", "kill_worker", "kill_server", "freeze"]],
    *[("ssh-callable", f) for f in [*CALLABLE_FAULTS, "kill_server", "freeze"]],
    *[("dask", f) for f in ["kill_server", *CALLABLE_FAULTS]],
]
MARKS = {"ssh": pytest.mark.ssh, "ssh-callable": pytest.mark.ssh, "dask": pytest.mark.dask}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "fault" in metafunc.fixturenames:
        params = []
        for kind, fault in CELLS:
            marks = [MARKS[kind]] if kind in MARKS else []
            if kind == "dask" and fault in ("os_exit", "crash", "kill_worker"):
                marks.append(pytest.mark.leaves_processes)  # the nanny restarts the cluster's worker
            params.append(pytest.param(kind, fault, marks=marks, id=f"{kind}-{fault}"))
        metafunc.parametrize(("kind_env", "fault"), params, indirect=["kind_env"], scope="module")


@pytest.fixture(scope="module")
def sshd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from . import sshd as sshd_helper

    with sshd_helper.module_server(tmp_path_factory) as server:
        # Keepalives every second, two unanswered drop the connection: the frozen-peer cells then
        # end in ~3 s, not the 45 s of psjobs' default (docs/remote.md).
        fast = server.ssh_config.with_name("ssh_config_fast")
        fast.write_text("Host *\n  ServerAliveInterval 1\n  ServerAliveCountMax 2\n" + server.ssh_config.read_text())
        yield server, fast


@pytest.fixture(scope="module")
def dask_client() -> Iterator[Any]:
    with make_client(n_workers=1, threads_per_worker=2, by_value=__name__) as client:
        yield client


@pytest.fixture(scope="module")
def kind_env(request: pytest.FixtureRequest) -> tuple[str, Any]:
    """The kind and what it runs against, made before conftest's per-test snapshot of processes."""
    name: str = request.param
    if name.startswith("ssh"):
        return name, request.getfixturevalue("sshd_server")
    if name == "dask":
        return name, request.getfixturevalue("dask_client")
    return name, None


@dataclass
class Cell:
    kind: str
    session: psjobs.Session
    start: Callable[..., psjobs.Job]
    backing: Any
    pidfile: Path

    @property
    def is_command(self) -> bool:
        return self.kind in ("command", "ssh")

    def leaf(self, job: psjobs.Job) -> psjobs.Job:
        return job if self.kind == "thread" else job.child_jobs[0]

    def worker_pid(self) -> int:
        # Its content, not only its existence: the job creates the file, then writes it (a full run
        # under load read it empty between the two: ValueError from int('')).
        wait_until(lambda: self.pidfile.exists() and self.pidfile.read_text().strip(), DEADLINE,
                   f"{self.kind}: the job's pid file")
        return int(self.pidfile.read_text())

    @property
    def counted(self) -> list[Any]:
        return ["1", "2"] if self.is_command else [1, 2]


@pytest.fixture
def cell(kind_env: tuple[str, Any], tmp_path: Path) -> Iterator[Cell]:
    name, backing = kind_env
    session = psjobs.Session(stop_grace=1.0)
    try:
        if name == "thread":
            start: Callable[..., psjobs.Job] = session.start_thread_job
        elif name in ("process", "command"):
            start = session.start_job
        elif name.startswith("ssh"):
            _server, config = backing
            psjobs.configure_ssh(session, config=str(config), python=sys.executable)

            def start(target: Any, *args: Any) -> psjobs.Job:
                return session.invoke_command(target, *args, computer_name="127.0.0.1")
        else:
            def start(target: Any, *args: Any) -> psjobs.Job:
                return session.start_cluster_job(target, *args, cluster=backing)
        yield Cell(name, session, start, backing, tmp_path / "pid")
    finally:
        session.close()
        if name == "dask":  # a killed worker is restarted by its nanny: back before the next cell
            backing.wait_for_workers(1, timeout=DEADLINE)


def finished(cell: Cell, job: psjobs.Job) -> psjobs.Job:
    assert job.wait(DEADLINE), f"{cell.kind}: {job!r} did not finish within {DEADLINE}s"
    return cell.leaf(job)


def failed_saying(cell: Cell, job: psjobs.Job, *texts: str) -> BaseException:
    leaf = finished(cell, job)
    reason = leaf.job_state_info.reason
    assert leaf.state is JobState.FAILED, (leaf, reason)
    assert reason is not None
    text = str(reason)
    assert any(t in text for t in texts), f"{cell.kind}: the reason {text!r} names none of {texts}"
    assert job.output == cell.counted, f"{cell.kind}: records before the fault were lost: {job.output}"
    return reason


# --- the test ---------------------------------------------------------------------------------------

@pytest.mark.timeout(180)
def test_fault(cell: Cell, fault: str, request: pytest.FixtureRequest) -> None:
    pidfile = str(cell.pidfile)
    if fault in ("raise", "crash") and cell.is_command:
        job = cell.start(SHELL[fault], pidfile)
        # Locally "killed by SIGSEGV"; over SSH, sshd's word: "without an exit status (signal SEGV)".
        reason = failed_saying(cell, job, "status 3" if fault == "raise" else "SEGV")
        # sshd reports a signal instead of a status: no status to keep, so a WorkerError there.
        remote_signal = fault == "crash" and cell.kind == "ssh"
        assert isinstance(reason, psjobs.WorkerError if remote_signal else psjobs.ExitStatusError), repr(reason)
    elif fault == "raise":
        job = cell.start(then_fault, fault, pidfile)
        reason = failed_saying(cell, job, "fault: raised while running")
        assert isinstance(reason, ValueError)
    elif fault == "exit":
        job = cell.start(then_fault, fault, pidfile)
        failed_saying(cell, job, "3")
        assert cell.leaf(job).exit_code == 3
    elif fault == "os_exit":
        job = cell.start(then_fault, fault, pidfile)
        if cell.kind == "dask":  # the worker's hook names the call before the process goes
            failed_saying(cell, job, "called os._exit(3)")
            assert cell.leaf(job).exit_code == 3
        else:
            failed_saying(cell, job, "status 3", "lost", "died")
    elif fault == "crash":
        job = cell.start(then_fault, fault, pidfile)
        failed_saying(cell, job, *(["called os.abort()"] if cell.kind == "dask" else ["SIGABRT", "lost", "died"]))
    elif fault == "pickle":
        with pytest.raises(TypeError, match="refuses to be pickled"):
            cell.start(with_argument, RaiseOnPickle())
        assert cell.session.get_job() == []  # refused before a job exists
    elif fault == "unpickle":
        job = cell.start(with_argument, RaiseOnUnpickle())
        leaf = finished(cell, job)
        assert leaf.state is JobState.FAILED
        assert "fault: raised while unpickling" in str(leaf.job_state_info.reason)
        assert "unpickle" in str(leaf.job_state_info.reason)
    elif fault == "result":
        job = cell.start(with_result)
        leaf = finished(cell, job)
        assert leaf.state is JobState.COMPLETED, leaf.job_state_info.reason
        one, two, snap = job.output
        assert (one, two) == (1, 2)
        assert isinstance(snap, psjobs.Snapshot) and "refuses to be pickled" in snap.error
    elif fault == "kill_worker":
        job = cell.start(SHELL["wait"], pidfile) if cell.is_command else cell.start(then_fault, "wait", pidfile)
        pid = cell.worker_pid()
        wait_until(lambda: job.output == cell.counted, DEADLINE, "the records before the fault")
        os.kill(pid, signal.SIGKILL)
        failed_saying(cell, job, "SIGKILL", "signal KILL", "lost", "died")
    elif fault == "kill_server":
        kill_server(cell, request)
    elif fault == "freeze":
        freeze(cell, request)
    else:
        raise AssertionError(f"no such fault {fault!r}")


def _running(cell: Cell) -> psjobs.Job:
    job = cell.start(SHELL["wait"], str(cell.pidfile)) if cell.is_command \
        else cell.start(then_fault, "wait", str(cell.pidfile))
    cell.worker_pid()
    wait_until(lambda: job.output == cell.counted, DEADLINE, "the records before the fault")
    return job


def _sshd_sessions(cell: Cell, pid: int) -> list[psutil.Process]:
    """The sshd processes between the listener and the job's process ``pid``."""
    server, _config = cell.backing
    return [p for p in psutil.Process(pid).parents()
            if p.name().startswith("sshd") and p.pid != server.proc.pid]


def kill_server(cell: Cell, request: pytest.FixtureRequest) -> None:
    if cell.kind in ("process", "command"):
        job = _running(cell)
        server = cell.session._backends["process"]._server  # type: ignore[attr-defined]
        os.kill(server.proc.pid, signal.SIGKILL)
        if cell.kind == "command" and not _from_session(server):
            # The command dies with the server that started it (nothing would end it with the session).
            failed_saying(cell, job, "fork server")
        else:
            # A worker outlives its fork server (the server is only its parent), and so does a command
            # started straight from the session (its child): the job goes on, and a stop still ends it.
            assert not job.wait(0.5)
            cell.session.stop_job(job)
            assert job.state is JobState.STOPPED and job.output == cell.counted
        again = cell.start(SHELL["raise"], str(cell.pidfile) + "2") if cell.is_command \
            else cell.start(then_fault, "raise", str(cell.pidfile) + "2")
        assert again.wait(DEADLINE) and again.output == cell.counted  # a new server serves new jobs
    elif cell.kind.startswith("ssh"):
        job = _running(cell)
        for p in _sshd_sessions(cell, cell.worker_pid()):
            p.kill()
        reason = failed_saying(cell, job, "dropped", "closed", "lost")
        assert isinstance(reason, psjobs.RemoteConnectionError), repr(reason)
    else:
        dask_scheduler_killed(cell, request)


def _from_session(server: Any) -> bool:
    """Whether this session starts commands itself, into cgroups under ``server``'s (_direct)."""
    return server.cgroup is not None and _direct.available()


def freeze(cell: Cell, request: pytest.FixtureRequest) -> None:
    if cell.kind in ("process", "command"):
        # The fork server frozen: a new job is not left NotStarted; psjobs replaces the server
        # (after ANSWER_TIMEOUT) and the job runs on the new one.
        monkeypatch = request.getfixturevalue("monkeypatch")
        monkeypatch.setenv("PSJOBS_SPARES", "0")
        # A command through the server (not started from the session, which never asks it): its
        # start must not wait on a frozen server either.
        monkeypatch.setenv("PSJOBS_DIRECT_COMMANDS", "0")
        with psjobs.Session(stop_grace=1.0) as s:
            first = s.start_job("echo 0") if cell.is_command else s.start_job(then_fault, "raise", str(cell.pidfile))
            assert first.wait(DEADLINE)
            server = s._backends["process"]._server  # type: ignore[attr-defined]
            os.kill(server.proc.pid, signal.SIGSTOP)
            try:
                began = time.monotonic()
                job = s.start_job(SHELL["raise"], str(cell.pidfile) + "2") if cell.is_command \
                    else s.start_job(then_fault, "raise", str(cell.pidfile) + "2")
                assert job.wait(DEADLINE), f"{job!r} waits on a frozen fork server"
                assert job.output == cell.counted and job.child_jobs[0].state is JobState.FAILED
                assert time.monotonic() - began < 30
                wait_until(lambda: server.proc.poll() is not None, 10, "the frozen server to be killed")
            finally:
                with contextlib.suppress(OSError):
                    os.kill(server.proc.pid, signal.SIGCONT)
    else:
        # sshd's session process frozen: the connection's keepalives go unanswered (every 1 s, two
        # missed in this test's ssh config), the connection is dropped, and the job fails saying so.
        job = _running(cell)
        frozen = _sshd_sessions(cell, cell.worker_pid())
        assert frozen
        for p in frozen:
            p.suspend()
        try:
            began = time.monotonic()
            reason = failed_saying(cell, job, "dropped", "closed", "lost", "keepalive", "answer")
            assert isinstance(reason, psjobs.RemoteConnectionError), repr(reason)
            assert time.monotonic() - began < 20
        finally:
            for p in frozen:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.kill()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dask_scheduler_killed(cell: Cell, request: pytest.FixtureRequest) -> None:
    """A scheduler and a worker of their own (the LocalCluster's scheduler is this process)."""
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                               "--port", str(port), "--dashboard-address", "127.0.0.1:0", "--no-show"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        procs.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address,
                                       "--nthreads", "2", "--no-nanny", "--host", "127.0.0.1",
                                       "--no-dashboard"],
                                      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

        def up() -> bool:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                return True
            return False

        wait_until(up, DEADLINE, "the dask scheduler")
        job = cell.session.start_cluster_job(then_fault, "wait", str(cell.pidfile), cluster=address)
        cell.worker_pid()
        wait_until(lambda: job.output == cell.counted, DEADLINE, "the records before the fault")
        procs[0].kill()
        failed_saying(cell, job, "scheduler", "lost", "connection")
    finally:
        for p in procs:
            p.kill()
            p.wait()


# --- issue 13, case 10: the rest -----------------------------------------------------------------------

def escapes(path: str) -> Iterator[str]:
    """A child that leaves the worker's process group (setsid), then waits to be stopped."""
    proc = subprocess.Popen(["sleep", "1000"], start_new_session=True)
    with open(path, "w") as f:
        f.write(str(proc.pid))
    yield "started"
    while True:
        time.sleep(0.01)


@pytest.mark.ssh
@pytest.mark.timeout(120)
@pytest.mark.parametrize("form", ["command", "callable"])
def test_case10_a_remote_setsid_grandchild_dies_with_a_stop_of_its_job(sshd_server: Any, tmp_path: Path,
                                                                     form: str) -> None:
    server, config = sshd_server
    pidfile = tmp_path / "escaped"
    with psjobs.Session(stop_grace=1.0) as s:
        psjobs.configure_ssh(s, config=str(config), python=sys.executable)
        if form == "command":
            line = 'setsid sh -c \'echo $$ > "$0"; exec sleep 1000\' "$1" & echo started; wait'
            job = s.invoke_command(line, str(pidfile), computer_name="127.0.0.1")
        else:
            job = s.invoke_command(escapes, str(pidfile), computer_name="127.0.0.1")
        wait_until(lambda: job.output == ["started"] and pidfile.exists() and pidfile.read_text().strip(),
                   DEADLINE, "the escaped grandchild")
        escaped = psutil.Process(int(pidfile.read_text()))
        assert escaped.pid in server.session_pids()
        assert os.getpgid(escaped.pid) != os.getpgid(psutil.Process(escaped.pid).ppid())  # it left the group
        s.stop_job(job)
        assert job.state is JobState.STOPPED
        assert not escaped.is_running() or escaped.status() == psutil.STATUS_ZOMBIE, \
            f"{form}: the setsid grandchild {escaped.pid} survived the stop of its SSH job"


def test_case10_a_thread_stop_waits_the_grace_period_only() -> None:
    # A thread in a call Python cannot interrupt keeps stop_job waiting for the grace period only
    # (API.md 5; it once waited 2 s more), then a warning, and Stopped when the call returns.
    with psjobs.Session(stop_grace=0.5) as s:
        job = s.start_thread_job(time.sleep, 6)
        wait_until(lambda: job.state is JobState.RUNNING, DEADLINE, "the thread job to run")
        began = time.monotonic()
        with pytest.warns(psjobs.StopTimeoutWarning, match=f"Job {job.id}"):
            s.stop_job(job)
        waited = time.monotonic() - began
        assert 0.5 <= waited < 0.5 + 1.0, waited  # the grace period, and a second of load
        assert job.state is JobState.STOPPING and "stop requested" in job.status_message
        assert job.wait(DEADLINE) and job.state is JobState.STOPPED  # once the sleep returns
