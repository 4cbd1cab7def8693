"""The two kinds of channel of a remote child job, and how the job ends.

::

    command channel: stdout (after MARK) --lines--> output; stderr (after MARK) --lines--> error
                     records; exit status --> exit_code; stop --> "k TICKS\\n" on stdin
    call channel:    stdout (after MARK) --frames--> R_INFO (versions, then R_MODULES + JOB go out),
                     HELLO, RECORDS --> port.records, PROMPT --> port.blocked, DONE, R_EXIT;
                     stop --> R_STOP on stdin
    channel closed --> Child.closed --> port.ended(Outcome completed | failed | stopped, tail)

What a login shell prints before MARK is not the job's: it becomes debug records.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import asyncssh

from ..._errors import ProtocolError, RemoteConnectionError, RemoteVersionError, WorkerError
from ..._records import ErrorRecord, Record, Stream
from ...core import Outcome
from ...worker import _remote_boot as boot
from ...worker import _salvage as salvage
from ...worker._outcome import load_reason, status_error, status_text
from ...worker._procs import Lines, text
from ...worker._wire import (
    DONE,
    HELLO,
    PROMPT,
    RECORDS,
    RECORDS_OOB,
    VERSION,
    Answer,
    Done,
    Exit,
    FrameReader,
    Hello,
    Info,
    JobMsg,
    Kind,
    Pause,
    Prompt,
    Refuse,
    Stop,
    decode_entries,
    frame,
)
from ._backend import ssh_options

if TYPE_CHECKING:
    from ...core import Entry, JobPort, JobSpec
    from ._engine import Engine

STOP_MARGIN = 3.0  # seconds past the grace before a stop closes the channel itself
_NUDGE = 0.05  # seconds after the remote process ended before its watcher is told to go ("q")
_LINGER = 2.0  # seconds a channel may stay open after its remote process ended


def local_python() -> tuple[int, int]:
    return (sys.version_info[0], sys.version_info[1])


# --- output of a channel -------------------------------------------------------------------------

class Marked:
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


def _noise_records(noise: bytes, computer: str, t: float) -> list[Entry]:
    """What the login shell printed before psjobs' command started: debug records."""
    lines = [text(x) for x in noise.split(b"\n") if x.strip()]
    return [(Stream.DEBUG, Record(Stream.DEBUG, f"login shell: {line}", t, computer), t) for line in lines]


class Channel(asyncssh.SSHClientSession[bytes]):
    """What both kinds of channel share: the stderr stream and the end of the channel."""

    def __init__(self, child: Child) -> None:
        self.child = child
        self.chan: asyncssh.SSHClientChannel[bytes] | None = None
        self.err = Marked()
        self.err_lines = Lines()
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
        # keep it open (a watcher whose shell was killed by someone else, or whose EXIT trap the
        # command replaced), "q" lets it go, and closing the channel later makes the watchdog end
        # what is left of the job.
        loop = asyncio.get_running_loop()
        loop.call_later(_NUDGE, self._nudge)
        loop.call_later(_LINGER, self._linger)

    def _nudge(self) -> None:
        if self.chan is not None and not self.closed and self.child.stop_grace is None:
            with contextlib.suppress(Exception):
                self.chan.write(b"q\n")

    def _linger(self) -> None:
        if not self.closed and self.chan is not None:
            self.chan.close()

    def eof_received(self) -> bool:
        # True: the remote's output ended, and psjobs has nothing to add to that. asyncssh's default
        # (False) sends an EOF of ours back, one packet more per job for nothing: the remote side
        # closes the channel when its process ends either way (a 3-computer fan-out of `true`:
        # ~5 packets a channel where raw asyncssh's conn.run sends 4).
        return True

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        try:
            if datatype == asyncssh.EXTENDED_DATA_STDERR:
                self.on_stderr(data)
            else:
                self.on_stdout(data)
        except BaseException as exc:  # never let a bad byte (or a value's SystemExit) take the connection down
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
            self.child.port.records(entries)

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

    def send_pause(self, pause: bool) -> None:
        """Suspend (True) or resume (False) the job's whole process group on the computer."""
        raise NotImplementedError

    def tail(self) -> list[Entry]:
        now = time.time()
        return self._errors(self.err_lines.rest(), now) if self.err.seen else []

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        try:
            self.child.closed(self, exc)
        except Exception as err:  # pragma: no cover - a bug here must still end the job
            self.child.end([], Outcome.failed(WorkerError(f"psjobs failed to end the job: {err!r}")))


