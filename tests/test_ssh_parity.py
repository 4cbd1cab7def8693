"""Parity with OpenSSH: for each host key and config case, ``ssh -o BatchMode=yes HOST true`` and
``invoke_command("true", computer_name=HOST)`` run on the same ssh_config and known_hosts files
against the tests' sshd; any difference in verdict (connects or refuses; for a recorded key, what
got recorded and whether hashed) fails.

::

    case --> tmp/ssh_config (the case's lines, then Host * with the test key and temp known_hosts
             files), tmp/kh, kh2, g, g2 (the case's known_hosts lines)
        ssh -F ssh_config -o BatchMode=yes NAME true   --> verdict, files afterwards
        (files restored)
        psjobs invoke_command("true", NAME) with configure_ssh(config=ssh_config)  --> verdict, files
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import psjobs
from psjobs import JobState

asyncssh = pytest.importorskip("asyncssh")

from . import sshd as sshd_helper  # noqa: E402 - after the importorskip

pytestmark = [pytest.mark.ssh, pytest.mark.skipif(shutil.which("ssh") is None, reason="no ssh client")]

FILES = ("kh", "kh2", "g", "g2", "special")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[sshd_helper.LoopbackSSHD]:
    with sshd_helper.module_server(tmp_path_factory) as srv:
        yield srv


@pytest.fixture(scope="module")
def other_key() -> str:
    return str(asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip())


@pytest.fixture(scope="module")
def other_rsa() -> str:
    return str(asyncssh.generate_private_key("ssh-rsa", key_size=2048).export_public_key().decode().strip())


@pytest.fixture
def quiet_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No agent and no accept-new from the environment, unless a case sets it."""
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    monkeypatch.delenv("PSJOBS_SSH_ACCEPT_NEW_HOST_KEYS", raising=False)


@dataclasses.dataclass
class Case:
    id: str
    config: str                       # lines before the common "Host *" block
    known: dict[str, str]             # file name (of FILES) -> lines
    computer: str
    connects: bool                    # OpenSSH's verdict, checked too: the suite documents it
    recorded: tuple[str, ...] = ()    # names found in kh afterwards (ssh-keygen -F), beyond before
    hashed: bool = False
    accept_new_env: bool = False      # PSJOBS_SSH_ACCEPT_NEW_HOST_KEYS=1 for psjobs
    ssh_options: tuple[str, ...] = () # what the psjobs setting means, told to ssh
    user_files: str = "{d}/kh {d}/kh2"
    global_files: str = "{d}/g {d}/g2"


