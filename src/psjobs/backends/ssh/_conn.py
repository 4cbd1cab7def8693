"""Connections of the SSH engine: one per computer, config and host keys as OpenSSH has them.

::

    Pool(computer).connection() --(first caller)--> _connect, shared by every waiter
        _config.resolve: ssh -G says what the name means (HostName, Port, User, IdentityFile,
            known_hosts files, StrictHostKeyChecking, ProxyCommand/ProxyJump, ConnectTimeout, ...)
        ProxyJump: each jump host logged in to first (its own host key verdict, named as the hop)
        asyncssh.connect with those options and an empty trust list: HostKeyClient asks
            _known_hosts for OpenSSH's verdict on the offered key; an accepted new key is recorded
            (hashed with HashKnownHosts) once the login succeeded
    Pool.open(factory, command) --> a channel on a connection with room; when sshd refuses one
        (MaxSessions) that connection is full and the next channel goes to a new connection
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import asyncssh

from ..._errors import HostKeyError, RemoteConnectionError
from ._backend import SSHOptions, ssh_options
from ._config import Resolved, proxy_argv, resolve
from ._known_hosts import HostKeyCheck, Verdict, record
from ._login import Keys, load_keys, login_hint, parse_computer, ssh_command

if TYPE_CHECKING:
    from ._engine import Engine

# bash, started by sshd, reads ~/.bashrc unless SHLVL says it is not the top shell (measured: a
# pyenv init there cost 110-140 ms a command). sshd passes it where it has `AcceptEnv SHLVL`.
ENV: dict[bytes | str, bytes | str] = {"SHLVL": "1"}
_CONNECT_TIMEOUT = 15.0  # seconds, when neither configure_ssh nor the config's ConnectTimeout says
_KEEPALIVE = 15.0  # seconds; 3 unanswered keepalives (asyncssh's default count) drop the connection


# --- host keys -----------------------------------------------------------------------------------

class HostKeyClient(asyncssh.SSHClient):
    """Hands every host key to _known_hosts (asyncssh is given an empty trust list), so that the
    verdict is OpenSSH's; ``verdict`` keeps it for the message and for recording."""

    def __init__(self, pool: Pool, check: HostKeyCheck, with_password: bool) -> None:
        self.pool = pool
        self.check = check
        self.with_password = with_password
        self.verdict: Verdict | None = None
        self.offered: asyncssh.SSHKey | None = None

    def _judge(self, addr: str, key: asyncssh.SSHKey, ca: bool) -> bool:
        self.offered = key
        self.verdict = self.check.judge(key, addr or None, ca=ca)
        # OpenSSH goes on through a changed key (StrictHostKeyChecking no) only with password login
        # disabled; asyncssh cannot take the password back mid-login, so psjobs refuses instead.
        return self.verdict.accept and not (self.verdict.unsafe and self.with_password)

    def validate_host_public_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        return self._judge(addr, key, False)

    def validate_host_ca_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        return self._judge(addr, key, True)

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.lost(self, exc)


# --- connections -------------------------------------------------------------------------------

class Connection:
    __slots__ = ("alive", "channels", "client", "conn", "hops", "limit", "notes", "proxy")

    def __init__(self, conn: asyncssh.SSHClientConnection, client: HostKeyClient,
                 hops: list[Connection] | None = None,
                 proxy: asyncio.subprocess.Process | None = None, notes: list[str] | None = None) -> None:
        self.conn = conn
        self.client = client
        self.hops = hops or []  # the jump host connection it runs through (ProxyJump), closed with it
        self.proxy = proxy      # the ProxyCommand process, ended (and reaped) with it
        self.channels = 0
        self.limit: int | None = None  # learned when sshd refuses a channel (MaxSessions)
        self.alive = True
        # Warnings of the login (a key file skipped), for the jobs that waited for this connection
        self.notes = notes or []


