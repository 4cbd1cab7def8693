"""A private OpenSSH server on loopback, for the remote-job tests and benchmarks.

::

    LoopbackSSHD(dir).start()
        dir/host_ed25519(.pub)     the server's host key
        dir/client_ed25519(.pub)   the client's key; its public half is dir/authorized_keys
        dir/known_hosts            "[127.0.0.N]:PORT <host key>" for each address
        dir/ssh_config             Host 127.0.0.* -> Port, User, IdentityFile, UserKnownHostsFile,
                                   and aliases web1, web2, db1 (127.0.0.1-3) and down (127.0.0.4)
        dir/sshd_config            ListenAddress 127.0.0.1/.2/.3, MaxSessions 64, AcceptEnv SHLVL
        sshd -D -e -f dir/sshd_config  (a child of this process; its log in dir/sshd.log)

Nothing outside ``dir`` is touched (but ``/run/sshd``, which sshd needs when run as root), and
the server listens on loopback addresses only. The three addresses are three "computers";
127.0.0.4 has nothing listening (a computer that is down).
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ADDRESSES = ("127.0.0.1", "127.0.0.2", "127.0.0.3")
DOWN = "127.0.0.4"  # nothing listens there
#: names of ssh_config that stand for the loopback computers (the docs use them)
ALIASES = {"web1": "127.0.0.1", "web2": "127.0.0.2", "db1": "127.0.0.3", "down": DOWN}


def find_sshd() -> str | None:
    """The sshd binary, installing Debian's openssh-server when it is missing and we are root."""
    for path in ("/usr/sbin/sshd", shutil.which("sshd") or ""):
        if path and os.access(path, os.X_OK):
            return path
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "install", "-y", "-q", "openssh-server"], env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False, timeout=600)
        if os.access("/usr/sbin/sshd", os.X_OK):
            return "/usr/sbin/sshd"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@contextlib.contextmanager
def module_server(tmp_path_factory: Any) -> Iterator[LoopbackSSHD]:
    """A test module's server: skipped where asyncssh or sshd is missing, stopped at the end."""
    import pytest

    pytest.importorskip("asyncssh")
    if find_sshd() is None:
        pytest.skip("no sshd (apt-get install openssh-server)")
    server = LoopbackSSHD(tmp_path_factory.mktemp("sshd")).start()
    try:
        yield server
    finally:
        server.stop()


class LoopbackSSHD:
    """An sshd of our own on 127.0.0.1, .2 and .3, with its own keys and files."""

    def __init__(self, directory: str | os.PathLike[str] | None = None, *, max_sessions: int = 64) -> None:
        self._own_dir = directory is None
        self.dir = Path(tempfile.mkdtemp(prefix="psjobs-sshd-") if directory is None else directory)
        self.max_sessions = max_sessions
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.user = getpass.getuser()
        self.host_public = ""

    # files ------------------------------------------------------------------------------------
    @property
    def ssh_config(self) -> Path:
        """An OpenSSH client config that reaches the three computers with the test key."""
        return self.dir / "ssh_config"

    @property
    def known_hosts(self) -> Path:
        return self.dir / "known_hosts"

    @property
    def client_key(self) -> Path:
        return self.dir / "client_ed25519"

    def _keys(self) -> None:
        import asyncssh

        host = asyncssh.generate_private_key("ssh-ed25519")
        host.write_private_key(str(self.dir / "host_ed25519"))
        self.host_public = host.export_public_key().decode().strip()
        client = asyncssh.generate_private_key("ssh-ed25519", comment="psjobs-test")
        client.write_private_key(str(self.client_key))
        client.write_public_key(str(self.client_key) + ".pub")
        (self.dir / "authorized_keys").write_bytes(client.export_public_key())
        for name in ("host_ed25519", "client_ed25519", "authorized_keys"):
            os.chmod(self.dir / name, 0o600)

    def _configs(self) -> None:
        d = self.dir
        listen = "".join(f"ListenAddress {a}\n" for a in ADDRESSES)
        (d / "sshd_config").write_text(
            f"Port {self.port}\n{listen}"
            f"HostKey {d / 'host_ed25519'}\n"
            f"PidFile {d / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {d / 'authorized_keys'}\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
            "PermitRootLogin prohibit-password\n"
            f"MaxSessions {self.max_sessions}\nMaxStartups 100:30:200\n"
            # psjobs sends SHLVL=1 so that bash skips ~/.bashrc (see docs/remote.md)
            "AcceptEnv SHLVL\n"
            "PrintMotd no\nLogLevel ERROR\n")
        self.known_hosts.write_text("".join(f"[{a}]:{self.port} {self.host_public}\n" for a in ADDRESSES))
        aliases = "".join(f"Host {name}\n  HostName {address}\n" for name, address in ALIASES.items())
        self.ssh_config.write_text(
            aliases +
            f"Host 127.0.0.* {' '.join(ALIASES)}\n"
            f"  Port {self.port}\n"
            f"  User {self.user}\n"
            f"  IdentityFile {self.client_key}\n"
            "  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {self.known_hosts}\n")

    # lifetime ---------------------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> LoopbackSSHD:
        sshd = find_sshd()
        if sshd is None:
            raise RuntimeError("sshd is not installed and could not be installed (apt-get install "
                               "openssh-server)")
        self.dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation dir
        self._keys()
        for _attempt in range(5):
            self.port = _free_port()
            self._configs()
            log = open(self.dir / "sshd.log", "ab")
            try:
                self.proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(self.dir / "sshd_config")],
                                             stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                             start_new_session=True)
            finally:
                log.close()
            if self._ready(timeout):
                return self
            self.stop()
        raise RuntimeError(f"sshd did not start; see {self.dir / 'sshd.log'}")

    def _ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return False
            ok = 0
            for address in ADDRESSES:
                with contextlib.suppress(OSError), socket.create_connection((address, self.port), 0.5):
                    ok += 1
            if ok == len(ADDRESSES):
                return True
            time.sleep(0.01)  # polling for the listener, bounded by the deadline
        return False

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if self._own_dir:
            import atexit

            atexit.register(shutil.rmtree, self.dir, True)
        import psutil

        # Each connection's sshd runs in a session of its own: end them with the listener.
        try:
            others = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            others = []
        for p in [psutil.Process(proc.pid), *others]:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.terminate()
        _gone, alive = psutil.wait_procs(others, timeout=5)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def session_pids(self) -> list[int]:
        """Processes of the server's sessions (every descendant of the listener)."""
        import psutil

        if self.proc is None:
            return []
        try:
            return [p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def __enter__(self) -> LoopbackSSHD:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