P = "[127.0.0.2]:{port}"   # the known_hosts name of 127.0.0.2 on the server's port
CASES = [
    # HostKeyAlias: looked up alone (no port), never through the address
    Case("alias-absent-ip-present", "Host web\n  HostName 127.0.0.2\n  HostKeyAlias webalias\n",
         {"kh": f"{P} {{key}}\n"}, "web", False),
    Case("alias-wrong-key", "Host web\n  HostName 127.0.0.2\n  HostKeyAlias webalias\n",
         {"kh": f"webalias {{other}}\n{P} {{key}}\n"}, "web", False),
    Case("alias-right-key", "Host web\n  HostName 127.0.0.2\n  HostKeyAlias webalias\n",
         {"kh": "webalias {key}\n"}, "web", True),
    Case("alias-accept-new-records-alias", "Host web\n  HostName 127.0.0.2\n  HostKeyAlias webalias\n"
         "  StrictHostKeyChecking accept-new\n", {}, "web", True, recorded=("webalias",)),
    # a name checked by itself: its address's entry neither vouches for it nor overrides it
    Case("name-absent-ip-present", "", {"kh": "[127.0.0.1]:{port} {key}\n"}, "localhost", False),
    Case("name-other-key-ip-right", "",
         {"kh": "[localhost]:{port} {other}\n[127.0.0.1]:{port} {key}\n"}, "localhost", False),
    # a key of another type recorded for the name (the server has only ed25519)
    Case("name-other-type", "", {"kh": f"{P} {{other_rsa}}\n"}, "127.0.0.2", False),
    Case("name-other-type-and-right", "", {"kh": f"{P} {{other_rsa}}\n{P} {{key}}\n"}, "127.0.0.2", True),
    Case("name-right", "", {"kh": "[localhost]:{port} {key}\n"}, "localhost", True),
    # CheckHostIP: never for loopback (OpenSSH), so a stale address entry does not matter here
    Case("checkhostip-loopback", "Host *\n  CheckHostIP yes\n",
         {"kh": "[localhost]:{port} {key}\n[127.0.0.1]:{port} {other}\n"}, "localhost", True),
    # StrictHostKeyChecking, for a new key and a changed one
    Case("strict-yes-new", "Host *\n  StrictHostKeyChecking yes\n", {}, "127.0.0.2", False),
    Case("strict-ask-new", "Host *\n  StrictHostKeyChecking ask\n", {}, "127.0.0.2", False),
    Case("strict-accept-new-new", "Host *\n  StrictHostKeyChecking accept-new\n", {}, "127.0.0.2", True,
         recorded=(P,)),
    Case("strict-no-new", "Host *\n  StrictHostKeyChecking no\n", {}, "127.0.0.2", True, recorded=(P,)),
    Case("strict-accept-new-changed", "Host *\n  StrictHostKeyChecking accept-new\n",
         {"kh": f"{P} {{other}}\n"}, "127.0.0.2", False),
    Case("strict-no-changed", "Host *\n  StrictHostKeyChecking no\n", {"kh": f"{P} {{other}}\n"},
         "127.0.0.2", True),
    # psjobs' accept-new is never weaker than the config, and means OpenSSH's accept-new
    Case("env-accept-new-vs-strict-yes", "Host *\n  StrictHostKeyChecking yes\n", {}, "127.0.0.2", False,
         accept_new_env=True),
    Case("env-accept-new-vs-ask", "", {}, "127.0.0.2", True, recorded=(P,), accept_new_env=True,
         ssh_options=("-o", "StrictHostKeyChecking=accept-new")),
    Case("env-accept-new-changed", "", {"kh": f"{P} {{other}}\n"}, "127.0.0.2", False, accept_new_env=True,
         ssh_options=("-o", "StrictHostKeyChecking=accept-new")),
    # UserKnownHostsFile: several files, the second one's key (known_hosts2 as OpenSSH's default)
    Case("user-file-second", "", {"kh2": f"{P} {{key}}\n"}, "127.0.0.2", True),
    Case("user-file-none-nothing-recorded", "Host *\n  StrictHostKeyChecking accept-new\n", {},
         "127.0.0.2", False, user_files="none"),
    Case("user-file-none-global-trusted", "", {"g": f"{P} {{key}}\n"}, "127.0.0.2", True, user_files="none"),
    # GlobalKnownHostsFile adds to the user files; its second file (ssh_known_hosts2) counts too
    Case("global-adds", "", {"g2": f"{P} {{key}}\n"}, "127.0.0.2", True),
    Case("global-and-user", "", {"kh": f"{P} {{key}}\n", "g": "[127.0.0.3]:{port} {key}\n"},
         "127.0.0.2", True),
    Case("global-revoked", "", {"kh": f"{P} {{key}}\n", "g": "@revoked * {key}\n"}, "127.0.0.2", False),
    Case("global-revoked-strict-no", "Host *\n  StrictHostKeyChecking no\n",
         {"kh": f"{P} {{key}}\n", "g": "@revoked * {key}\n"}, "127.0.0.2", True),
    Case("global-cert-authority-is-no-host-key", "", {"g": "@cert-authority * {key}\n"}, "127.0.0.2", False),
    # HashKnownHosts when recording
    Case("hash-when-recording", "Host *\n  StrictHostKeyChecking accept-new\n  HashKnownHosts yes\n", {},
         "127.0.0.2", True, recorded=(P,), hashed=True),
    # a name off port 22 is also found without its port (OpenSSH's second look)
    Case("name-without-port", "", {"kh": "127.0.0.2 {key}\n"}, "127.0.0.2", True),
    # Match exec with %h, and IdentityFile with %r and %p
    Case("match-exec-percent-h", 'Match exec "test %h = 127.0.0.3"\n  UserKnownHostsFile {d}/special\n',
         {"special": "[127.0.0.3]:{port} {key}\n"}, "127.0.0.3", True),
    Case("match-exec-other-host", 'Match exec "test %h = 127.0.0.3"\n  UserKnownHostsFile {d}/special\n',
         {"special": f"{P} {{key}}\n"}, "127.0.0.2", False),
]