class CommandChannel(Channel):
    """A command under the remote watchdog: lines out, status back, "k" on stdin to stop."""

    def __init__(self, child: Child) -> None:
        super().__init__(child)
        self.out = Marked()
        self.out_lines = Lines()

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
            self.child.port.records(entries)

    def send_stop(self, grace: float) -> None:
        if self.chan is not None:
            ticks = max(1, math.ceil(grace / boot.TICK))
            with contextlib.suppress(Exception):
                self.chan.write(f"k {ticks}\n".encode())

    def send_pause(self, pause: bool) -> None:
        if self.chan is not None:
            with contextlib.suppress(Exception):
                self.chan.write(b"s\n" if pause else b"c\n")

    def tail(self) -> list[Entry]:
        now = time.time()
        out = [(Stream.OUTPUT, line, now) for line in self.out_lines.rest()] if self.out.seen else []
        return out + super().tail()

    def started(self) -> bool:
        return self.out.seen or self.err.seen

    def not_started_text(self) -> str:
        text = (self.err.unmarked() + self.out.unmarked()).decode("utf-8", "replace").strip()
        return text[-2000:]


class CallChannel(Channel):
    """A Python callable under the remote bootstrap: frames on the channel, never the job's stdout."""

    def __init__(self, child: Child, boot_source: bytes) -> None:
        super().__init__(child)
        self.out = Marked()
        self.frames = FrameReader()
        self.boot_source = boot_source
        self.done: Done | None = None
        self.worker_status: int | None = None
        self.handshaken = False

    def session_started(self) -> None:
        assert self.chan is not None
        self.chan.write(self.boot_source)

    def on_stdout(self, data: bytes) -> None:
        rest = self.out.feed(data)
        if not self.out.seen:
            return
        if self.out.noise:
            now = time.time()
            self.child.port.records(_noise_records(self.out.noise, self.child.computer, now))
            self.out.noise = b""
        try:
            frames = self.frames.feed(rest)  # every header checked: kind, and the size cap
        except ProtocolError as exc:
            raise ProtocolError(f"{self.child.computer} sent a bad frame: {exc}") from None
        for kind, payload in frames:
            self.on_frame(kind, payload)

    def on_frame(self, kind: int, payload: bytes | bytearray) -> None:
        child = self.child
        if kind == RECORDS or kind == RECORDS_OOB:
            try:
                entries = decode_entries(kind, payload)
            except BaseException as exc:  # a value's own code raised, even SystemExit: not out of the event loop
                entries = salvage.entries(kind, payload, exc, child.port.describe(), child.computer)
            for _stream, record, _t in entries:
                if isinstance(record, Record) and record.computer_name is None:
                    record.computer_name = child.computer
            child.port.records(entries)
        elif kind == DONE:
            self.done = Done.decode(payload)
        elif kind == Kind.R_INFO:
            self.on_info(Info.decode(payload).info)
        elif kind == Kind.R_REFUSE:
            why = Refuse.decode(payload).text
            self.refuse(RemoteVersionError(
                f"{child.computer} cannot run the callable: {why}. Pickled code does not "
                f"cross Python minor versions; name a matching interpreter with "
                f"psjobs.configure_ssh(python='python3.N') or run the session under that Python"))
        elif kind == HELLO:
            version = Hello.decode(payload).version
            if version != VERSION:
                self.refuse(ProtocolError(
                    f"the psjobs on {child.computer} speaks protocol {version}, this "
                    f"session {VERSION}; install the same psjobs there, or uninstall it there (psjobs then "
                    f"sends its own)"))
        elif kind == PROMPT:
            child.prompt = Prompt.decode(payload).text
            child.port.blocked(child.prompt)  # receive_job can then show and answer it
        elif kind == Kind.R_EXIT:
            self.worker_status = Exit.decode(payload).status
        else:
            raise ProtocolError(f"unexpected frame kind {kind} from {child.computer}")

    def on_info(self, info: dict[str, Any]) -> None:
        child = self.child
        remote = tuple(info.get("python", [0, 0])[:2])
        local = local_python()
        if info.get("implementation", sys.implementation.name) != sys.implementation.name:
            self.refuse(RemoteVersionError(
                f"{child.computer} cannot run the callable: its Python is {info.get('implementation')} "
                f"({info.get('executable')}), this session's {sys.implementation.name}; name another "
                f"interpreter with psjobs.configure_ssh(python=...)"))
            return
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
        self.chan.write(frame(Kind.R_MODULES, modules) + JobMsg(child.spec.payload).frame())
        now = time.time()
        child.port.records([(Stream.DEBUG, Record(Stream.DEBUG, note, now, child.computer), now)])

    def send_stop(self, grace: float) -> None:
        if self.chan is not None:
            with contextlib.suppress(Exception):
                self.chan.write(Stop(grace).frame())

    def send_pause(self, pause: bool) -> None:
        if self.chan is not None:
            with contextlib.suppress(Exception):
                self.chan.write(Pause(pause).frame())

    def send_answer(self, text: str) -> None:
        if self.chan is not None:
            self.chan.write(Answer(text).frame())

    def started(self) -> bool:
        return self.out.seen

    def not_started_text(self) -> str:
        text = (self.err.unmarked() + self.out.unmarked()).decode("utf-8", "replace").strip()
        return text[-2000:]


