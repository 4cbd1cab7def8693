"""Remote jobs against a real OpenSSH server on loopback: three "computers" (127.0.0.1, .2, .3)
and one that is down (127.0.0.4). The autouse check of conftest also sees the server's session
processes, so a test that leaves a remote process behind fails."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import psjobs
from psjobs import JobState

from .conftest import wait_until

asyncssh = pytest.importorskip("asyncssh")

from . import sshd as sshd_helper  # noqa: E402 - after the importorskip

pytestmark = pytest.mark.ssh

THREE = list(sshd_helper.ADDRESSES)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[sshd_helper.LoopbackSSHD]:
    with sshd_helper.module_server(tmp_path_factory) as srv:
        yield srv


@pytest.fixture
def rs(server: sshd_helper.LoopbackSSHD) -> Iterator[psjobs.Session]:
    """A session that reaches the three computers through the server's own config and keys."""
    s = psjobs.Session(stop_grace=2.0)
    # The remote interpreter: this one (the same minor version, whatever CI runs), without its
    # site-packages, so that psjobs and cloudpickle are always sent (and the sending is tested).
    psjobs.configure_ssh(s, config=str(server.ssh_config), python=f"{sys.executable} -S")
    try:
        yield s
    finally:
        s.close()


def gather(job: psjobs.Job, got: list[Any], count: int) -> bool:
    """Receive what ``job`` has into ``got``; True once ``count`` items arrived (for wait_until)."""
    got.extend(job.receive())
    return len(got) >= count


def remote_procs(server: sshd_helper.LoopbackSSHD, argv: list[str]) -> list[psutil.Process]:
    """Live (non-zombie) processes of the server's sessions running ``argv``."""
    out = []
    for pid in server.session_pids():
        try:
            p = psutil.Process(pid)
            if p.status() != psutil.STATUS_ZOMBIE and p.cmdline() == argv:
                out.append(p)
        except psutil.NoSuchProcess:
            continue
    return out


# --- fan-out, streaming, records -------------------------------------------------------------------

def test_fan_out_to_three_computers_one_child_each_in_order(rs: psjobs.Session) -> None:
    job = rs.invoke_command('echo "hello $1"; echo "careful" >&2', "world", computer_name=THREE,
                            job_name="fan")
    assert job.job_type == "RemoteJob" and job.name == "fan"
    assert job.state is JobState.RUNNING  # Running from the moment it is returned
    assert job.location == "127.0.0.1, 127.0.0.2, 127.0.0.3"
    assert [c.location for c in job.child_jobs] == THREE
    assert [c.computer_name for c in job.child_jobs] == THREE
    assert [c.id for c in job.child_jobs] == [job.id + 1, job.id + 2, job.id + 3]
    assert job.wait(30)
    assert job.state is JobState.COMPLETED and job.exit_code == 0
    assert [c.state for c in job.child_jobs] == [JobState.COMPLETED] * 3
    records = job.receive(records=True)
    assert sorted((r.computer_name, r.value) for r in records) == [(c, "hello world") for c in THREE]
    assert {r.job.id for r in records} == {c.id for c in job.child_jobs}
    assert sorted((e.computer_name, e.message) for e in job.error) == [(c, "careful") for c in THREE]
    assert job.has_more_data is False


def test_output_streams_while_the_command_runs(rs: psjobs.Session, tmp_path: Path) -> None:
    go = tmp_path / "go"
    job = rs.invoke_command('echo first; while [ ! -e "$1" ]; do sleep 0.02; done; echo second', str(go),
                            computer_name="127.0.0.2")
    got: list[Any] = []
    wait_until(lambda: gather(job, got, 1), 30, "the first line while the command runs")
    assert got == ["first"] and job.state is JobState.RUNNING
    go.touch()
    assert job.wait(30)
    assert job.receive() == ["second"]
    assert job.output == ["first", "second"]


def test_argv_is_quoted_safely(rs: psjobs.Session) -> None:
    words = ["a b", "$HOME", "it's", "*", "`id`", "x;y"]
    job = rs.invoke_command(["printf", "%s\\n", *words], computer_name="127.0.0.3")
    assert job.wait(30) and job.state is JobState.COMPLETED
    assert job.receive() == words