def _write_case(case: Case, server: sshd_helper.LoopbackSSHD, d: Path, other: str, other_rsa: str = "") -> Path:
    fmt = {"port": server.port, "key": server.host_public, "other": other, "other_rsa": other_rsa, "d": d,
           "user": server.user, "client": server.client_key}
    for name in FILES:
        (d / name).write_text(case.known.get(name, "").format(**fmt))
    config = d / "ssh_config"
    config.write_text(case.config.format(**fmt) + (
        "Host *\n  Port {port}\n  User {user}\n  IdentityFile {client}\n  IdentitiesOnly yes\n"
        f"  UserKnownHostsFile {case.user_files}\n  GlobalKnownHostsFile {case.global_files}\n"
        "  PasswordAuthentication no\n").format(**fmt))
    return config


def _snapshot(d: Path) -> dict[str, bytes]:
    return {name: (d / name).read_bytes() for name in FILES}


def _restore(d: Path, snap: dict[str, bytes]) -> None:
    for name, data in snap.items():
        (d / name).write_bytes(data)


def _found(d: Path, name: str) -> bool:
    """ssh-keygen's own lookup (it reads hashed lines too)."""
    out = subprocess.run(["ssh-keygen", "-F", name, "-f", str(d / "kh")], capture_output=True, timeout=30)
    return out.returncode == 0 and bool(out.stdout.strip())