# --- one child job ---------------------------------------------------------------------------------

class Child:
    """What the engine keeps for a child job (its ``backend_data``)."""

    backend_kind = "ssh"

    def __init__(self, engine: Engine, port: JobPort, spec: JobSpec) -> None:
        self.engine = engine
        self.port = port
        self.spec = spec
        self.computer: str = port.computer_name or port.location
        self.task: asyncio.Task[None] | None = None
        self.phase = "waiting"  # waiting, connecting, opening, running, done
        self.channel: Channel | None = None
        self.stop_grace: float | None = None
        self.finished = False
        self.over: asyncio.Event | None = None  # made on the loop
        self.prompt: str | None = None
        self.release: Callable[[], None] | None = None  # gives the channel's slot back to its connection

    def end(self, entries: list[Entry], outcome: Outcome) -> None:
        if self.finished:
            return
        self.finished = True
        self.phase = "done"
        if self.release is not None:
            self.release()
            self.release = None
        self.port.ended(outcome, entries)
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
            loop.call_later(grace + STOP_MARGIN, self.stop_overdue)

    def stop_overdue(self) -> None:
        """The computer did not confirm the stop in time: close the channel (its watchdog then ends
        the process group), and count the job as stopped soon after even if nothing answers."""
        if self.finished:
            return
        if self.channel is not None and self.channel.chan is not None:
            self.channel.chan.close()
        asyncio.get_running_loop().call_later(
            2.0, lambda: self.end([], Outcome.stopped()))

    # --- the end of the channel ------------------------------------------------------------------
    def closed(self, channel: Channel, exc: Exception | None) -> None:
        entries = channel.tail()
        stopping = self.stop_grace is not None or self.port.stop_requested
        if isinstance(channel, CommandChannel):
            self._command_end(channel, exc, entries, stopping)
        elif isinstance(channel, CallChannel):
            self._call_end(channel, exc, entries, stopping)

    def _command_end(self, ch: CommandChannel, exc: Exception | None, entries: list[Entry],
                     stopping: bool) -> None:
        code = ch.status
        if ch.reason is not None:
            self.end(entries, Outcome.failed(ch.reason, code))
        elif stopping:
            self.end(entries, Outcome.stopped(code))
        elif exc is not None:
            self.end(entries, Outcome.failed(self._dropped(exc), code))
        elif not ch.started():
            self.end(entries, Outcome.failed(WorkerError(self.fail_text(
                f"the login shell could not start the psjobs watchdog (exit status {code}): "
                f"{ch.not_started_text() or 'no message'}; psjobs needs a POSIX login shell (sh, bash, "
                f"zsh, ksh) and /bin/sh there")), code))
        elif code is None:
            self.end(entries, Outcome.failed(WorkerError(self.fail_text(
                f"the command ended without an exit status (signal {ch.signal or 'unknown'})"))))
        elif code == 0:
            self.end(entries, Outcome.completed(0))
        else:
            self.end(entries, Outcome.failed(status_error(f"the command on {self.computer}", code), code))

    def _call_end(self, ch: CallChannel, exc: Exception | None, entries: list[Entry],
                  stopping: bool) -> None:
        if ch.reason is not None:
            self.end(entries, Outcome.failed(ch.reason))
            return
        if ch.done is not None:
            done = ch.done
            code = done.exit_code
            outcome = Outcome.named(done.event, load_reason(done.reason, done.traceback)
                                    if done.reason is not None else None, code)
            if stopping and outcome.kind != Outcome.completed().kind:
                outcome = Outcome.stopped(code)
            self.end(entries, outcome)
        elif stopping:
            self.end(entries, Outcome.stopped())
        elif exc is not None:
            self.end(entries, Outcome.failed(self._dropped(exc)))
        elif not ch.started():
            text = ch.not_started_text() or "no message"
            self.end(entries, Outcome.failed(WorkerError(self.fail_text(
                f"the remote Python bootstrap did not start (exit status {ch.status}): {text}; check that "
                f"{ssh_options(self.engine.session).python!r} runs there "
                f"(psjobs.configure_ssh(python=...))"))))
        else:
            status = ch.worker_status
            what = status_text(status) if status is not None else "ended"
            self.end(entries, Outcome.failed(WorkerError(self.fail_text(
                f"the remote worker {what} before it reported the end of the job"))))

    def _dropped(self, exc: BaseException) -> RemoteConnectionError:
        why = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
        return RemoteConnectionError(self.fail_text(
            f"the connection to {self.computer} dropped ({why}); the job's remote processes are ended by "
            f"its watchdog. Start the job again when the computer is back"), self.computer)
