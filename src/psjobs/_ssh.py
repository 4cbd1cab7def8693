"""The SSH engine: asyncssh on one event-loop thread per session.

::

    session thread: Engine.start(children, spec, N) / stop / forget / close --call_soon_threadsafe-->
    loop thread "psjobs-ssh":
        _run_child (one task per child, at most N of a call hold the throttle semaphore)
            _Pool(computer).connection()  one connection per computer, shared by every job of the
                                          session; a second one when sshd refuses more channels
            conn.create_session(...)      one channel per child job
        command: "exec /bin/sh -c WATCHDOG ..."  stdout lines -> output, stderr lines -> error records,
                                                 exit status -> exit_code; stop: "k TICKS\\n" on stdin
        callable: "exec python3 -c BOOT0"        stdin: boot source, R_MODULES, JOB (ANSWER, R_STOP)
                                                 stdout: MARK, R_INFO, HELLO, RECORDS..., DONE, R_EXIT
        the channel closes --> finish(child, event): Completed, Failed (with the computer and why)
                               or Stopped (the remote process group is gone by then)

Backends never set state: everything reaches the job through report/deliver/finish. The remote
side (watchdog and bootstrap) is in _remote_boot.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import json
import math
import os
import pickle
import shlex
import socket
import sys
import sysconfig
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncssh

from . import _remote_boot as boot
from ._backend import deliver, finish, report
from ._errors import ProtocolError, WorkerError
from ._process import _load_reason
from ._records import ErrorRecord, Record, Stream
from ._remote import HostKeyError, RemoteConnectionError, RemoteVersionError, SSHOptions, ssh_options
from ._state import Event
from ._target import CALL, SHELL
from ._wire import ANSWER, DONE, HELLO, JOB, MAX_FRAME, PROMPT, RECORDS, VERSION

if TYPE_CHECKING:
    from ._job import Entry, Job
    from ._session import Session
    from ._target import JobSpec

# Test hooks (handshake only): the Python version this session announces to the remote, and a
# version the remote first stage pretends to run. Never set outside tests.
_ANNOUNCE_PYTHON: tuple[int, int] | None = None
_FAKE_REMOTE_PYTHON: tuple[int, int] | None = None

# bash, started by sshd, reads ~/.bashrc unless SHLVL says it is not the top shell (measured: a
# pyenv init there cost 110-140 ms a command). sshd passes it where it has `AcceptEnv SHLVL`.
_ENV: dict[bytes | str, bytes | str] = {"SHLVL": "1"}
_KEEPALIVE = 15.0  # seconds; 3 unanswered keepalives (asyncssh's default count) drop the connection
_STOP_MARGIN = 3.0  # seconds past the grace before a stop closes the channel itself
_LINGER = 2.0  # seconds a channel may stay open after its remote process ended
_PICKLE_LOCK = threading.Lock()


def _local_python() -> tuple[int, int]:
    return (sys.version_info[0], sys.version_info[1])


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


class _Client(asyncssh.SSHClient):
    """Checks host keys as OpenSSH does, with accept-new as an explicit option."""

    def __init__(self, pool: _Pool, known: Any, accept_new: bool) -> None:
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

class _Conn:
    __slots__ = ("alive", "channels", "client", "conn", "limit")

    def __init__(self, conn: asyncssh.SSHClientConnection, client: _Client) -> None:
        self.conn = conn
        self.client = client
        self.channels = 0
        self.limit: int | None = None  # learned when sshd refuses a channel (MaxSessions)
        self.alive = True


class _Pool:
    """The connections to one computer: one, and more only when sshd refuses more channels."""

    def __init__(self, engine: Engine, name: str) -> None:
        self.engine = engine
        self.name = name
        self.conns: list[_Conn] = []
        self.connecting: asyncio.Task[_Conn] | None = None

    async def connection(self) -> _Conn:
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

    def _connected(self, task: asyncio.Task[_Conn]) -> None:
        if self.connecting is task:
            self.connecting = None
        if not task.cancelled() and task.exception() is None:
            self.conns.append(task.result())

    async def _connect(self) -> _Conn:
        options = ssh_options(self.engine.session)
        user, host, port = parse_computer(self.name)
        kwargs: dict[str, Any] = {"connect_timeout": options.connect_timeout}
        if options.config is not None:
            kwargs["config"] = list(options.config) if options.config else None
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
        client: _Client | None = None
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
            client = _Client(self, known, options.accepts_new_host_keys)
            if not resolved.keepalive_interval:  # ServerAliveInterval unset: still notice a dead peer
                kwargs["keepalive_interval"] = _KEEPALIVE
            factory = client
            conn = await asyncssh.connect(host, known_hosts=known, client_factory=lambda: factory, **kwargs)
        except asyncssh.HostKeyNotVerifiable as exc:
            raise _host_key_error(what, client, files, exc) from None
        except asyncssh.PermissionDenied as exc:
            raise RemoteConnectionError(
                f"{what} refused the login ({exc.reason}); check the user name and that your key is in "
                f"its authorized_keys (ssh {what} true)", self.name) from None
        except (asyncio.TimeoutError, TimeoutError):
            raise RemoteConnectionError(
                f"{what} did not answer within {options.connect_timeout:g}s; check that it is up and "
                f"reachable, or raise connect_timeout with psjobs.configure_ssh", self.name) from None
        except OSError as exc:
            if isinstance(exc, socket.gaierror) or not exc.errno or exc.errno < 0:
                why = exc.strerror or str(exc)  # a name that does not resolve, or several causes
            else:
                why = os.strerror(exc.errno)
            raise RemoteConnectionError(
                f"cannot connect to {what} ({at}): {why}; check that the computer is up and that sshd "
                f"listens there (ssh {what} true)", self.name) from None
        except asyncssh.Error as exc:
            raise RemoteConnectionError(f"the SSH connection to {what} failed: {exc.reason}",
                                        self.name) from None
        except (ValueError, KeyError) as exc:  # bad config or key files
            raise RemoteConnectionError(f"cannot connect to {what}: {exc}", self.name) from None
        assert client is not None
        if client.new_key is not None:
            host_seen, port_seen, key = client.new_key
            with contextlib.suppress(OSError):
                _record_key(target, host_seen, port_seen, key)
        return _Conn(conn, client)

    def lost(self, client: _Client, exc: Exception | None) -> None:
        for c in self.conns:
            if c.client is client:
                c.alive = False
        self.conns = [c for c in self.conns if c.alive]

    async def open(self, factory: Callable[[], asyncssh.SSHClientSession[bytes]],
                   command: str) -> tuple[_Conn, asyncssh.SSHClientChannel[bytes], Any]:
        while True:
            conn = await self.connection()
            conn.channels += 1
            try:
                chan, session = await conn.conn.create_session(factory, command, encoding=None, env=_ENV,
                                                               request_pty=False)
                return conn, chan, session
            except asyncssh.ChannelOpenError as exc:
                conn.channels -= 1
                if conn.channels == 0:
                    raise RemoteConnectionError(f"{self.name} refused to open a channel: {exc.reason}",
                                                self.name) from None
                conn.limit = conn.channels  # sshd's MaxSessions: the next job gets another connection
            except BaseException:
                conn.channels -= 1
                raise

    def release(self, conn: _Conn) -> None:
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


def _host_key_error(what: str, client: _Client | None, files: list[str], exc: Exception) -> HostKeyError:
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


# --- output of a channel -------------------------------------------------------------------------

class _Marked:
    """One stream of a channel: what comes before MARK is the login shell's, the rest is ours."""

    __slots__ = ("buf", "noise", "seen")

    def __init__(self) -> None:
        self.seen = False
        self.buf = bytearray()
        self.noise = b""

    def feed(self, data: bytes) -> bytes:
        if self.seen:
            return data
        self.buf += data
        i = self.buf.find(boot.MARK)
        if i < 0:
            return b""
        self.noise = bytes(self.buf[:i])
        rest = bytes(self.buf[i + len(boot.MARK):])
        self.seen = True
        self.buf = bytearray()
        return rest

    def unmarked(self) -> bytes:
        """Everything the stream carried when MARK never came."""
        return bytes(self.buf)


