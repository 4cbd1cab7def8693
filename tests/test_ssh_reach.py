"""Reaching a computer: what a computer name and configure_ssh accept up front, which key files a
login uses (as OpenSSH's ssh picks them), and that the next step a refusal suggests works when pasted.

Against the tests' real sshd (tests/sshd.py) on loopback; ``ssh -o BatchMode=yes`` runs beside
psjobs where the point is to behave as OpenSSH does."""

from __future__ import annotations

import math
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import psjobs
from psjobs import JobState

asyncssh = pytest.importorskip("asyncssh")

from . import sshd as sshd_helper  # noqa: E402 - after the importorskip

pytestmark = pytest.mark.ssh


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[sshd_helper.LoopbackSSHD]:
    with sshd_helper.module_server(tmp_path_factory) as srv:
        yield srv


# --- computer names and options: refused before any job exists -------------------------------------

@pytest.mark.parametrize("name", ["web1:99999", "web1:0", "web1:65536", "web1:00000", "root@[::1]:70000"])
def test_a_port_out_of_range_is_refused_before_any_job(session: psjobs.Session, name: str) -> None:
    with pytest.raises(ValueError, match="1 to 65535") as info:
        session.invoke_command("true", computer_name=["web2", name])
    assert repr(name) in str(info.value)
    assert session.get_job() == []


@pytest.mark.parametrize("name", ["web1\0", "web1\n", "we\tb1", "web1\x7f", "root\x1b@web1", "web1:\u0662\u0662"])
def test_control_characters_and_foreign_digits_are_refused_before_any_job(session: psjobs.Session,
                                                                         name: str) -> None:
    with pytest.raises(ValueError, match="invoke_command") as info:
        session.invoke_command("true", computer_name=name)
    assert repr(name) in str(info.value)
    assert session.get_job() == []


@pytest.mark.parametrize("name", ["web1:1", "web1:65535", "admin@10.0.0.1:2222", "[::1]:22", "[fe80::1%eth0]"])
def test_names_at_the_edges_are_accepted(name: str) -> None:
    from psjobs.backends.ssh._backend import check_computers

    assert check_computers([name]) == [name]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 0, -1])
def test_connect_timeout_must_be_finite_seconds(session: psjobs.Session, value: Any) -> None:
    before = psjobs.configure_ssh(session)
    with pytest.raises(ValueError, match="connect_timeout"):
        psjobs.configure_ssh(session, connect_timeout=value)
    assert psjobs.configure_ssh(session) == before  # nothing changed
    assert psjobs.configure_ssh(session, connect_timeout=2.5).connect_timeout == 2.5
    assert psjobs.configure_ssh(session, connect_timeout=None).connect_timeout is None


# --- the ssh command a failure suggests works when pasted ---------------------------------------------

def _suggested(reason: BaseException) -> str:
    """The ``ssh ... true`` command at the end of a failure's text."""
    text = str(reason)
    start = text.rindex("(ssh ")
    return text[start + 1:text.rindex(")")]


def _paste(command: str) -> subprocess.CompletedProcess[str]:
    """Run ``command`` as a user pasting it into a shell would (never asking: BatchMode)."""
    argv = shlex.split(command)
    assert argv[0] == "ssh" and argv[-1] == "true", command
    return subprocess.run(["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", *argv[1:]], text=True,
                          capture_output=True, stdin=subprocess.DEVNULL, timeout=30)


@pytest.mark.skipif(shutil.which("ssh") is None, reason="no ssh client")
@pytest.mark.parametrize(("name", "command"), [
    ("127.0.0.1:1", "ssh -F /dev/null -p 1 127.0.0.1 true"),
    ("root@127.0.0.2:1", "ssh -F /dev/null -p 1 root@127.0.0.2 true"),
    ("[127.0.0.3]:1", "ssh -F /dev/null -p 1 127.0.0.3 true"),
    ("[::1]:1", "ssh -F /dev/null -p 1 ::1 true"),
])
def test_cannot_connect_suggests_an_ssh_command_that_parses(name: str, command: str) -> None:
    with psjobs.Session() as s:
        psjobs.configure_ssh(s, config=[], connect_timeout=10)
        job = s.invoke_command("true", computer_name=name)
        assert job.wait(30) and job.state is JobState.FAILED
        reason = job.child_jobs[0].job_state_info.reason
    assert isinstance(reason, psjobs.RemoteConnectionError) and reason.computer_name == name
    assert f"cannot connect to {name}" in str(reason)
    assert _suggested(reason) == command
    # ssh fails as psjobs did (nothing listens on port 1), never on the name itself
    done = _paste(command)
    assert done.returncode == 255
    assert "Could not resolve" not in done.stderr and "port 1:" in done.stderr, done.stderr


@pytest.mark.skipif(shutil.which("ssh") is None, reason="no ssh client")
def test_the_suggested_command_reaches_the_computer_with_the_sessions_files(
        server: sshd_helper.LoopbackSSHD, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger"
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(stranger))
    name = f"{server.user}@127.0.0.3:{server.port}"
    with psjobs.Session() as s:
        psjobs.configure_ssh(s, config=[], client_keys=[str(stranger)], known_hosts=[str(server.known_hosts)])
        job = s.invoke_command("true", computer_name=name)
        assert job.wait(30) and job.state is JobState.FAILED
        reason = job.child_jobs[0].job_state_info.reason
        assert "refused the login" in str(reason)
        command = _suggested(reason)
        assert command == shlex.join(["ssh", "-F", "/dev/null", "-i", str(stranger), "-o",
                                      f"UserKnownHostsFile={server.known_hosts}", "-p", str(server.port),
                                      f"{server.user}@127.0.0.3", "true"])
        assert "Permission denied" in _paste(command).stderr  # ssh is refused for the same reason
        # with the right key the same command gets in, and so does psjobs
        psjobs.configure_ssh(s, client_keys=[str(server.client_key)])
        assert _paste(command.replace(str(stranger), str(server.client_key))).returncode == 0
        again = s.invoke_command("true", computer_name=name)
        assert again.wait(30) and again.state is JobState.COMPLETED, again.reason