def test_non_zero_exit_fails_that_child_and_keeps_the_status(rs: psjobs.Session) -> None:
    job = rs.invoke_command('case "$SSH_CONNECTION" in *" 127.0.0.2 "*) exit 3;; esac; echo ok',
                            computer_name=THREE)
    assert job.wait(30)
    bad = job.child_jobs[1]
    assert bad.state is JobState.FAILED and bad.exit_code == 3
    assert isinstance(bad.job_state_info.reason, psjobs.ExitStatusError)
    assert "127.0.0.2" in str(bad.job_state_info.reason) and "status 3" in str(bad.job_state_info.reason)
    assert [c.state for c in (job.child_jobs[0], job.child_jobs[2])] == [JobState.COMPLETED] * 2
    assert job.state is JobState.FAILED and job.exit_code == 3


def test_as_job_false_returns_the_output_and_keeps_no_job(rs: psjobs.Session) -> None:
    out = rs.invoke_command("echo one", computer_name=["127.0.0.1", "127.0.0.2"], as_job=False)
    assert out == ["one", "one"]
    assert rs.get_job() == []


def test_one_connection_per_computer_is_reused(rs: psjobs.Session, server: sshd_helper.LoopbackSSHD) -> None:
    for _ in range(3):
        job = rs.invoke_command("true", computer_name="127.0.0.1")
        assert job.wait(30) and job.state is JobState.COMPLETED
    mine = [c for c in psutil.Process().net_connections("tcp")
            if c.raddr and c.raddr.port == server.port and c.status == psutil.CONN_ESTABLISHED]
    assert len(mine) == 1


# --- failures of one computer ----------------------------------------------------------------------

def test_a_computer_that_is_down_fails_only_its_child(rs: psjobs.Session,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    job = rs.invoke_command("echo up", computer_name=["127.0.0.1", sshd_helper.DOWN, "127.0.0.3"])
    assert job.wait(30)
    up1, down, up3 = job.child_jobs
    assert up1.state is JobState.COMPLETED and up3.state is JobState.COMPLETED
    assert down.state is JobState.FAILED
    reason = down.job_state_info.reason
    assert isinstance(reason, psjobs.RemoteConnectionError) and reason.computer_name == sshd_helper.DOWN
    assert sshd_helper.DOWN in str(reason) and "refused" in str(reason).lower()
    assert job.state is JobState.FAILED and job.reason is reason
    assert sorted(job.receive()) == ["up", "up"]
    assert sshd_helper.DOWN in capsys.readouterr().err  # the host reports the failure


def test_unknown_host_key_is_refused_and_accept_new_records_it(server: sshd_helper.LoopbackSSHD,
                                                              tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"
    known.write_text("")
    with psjobs.Session() as s:
        psjobs.configure_ssh(s, config=str(server.ssh_config), known_hosts=str(known))
        job = s.invoke_command("true", computer_name="127.0.0.2")
        assert job.wait(30) and job.state is JobState.FAILED
        reason = job.child_jobs[0].job_state_info.reason
        assert isinstance(reason, psjobs.HostKeyError)
        assert "unknown" in str(reason) and "accept_new_host_keys=True" in str(reason)
        assert "SHA256:" in str(reason)
    assert known.read_text() == ""
    with psjobs.Session() as s:
        psjobs.configure_ssh(s, config=str(server.ssh_config), known_hosts=str(known),
                             accept_new_host_keys=True)
        job = s.invoke_command("echo in", computer_name="127.0.0.2")
        assert job.wait(30) and job.receive() == ["in"]
    assert known.read_text().startswith(f"[127.0.0.2]:{server.port} ssh-ed25519 ")


def test_changed_host_key_is_refused_even_with_accept_new(server: sshd_helper.LoopbackSSHD,
                                                         tmp_path: Path) -> None:
    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.3]:{server.port} {other}\n")
    with psjobs.Session() as s:
        psjobs.configure_ssh(s, config=str(server.ssh_config), known_hosts=str(known),
                             accept_new_host_keys=True)
        job = s.invoke_command("true", computer_name="127.0.0.3")
        assert job.wait(30) and job.state is JobState.FAILED
        reason = job.child_jobs[0].job_state_info.reason
        assert isinstance(reason, psjobs.HostKeyError) and "differs" in str(reason)
    assert known.read_text() == f"[127.0.0.3]:{server.port} {other}\n"


def test_refused_login_names_the_computer_and_never_the_secret(server: sshd_helper.LoopbackSSHD,
                                                              tmp_path: Path) -> None:
    stranger = tmp_path / "stranger"
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(stranger))
    with psjobs.Session() as s:
        options = psjobs.configure_ssh(s, config=str(server.ssh_config), client_keys=[str(stranger)],
                                       password="hunter2-secret")
        assert "hunter2" not in repr(options)
        job = s.invoke_command("true", computer_name="127.0.0.1")
        assert job.wait(30) and job.state is JobState.FAILED
        reason = job.child_jobs[0].job_state_info.reason
        assert isinstance(reason, psjobs.RemoteConnectionError)
        assert "refused the login" in str(reason) and "127.0.0.1" in str(reason)
        assert "hunter2" not in str(reason) and "hunter2" not in repr(reason)