class Pool:
    """The connections to one computer: one, and more only when sshd refuses more channels."""

    def __init__(self, engine: Engine, name: str) -> None:
        self.engine = engine
        self.name = name
        self.conns: list[Connection] = []
        self.connecting: asyncio.Task[Connection] | None = None

    async def connection(self, notes: list[str] | None = None) -> Connection:
        """A connection with room for a channel; ``notes`` gets the login's warnings when this
        caller waited for a new connection (as ssh, once a connection, not once a job)."""
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
            if notes is not None:
                notes += conn.notes
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
        resolved = await self._resolve(self.name, host, user or options.username,
                                       port if port is not None else options.port, options)
        return await self._login(self.name, resolved, options)

    async def _resolve(self, what: str, host: str, user: str | None, port: int | None,
                       options: SSHOptions) -> Resolved:
        try:
            return await resolve(host, user, port, options)
        except (ValueError, KeyError, OSError) as exc:  # bad config (ssh -G's message), unreadable file
            raise RemoteConnectionError(f"cannot connect to {what}: {exc}", self.name) from exc

    async def _login(self, what: str, r: Resolved, options: SSHOptions,
                     via: Connection | None = None) -> Connection:
        """Connect and log in to the computer ``r`` describes, through ``via`` (a jump host) if
        given; ``what`` names it in messages (a jump host is named as such, not as the target)."""
        hops: list[Connection] = [] if via is None else [via]
        chain = [h for h in (r.proxy_jump or "").split(",") if h and h.lower() != "none"]
        if via is None and chain:
            # As OpenSSH's -J: the first hop as its own config says, each next one through the hop
            # before it, and the computer through the last.
            hop_via: Connection | None = None
            for i, hop in enumerate(chain):
                h_user, h_host, h_port = parse_computer(hop)
                hr = await self._resolve(what, h_host, h_user, h_port, options)
                if i:
                    hr = dataclasses.replace(hr, proxy_jump=None)
                label = f"{h_user + '@' if h_user else ''}{h_host}{':' + str(h_port) if h_port else ''}"
                try:
                    hop_via = await self._login(f"the jump host {label} (on the way to {self.name})", hr,
                                                options, hop_via)
                except BaseException:
                    await _abandon(hops)
                    raise
                hops = [hop_via]
        tunnel = hops[-1].conn if hops else None
        timeout = options.connect_timeout or r.connect_timeout or _CONNECT_TIMEOUT
        user_files = options.known_hosts if options.known_hosts is not None else r.user_known_hosts
        strict = r.strict
        if strict == "ask" and options.accepts_new_host_keys:  # psjobs' setting never weakens the config
            strict = "accept-new"
        proxy = proxy_argv(r) if tunnel is None else None
        proxy_proc: asyncio.subprocess.Process | None = None
        check = HostKeyCheck(r.hostname, r.port, tuple(user_files), r.global_known_hosts, strict,
                             r.check_host_ip, r.hash_known_hosts, r.host_key_alias,
                             proxied=proxy is not None or tunnel is not None)
        client = HostKeyClient(self, check, options.password is not None)
        # Read here, not by asyncssh: it fails the whole login on one missing file, where ssh skips it
        keys = await asyncio.get_running_loop().run_in_executor(None, load_keys, r, options)
        # a hop and the computer often read the same IdentityFile lines: each warning once
        notes = list(dict.fromkeys([n for hop in hops for n in hop.notes] + keys.warnings(self.name)))
        kwargs = _connect_kwargs(r, options, timeout, keys)
        kwargs["server_host_key_algs"] = algs = check.algorithms(r.host_key_algorithms)
        # asyncssh is given an empty trust list so that every key comes to HostKeyClient; with a
        # certificate possible, also the @revoked keys (the CA callback never shows the host's key)
        kwargs["known_hosts"] = check.revoked() if any("-cert-" in a for a in algs) \
            else asyncssh.import_known_hosts("")
        if proxy is not None:
            # Run by psjobs, not by asyncssh's proxy_command: asyncssh forgets the process when the
            # connection closes, and a loop that closes before it is reaped leaks it (unreaped).
            ours, theirs = socket.socketpair()
            try:
                proxy_proc = await asyncio.create_subprocess_exec(*proxy, stdin=theirs.fileno(),
                                                                  stdout=theirs.fileno(),
                                                                  start_new_session=True)
            except OSError as exc:
                ours.close()
                raise RemoteConnectionError(f"cannot connect to {what}: its ProxyCommand does not start "
                                            f"({exc})", self.name) from exc
            finally:
                theirs.close()
            kwargs["sock"] = ours
        if tunnel is not None:  # through the jump host to HostName and Port as ssh -G said
            kwargs["tunnel"] = _Hop(tunnel, r.hostname, r.port)
        at = f"{r.hostname} port {r.port}"
        try:
            if proxy is None and tunnel is None:  # the TCP connection to HostName, as ssh makes it
                kwargs["sock"] = await _tcp(r.hostname, r.port, timeout)
            try:
                conn = await _asyncssh_connect(r.name, client, kwargs)
            except BaseException:
                if "sock" in kwargs:  # a refused or failed login: the socket is ours to close
                    kwargs["sock"].close()
                raise
        except asyncssh.HostKeyNotVerifiable as exc:
            await _abandon(hops, proxy_proc)
            raise _host_key_error(what, self.name, client, check, exc) from exc
        except asyncssh.PermissionDenied as exc:
            await _abandon(hops, proxy_proc)
            raise RemoteConnectionError(
                f"{what} refused the login ({exc.reason}); "
                f"{login_hint(self.name, options, keys)}", self.name) from exc
        except (asyncio.TimeoutError, TimeoutError) as exc:
            await _abandon(hops, proxy_proc)
            raise RemoteConnectionError(
                f"{what} did not answer within {timeout:g}s; check that it is up and "
                f"reachable, or raise connect_timeout with psjobs.configure_ssh", self.name) from exc
        except OSError as exc:
            await _abandon(hops, proxy_proc)
            if exc.filename is not None:  # a file asyncssh reads (a certificate), not the network
                raise RemoteConnectionError(
                    f"cannot connect to {what}: cannot read {exc.filename} ({exc.strerror or exc}); "
                    f"correct the ssh config line that names it, or the path given to "
                    f"psjobs.configure_ssh", self.name) from exc
            if isinstance(exc, socket.gaierror) or not exc.errno or exc.errno < 0:
                why = exc.strerror or str(exc)  # a name that does not resolve, or several causes
            else:
                why = os.strerror(exc.errno)
            raise RemoteConnectionError(
                f"cannot connect to {what} ({at}): {why}; check that the computer is up and that sshd "
                f"listens there ({ssh_command(self.name, options)})", self.name) from exc
        except asyncssh.Error as exc:
            await _abandon(hops, proxy_proc)
            raise RemoteConnectionError(f"the SSH connection to {what} failed: {exc.reason}",
                                        self.name) from exc
        except (ValueError, KeyError) as exc:  # bad key files
            await _abandon(hops, proxy_proc)
            raise RemoteConnectionError(f"cannot connect to {what}: {exc}", self.name) from exc
        except BaseException:
            await _abandon(hops, proxy_proc)
            raise
        if client.verdict is not None and client.verdict.lines and user_files:
            with contextlib.suppress(OSError):  # OpenSSH too connects when it cannot record the key
                record(user_files[0], client.verdict.lines)
        return Connection(conn, client, hops, proxy_proc, notes)

    def lost(self, client: HostKeyClient, exc: Exception | None) -> None:
        for c in self.conns:
            if c.client is client:
                c.alive = False
                _close(c.hops, c.proxy)
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
        connecting = self.connecting
        if connecting is not None:
            connecting.cancel()
            # Waited for: a cancelled ssh -G or ProxyCommand is killed and reaped before the loop ends
            await asyncio.wait({connecting}, timeout=5)
        conns, self.conns = self.conns, []
        for c in conns:
            c.conn.close()
        for c in conns:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(c.conn.wait_closed(), 5)
            _close(c.hops, c.proxy)
        await _reaped(conns)


