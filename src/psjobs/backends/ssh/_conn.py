"""Connections of the SSH engine: one per computer, host keys checked as OpenSSH does.

::

    Pool(computer).connection() --(first caller)--> asyncssh.connect, shared by every waiter
        config, keys, agent, known_hosts as OpenSSH applies them; HostKeyClient decides a key that is
        not trusted: unknown (refused, or recorded with accept_new_host_keys), changed (refused)
    Pool.open(factory, command) --> a channel on a connection with room; when sshd refuses one
        (MaxSessions) that connection is full and the next channel goes to a new connection
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import asyncssh

from ..._errors import HostKeyError, RemoteConnectionError
from ._backend import SSHOptions, ssh_options

if TYPE_CHECKING:
    from ._engine import Engine

# bash, started by sshd, reads ~/.bashrc unless SHLVL says it is not the top shell (measured: a
# pyenv init there cost 110-140 ms a command). sshd passes it where it has `AcceptEnv SHLVL`.
ENV: dict[bytes | str, bytes | str] = {"SHLVL": "1"}
_KEEPALIVE = 15.0  # seconds; 3 unanswered keepalives (asyncssh's default count) drop the connection


# --- what a computer name means ----------------------------------------------------------------

def parse_computer(name: str) -> tuple[str | None, str, int | None]:
    """'user@host:port' -> (user, host, port); a bare name may be an alias of ~/.ssh/config."""
    user = None
    rest = name
    if "@" in rest:
        user, rest = rest.rsplit("@", 1)
    port = None
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        if tail.startswith(":"):
            port = int(tail[1:])
    elif rest.count(":") == 1:
        host, _, p = rest.partition(":")
        port = int(p)
    else:
        host = rest
    return user, host, port


# --- host keys -----------------------------------------------------------------------------------

def _known_hosts_files(options: SSHOptions, resolved: Any) -> tuple[list[str], str]:
    """The known_hosts files to trust, and the one where accepted new keys are written."""
    if options.known_hosts is not None:
        files = list(options.known_hosts)
    else:
        given = resolved if isinstance(resolved, (list, tuple)) else []
        files = [os.path.expanduser(str(f)) for f in given]
        if not files:
            files = [os.path.expanduser("~/.ssh/known_hosts")]
    return files, files[0]


class HostKeyClient(asyncssh.SSHClient):
    """Checks host keys as OpenSSH does, with accept-new as an explicit option."""

    def __init__(self, pool: Pool, known: Any, accept_new: bool) -> None:
        self.pool = pool
        self.known = known
        self.accept_new = accept_new
        self.verdict: str | None = None
        self.new_key: tuple[str, int | None, asyncssh.SSHKey] | None = None
        self.offered: asyncssh.SSHKey | None = None

    def validate_host_public_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        self.offered = key
        wanted_port = None if port == 22 else port
        trusted, cas, revoked = self.known.match(host, addr, wanted_port)[:3]
        if key in revoked:
            self.verdict = "revoked"
            return False
        if trusted or cas:
            self.verdict = "changed"
            return False
        if self.accept_new:
            self.new_key = (host, wanted_port, key)
            return True
        self.verdict = "unknown"
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.lost(self, exc)


def _record_key(path: str, host: str, port: int | None, key: asyncssh.SSHKey) -> None:
    pattern = host if port is None else f"[{host}]:{port}"
    line = f"{pattern} {key.export_public_key().decode().strip()}\n"
    directory = os.path.dirname(path)
    if directory and not os.path.isdir(directory):
        os.makedirs(directory, mode=0o700, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)


# --- connections -------------------------------------------------------------------------------

class Connection:
    __slots__ = ("alive", "channels", "client", "conn", "limit")

    def __init__(self, conn: asyncssh.SSHClientConnection, client: HostKeyClient) -> None:
        self.conn = conn
        self.client = client
        self.channels = 0
        self.limit: int | None = None  # learned when sshd refuses a channel (MaxSessions)
        self.alive = True


class Pool:
    """The connections to one computer: one, and more only when sshd refuses more channels."""

    def __init__(self, engine: Engine, name: str) -> None:
        self.engine = engine
        self.name = name
        self.conns: list[Connection] = []
        self.connecting: asyncio.Task[Connection] | None = None

    async def connection(self) -> Connection:
        while True:
            for c in self.conns:
                if c.alive and (c.limit is None or c.channels < c.limit):
                    return c
            if self.connecting is None:
                self.connecting = asyncio.get_running_loop().create_task(self._connect())
                self.connecting.add_done_callback(self._connected)
            task = self.connecting
            # Shielded: one child giving up (a stop) must not cancel the others' connection.
            conn = await asyncio.shield(task)
            if conn.alive:
                return conn

    def _connected(self, task: asyncio.Task[Connection]) -> None:
        if self.connecting is task:
            self.connecting = None
        if not task.cancelled() and task.exception() is None:
            self.conns.append(task.result())

    async def _connect(self) -> Connection:
        options = ssh_options(self.engine.session)
        user, host, port = parse_computer(self.name)
        kwargs: dict[str, Any] = {"connect_timeout": options.connect_timeout}
        if options.config is not None:
            kwargs["config"] = list(options.config) if options.config else None
        elif os.path.isfile(os.path.expanduser("~/.ssh/config")):
            # asyncssh falls back to ~/.ssh/config only inside connect(): name it, so that the
            # options resolved below (which known_hosts files, keepalives) come from it too.
            kwargs["config"] = [os.path.expanduser("~/.ssh/config")]
        if port is not None or options.port is not None:
            kwargs["port"] = port if port is not None else options.port
        if user is not None or options.username is not None:
            kwargs["username"] = user if user is not None else options.username
        if options.client_keys is not None:
            kwargs["client_keys"] = list(options.client_keys)
        if options.passphrase is not None:
            kwargs["passphrase"] = options.passphrase
        if options.password is not None:
            kwargs["password"] = options.password
        what = self.name
        client: HostKeyClient | None = None
        files: list[str] = []
        at = what
        try:
            # Resolve the config first, for what asyncssh does not decide for us: which known_hosts
            # files to trust (and where to record an accepted key), and whether keepalives are set.
            resolved = await asyncssh.SSHClientConnectionOptions.construct(None, host=host, **kwargs)
            at = f"{resolved.host} port {resolved.port}"
            files, target = _known_hosts_files(options, resolved.known_hosts)
            existing = [f for f in files if os.path.isfile(f)]
            known = asyncssh.read_known_hosts(existing) if existing else asyncssh.import_known_hosts("")
            client = HostKeyClient(self, known, options.accepts_new_host_keys)
            if not resolved.keepalive_interval:  # ServerAliveInterval unset: still notice a dead peer
                kwargs["keepalive_interval"] = _KEEPALIVE
            factory = client
            conn = await asyncssh.connect(host, known_hosts=known, client_factory=lambda: factory, **kwargs)
        except asyncssh.HostKeyNotVerifiable as exc:
            raise _host_key_error(what, client, files, exc) from exc
        except asyncssh.PermissionDenied as exc:
            raise RemoteConnectionError(
                f"{what} refused the login ({exc.reason}); check the user name and that your key is in "
                f"its authorized_keys (ssh {what} true)", self.name) from exc
        except (asyncio.TimeoutError, TimeoutError) as exc:
            raise RemoteConnectionError(
                f"{what} did not answer within {options.connect_timeout:g}s; check that it is up and "
                f"reachable, or raise connect_timeout with psjobs.configure_ssh", self.name) from exc
        except OSError as exc:
            if isinstance(exc, socket.gaierror) or not exc.errno or exc.errno < 0:
                why = exc.strerror or str(exc)  # a name that does not resolve, or several causes
            else:
                why = os.strerror(exc.errno)
            raise RemoteConnectionError(
                f"cannot connect to {what} ({at}): {why}; check that the computer is up and that sshd "
                f"listens there (ssh {what} true)", self.name) from exc
        except asyncssh.Error as exc:
            raise RemoteConnectionError(f"the SSH connection to {what} failed: {exc.reason}",
                                        self.name) from exc
        except (ValueError, KeyError) as exc:  # bad config or key files
            raise RemoteConnectionError(f"cannot connect to {what}: {exc}", self.name) from exc
        assert client is not None
        if client.new_key is not None:
            host_seen, port_seen, key = client.new_key
            with contextlib.suppress(OSError):
                _record_key(target, host_seen, port_seen, key)
        return Connection(conn, client)

    def lost(self, client: HostKeyClient, exc: Exception | None) -> None:
        for c in self.conns:
            if c.client is client:
                c.alive = False
        self.conns = [c for c in self.conns if c.alive]

    async def open(self, factory: Callable[[], asyncssh.SSHClientSession[bytes]],
                   command: str) -> tuple[Connection, asyncssh.SSHClientChannel[bytes], Any]:
        while True:
            conn = await self.connection()
            conn.channels += 1
            try:
                chan, session = await conn.conn.create_session(factory, command, encoding=None, env=ENV,
                                                               request_pty=False)
                return conn, chan, session
            except asyncssh.ChannelOpenError as exc:
                conn.channels -= 1
                if conn.channels == 0:
                    raise RemoteConnectionError(f"{self.name} refused to open a channel: {exc.reason}",
                                                self.name) from exc
                conn.limit = conn.channels  # sshd's MaxSessions: the next job gets another connection
            except BaseException:
                conn.channels -= 1
                raise

    def release(self, conn: Connection) -> None:
        conn.channels = max(0, conn.channels - 1)

    async def close(self) -> None:
        conns, self.conns = self.conns, []
        if self.connecting is not None:
            self.connecting.cancel()
        for c in conns:
            c.conn.close()
        for c in conns:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(c.conn.wait_closed(), 5)


def _host_key_error(what: str, client: HostKeyClient | None, files: list[str], exc: Exception) -> HostKeyError:
    verdict = client.verdict if client is not None else None
    where = ", ".join(files) or "~/.ssh/known_hosts"
    key = client.offered if client is not None else None
    fingerprint = f" ({key.get_fingerprint()})" if key is not None else ""
    if verdict == "changed":
        return HostKeyError(
            f"the host key of {what}{fingerprint} differs from the one recorded in {where}: the computer "
            f"was reinstalled, or someone is impersonating it. If the change is expected, remove the old "
            f"entry (ssh-keygen -R HOST -f FILE) and connect again", what)
    if verdict == "revoked":
        return HostKeyError(f"the host key of {what}{fingerprint} is revoked in {where}", what)
    return HostKeyError(
        f"the host key of {what}{fingerprint} is unknown: it is not in {where}. Check the fingerprint "
        f"and add the key (ssh-keyscan HOST >> {files[0] if files else '~/.ssh/known_hosts'}), or let "
        f"psjobs record new keys: psjobs.configure_ssh(accept_new_host_keys=True) or "
        f"PSJOBS_SSH_ACCEPT_NEW_HOST_KEYS=1", what)