def test_a_dropped_connection_fails_the_child_and_leaves_nothing(
        rs: psjobs.Session, server: sshd_helper.LoopbackSSHD) -> None:
    job = rs.invoke_command("sleep 100 | cat", computer_name="127.0.0.3")
    wait_until(lambda: remote_procs(server, ["sleep", "100"]), 30, "the remote sleep")
    # Kill the connection's sshd processes (between the listener and the session): it drops.
    sleeper = remote_procs(server, ["sleep", "100"])[0]
    assert server.proc is not None
    for p in sleeper.parents():
        if p.name().startswith("sshd") and p.pid != server.proc.pid:
            p.kill()
    assert job.wait(30)
    child = job.child_jobs[0]
    assert child.state is JobState.FAILED
    reason = child.job_state_info.reason
    assert isinstance(reason, psjobs.RemoteConnectionError) and "dropped" in str(reason)
    wait_until(lambda: not remote_procs(server, ["sleep", "100"]) and not remote_procs(server, ["cat"]),
               10, "the watchdog to end the job's processes")
    job2 = rs.invoke_command("echo back", computer_name="127.0.0.3")  # a new connection is made
    assert job2.wait(30) and job2.receive() == ["back"]


# --- throttle ----------------------------------------------------------------------------------------

def test_throttle_one_runs_one_computer_at_a_time_in_order(rs: psjobs.Session, tmp_path: Path) -> None:
    go = tmp_path / "go"
    job = rs.invoke_command('while [ ! -e "$1" ]; do sleep 0.02; done; echo done', str(go),
                            computer_name=THREE, throttle_limit=1)
    first, second, third = job.child_jobs
    wait_until(lambda: first.state is JobState.RUNNING, 30, "the first child to run")
    assert second.state is JobState.NOT_STARTED and third.state is JobState.NOT_STARTED
    assert job.state is JobState.RUNNING
    go.touch()
    assert job.wait(30) and job.state is JobState.COMPLETED
    assert first.end_time and second.begin_time and second.end_time and third.begin_time
    assert first.end_time <= second.begin_time and second.end_time <= third.begin_time


def test_stopping_a_child_that_waits_for_a_slot(rs: psjobs.Session, tmp_path: Path) -> None:
    go = tmp_path / "go"
    job = rs.invoke_command('while [ ! -e "$1" ]; do sleep 0.02; done', str(go),
                            computer_name=["127.0.0.1", "127.0.0.2"], throttle_limit=1)
    first, second = job.child_jobs
    wait_until(lambda: first.state is JobState.RUNNING, 30, "the first child to run")
    second.stop()
    assert second.state is JobState.STOPPED
    go.touch()
    assert job.wait(30)
    assert first.state is JobState.COMPLETED and job.state is JobState.STOPPED


# --- stop leaves nothing behind ------------------------------------------------------------------------

def test_stop_ends_the_remote_process_tree_on_every_computer(
        rs: psjobs.Session, server: sshd_helper.LoopbackSSHD) -> None:
    job = rs.invoke_command("sleep 100 | cat", computer_name=THREE)
    wait_until(lambda: len(remote_procs(server, ["sleep", "100"])) == 3, 30, "three remote sleeps")
    assert len(remote_procs(server, ["cat"])) == 3
    job.stop()
    assert job.state is JobState.STOPPED
    assert [c.state for c in job.child_jobs] == [JobState.STOPPED] * 3
    assert remote_procs(server, ["sleep", "100"]) == [] and remote_procs(server, ["cat"]) == []
    job.remove()
    assert rs.get_job() == []


def test_closing_the_session_ends_remote_jobs(server: sshd_helper.LoopbackSSHD) -> None:
    s = psjobs.Session(stop_grace=1.0)
    psjobs.configure_ssh(s, config=str(server.ssh_config))
    s.invoke_command("sleep 100 | cat", computer_name=["127.0.0.1", "127.0.0.2"])
    wait_until(lambda: len(remote_procs(server, ["sleep", "100"])) == 2, 30, "two remote sleeps")
    s.close()
    assert remote_procs(server, ["sleep", "100"]) == [] and remote_procs(server, ["cat"]) == []
    assert not [t for t in __import__("threading").enumerate() if t.name == "psjobs-ssh"]