def ssh_verdict(config: Path, computer: str, extra: tuple[str, ...] = ()) -> tuple[bool, str]:
    out = subprocess.run(["ssh", "-F", str(config), "-o", "BatchMode=yes", *extra, computer, "true"],
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    return out.returncode == 0, out.stderr


def psjobs_verdict(config: Path, computer: str, *, accept_new: bool | None = None,
                   **options: object) -> tuple[bool, str]:
    with psjobs.Session() as s:
        psjobs.configure_ssh(s, config=str(config), accept_new_host_keys=accept_new, **options)
        job = s.invoke_command("true", computer_name=computer)
        assert job.wait(60)
        child = job.child_jobs[0]
        return child.state is JobState.COMPLETED, str(child.job_state_info.reason or "")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_same_verdict_as_openssh(case: Case, server: sshd_helper.LoopbackSSHD, tmp_path: Path,
                                 other_key: str, other_rsa: str, quiet_env: None,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    config = _write_case(case, server, tmp_path, other_key, other_rsa)
    before = _snapshot(tmp_path)
    names = [n.format(port=server.port) for n in case.recorded]
    ssh_ok, ssh_err = ssh_verdict(config, case.computer, case.ssh_options)
    ssh_kh = (tmp_path / "kh").read_text()
    ssh_found = [_found(tmp_path, n) for n in names]
    _restore(tmp_path, before)
    if case.accept_new_env:
        monkeypatch.setenv("PSJOBS_SSH_ACCEPT_NEW_HOST_KEYS", "1")
    ours_ok, ours_err = psjobs_verdict(config, case.computer)
    ours_kh = (tmp_path / "kh").read_text()
    ours_found = [_found(tmp_path, n) for n in names]
    assert ssh_ok == case.connects, f"OpenSSH itself changed its mind: {ssh_err}"
    assert ours_ok == ssh_ok, f"ssh says {'connects' if ssh_ok else 'refuses: ' + ssh_err}; psjobs {ours_err}"
    assert ours_found == ssh_found == [True] * len(names)
    added_ssh = ssh_kh[len(before["kh"]):].splitlines()
    added_ours = ours_kh[len(before["kh"]):].splitlines()
    assert len(added_ours) == len(added_ssh)  # the same number of lines recorded (none when refused)
    assert [ln.startswith("|1|") for ln in added_ours] == [ln.startswith("|1|") for ln in added_ssh] \
        == [case.hashed] * len(added_ssh)
    if not ours_ok:
        assert isinstance(ours_err, str) and ours_err


def test_the_refusals_name_the_host_and_the_way_out(server: sshd_helper.LoopbackSSHD, tmp_path: Path,
                                                   other_key: str, quiet_env: None) -> None:
    yes = next(c for c in CASES if c.id == "strict-yes-new")
    ok, why = psjobs_verdict(_write_case(yes, server, tmp_path, other_key), "127.0.0.2")
    assert not ok and "unknown" in why and "StrictHostKeyChecking yes" in why and "SHA256:" in why
    none = next(c for c in CASES if c.id == "user-file-none-nothing-recorded")
    ok, why = psjobs_verdict(_write_case(none, server, tmp_path, other_key), "127.0.0.2")
    assert not ok and "UserKnownHostsFile" in why
    alias = next(c for c in CASES if c.id == "alias-wrong-key")
    ok, why = psjobs_verdict(_write_case(alias, server, tmp_path, other_key), "web")
    assert not ok and "differs" in why
    revoked = next(c for c in CASES if c.id == "global-revoked")
    ok, why = psjobs_verdict(_write_case(revoked, server, tmp_path, other_key), "127.0.0.2")
    assert not ok and "revoked" in why


def test_strict_no_with_a_password_refuses_a_changed_key(server: sshd_helper.LoopbackSSHD, tmp_path: Path,
                                                        other_key: str, quiet_env: None) -> None:
    """OpenSSH goes on through a changed key only without password login; psjobs, given a password,
    refuses rather than send it to a computer that may be an impostor."""
    case = next(c for c in CASES if c.id == "strict-no-changed")
    ok, why = psjobs_verdict(_write_case(case, server, tmp_path, other_key), "127.0.0.2",
                             password="never-sent")
    assert not ok and "password" in why and "never-sent" not in why


# --- ConnectTimeout, ProxyCommand, ProxyJump, IdentityFile -----------------------------------------

def test_connect_timeout_from_the_config(server: sshd_helper.LoopbackSSHD, tmp_path: Path, other_key: str,
                                         quiet_env: None) -> None:
    """A listener that never answers: both give up after the config's ConnectTimeout (1 s), not 15."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes the handshake; nobody ever speaks
        port = silent.getsockname()[1]
        case = Case("timeout", f"Host silent\n  HostName 127.0.0.1\n  Port {port}\n  ConnectTimeout 1\n",
                    {}, "silent", False)
        config = _write_case(case, server, tmp_path, other_key)
        t0 = time.monotonic()
        ssh_ok, _ = ssh_verdict(config, "silent")
        ssh_took = time.monotonic() - t0
        t0 = time.monotonic()
        ours_ok, why = psjobs_verdict(config, "silent")
        ours_took = time.monotonic() - t0
    assert ssh_ok is ours_ok is False
    assert ssh_took < 8 and ours_took < 8, (ssh_took, ours_took)
    assert "did not answer within 1s" in why


RELAY = """#!{python}
import os, socket, sys, threading
if sys.argv[3] != {user!r}:
    sys.exit("relay: %r is not the user %r" % (sys.argv[3], {user!r}))
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
def up():
    while True:
        data = os.read(0, 65536)
        if not data:
            break
        s.sendall(data)
    s.shutdown(socket.SHUT_WR)
threading.Thread(target=up, daemon=True).start()
while True:
    data = s.recv(65536)
    if not data:
        break
    os.write(1, data)
"""


@pytest.mark.parametrize("command", ["~/bin/relay %h %p %r", "$HOME/bin/relay %h %p %r",
                                     "~/bin/relay %h %p someone-else"])
def test_proxy_command_expands_tokens_tilde_and_home(command: str, server: sshd_helper.LoopbackSSHD,
                                                     tmp_path: Path, other_key: str, quiet_env: None,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    (home / "bin").mkdir(parents=True)
    relay = home / "bin" / "relay"
    relay.write_text(RELAY.format(python=sys.executable, user=server.user))
    relay.chmod(relay.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("HOME", str(home))  # ~ and $HOME are the shell's, as OpenSSH runs it
    case = Case("proxy", f"Host hop\n  HostName 127.0.0.2\n  ProxyCommand {command}\n",
                {"kh": f"{P} {{key}}\n"}, "hop", "someone-else" not in command)
    config = _write_case(case, server, tmp_path, other_key)
    ssh_ok, ssh_err = ssh_verdict(config, "hop")
    ours_ok, why = psjobs_verdict(config, "hop")
    assert ssh_ok == case.connects, ssh_err
    assert ours_ok == ssh_ok, why


@pytest.mark.parametrize("known", ["target-only", "both"])
def test_proxy_jump_checks_the_hop_and_names_it(known: str, server: sshd_helper.LoopbackSSHD, tmp_path: Path,
                                                other_key: str, quiet_env: None) -> None:
    lines = "[127.0.0.3]:{port} {key}\n" + (f"{P} {{key}}\n" if known == "both" else "")
    case = Case("jump", "Host target\n  HostName 127.0.0.3\n  ProxyJump 127.0.0.2\n", {"kh": lines},
                "target", known == "both")
    config = _write_case(case, server, tmp_path, other_key)
    ssh_ok, ssh_err = ssh_verdict(config, "target")
    ours_ok, why = psjobs_verdict(config, "target")
    assert ssh_ok == case.connects, ssh_err
    assert ours_ok == ssh_ok, why
    if not ours_ok:
        assert "jump host 127.0.0.2" in why and "unknown" in why and "[127.0.0.2]" in why


def test_identity_file_tokens(server: sshd_helper.LoopbackSSHD, tmp_path: Path, other_key: str,
                              quiet_env: None) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    shutil.copy(server.client_key, keys / f"id_{server.user}_{server.port}")
    os.chmod(keys / f"id_{server.user}_{server.port}", 0o600)
    for host, connects in (("127.0.0.2", True),):
        case = Case("identity", f"Host {host}\n  IdentityFile {keys}/id_%r_%p\n", {"kh": f"{P} {{key}}\n"},
                    host, connects)
        # the case's IdentityFile only: the common block's key would log in anyway
        config = _write_case(case, server, tmp_path, other_key)
        config.write_text(config.read_text().replace(f"  IdentityFile {server.client_key}\n", ""))
        assert ssh_verdict(config, host)[0] is connects
        assert psjobs_verdict(config, host)[0] is connects
        config.write_text(config.read_text().replace("id_%r_%p", "id_%r_%h"))  # no such file: refused
        assert ssh_verdict(config, host)[0] is False
        assert psjobs_verdict(config, host)[0] is False


def _locked_case(case: Case, server: sshd_helper.LoopbackSSHD, tmp_path: Path, other_key: str) -> tuple[Path, Path]:
    """The case's config, logging in with the client key encrypted (passphrase "s3cret"): the
    encrypted key's path and the config's."""
    locked = tmp_path / "locked_ed25519"
    # rounds=50: fewer makes bcrypt warn, its default (128) costs seconds at every opening
    asyncssh.read_private_key(str(server.client_key)).write_private_key(str(locked), passphrase="s3cret",
                                                                        rounds=50)
    config = _write_case(case, server, tmp_path, other_key)
    config.write_text(config.read_text().replace(str(server.client_key), str(locked)))
    return locked, config


def test_an_encrypted_key_is_skipped_with_the_reason_and_works_with_its_passphrase(
        server: sshd_helper.LoopbackSSHD, tmp_path: Path, other_key: str, quiet_env: None) -> None:
    pytest.importorskip("bcrypt")  # OpenSSH-format encrypted keys (the ssh extra installs it)
    locked, config = _locked_case(Case("locked", "", {"kh": f"{P} {{key}}\n"}, "127.0.0.2", False),
                                  server, tmp_path, other_key)
    assert ssh_verdict(config, "127.0.0.2")[0] is False  # BatchMode: no passphrase prompt
    ok, why = psjobs_verdict(config, "127.0.0.2")
    assert not ok and str(locked) in why and "encrypted" in why and "passphrase" in why
    assert "ssh-add" in why and "s3cret" not in why
    ok, why = psjobs_verdict(config, "127.0.0.2", passphrase="s3cret")
    assert ok, why


def test_the_default_files_are_openssh_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no config at all, psjobs reads the files OpenSSH reads: known_hosts and known_hosts2,
    the system ssh_known_hosts and ssh_known_hosts2 (ssh -G's list; this machine's HOME)."""
    import asyncio

    from psjobs.backends.ssh._config import resolve

    r = asyncio.run(resolve("example.invalid", None, None, psjobs.SSHOptions(config=())))
    home = os.path.expanduser("~")
    assert r.user_known_hosts == (f"{home}/.ssh/known_hosts", f"{home}/.ssh/known_hosts2")
    assert r.global_known_hosts == ("/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2")
    assert r.strict == "ask" and not r.check_host_ip and not r.hash_known_hosts


@contextlib.contextmanager
def _agent_holding(key: asyncssh.SSHKey, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A real ssh-agent listening in ``tmp_path``, holding ``key``, as this process's SSH_AUTH_SOCK."""
    import asyncio

    from .conftest import wait_until

    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        def listening() -> bool:
            with socket.socket(socket.AF_UNIX) as probe:
                return probe.connect_ex(str(sock)) == 0

        wait_until(listening, 10, "the agent to listen")  # its socket file exists before listen()

        async def add() -> None:
            async with asyncssh.connect_agent(str(sock)) as client:
                await client.add_keys([key])

        asyncio.run(add())
        monkeypatch.setenv("SSH_AUTH_SOCK", str(sock))
        yield
    finally:
        agent.terminate()
        agent.wait(10)


def test_an_encrypted_key_in_an_agent_logs_in_as_with_ssh(server: sshd_helper.LoopbackSSHD, tmp_path: Path,
                                                          other_key: str, quiet_env: None,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    if shutil.which("ssh-agent") is None:
        pytest.skip("no ssh-agent")
    locked, config = _locked_case(Case("agent", "", {"kh": f"{P} {{key}}\n"}, "127.0.0.2", True),
                                  server, tmp_path, other_key)
    with _agent_holding(asyncssh.read_private_key(str(locked), "s3cret"), tmp_path, monkeypatch):
        ssh_ok, err = ssh_verdict(config, "127.0.0.2")
        ours_ok, why = psjobs_verdict(config, "127.0.0.2")
        assert ssh_ok, err
        assert ours_ok, why


def test_known_hosts_option_is_the_user_file_and_the_global_files_still_count(
        server: sshd_helper.LoopbackSSHD, tmp_path: Path, other_key: str, quiet_env: None) -> None:
    case = Case("option", "", {"g": f"{P} {{key}}\n"}, "127.0.0.2", True)
    config = _write_case(case, server, tmp_path, other_key)
    empty = tmp_path / "mine"
    empty.write_text("")
    assert psjobs_verdict(config, "127.0.0.2", known_hosts=str(empty))[0]
    (tmp_path / "g").write_text("")
    ok, why = psjobs_verdict(config, "127.0.0.2", known_hosts=str(empty))
    assert not ok and str(empty) in why


def test_without_the_ssh_command_asyncssh_reads_the_config(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    from psjobs.backends.ssh._config import resolve

    config = tmp_path / "ssh_config"
    config.write_text("Host web\n  HostName 127.0.0.2\n  Port 2222\n  User admin\n  HostKeyAlias webkey\n"
                      f"  UserKnownHostsFile {tmp_path}/kh\n  ConnectTimeout 3\n")
    monkeypatch.setenv("PATH", str(tmp_path))  # no ssh there
    r = asyncio.run(resolve("web", None, None, psjobs.SSHOptions(config=(str(config),))))
    assert r.by == "asyncssh"
    assert (r.hostname, r.port, r.user, r.host_key_alias) == ("127.0.0.2", 2222, "admin", "webkey")
    assert r.user_known_hosts == (f"{tmp_path}/kh",) and r.connect_timeout == 3
    assert r.global_known_hosts == ("/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2")
    assert r.strict == "ask" and not r.check_host_ip and not r.hash_known_hosts


def test_check_host_ip_off_loopback_follows_openssh(other_key: str, tmp_path: Path) -> None:
    """CheckHostIP cannot be seen on 127.0.0.1 (OpenSSH skips loopback), so the address case is
    judged directly, as sshconnect.c's check_host_key decides it for a routable address."""
    from psjobs.backends.ssh._known_hosts import HostKeyCheck

    public = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
    key = asyncssh.import_public_key(public)  # what a server offers
    kh = tmp_path / "kh"

    def judge(lines: str, strict: str = "ask", **kw: object) -> tuple[bool, str, tuple[str, ...]]:
        kh.write_text(lines)
        check = HostKeyCheck("web", 22, (str(kh),), (), strict, True, False, **kw)  # type: ignore[arg-type]
        v = check.judge(key, "192.0.2.7")
        return v.accept, v.status, v.lines

    ok, status, lines = judge(f"web {public}\n")  # name known, address new: the address is added
    assert ok and status == "ok" and lines == (f"192.0.2.7 {' '.join(public.split()[:2])}",)
    ok, status, _ = judge(f"web {public}\n192.0.2.7 {other_key}\n")  # the address's key differs
    assert not ok and status == "ip-changed"
    assert judge(f"web {public}\n192.0.2.7 {other_key}\n", "no")[0]
    ok, _, lines = judge("", "accept-new")  # both new: one "name,address" line
    assert ok and lines == (f"web,192.0.2.7 {' '.join(public.split()[:2])}",)
    assert judge(f"web {public}\n192.0.2.7 {other_key}\n", proxied=True)[0]  # no address via a proxy


# --- host certificates: @cert-authority ------------------------------------------------------------

class CertSSHD(sshd_helper.LoopbackSSHD):
    """The tests' sshd, its host key certified by a CA of its own (principal 127.0.0.2)."""

    def _keys(self) -> None:
        super()._keys()
        ca = asyncssh.generate_private_key("ssh-ed25519")
        self.ca_public = ca.export_public_key().decode().strip()
        host = asyncssh.read_private_key(str(self.dir / "host_ed25519"))
        cert = ca.generate_host_certificate(host, "psjobs-test-host", principals=["127.0.0.2"])
        cert.write_certificate(str(self.dir / "host_ed25519-cert.pub"))

    def _configs(self) -> None:
        super()._configs()
        with open(self.dir / "sshd_config", "a") as f:
            f.write(f"HostCertificate {self.dir / 'host_ed25519-cert.pub'}\n")


@pytest.fixture(scope="module")
def cert_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CertSSHD]:
    if sshd_helper.find_sshd() is None:
        pytest.skip("no sshd (apt-get install openssh-server)")
    srv = CertSSHD(tmp_path_factory.mktemp("certsshd")).start()
    try:
        yield srv
    finally:
        srv.stop()


CERT_CASES = {
    "ca-trusted": ("@cert-authority {name} {ca}\n", True),
    "ca-trusted-by-wildcard": ("@cert-authority [127.0.0.*]:* {ca}\n", True),
    "ca-revoked": ("@cert-authority {name} {ca}\n@revoked * {ca}\n", False),
    "host-key-revoked": ("@cert-authority {name} {ca}\n@revoked * {key}\n", False),
    "plain-key-only": ("{name} {key}\n", True),   # OpenSSH falls back from the certificate
    "other-ca": ("@cert-authority {name} {other}\n", False),
}


@pytest.mark.parametrize("which", list(CERT_CASES))
def test_certificate_authorities_as_openssh(which: str, cert_server: CertSSHD, tmp_path: Path, other_key: str,
                                            quiet_env: None) -> None:
    lines, connects = CERT_CASES[which]
    name = f"[127.0.0.2]:{cert_server.port}"
    case = Case(which, "", {"g": lines.format(name=name, ca=cert_server.ca_public, key=cert_server.host_public,
                                              other=other_key)}, "127.0.0.2", connects)
    config = _write_case(case, cert_server, tmp_path, other_key)  # type: ignore[arg-type]
    ssh_ok, ssh_err = ssh_verdict(config, "127.0.0.2")
    ours_ok, why = psjobs_verdict(config, "127.0.0.2")
    assert ssh_ok == connects, ssh_err
    assert ours_ok == ssh_ok, why


@pytest.mark.parametrize("path", ["~/keys/id", "%d/keys/id"])
def test_identity_file_home(path: str, server: sshd_helper.LoopbackSSHD, tmp_path: Path, other_key: str,
                            quiet_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """~ and %d in IdentityFile are the home directory (psjobs' ~ is $HOME, as Python's: OpenSSH
    would take the password database's, the same directory unless HOME was changed, as here)."""
    home = tmp_path / "home"
    (home / "keys").mkdir(parents=True)
    shutil.copy(server.client_key, home / "keys" / "id")
    os.chmod(home / "keys" / "id", 0o600)
    monkeypatch.setenv("HOME", str(home))
    case = Case("home", "", {"kh": f"{P} {{key}}\n"}, "127.0.0.2", True)
    config = _write_case(case, server, tmp_path, other_key)
    config.write_text(config.read_text().replace(str(server.client_key), path))
    ok, why = psjobs_verdict(config, "127.0.0.2")
    assert ok, why


# --- key files that cannot be used: skipped, as OpenSSH skips them -------------------------------------

def _identities(config: Path, client: Path, files: list[str]) -> None:
    """The case's IdentityFile lines instead of the common block's one."""
    lines = "".join(f"  IdentityFile {f}\n" for f in files)
    config.write_text(config.read_text().replace(f"  IdentityFile {client}\n", lines))


def _login(config: Path, computer: str, **options: object) -> psjobs.Job:
    with psjobs.Session() as s:
        psjobs.configure_ssh(s, config=str(config), **options)
        job = s.invoke_command("true", computer_name=computer)
        assert job.wait(60)
        return job.child_jobs[0]


@pytest.mark.parametrize(("which", "connects"), [
    ("missing-then-good", True), ("junk-then-good", True), ("missing-only", False), ("junk-only", False),
])
def test_an_unusable_identity_file_is_skipped_as_ssh_skips_it(
        which: str, connects: bool, server: sshd_helper.LoopbackSSHD, tmp_path: Path, other_key: str,
        quiet_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    # a default key that would get in: ssh does not try it when the config names files, nor psjobs
    (tmp_path / "home" / ".ssh").mkdir(parents=True)
    shutil.copy(server.client_key, tmp_path / "home" / ".ssh" / "id_ed25519")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    bad = tmp_path / ("missing_key" if which.startswith("missing") else "junk_key")
    if which.startswith("junk"):
        bad.write_text("not a key\n")
    case = Case(which, "", {"kh": f"{P} {{key}}\n"}, "127.0.0.2", connects)
    config = _write_case(case, server, tmp_path, other_key)
    _identities(config, server.client_key, [str(bad)] + ([str(server.client_key)] if connects else []))
    config.write_text(config.read_text().replace("  IdentitiesOnly yes\n", ""))  # no limit but the files
    ssh_ok, ssh_err = ssh_verdict(config, "127.0.0.2")
    assert ssh_ok is connects and str(bad) in ssh_err, ssh_err  # ssh names the file, and goes on
    child = _login(config, "127.0.0.2")
    reason = child.job_state_info.reason
    if connects:
        assert child.state is JobState.COMPLETED, reason
        warnings = [str(w) for w in child.warning]
        assert len(warnings) == 1 and str(bad) in warnings[0] and "IdentityFile" in warnings[0], warnings
        assert all(w.computer_name == "127.0.0.2" for w in child.warning)
    else:  # refused as ssh is, with the file named and what to do; never "is the computer up?"
        assert isinstance(reason, psjobs.RemoteConnectionError) and "refused the login" in str(reason)
        assert f"no key file could be used: {bad}" in str(reason) and "IdentityFile" in str(reason)
        assert "sshd listens" not in str(reason)


def test_client_keys_skip_a_missing_file_as_ssh_i_does(server: sshd_helper.LoopbackSSHD, tmp_path: Path,
                                                      other_key: str, quiet_env: None) -> None:
    missing = tmp_path / "nonexistent_key"
    case = Case("client-keys", "", {"kh": f"{P} {{key}}\n"}, "127.0.0.2", True)
    config = _write_case(case, server, tmp_path, other_key)
    _identities(config, server.client_key, [])
    ssh_ok, ssh_err = ssh_verdict(config, "127.0.0.2", ("-i", str(missing), "-i", str(server.client_key)))
    assert ssh_ok, ssh_err
    child = _login(config, "127.0.0.2", client_keys=[str(missing), str(server.client_key)])
    assert child.state is JobState.COMPLETED, child.job_state_info.reason
    assert [str(missing) in str(w) and "client_keys" in str(w) for w in child.warning] == [True]
    # only the missing one: refused as ssh is, naming the file and how to name another
    assert ssh_verdict(config, "127.0.0.2", ("-i", str(missing)))[0] is False
    child = _login(config, "127.0.0.2", client_keys=[str(missing)])
    reason = str(child.job_state_info.reason)
    assert child.state is JobState.FAILED and f"no key file could be used: {missing} (No such file" in reason
    assert "psjobs.configure_ssh(client_keys=[...])" in reason and f"-i {missing}" in reason


def test_a_missing_certificate_file_is_passed_over_as_by_ssh(server: sshd_helper.LoopbackSSHD, tmp_path: Path,
                                                              other_key: str, quiet_env: None) -> None:
    case = Case("certificate", "", {"kh": f"{P} {{key}}\n"}, "127.0.0.2", True)
    config = _write_case(case, server, tmp_path, other_key)
    config.write_text(config.read_text() + f"  CertificateFile {tmp_path / 'missing-cert.pub'}\n")
    ssh_ok, err = ssh_verdict(config, "127.0.0.2")
    child = _login(config, "127.0.0.2")
    assert ssh_ok, err
    assert child.state is JobState.COMPLETED, child.job_state_info.reason


@pytest.mark.parametrize("identities_only", [False, True])
def test_with_no_key_file_left_the_agent_is_used_as_ssh_uses_it(
        identities_only: bool, server: sshd_helper.LoopbackSSHD, tmp_path: Path, other_key: str,
        quiet_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """IdentityFile names a missing file only: ssh still offers the agent's keys, unless
    IdentitiesOnly limits them to the (missing) files; psjobs neither falls back to
    ~/.ssh/id_* nor gives up the agent."""
    if shutil.which("ssh-agent") is None:
        pytest.skip("no ssh-agent")
    case = Case("agent-only", "", {"kh": f"{P} {{key}}\n"}, "127.0.0.2", not identities_only)
    config = _write_case(case, server, tmp_path, other_key)
    _identities(config, server.client_key, [str(tmp_path / "missing_key")])
    if not identities_only:
        config.write_text(config.read_text().replace("  IdentitiesOnly yes\n", ""))
    with _agent_holding(asyncssh.read_private_key(str(server.client_key)), tmp_path, monkeypatch):
        ssh_ok, err = ssh_verdict(config, "127.0.0.2")
        child = _login(config, "127.0.0.2")
        assert ssh_ok is case.connects, err
        assert (child.state is JobState.COMPLETED) is case.connects, child.job_state_info.reason