def _connect_kwargs(r: Resolved, options: SSHOptions, timeout: float, keys: Keys) -> dict[str, Any]:
    """asyncssh.connect's options for the computer ssh -G resolved to ``r``."""
    # asyncssh still reads the config for what ssh -G's answer does not carry over (algorithms,
    # auth methods, ...); what it did resolve is given explicitly and wins.
    kwargs: dict[str, Any] = {"port": r.port, "username": r.user, "connect_timeout": timeout,
                              "config": _asyncssh_configs(options)}
    if r.identity_agent:
        kwargs["agent_path"] = keys.agent
    if r.certificate_files:  # ssh passes over a missing CertificateFile without a word; asyncssh fails
        kwargs["client_certs"] = [f for f in r.certificate_files if os.path.isfile(f)]
    if options.client_keys is not None or r.identity_files:
        kwargs["client_keys"] = keys.client_keys()
        if keys.agent_identities:
            kwargs["agent_identities"] = keys.agent_identities
    # else: asyncssh's reader found no IdentityFile (no ssh command): its default files, as ssh's
    if options.passphrase is not None:
        kwargs["passphrase"] = options.passphrase
    if options.password is not None:
        kwargs["password"] = options.password
    if not r.server_alive_interval:  # ServerAliveInterval unset: still notice a dead peer
        kwargs["keepalive_interval"] = _KEEPALIVE
    else:
        kwargs["keepalive_interval"] = r.server_alive_interval
        kwargs["keepalive_count_max"] = r.server_alive_count
    return kwargs


def _asyncssh_configs(options: SSHOptions) -> list[str]:
    if options.config is not None:
        return list(options.config)
    user = os.path.expanduser("~/.ssh/config")
    return [user] if os.path.isfile(user) else []