def test_remove_force_stops_a_running_remote_job(rs: psjobs.Session,
                                                server: sshd_helper.LoopbackSSHD) -> None:
    job = rs.invoke_command(["sleep", "100"], computer_name="127.0.0.2")
    wait_until(lambda: remote_procs(server, ["sleep", "100"]), 30, "the remote sleep")
    with pytest.raises(psjobs.JobNotFinishedError):
        job.remove()
    job.remove(force=True)
    assert remote_procs(server, ["sleep", "100"]) == []
    assert rs.get_job() == []


# --- what a completed job leaves running (docs/remote.md, "A job that completes") -----------------------

def start_in_group(argv: list[str]) -> int:
    """A process in the job's own process group, left running when the callable returns."""
    import subprocess

    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid


def start_in_own_session(argv: list[str]) -> int:
    import subprocess

    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True).pid


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_completed_callable_ends_what_it_left_in_its_group(rs: psjobs.Session) -> None:
    job = rs.invoke_command(start_in_group, ["sleep", "301"], computer_name="127.0.0.1")
    assert job.wait(60) and job.state is JobState.COMPLETED, job.reason
    pid = job.receive()[0]
    try:
        # as a local job's: its process group ends with the worker, before the job is Completed
        wait_until(lambda: not _running(pid), 10, "the leftover sleep to end")
    finally:
        if _running(pid):
            psutil.Process(pid).kill()


@pytest.mark.parametrize("how", ["command in the background", "callable, own session"])
def test_what_a_completed_job_started_outside_its_group_outlives_the_session(
        how: str, server: sshd_helper.LoopbackSSHD) -> None:
    """Documented, not wanted: a remote job's watchdog lives as long as its channel, so nothing of
    psjobs is left on the computer to end a command's background process (or a callable's child
    that left its group) once the job completed; locally the session's end ends it."""
    s = psjobs.Session(stop_grace=1.0)
    psjobs.configure_ssh(s, config=str(server.ssh_config), python=f"{sys.executable} -S")
    pid = None
    try:
        if how.startswith("command"):
            job = s.invoke_command("nohup sleep 302 >/dev/null 2>&1 & echo $!", computer_name="127.0.0.2")
        else:
            job = s.invoke_command(start_in_own_session, ["sleep", "303"], computer_name="127.0.0.2")
        assert job.wait(60) and job.state is JobState.COMPLETED, job.reason
        pid = int(job.receive()[0])
        s.close()
        assert _running(pid)  # after the job, and after the session
    finally:
        s.close()
        if pid is not None and _running(pid):
            psutil.Process(pid).kill()


# --- the verbs on the parent and on each child ---------------------------------------------------------

def test_receive_wait_stop_remove_on_parent_and_children(rs: psjobs.Session, tmp_path: Path) -> None:
    go = tmp_path / "go"
    job = rs.invoke_command('echo "$1"; while [ ! -e "$2" ]; do sleep 0.02; done; echo end', "start", str(go),
                            computer_name=THREE)
    a, b, c = job.child_jobs
    wait_until(lambda: all(len(x.output) == 1 for x in (a, b, c)), 30, "every child's first line")
    assert rs.receive_job(a.id) == ["start"]  # a child by id: only its own records
    assert a.receive() == []
    assert rs.wait_job(b, timeout=0) == []
    b.stop()  # one child: the others go on
    assert b.state is JobState.STOPPED and a.state is JobState.RUNNING and c.state is JobState.RUNNING
    with pytest.raises(psjobs.JobStateError):
        a.remove()
    go.touch()
    assert rs.wait_job([a, c], timeout=30) == [a, c]
    assert job.wait(30) and job.state is JobState.STOPPED  # a child was stopped
    assert sorted(job.receive()) == ["end", "end", "start", "start"]  # parent: what is left of all
    assert job.child_jobs[0].has_more_data is False
    found = rs.get_job(include_child_jobs=True)
    assert [j.id for j in found] == [job.id, a.id, b.id, c.id]
    rs.remove_job(job)
    assert rs.get_job() == []
    with pytest.raises(psjobs.JobNotFoundError):
        rs.get_job(a.id)


# --- Python callables ---------------------------------------------------------------------------------

def squares(n: int, gate: str) -> Any:
    import os
    import time

    yield 0
    while not os.path.exists(gate):
        time.sleep(0.02)
    for i in range(1, n):
        yield i * i


def chatty() -> str:
    import socket

    print("hello from", socket.gethostname())
    psjobs.write_warning("careful")
    return "result"


class Boom(ValueError):
    pass


class Point:
    def __init__(self, x: int, y: int) -> None:
        self.x, self.y = x, y

    def moved(self, dx: int) -> Point:
        return Point(self.x + dx, self.y)