class _Lines:
    __slots__ = ("partial",)

    def __init__(self) -> None:
        self.partial = b""

    def feed(self, data: bytes) -> list[str]:
        *lines, self.partial = (self.partial + data).split(b"\n")
        return [_text(line) for line in lines]

    def rest(self) -> list[str]:
        rest, self.partial = self.partial, b""
        return [_text(rest)] if rest else []


def _text(raw: bytes) -> str:
    text = raw.decode("utf-8", "replace")
    return text[:-1] if text.endswith("\r") else text


def _noise_records(noise: bytes, computer: str, t: float) -> list[Entry]:
    """What the login shell printed before psjobs' command started: debug records."""
    lines = [_text(x) for x in noise.split(b"\n") if x.strip()]
    return [(Stream.DEBUG, Record(Stream.DEBUG, f"login shell: {line}", t, computer), t) for line in lines]


class _Base(asyncssh.SSHClientSession[bytes]):
    """What both kinds of channel share: the stderr stream and the end of the channel."""

    def __init__(self, child: _Child) -> None:
        self.child = child
        self.chan: asyncssh.SSHClientChannel[bytes] | None = None
        self.err = _Marked()
        self.err_lines = _Lines()
        self.status: int | None = None
        self.signal: str | None = None
        self.reason: BaseException | None = None  # set when psjobs itself refuses the channel
        self.closed = False

    def connection_made(self, chan: asyncssh.SSHClientChannel[bytes]) -> None:
        self.chan = chan

    def exit_status_received(self, status: int) -> None:
        self.status = status
        self._exited()

    def exit_signal_received(self, signal: str, core_dumped: bool, msg: str, lang: str) -> None:
        self.signal = signal
        self._exited()

    def _exited(self) -> None:
        # The remote process ended; the channel closes as soon as its output ends. Should something
        # keep it open (a watcher whose shell was killed by someone else), closing it makes the
        # watchdog end what is left of the job.
        asyncio.get_running_loop().call_later(_LINGER, self._linger)

    def _linger(self) -> None:
        if not self.closed and self.chan is not None:
            self.chan.close()

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        try:
            if datatype == asyncssh.EXTENDED_DATA_STDERR:
                self.on_stderr(data)
            else:
                self.on_stdout(data)
        except Exception as exc:  # never let a bad byte take the connection down
            self.refuse(exc if isinstance(exc, WorkerError) else WorkerError(
                f"psjobs could not read what {self.child.computer} sent: {type(exc).__name__}: {exc}"))

    def on_stdout(self, data: bytes) -> None:
        raise NotImplementedError

    def on_stderr(self, data: bytes) -> None:
        rest = self.err.feed(data)
        if not self.err.seen:
            return
        now = time.time()
        entries: list[Entry] = []
        if self.err.noise:
            entries += _noise_records(self.err.noise, self.child.computer, now)
            self.err.noise = b""
        entries += self._errors(self.err_lines.feed(rest), now)
        if entries:
            deliver(self.child.job, entries)

    def _errors(self, lines: list[str], now: float) -> list[Entry]:
        computer = self.child.computer
        return [(Stream.ERROR, ErrorRecord(line, now, computer), now) for line in lines]

    def refuse(self, reason: BaseException) -> None:
        """psjobs will not go on with this channel: fail the job with ``reason`` once it closes."""
        if self.reason is None:
            self.reason = reason
        if self.chan is not None:
            self.chan.close()

    def send_stop(self, grace: float) -> None:
        raise NotImplementedError

    def tail(self) -> list[Entry]:
        now = time.time()
        return self._errors(self.err_lines.rest(), now) if self.err.seen else []

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        try:
            self.child.closed(self, exc)
        except Exception as err:  # pragma: no cover - a bug here must still end the job
            self.child.end([], Event.FAIL, WorkerError(f"psjobs failed to end the job: {err!r}"))