async def _asyncssh_connect(name: str, client: HostKeyClient,
                            kwargs: dict[str, Any]) -> asyncssh.SSHClientConnection:
    try:
        # the name as given: asyncssh matches its Host blocks against it, as ssh does
        return await asyncssh.connect(name, client_factory=lambda: client, **kwargs)
    except asyncssh.ConfigParseError:
        # asyncssh's reader fails on a config ssh -G accepted (Match exec "test %h = x" is split
        # at its "="): what matters came from ssh -G, so go on without asyncssh's reading
        return await asyncssh.connect(name, client_factory=lambda: client, **{**kwargs, "config": []})


class _Hop:
    """A jump host connection as asyncssh's ``tunnel``, always to the address ssh -G resolved."""

    def __init__(self, conn: asyncssh.SSHClientConnection, host: str, port: int) -> None:
        self.conn = conn
        self.host = host
        self.port = port

    async def create_connection(self, session_factory: Any, remote_host: str,
                                remote_port: int) -> Any:
        return await self.conn.create_connection(session_factory, self.host, self.port)


async def _tcp(host: str, port: int, timeout: float) -> socket.socket:
    """A connected TCP socket to the first address of ``host`` that answers (as OpenSSH tries
    them), each attempt bounded by ``timeout``."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    error: OSError = OSError(f"{host} has no address")
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, address), timeout)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
        except BaseException:
            sock.close()
            raise
    raise error


def _close(conns: list[Connection], proxy: asyncio.subprocess.Process | None = None) -> None:
    """Close jump host connections (and what they run through), end a ProxyCommand process."""
    if proxy is not None and proxy.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proxy.kill()
    for c in conns:
        c.conn.close()
        _close(c.hops, c.proxy)


async def _abandon(conns: list[Connection], proxy: asyncio.subprocess.Process | None = None) -> None:
    """_close, then wait until the processes are reaped (a failed login leaves no process)."""
    _close(conns, proxy)
    if proxy is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(proxy.wait(), 5)
    await _reaped(conns)


async def _reaped(conns: list[Connection]) -> None:
    """Wait until the ProxyCommand processes under ``conns`` are reaped (before the loop closes)."""
    for c in conns:
        if c.proxy is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(c.proxy.wait(), 5)
        await _reaped(c.hops)


def _host_key_error(what: str, computer: str, client: HostKeyClient, check: HostKeyCheck,
                    exc: Exception) -> HostKeyError:
    verdict = client.verdict
    status = verdict.status if verdict is not None else None
    name = verdict.name if verdict is not None else what
    files = check.user_files + check.system_files
    where = ", ".join(files) or "no known_hosts file (UserKnownHostsFile none)"
    key = client.offered
    fingerprint = f" ({key.get_fingerprint()})" if key is not None else ""
    first = check.user_files[0] if check.user_files else "~/.ssh/known_hosts"
    if verdict is not None and verdict.accept and verdict.unsafe:
        return HostKeyError(
            f"the host key of {what}{fingerprint} differs from the one recorded for {name} in {where}. "
            f"StrictHostKeyChecking no would go on without password login, but psjobs was given a "
            f"password: it refuses instead. Remove the old entry (ssh-keygen -R HOST -f FILE) if the "
            f"change is expected", computer)
    if status == "changed":
        return HostKeyError(
            f"the host key of {what}{fingerprint} differs from the one recorded in {where}: the computer "
            f"was reinstalled, or someone is impersonating it. If the change is expected, remove the old "
            f"entry (ssh-keygen -R HOST -f FILE) and connect again", computer)
    if status == "ip-changed":
        return HostKeyError(
            f"the host key of {what}{fingerprint} differs from the one recorded for its address in "
            f"{where} (CheckHostIP): remove the stale entry (ssh-keygen -R ADDRESS -f FILE) if the "
            f"change is expected", computer)
    if status == "revoked" or (verdict is None and "revoked" in str(exc).lower()):
        return HostKeyError(f"the host key of {what}{fingerprint} is revoked in {where}", computer)
    if not check.user_files:
        how = "add the key to a known_hosts file and name it in UserKnownHostsFile"
    elif check.strict == "yes":
        how = (f"StrictHostKeyChecking yes in the ssh config forbids recording it: check the fingerprint "
               f"and add the key yourself (ssh-keyscan HOST >> {first})")
    else:
        how = (f"Check the fingerprint and add the key (ssh-keyscan HOST >> {first}), or let psjobs "
               f"record new keys: psjobs.configure_ssh(accept_new_host_keys=True) or "
               f"PSJOBS_SSH_ACCEPT_NEW_HOST_KEYS=1")
    return HostKeyError(
        f"the host key of {what}{fingerprint} is unknown: {name} is not in {where}. {how}", computer)