def move_all(points: list[Point], dx: int) -> Any:
    for p in points:
        yield p.moved(dx)


def explode(x: int) -> None:
    def inner() -> None:
        raise Boom(f"boom {x}")

    inner()


def test_remote_generator_streams_its_items(rs: psjobs.Session, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    job = rs.invoke_command(squares, 5, str(gate), computer_name=["127.0.0.1", "127.0.0.2"])
    got: list[Any] = []
    wait_until(lambda: gather(job, got, 2), 60, "the first item of each computer")
    assert got == [0, 0] and job.state is JobState.RUNNING
    gate.touch()
    assert job.wait(60) and job.state is JobState.COMPLETED
    assert [c.output for c in job.child_jobs] == [[0, 1, 4, 9, 16]] * 2
    notes = [r.message for r in job.debug]  # "-S": the remote has neither, psjobs sent both
    assert len(notes) == 2 and all(n.startswith("sent psjobs and cloudpickle to ") for n in notes), notes
    assert job.child_jobs[0].exit_code is None


def blobs() -> Any:
    yield b"r" * (3 << 20)   # out of band (RECORDS_OOB), through the SSH channel
    yield bytearray(b"s" * 5)


def test_a_large_bytes_value_comes_back_whole(rs: psjobs.Session) -> None:
    job = rs.invoke_command(blobs, computer_name="127.0.0.2")
    assert job.wait(60)
    got = job.receive()
    assert got == [b"r" * (3 << 20), bytearray(b"sssss")]
    assert [type(v) for v in got] == [bytes, bytearray]


def test_the_callers_own_classes_travel_by_value(rs: psjobs.Session) -> None:
    import cloudpickle

    job = rs.invoke_command(move_all, [Point(1, 2), Point(3, 4)], 10, computer_name="127.0.0.2")
    assert job.wait(60) and job.state is JobState.COMPLETED, job.reason
    assert [(p.x, p.y) for p in job.receive()] == [(11, 2), (13, 4)]
    assert __name__ not in cloudpickle.list_registry_pickle_by_value()  # registered for the call only


def test_print_goes_to_information_with_the_computer(rs: psjobs.Session,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    job = rs.invoke_command(chatty, computer_name="127.0.0.3")
    assert job.wait(60) and job.state is JobState.COMPLETED
    assert job.receive() == ["result"]
    info = job.information
    assert [r.message.split()[:2] for r in info] == [["hello", "from"]]
    assert info[0].computer_name == "127.0.0.3"
    assert [(w.message, w.computer_name) for w in job.warning] == [("careful", "127.0.0.3")]
    captured = capsys.readouterr()
    assert "[127.0.0.3] hello from" in captured.out and "[127.0.0.3] WARNING: careful" in captured.err


def test_exception_comes_back_with_the_remote_traceback(rs: psjobs.Session) -> None:
    job = rs.invoke_command(explode, 7, computer_name="127.0.0.1")
    assert job.wait(60) and job.state is JobState.FAILED
    reason = job.child_jobs[0].job_state_info.reason
    assert isinstance(reason, ValueError) and str(reason) == "boom 7"
    assert type(reason).__name__ == "Boom"
    assert isinstance(reason.__cause__, psjobs.RemoteTraceback)
    tb = reason.__cause__.tb
    assert "in inner" in tb and "in explode" in tb and "boom 7" in tb


def test_a_python_version_mismatch_is_refused_by_the_remote(rs: psjobs.Session,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from psjobs.backends.ssh import _engine as _ssh

    monkeypatch.setattr(_ssh, "_ANNOUNCE_PYTHON", (3, 99))
    job = rs.invoke_command(chatty, computer_name="127.0.0.2")
    assert job.wait(60) and job.state is JobState.FAILED
    reason = job.child_jobs[0].job_state_info.reason
    assert isinstance(reason, psjobs.RemoteVersionError)
    text = str(reason)
    assert "127.0.0.2" in text and "3.99" in text and "Python 3." in text and "configure_ssh(python=" in text
    assert job.information == []  # the callable never ran


def test_a_python_version_mismatch_is_refused_by_the_session(rs: psjobs.Session,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from psjobs.backends.ssh import _engine as _ssh

    monkeypatch.setattr(_ssh, "_FAKE_REMOTE_PYTHON", (3, 99))  # the remote says it runs 3.99
    job = rs.invoke_command(chatty, computer_name="127.0.0.3")
    assert job.wait(60) and job.state is JobState.FAILED
    reason = job.child_jobs[0].job_state_info.reason
    assert isinstance(reason, psjobs.RemoteVersionError) and "runs Python 3.99" in str(reason)


def test_stop_a_remote_python_job(rs: psjobs.Session, server: sshd_helper.LoopbackSSHD,
                                  tmp_path: Path) -> None:
    job = rs.invoke_command(squares, 3, str(tmp_path / "never"), computer_name="127.0.0.1")
    wait_until(lambda: job.child_jobs[0].output == [0], 60, "the first item")
    job.stop()
    assert job.state is JobState.STOPPED and job.child_jobs[0].state is JobState.STOPPED
    assert not [p for pid in server.session_pids() for p in [psutil.Process(pid)]
                if "psjobs" in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE]


# --- arguments are checked before any job exists ------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "error"), [
    ({"computer_name": None}, ValueError),
    ({"computer_name": []}, ValueError),
    ({"computer_name": 5}, TypeError),
    ({"computer_name": ["ok", 3]}, TypeError),
    ({"computer_name": "two words"}, ValueError),
    ({"computer_name": "-oProxyCommand=x"}, ValueError),
    ({"computer_name": "admin:secret@web1"}, ValueError),  # no password in a computer name
    ({"computer_name": "h", "throttle_limit": -1}, ValueError),
    ({"computer_name": "h", "throttle_limit": True}, ValueError),
    ({"computer_name": "h", "as_job": "yes"}, TypeError),
    ({"computer_name": "h", "job_name": 3}, TypeError),
    ({"computer_name": "h", "job_name": "x", "as_job": False}, ValueError),
    ({"computer_name": "h", "color": "red"}, TypeError),  # keyword arguments with a command
])
def test_bad_arguments_raise_before_any_job(session: psjobs.Session, kwargs: dict[str, Any],
                                            error: type[Exception]) -> None:
    with pytest.raises(error):
        session.invoke_command("true", **kwargs)
    assert session.get_job() == []


def test_an_unpicklable_argument_raises_before_any_job(session: psjobs.Session) -> None:
    import threading

    with pytest.raises(TypeError, match="cannot be sent"):
        session.invoke_command(chatty, threading.Lock(), computer_name="h")
    assert session.get_job() == []


def test_ssh_options_are_checked_and_hide_secrets(session: psjobs.Session) -> None:
    with pytest.raises(ValueError):
        psjobs.configure_ssh(session, port=0)
    with pytest.raises(TypeError):
        psjobs.configure_ssh(session, known_hosts=3)
    options = psjobs.configure_ssh(session, known_hosts="~/kh", passphrase="pp-secret", port=2222)
    assert options.known_hosts == (os.path.expanduser("~/kh"),) and options.port == 2222
    assert "pp-secret" not in repr(options)
    assert psjobs.configure_ssh(session).port == 2222  # only the options given change


def test_accept_new_can_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PSJOBS_SSH_ACCEPT_NEW_HOST_KEYS", "1")
    assert psjobs.SSHOptions().accepts_new_host_keys
    assert not psjobs.SSHOptions(accept_new_host_keys=False).accepts_new_host_keys
    monkeypatch.delenv("PSJOBS_SSH_ACCEPT_NEW_HOST_KEYS")
    assert not psjobs.SSHOptions().accepts_new_host_keys


def test_what_a_login_shell_prints_first_is_not_output() -> None:
    from psjobs.backends.ssh._channel import Marked
    from psjobs.worker._remote_boot import MARK

    m = Marked()
    assert m.feed(b"Welcome!\nlast login") == b""
    assert m.feed(b" today\n" + MARK[:3]) == b""
    assert m.feed(MARK[3:] + b"real output\n") == b"real output\n"
    assert m.noise == b"Welcome!\nlast login today\n"
    assert m.feed(b"more") == b"more"


def _same_psjobs_there(python: str) -> bool:
    """Whether ``python``, started as sshd starts it, has this psjobs protocol and cloudpickle."""
    import subprocess

    import cloudpickle

    from psjobs.worker import _wire

    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/")}
    done = subprocess.run([python, "-c", "import psjobs, cloudpickle; from psjobs.worker import _wire; "
                           "print(psjobs.__version__, _wire.VERSION, cloudpickle.__version__)"],
                          env=env, capture_output=True, text=True)
    return done.stdout.split() == [psjobs.__version__, str(_wire.VERSION), cloudpickle.__version__]


def test_a_remote_interpreter_with_psjobs_is_reused(rs: psjobs.Session) -> None:
    psjobs.configure_ssh(rs, python=sys.executable)  # the same interpreter, seen through sshd
    job = rs.invoke_command(chatty, computer_name="127.0.0.1")
    assert job.wait(60) and job.state is JobState.COMPLETED and job.receive() == ["result"]
    notes = [r.message for r in job.debug]
    if _same_psjobs_there(sys.executable):
        assert any(n.startswith("using psjobs and cloudpickle installed") for n in notes), notes
    else:  # not installed there, or another version: psjobs sends its own
        assert any(n.startswith("sent psjobs") for n in notes), notes


def test_a_missing_remote_interpreter_fails_with_a_clear_reason(rs: psjobs.Session) -> None:
    psjobs.configure_ssh(rs, python="no-such-python3")
    job = rs.invoke_command(chatty, computer_name="127.0.0.2")
    assert job.wait(60) and job.state is JobState.FAILED
    text = str(job.child_jobs[0].job_state_info.reason)
    assert "bootstrap did not start" in text and "no-such-python3" in text and "127.0.0.2" in text, text


def test_more_jobs_than_sshd_sessions_open_another_connection(tmp_path: Path) -> None:
    with sshd_helper.LoopbackSSHD(tmp_path / "small", max_sessions=2) as small, psjobs.Session() as s:
        psjobs.configure_ssh(s, config=str(small.ssh_config))
        go = tmp_path / "go"
        jobs = [s.invoke_command('while [ ! -e "$1" ]; do sleep 0.02; done; echo ok', str(go),
                                 computer_name="127.0.0.2") for _ in range(5)]
        wait_until(lambda: all(j.child_jobs[0].state is JobState.RUNNING for j in jobs), 30, "five jobs")

        def connections() -> int:
            return len([c for c in psutil.Process().net_connections("tcp") if c.raddr
                        and c.raddr.port == small.port and c.status == psutil.CONN_ESTABLISHED])

        wait_until(lambda: connections() == 3, 30, "three connections of two channels each")
        go.touch()
        assert s.wait_job(jobs, timeout=60) == jobs
        assert [j.state for j in jobs] == [JobState.COMPLETED] * 5
        assert [j.receive() for j in jobs] == [["ok"]] * 5


def test_stop_kills_a_command_that_ignores_sigterm(server: sshd_helper.LoopbackSSHD) -> None:
    with psjobs.Session(stop_grace=0.3) as s:
        psjobs.configure_ssh(s, config=str(server.ssh_config))
        job = s.invoke_command("trap '' TERM; sleep 100; echo survived", computer_name="127.0.0.1")
        wait_until(lambda: remote_procs(server, ["sleep", "100"]), 30, "the remote sleep")
        job.stop()  # TERM is ignored: the watchdog sends KILL after the grace period
        assert job.state is JobState.STOPPED and job.receive() == []
        assert remote_procs(server, ["sleep", "100"]) == []


def test_user_host_port_without_any_config(server: sshd_helper.LoopbackSSHD) -> None:
    with psjobs.Session() as s:
        psjobs.configure_ssh(s, config=[], client_keys=[str(server.client_key)],
                             known_hosts=[str(server.known_hosts)])
        name = f"{server.user}@127.0.0.3:{server.port}"
        job = s.invoke_command('echo "$(id -un)"', computer_name=name)
        assert job.wait(30) and job.state is JobState.COMPLETED, job.reason
        assert job.location == name and job.receive(records=True)[0].computer_name == name
        assert job.output == [server.user]


@pytest.mark.parametrize("marshalled", [True, False])
def test_sent_modules_import_from_memory(marshalled: bool) -> None:
    import importlib

    from psjobs.worker import _remote_boot as boot

    sources = {"psj_sent_pkg": ["VALUE = 21\n", True],
               "psj_sent_pkg.mod": ["from . import VALUE\nDOUBLE = VALUE * 2\n", False]}
    finder = boot.MemoryFinder(boot.load_modules(boot.dump_modules(sources, marshalled)))
    sys.meta_path.insert(0, finder)
    try:
        mod = importlib.import_module("psj_sent_pkg.mod")
        assert mod.DOUBLE == 42 and mod.__file__ == "<psjobs-sent>/psj_sent_pkg/mod.py"
        assert (finder.get_source("psj_sent_pkg.mod") is None) is marshalled
    finally:
        sys.meta_path.remove(finder)
        for name in ("psj_sent_pkg", "psj_sent_pkg.mod"):
            sys.modules.pop(name, None)


def test_a_command_that_sets_its_own_exit_trap_still_ends(rs: psjobs.Session) -> None:
    job = rs.invoke_command("trap 'echo bye' EXIT; echo hi; exit 4", computer_name="127.0.0.1")
    assert job.wait(30) and job.state is JobState.FAILED and job.exit_code == 4
    assert job.receive() == ["hi", "bye"]


# --- interactive: Blocked and Suspended (issue 6) ---------------------------------------------------

def remote_ask() -> str:
    return "hello " + input("Name? ")


def test_remote_job_blocked_round_trip(rs: psjobs.Session) -> None:
    job = rs.invoke_command(remote_ask, computer_name="127.0.0.2")
    child = job.child_jobs[0]
    wait_until(lambda: job.state is JobState.BLOCKED, 60, "the remote job to ask")
    assert child.state is JobState.BLOCKED and child.prompt == "Name? "
    with pytest.raises(psjobs.JobBlockedError):
        rs.wait_job(job)
    job.send_input("remote Ada")
    assert job.wait(60)
    assert job.receive() == ["hello remote Ada"]


def _stopped_or_gone(proc: psutil.Process) -> bool:
    """A `sleep 0.01` listed a moment ago may have ended before the stop reached it: that is no runner."""
    try:
        return bool(proc.status() == psutil.STATUS_STOPPED)
    except psutil.Error:
        return True


def test_remote_command_suspend_and_resume(rs: psjobs.Session, server: sshd_helper.LoopbackSSHD) -> None:
    job = rs.invoke_command("for i in $(seq 1 400); do echo $i; sleep 0.01; done", computer_name="127.0.0.3")
    child = job.child_jobs[0]
    wait_until(lambda: len(child.output) >= 3, 30, "some output")
    rs.suspend_job(job)
    assert job.state is JobState.SUSPENDED
    wait_until(lambda: all(_stopped_or_gone(p) for p in remote_procs(server, ["sleep", "0.01"])), 10,
               "the remote group to stop")
    # Lines printed before the group stopped may still be on their way (the channel, the reader:
    # several under load): wait until none has come for 0.3 s, then none may come at all.
    settled = _settled_count(child, quiet=0.3, timeout=20)
    time.sleep(0.3)  # an interval to observe, not synchronisation
    assert len(child.output) == settled
    rs.resume_job(job)
    assert job.state is JobState.RUNNING
    assert job.wait(60)
    assert job.receive() == [str(i) for i in range(1, 401)]  # nothing lost


def _settled_count(job: psjobs.Job, quiet: float, timeout: float) -> int:
    """How many output items ``job`` has once none came for ``quiet`` seconds."""
    deadline = time.monotonic() + timeout
    count, since = len(job.output), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.02)
        now = len(job.output)
        if now != count:
            count, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return count
    raise AssertionError(f"output kept coming for {timeout}s after the suspend: {count} items")


def remote_counter():  # type: ignore[no-untyped-def]
    import time as t

    for i in range(10_000):
        yield i
        t.sleep(0.005)


def test_remote_callable_suspend_resume_and_stop(rs: psjobs.Session) -> None:
    job = rs.invoke_command(remote_counter, computer_name="127.0.0.1")
    child = job.child_jobs[0]
    wait_until(lambda: len(child.output) >= 3, 60, "some items")
    rs.suspend_job(job)
    assert job.state is JobState.SUSPENDED
    time.sleep(0.2)  # let what was on its way arrive (an interval, not synchronisation)
    settled = len(child.output)
    time.sleep(0.3)
    assert len(child.output) == settled
    rs.resume_job(job)
    wait_until(lambda: len(child.output) > settled + 3, 30, "items after resume")
    rs.suspend_job(job)
    rs.stop_job(job)  # a stop reaches a suspended job too
    assert job.state is JobState.STOPPED
    out = job.receive()
    assert out == list(range(len(out)))


def test_the_psjobs_command_runs_remote_jobs(server: sshd_helper.LoopbackSSHD, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """`psjobs invoke` end to end: the session host it starts uses the user's ~/.ssh/config."""
    import json

    from .clitools import ok, private_home

    home = tmp_path / "user"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "config").write_text(server.ssh_config.read_text())
    monkeypatch.setenv("HOME", str(home))
    with private_home(tmp_path / "state"):
        row = json.loads(ok("invoke", "--json", "-c", "127.0.0.1,127.0.0.3", "--", "echo hello; echo oops >&2"))
        job = row["id"] if isinstance(row, dict) else row[0]["id"]
        ok("wait", "--timeout", "60", str(job))
        table = json.loads(ok("get", "--json", "--children", str(job)))
        assert {t["State"] if "State" in t else t["state"] for t in table} == {"Completed"}
        out = ok("receive", str(job))
        assert sorted(out.splitlines()) == ["[127.0.0.1] hello", "[127.0.0.3] hello"]  # issue 15: names
        ok("remove", str(job))