class _CommandChannel(_Base):
    """A command under the remote watchdog: lines out, status back, "k" on stdin to stop."""

    def __init__(self, child: _Child) -> None:
        super().__init__(child)
        self.out = _Marked()
        self.out_lines = _Lines()

    def on_stdout(self, data: bytes) -> None:
        rest = self.out.feed(data)
        if not self.out.seen:
            return
        now = time.time()
        entries: list[Entry] = []
        if self.out.noise:
            entries += _noise_records(self.out.noise, self.child.computer, now)
            self.out.noise = b""
        entries += [(Stream.OUTPUT, line, now) for line in self.out_lines.feed(rest)]
        if entries:
            deliver(self.child.job, entries)

    def send_stop(self, grace: float) -> None:
        if self.chan is not None:
            ticks = max(1, math.ceil(grace / boot.TICK))
            with contextlib.suppress(Exception):
                self.chan.write(f"k {ticks}\n".encode())

    def tail(self) -> list[Entry]:
        now = time.time()
        out = [(Stream.OUTPUT, line, now) for line in self.out_lines.rest()] if self.out.seen else []
        return out + super().tail()

    def started(self) -> bool:
        return self.out.seen or self.err.seen

    def not_started_text(self) -> str:
        text = (self.err.unmarked() + self.out.unmarked()).decode("utf-8", "replace").strip()
        return text[-2000:]


