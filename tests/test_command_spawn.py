"""How a command starts: straight from the session into a cgroup of its own (backends/process/_direct,
the _cspawn extension: born there by clone3, or moved there after a vfork), or through the fork
server (worker/_spawn: posix_spawn where it can, Popen where not) where the extension was not built
or there is no cgroup.

Each test runs on the three ways (PSJOBS_DIRECT_COMMANDS, _direct.born_in_cgroup) with real
commands, and checks what the command sees, or the error the caller gets, so the cheaper starts
keep Popen's behaviour: the program found along the job's own PATH or relative to its working
directory, Popen's error for a program that is not there, SIGPIPE not ignored, no descriptor but 0,
1 and 2, and each command in its own directory.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

import psjobs
from psjobs import JobState
from psjobs.backends.process import _direct
from psjobs.core._shipped import start_for_client
from psjobs.host._client import current_umask

from .conftest import wait_until

BUILT = _direct._cspawn is not None


@pytest.fixture(autouse=True, params=["direct", "direct, moved", "fork server"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which way the test's commands start (read at each start). "direct, moved": from the session,
    but moved into the cgroup after a vfork, as where clone3 cannot have it born there."""
    if request.param != "fork server" and not BUILT:
        pytest.skip("the _cspawn extension was not built (no C compiler at install): commands start "
                    "through the fork server")
    monkeypatch.setenv("PSJOBS_DIRECT_COMMANDS", "0" if request.param == "fork server" else "1")
    monkeypatch.setattr(_direct, "born_in_cgroup", request.param == "direct")
    return "fork server" if request.param == "fork server" else "direct"


def _server(session: psjobs.Session) -> Any:
    session.start_job(["true"]).wait(10)  # the fork server exists from the first command on
    return session._backends["process"]._server  # type: ignore[attr-defined]


def _cgroup_line(pid: int) -> str:
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    return next(line[3:] for line in lines if line.startswith("0::"))


def _tool(directory: Path, name: str, line: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(f"#!/bin/sh\necho {line}\n")
    path.chmod(0o755)
    return path


def _run(session: psjobs.Session, argv: list[str], **kwargs: object) -> psjobs.Job:
    job = session.start_job(argv, **kwargs)  # type: ignore[arg-type]
    assert job.wait(10)
    return job


def test_the_program_is_found_along_the_jobs_own_path(session: psjobs.Session, tmp_path: Path) -> None:
    _tool(tmp_path / "bin", "psjobs-hello", "from-the-jobs-PATH")
    job = _run(session, ["psjobs-hello"], env={"PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"})
    assert job.state is JobState.COMPLETED, job.child_jobs[0].job_state_info.reason
    assert job.receive() == ["from-the-jobs-PATH"]


def test_a_relative_program_is_relative_to_the_working_directory(session: psjobs.Session, tmp_path: Path) -> None:
    _tool(tmp_path, "tool", "relative")
    job = _run(session, ["./tool"], working_directory=tmp_path)
    assert job.receive() == ["relative"]
    assert job.state is JobState.COMPLETED


def test_a_missing_program_fails_with_popens_error(session: psjobs.Session, tmp_path: Path) -> None:
    job = _run(session, ["psjobs-no-such-program"], working_directory=tmp_path)
    assert job.state is JobState.FAILED
    reason = job.child_jobs[0].job_state_info.reason if job.child_jobs else job.job_state_info.reason
    assert isinstance(reason, FileNotFoundError)
    assert "psjobs-no-such-program" in str(reason)


def test_the_command_does_not_ignore_sigpipe(session: psjobs.Session) -> None:
    job = _run(session, ["grep", "^SigIgn", "/proc/self/status"])
    (line,) = job.receive()
    ignored = int(line.split()[1], 16)
    for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT):
        assert not ignored & (1 << (sig - 1)), f"{sig.name} is ignored in the command"


def test_the_command_holds_no_descriptor_but_its_stdio(session: psjobs.Session, tmp_path: Path) -> None:
    # Another command running meanwhile: its pipes pass through the server too.
    other = session.start_job(["sleep", "30"])
    wait_until(lambda: other.state is JobState.RUNNING, what="the other command to run")
    code = "import os; print(*sorted(int(f) for f in os.listdir('/proc/self/fd')))"
    job = _run(session, [sys.executable, "-S", "-c", code], working_directory=tmp_path)
    fds = [int(fd) for fd in job.receive()[0].split()]
    assert fds[:3] == [0, 1, 2]
    assert len(fds) == 4, f"the command kept descriptors {fds[3:-1]} (the last is listdir's own)"
    session.stop_job([other])


def test_each_command_runs_in_its_own_directory(session: psjobs.Session, tmp_path: Path) -> None:
    here = os.getcwd()
    first = _run(session, ["pwd"], working_directory=tmp_path)
    second = _run(session, ["pwd"])
    third = session.start_job(os.getcwd)
    assert third.wait(10)
    assert (first.receive(), second.receive(), third.receive()) == ([str(tmp_path)], [here], [here])