class _CallChannel(_Base):
    """A Python callable under the remote bootstrap: frames on the channel, never the job's stdout."""

    def __init__(self, child: _Child, boot_source: bytes) -> None:
        super().__init__(child)
        self.out = _Marked()
        self.frames = boot.FrameSplitter()
        self.boot_source = boot_source
        self.done: tuple[str, bytes | None, str | None, int | None] | None = None
        self.worker_status: int | None = None
        self.handshaken = False

    def session_started(self) -> None:
        assert self.chan is not None
        self.chan.write(len(self.boot_source).to_bytes(4, "big") + self.boot_source)

    def on_stdout(self, data: bytes) -> None:
        rest = self.out.feed(data)
        if not self.out.seen:
            return
        if self.out.noise:
            now = time.time()
            deliver(self.child.job, _noise_records(self.out.noise, self.child.computer, now))
            self.out.noise = b""
        for kind, payload in self.frames.feed(rest):
            self.on_frame(kind, payload)
        buf = self.frames.buf
        if len(buf) >= boot.HEADER.size and boot.HEADER.unpack_from(buf)[0] > MAX_FRAME:
            raise ProtocolError(f"{self.child.computer} announced a frame over the {MAX_FRAME}-byte limit")

    def on_frame(self, kind: int, payload: bytes) -> None:
        child = self.child
        if kind == RECORDS:
            entries = pickle.loads(payload)
            for _stream, record, _t in entries:
                if isinstance(record, Record) and record.computer_name is None:
                    record.computer_name = child.computer
            deliver(child.job, entries)
        elif kind == DONE:
            self.done = pickle.loads(payload)
        elif kind == boot.R_INFO:
            self.on_info(json.loads(payload.decode("utf-8")))
        elif kind == boot.R_REFUSE:
            text = payload.decode("utf-8", "replace")
            self.refuse(RemoteVersionError(
                f"{child.computer} cannot run the callable: {text}. Pickled code does not "
                f"cross Python minor versions; name a matching interpreter with "
                f"psjobs.configure_ssh(python='python3.N') or run the session under that Python"))
        elif kind == HELLO:
            version, _pid, _python = pickle.loads(payload)
            if version != VERSION:
                self.refuse(ProtocolError(
                    f"the psjobs on {child.computer} speaks protocol {version}, this "
                    f"session {VERSION}; install the same psjobs there, or uninstall it there (psjobs then "
                    f"sends its own)"))
        elif kind == PROMPT:
            child.prompt = pickle.loads(payload)
            report(child.job, Event.BLOCK)
        elif kind == boot.R_EXIT:
            self.worker_status = json.loads(payload.decode("utf-8")).get("status")
        else:
            raise ProtocolError(f"unexpected frame kind {kind} from {child.computer}")

    def on_info(self, info: dict[str, Any]) -> None:
        child = self.child
        remote = tuple(info.get("python", [0, 0])[:2])
        local = _local_python()
        if remote != local:  # checked here too, before anything from there is unpickled
            self.refuse(RemoteVersionError(
                f"{child.computer} cannot run the callable: it runs Python "
                f"{remote[0]}.{remote[1]} ({info.get('executable')}) and this session Python "
                f"{local[0]}.{local[1]}. Pickled code does not cross Python minor versions; name a matching "
                f"interpreter with psjobs.configure_ssh(python='python3.N')"))
            return
        if child.stop_grace is not None:  # stopped during the handshake: nothing was started there
            assert self.chan is not None
            self.chan.close()
            return
        modules, note = child.engine.modules_for(info)
        self.handshaken = True
        assert self.chan is not None and child.spec.payload is not None
        meta = {"cwd": None, "env": None, "sys_path": None, "call": child.spec.payload}
        job_frame = boot._frame(JOB, pickle.dumps(meta, protocol=5))
        self.chan.write(boot._frame(boot.R_MODULES, modules) + job_frame)
        now = time.time()
        deliver(child.job, [(Stream.DEBUG, Record(Stream.DEBUG, note, now, child.computer), now)])

    def send_stop(self, grace: float) -> None:
        if self.chan is not None:
            with contextlib.suppress(Exception):
                self.chan.write(boot._frame(boot.R_STOP, json.dumps({"grace": grace}).encode()))

    def send_answer(self, text: str) -> None:
        if self.chan is not None:
            self.chan.write(boot._frame(ANSWER, pickle.dumps(text)))

    def started(self) -> bool:
        return self.out.seen

    def not_started_text(self) -> str:
        text = (self.err.unmarked() + self.out.unmarked()).decode("utf-8", "replace").strip()
        return text[-2000:]