def test_without_input_the_command_reads_an_empty_stdin(session: psjobs.Session) -> None:
    job = _run(session, ["cat"])
    assert job.state is JobState.COMPLETED
    assert job.receive() == []


def test_each_command_runs_with_its_own_umask(session: psjobs.Session) -> None:
    # The session host starts a client's command with the client's umask (core/_shipped); through
    # the fork server, the next command without one still gets the session's own.
    ours = current_umask()
    umask = ["grep", "^Umask", "/proc/self/status"]
    private = start_for_client(session, umask, thread=False, umask=0o077, name=None, working_directory=None,
                               env=None)
    assert private.wait(10)
    plain = _run(session, umask)
    assert [private.receive(), plain.receive()] == [["Umask:\t0077"], [f"Umask:\t{ours:04o}"]]


def test_a_command_started_from_the_session_is_its_child_in_a_cgroup_of_its_own(
        session: psjobs.Session, path: str) -> None:
    server = _server(session)
    if path != "direct" or server.cgroup is None:
        pytest.skip("only commands started straight from the session, where cgroup v2 is writable")
    job = session.start_job(["sleep", "30"])
    child = job.child_jobs[0]
    assert child.state is JobState.RUNNING and child.pid is not None  # started before start_job returned
    assert psutil.Process(child.pid).ppid() == os.getpid()
    assert os.path.dirname(_cgroup_line(child.pid)).endswith("/" + os.path.basename(server.cgroup)), \
        "the command is not in a cgroup under the fork server's"
    session.stop_job(job)
    assert job.state is JobState.STOPPED


def test_a_finished_commands_cgroup_goes_to_the_next_unless_something_of_it_is_left(
        session: psjobs.Session, path: str, tmp_path: Path) -> None:
    server = _server(session)
    if path != "direct" or server.cgroup is None:
        pytest.skip("only commands started straight from the session, where cgroup v2 is writable")
    where = ["sh", "-c", "cat /proc/self/cgroup | grep ^0::"]
    first = _run(session, where).receive()
    assert _run(session, where).receive() == first, "an empty cgroup was not used again"
    pidfile = tmp_path / "escaped"
    # It ends Completed while a daemon it started (its own session, no stdio) stays in its cgroup.
    escaping = _run(session, ["sh", "-c", f"setsid sleep 60 </dev/null >/dev/null 2>&1 & echo $! > {pidfile}; "
                                          "cat /proc/self/cgroup | grep ^0::"])
    assert escaping.state is JobState.COMPLETED and escaping.receive() == first
    escaped = int(pidfile.read_text())
    assert psutil.pid_exists(escaped)
    assert _run(session, where).receive() != first, "a cgroup that still holds a process went to another job"
    session.close()  # the session's end ends the daemon with the cgroup that held it
    wait_until(lambda: not psutil.pid_exists(escaped) or psutil.Process(escaped).status() == psutil.STATUS_ZOMBIE,
               what="the escaped daemon to die with the session")


def test_a_command_is_born_in_its_cgroup_or_moved_there_before_it_runs(session: psjobs.Session, path: str,
                                                                        tmp_path: Path) -> None:
    # Born there (clone3) spares the move's wait for an RCU grace period after a quiet moment
    # (bench/FINDINGS.md); the move (vfork) is what a kernel before 5.7 or a seccomp filter leaves.
    server = _server(session)
    if path != "direct" or server.cgroup is None:
        pytest.skip("only commands started straight from the session, where cgroup v2 is writable")
    cgroup = os.path.join(server.cgroup, f"test-{os.getpid()}")
    os.mkdir(cgroup)
    directory = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    null = os.open(os.devnull, os.O_RDONLY)
    out_r, out_w = os.pipe()
    try:
        for how in (0, 1):
            argv = [b"/bin/sh", b"-c", b"cat /proc/self/cgroup"]
            pid, err, step, born_in = _direct._cspawn.spawn([argv[0]], argv, [], null, out_w, out_w, None, -1,
                                                            directory, how)
            assert (err, step) == (0, 0) and pid > 0
            assert os.waitpid(pid, 0)[1] == 0
            line = next(x for x in os.read(out_r, 65536).decode().splitlines() if x.startswith("0::"))
            assert line.endswith("/" + os.path.basename(server.cgroup) + "/" + os.path.basename(cgroup)), line
            if how == 1:
                assert born_in == 0
            elif os.uname().machine == "x86_64":
                assert born_in == 1, "clone3 did not have the command born in its cgroup on x86-64"
        # A cgroup that cgroup.kill once emptied: Linux 6.18 SIGKILLs a child born there, so the
        # command is started the other way (moved in), and runs.
        with open(os.path.join(cgroup, "cgroup.kill"), "w") as kill:
            kill.write("1")
        argv = [b"/bin/sh", b"-c", b"exit 3"]
        pid, err, step, born_in = _direct._cspawn.spawn([argv[0]], argv, [], null, out_w, out_w, None, -1,
                                                        directory, 0)
        assert (err, step) == (0, 0) and pid > 0
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 3, "the command did not run"
        # A program that is not there, either way: the exec step's error (the child is reaped).
        for how in (0, 1):
            pid, err, step, _ = _direct._cspawn.spawn([b"/nonexistent/psjobs"], [b"x"], [], null, out_w, out_w,
                                                      None, -1, directory, how)
            assert (pid, err, step) == (-1, errno.ENOENT, 4)
    finally:
        for fd in (directory, null, out_r, out_w):
            os.close(fd)
        os.rmdir(cgroup)


def test_commands_run_after_one_was_killed(path: str) -> None:
    # A stopped command whose processes outlive its SIGTERM is killed with cgroup.kill; the
    # commands after it still run (a killed cgroup is not used again, see give_cgroup).
    with psjobs.Session(stop_grace=0.2) as session:
        stubborn = session.start_job(["sh", "-c", "trap '' TERM; grep ^0:: /proc/self/cgroup; sleep 30"])
        wait_until(lambda: len(stubborn.receive(keep=True)) == 1, what="the command to be ready")
        killed_in = stubborn.receive()[0]
        session.stop_job(stubborn)
        assert stubborn.state is JobState.STOPPED
        for i in range(5):
            job = _run(session, ["sh", "-c", f"echo {i}; grep ^0:: /proc/self/cgroup"])
            assert job.state is JobState.COMPLETED, job.child_jobs[0].job_state_info.reason
            echoed, cgroup = job.receive()
            assert echoed == str(i)
            if path == "direct":
                assert cgroup != killed_in, "a killed cgroup went to the next command"


def test_start_job_does_not_wait_for_the_fork_server_to_start_a_command(session: psjobs.Session, path: str) -> None:
    if path != "fork server":
        pytest.skip("a command started from the session is running when start_job returns")
    server = _server(session)
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        job = session.start_job(["echo", "hi"])  # returns: the server's answer comes to the I/O loop
        assert job.child_jobs[0].state is JobState.NOT_STARTED
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    assert job.wait(10) and job.state is JobState.COMPLETED
    assert job.receive() == ["hi"]


def test_a_command_stopped_as_it_starts_leaves_no_process(session: psjobs.Session) -> None:
    argv = ["sleep", f"29.{os.getpid()}"]  # a duration no other process here sleeps
    jobs = []
    for _ in range(10):
        job = session.start_job(argv)
        session.stop_job(job)  # at once: the server may not have answered yet
        assert job.state is JobState.STOPPED
        jobs.append(job)

    def none_left() -> bool:
        for p in psutil.process_iter(["cmdline", "status"]):
            if p.info["cmdline"] == argv and p.info["status"] != psutil.STATUS_ZOMBIE:
                return False
        return True

    wait_until(none_left, what="no command of a stopped job to be left")


def test_without_the_extension_the_fork_server_starts_commands(tmp_path: Path) -> None:
    """A psjobs installed where no C compiler was found has no _cspawn: commands still run, started
    by the fork server (its children, not the session's)."""
    code = """
import os, sys
sys.modules["psjobs.backends.process._cspawn"] = None  # as if it had not been built
import psjobs, psutil
from psjobs.backends.process import _direct
assert not _direct.available()
with psjobs.Session() as s:
    job = s.start_job(["sh", "-c", "echo $PPID"])
    assert job.wait(30) and job.state is psjobs.JobState.COMPLETED, job.child_jobs[0].job_state_info.reason
    server = s._backends["process"]._server
    print(job.receive() == [str(server.proc.pid)])
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PSJOBS_DIRECT_COMMANDS": "1"})
    assert done.stdout.strip() == "True", done.stderr


def test_the_commands_parent_is_the_session_or_the_fork_server(session: psjobs.Session, path: str) -> None:
    server = _server(session)
    direct = path == "direct" and server.cgroup is not None  # without a cgroup the server starts it
    job = _run(session, ["sh", "-c", "echo $PPID"])
    assert job.receive() == [str(os.getpid() if direct else server.proc.pid)]


def test_a_closed_session_leaves_no_zombie_of_its_commands(path: str) -> None:
    session = psjobs.Session(stop_grace=2.0)
    job = session.start_job(["sleep", "30"])
    wait_until(lambda: job.child_jobs[0].pid is not None, what="the command's pid")
    pid = job.child_jobs[0].pid
    assert pid is not None
    session.close()
    assert job.state is JobState.STOPPED
    try:
        os.waitpid(pid, os.WNOHANG)  # our child when the session started it: psjobs reaped it already
    except ChildProcessError:
        return
    raise AssertionError(f"the command {pid} was left for this process to reap")