# --- one child job ---------------------------------------------------------------------------------

class _Child:
    """What the engine keeps for a child job (its ``backend_data``)."""

    backend_kind = "ssh"

    def __init__(self, engine: Engine, job: Job, spec: JobSpec) -> None:
        self.engine = engine
        self.job = job
        self.spec = spec
        self.computer: str = job.computer_name or job.location
        self.task: asyncio.Task[None] | None = None
        self.phase = "waiting"  # waiting, connecting, opening, running, done
        self.channel: _Base | None = None
        self.stop_grace: float | None = None
        self.finished = False
        self.over: asyncio.Event | None = None  # made on the loop
        self.prompt: str | None = None
        self.release: Callable[[], None] | None = None  # gives the channel's slot back to its connection

    def end(self, entries: list[Entry], event: Event, reason: BaseException | None = None,
            code: int | None = None) -> None:
        if self.finished:
            return
        self.finished = True
        self.phase = "done"
        if self.release is not None:
            self.release()
            self.release = None
        finish(self.job, entries, event, reason=reason, exit_code=code)
        if self.over is not None:
            self.over.set()

    def fail_text(self, text: str) -> str:
        """A failure reason: the host shows it after the job's id and name, so it names the computer."""
        return text if self.computer in text else f"on {self.computer}: {text}"

    # --- stopping ------------------------------------------------------------------------------
    def stop(self, grace: float) -> None:
        if self.finished:
            return
        first = self.stop_grace is None
        self.stop_grace = grace
        if self.phase in ("waiting", "connecting"):
            if self.task is not None:
                self.task.cancel()
            return
        if self.phase == "running" and self.channel is not None and first:
            self.channel.send_stop(grace)
            loop = asyncio.get_running_loop()
            loop.call_later(grace + _STOP_MARGIN, self._stop_overdue)

    def _stop_overdue(self) -> None:
        """The computer did not confirm the stop in time: close the channel (its watchdog then ends
        the process group), and count the job as stopped soon after even if nothing answers."""
        if self.finished:
            return
        if self.channel is not None and self.channel.chan is not None:
            self.channel.chan.close()
        asyncio.get_running_loop().call_later(
            2.0, lambda: self.end([], Event.STOPPED))

    # --- the end of the channel ------------------------------------------------------------------
    def closed(self, channel: _Base, exc: Exception | None) -> None:
        entries = channel.tail()
        stopping = self.stop_grace is not None or self.job._stop_requested
        if isinstance(channel, _CommandChannel):
            self._command_end(channel, exc, entries, stopping)
        elif isinstance(channel, _CallChannel):
            self._call_end(channel, exc, entries, stopping)

    def _command_end(self, ch: _CommandChannel, exc: Exception | None, entries: list[Entry],
                     stopping: bool) -> None:
        code = ch.status
        if ch.reason is not None:
            self.end(entries, Event.FAIL, ch.reason, code)
        elif stopping:
            self.end(entries, Event.STOPPED, None, code)
        elif exc is not None:
            self.end(entries, Event.FAIL, self._dropped(exc), code)
        elif not ch.started():
            self.end(entries, Event.FAIL, WorkerError(self.fail_text(
                f"the login shell could not start the psjobs watchdog (exit status {code}): "
                f"{ch.not_started_text() or 'no message'}; psjobs needs /bin/sh and setsid there")), code)
        elif code is None:
            self.end(entries, Event.FAIL, WorkerError(self.fail_text(
                f"the command ended without an exit status (signal {ch.signal or 'unknown'})")), None)
        elif code == 0:
            self.end(entries, Event.COMPLETE, None, 0)
        else:
            from ._thread import _status_error

            self.end(entries, Event.FAIL, _status_error(f"the command on {self.computer}", code), code)

    def _call_end(self, ch: _CallChannel, exc: Exception | None, entries: list[Entry],
                  stopping: bool) -> None:
        if ch.reason is not None:
            self.end(entries, Event.FAIL, ch.reason)
            return
        if ch.done is not None:
            name, blob, tb, code = ch.done
            event = {"complete": Event.COMPLETE, "fail": Event.FAIL, "stopped": Event.STOPPED}[name]
            reason = _load_reason(blob, tb) if blob is not None else None
            if stopping and event is not Event.COMPLETE:
                event, reason = Event.STOPPED, None
            self.end(entries, event, reason, code)
        elif stopping:
            self.end(entries, Event.STOPPED)
        elif exc is not None:
            self.end(entries, Event.FAIL, self._dropped(exc))
        elif not ch.started():
            text = ch.not_started_text() or "no message"
            self.end(entries, Event.FAIL, WorkerError(self.fail_text(
                f"the remote Python bootstrap did not start (exit status {ch.status}): {text}; check that "
                f"{ssh_options(self.engine.session).python!r} runs there "
                f"(psjobs.configure_ssh(python=...))")))
        else:
            from ._process import status_text

            status = ch.worker_status
            what = status_text(status) if status is not None else "ended"
            self.end(entries, Event.FAIL, WorkerError(self.fail_text(
                f"the remote worker {what} before it reported the end of the job")))

    def _dropped(self, exc: BaseException) -> RemoteConnectionError:
        why = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
        return RemoteConnectionError(self.fail_text(
            f"the connection to {self.computer} dropped ({why}); the job's remote processes are ended by "
            f"its watchdog. Start the job again when the computer is back"), self.computer)


# --- the engine ------------------------------------------------------------------------------------

class Engine:
    """asyncssh on a loop thread of its own; the session calls it from any thread."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.loop = asyncio.new_event_loop()
        self.pools: dict[str, _Pool] = {}
        self.children: dict[int, _Child] = {}
        self._modules: dict[tuple[bool, bool], bytes] = {}
        self._boot_source: bytes | None = None
        self._closed = False
        self.thread = threading.Thread(target=self._run, name="psjobs-ssh", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            with contextlib.suppress(Exception):
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())

    def _call(self, fn: Callable[..., Any], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing left to do
            self.loop.call_soon_threadsafe(fn, *args)

    # --- preparing (caller's thread) ---------------------------------------------------------------
    def pickle_call(self, spec: JobSpec) -> None:
        """Pickle the call now, the caller's own modules by value (the remote cannot import them)."""
        import cloudpickle

        with _PICKLE_LOCK:
            registered = []
            for module in _by_value_modules(spec.target, spec.init):
                with contextlib.suppress(ValueError):
                    cloudpickle.register_pickle_by_value(module)
                    registered.append(module)
            try:
                spec.payload = cloudpickle.dumps((spec.target, spec.args, spec.kwargs, spec.init, spec.input),
                                                 protocol=5)
            except Exception as exc:
                raise TypeError(f"invoke_command: the callable {spec.command!r} or its arguments cannot be "
                                f"sent to another computer ({type(exc).__name__}: {exc}); pass picklable "
                                f"values") from exc
            finally:
                for module in registered:
                    with contextlib.suppress(ValueError):
                        cloudpickle.unregister_pickle_by_value(module)

    def boot_source(self) -> bytes:
        if self._boot_source is None:
            self._boot_source = Path(boot.__file__).read_bytes()
        return self._boot_source

    def modules_for(self, info: dict[str, Any]) -> tuple[bytes, str]:
        """The json R_MODULES payload for a remote that has what ``info`` says, and a note on it."""
        import cloudpickle

        import psjobs

        need_psjobs = info.get("psjobs") != psjobs.__version__ or info.get("wire") != VERSION
        need_cp = info.get("cloudpickle") != cloudpickle.__version__
        key = (need_psjobs, need_cp)
        if key not in self._modules:
            sources: dict[str, list[Any]] = {}
            if need_psjobs:
                sources.update(_package_sources(psjobs))
            if need_cp:
                sources.update(_package_sources(cloudpickle))
            self._modules[key] = json.dumps(sources).encode("utf-8")
        sent = [name for name, needed in (("psjobs", need_psjobs), ("cloudpickle", need_cp)) if needed]
        where = info.get("executable")
        note = (f"sent {' and '.join(sent)} to {where} (missing or another version there; served from memory)"
                if sent else f"using psjobs and cloudpickle installed for {where}")
        return self._modules[key], note

    # --- starting --------------------------------------------------------------------------------
    def start(self, jobs: list[Job], spec: JobSpec, limit: int) -> None:
        children = []
        for job in jobs:
            child = _Child(self, job, spec)
            job.backend_data = child
            children.append(child)
        self._call(self._start, children, limit)

    def _start(self, children: list[_Child], limit: int) -> None:
        gate = asyncio.Semaphore(limit)
        for child in children:
            self.children[child.job.id] = child
            child.over = asyncio.Event()
            child.task = self.loop.create_task(self._run_child(child, gate))

    async def _run_child(self, child: _Child, gate: asyncio.Semaphore) -> None:
        try:
            async with gate:
                if child.job.state.is_finished or child.finished:
                    return  # stopped while it waited for a slot (the session made it Stopped)
                report(child.job, Event.START)
                if child.stop_grace is not None or child.job._stop_requested:
                    child.end([], Event.STOPPED)
                    return
                await self._launch(child)
                assert child.over is not None
                await child.over.wait()
        except asyncio.CancelledError:
            if not child.finished:
                child.end([], Event.STOPPED)
        except RemoteConnectionError as exc:
            child.end([], Event.FAIL, exc)
        except Exception as exc:
            err = WorkerError(child.fail_text(f"{type(exc).__name__}: {exc}"))
            err.__cause__ = exc
            child.end([], Event.FAIL, err)

    async def _launch(self, child: _Child) -> None:
        pool = self.pools.get(child.computer)
        if pool is None:
            pool = self.pools[child.computer] = _Pool(self, child.computer)
        child.phase = "connecting"
        await pool.connection()
        child.phase = "opening"
        options = ssh_options(self.session)
        grace = self.session.stop_grace
        factory: Callable[[], _Base]
        if child.spec.kind == CALL:
            announce = _ANNOUNCE_PYTHON or _FAKE_REMOTE_PYTHON or _local_python()
            source = boot.boot0(announce, {"computer": child.computer, "grace": grace}, _FAKE_REMOTE_PYTHON)
            python = " ".join(shlex.quote(word) for word in shlex.split(options.python))
            command = f"exec {python} -c {shlex.quote(source)}"
            boot_source = self.boot_source()
            factory = functools.partial(_CallChannel, child, boot_source)
        else:
            argv = child.spec.argv
            ticks = max(1, math.ceil(grace / boot.TICK))
            if child.spec.kind == SHELL:  # ["/bin/sh", "-c", line, "sh", args...]: the login shell runs it
                command = boot.command_line(ticks, [argv[2], *argv[4:]], shell=True)
            else:
                command = boot.command_line(ticks, argv, shell=False)
            factory = functools.partial(_CommandChannel, child)
        try:
            conn, _chan, channel = await pool.open(factory, command)
        except (asyncssh.Error, OSError) as exc:
            raise RemoteConnectionError(child.fail_text(
                f"could not open a channel to {child.computer}: {getattr(exc, 'reason', None) or exc}"),
                child.computer) from None
        child.channel = channel
        child.release = functools.partial(pool.release, conn)
        child.phase = "running"
        if child.stop_grace is not None:  # a stop came while the channel opened
            channel.send_stop(child.stop_grace)
            self.loop.call_later(child.stop_grace + _STOP_MARGIN, child._stop_overdue)

    # --- the session's other calls (any thread) ------------------------------------------------------
    def stop(self, job: Job, grace: float) -> None:
        child = job.backend_data
        if isinstance(child, _Child):
            self._call(child.stop, grace)

    def forget(self, job: Job) -> None:
        self._call(self._forget, job.id)

    def _forget(self, job_id: int) -> None:
        child = self.children.pop(job_id, None)
        if child is not None and not child.finished and child.channel is not None and child.channel.chan:
            child.channel.chan.close()

    def send_input(self, job: Job, text: str) -> None:
        child = job.backend_data
        if isinstance(child, _Child):
            def answer() -> None:
                if isinstance(child.channel, _CallChannel):
                    child.prompt = None
                    child.channel.send_answer(text)
                    report(child.job, Event.UNBLOCK)

            self._call(answer)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if threading.current_thread() is self.thread:  # pragma: no cover - never from the loop itself
            self.loop.call_soon(self.loop.stop)
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._aclose(), self.loop).result(15)
        self._call(self.loop.stop)
        self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()

    async def _aclose(self) -> None:
        for child in list(self.children.values()):
            if child.task is not None and not child.task.done():
                child.task.cancel()
        pools, self.pools = list(self.pools.values()), {}
        await asyncio.gather(*(p.close() for p in pools), return_exceptions=True)
        tasks = [c.task for c in self.children.values() if c.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        for child in self.children.values():
            child.end([], Event.STOPPED)
        self.children.clear()


# --- helpers -----------------------------------------------------------------------------------------

def _site_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    dirs = {paths.get("stdlib"), paths.get("platstdlib"), paths.get("purelib"), paths.get("platlib")}
    return tuple(os.path.realpath(d) + os.sep for d in dirs if d)


def _by_value_modules(*functions: Any) -> list[Any]:
    """Modules of the caller's own code, which the remote computer cannot import by name."""
    out = []
    stdlib: frozenset[str] = getattr(sys, "stdlib_module_names", frozenset())
    installed = _site_dirs()
    for fn in functions:
        while isinstance(fn, functools.partial):
            fn = fn.func
        fn = getattr(fn, "__func__", fn)
        name = getattr(fn, "__module__", None)
        if not name or name == "__main__" or name.split(".")[0] in stdlib or name.split(".")[0] == "psjobs":
            continue
        module = sys.modules.get(name)
        path = getattr(module, "__file__", None)
        if module is None or not path:
            continue
        real = os.path.realpath(path)
        if any(real.startswith(d) for d in installed) or "site-packages" in real or "dist-packages" in real:
            continue
        out.append(module)
    return out


def _package_sources(package: Any) -> dict[str, list[Any]]:
    root = Path(inspect.getfile(package)).parent
    name = package.__name__
    sources: dict[str, list[Any]] = {}
    for path in sorted(root.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        rel = path.relative_to(root).with_suffix("")
        parts = [name, *rel.parts]
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        sources[".".join(parts)] = [path.read_text(encoding="utf-8"), is_pkg]
    return sources

