"""The runtime inside a job's worker process (forked by the fork server, or a fresh interpreter).

::

    session ==JOB frame==> worker: cwd, env, sys.path, then the cloudpickled call
    worker: write_*() / print / warnings / logging --> Writer batch --(1 ms or 1000 items)--> RECORDS
            fd 1 and fd 2 (C code, subprocesses) --> pipe --> pump thread --> information / error
    worker ==DONE==> session: how it ended, the exception and its traceback text; then it exits

The channel is a pair of file descriptors of its own (a socket locally, the SSH channel's
stdin/stdout remotely): fd 1 is never the channel. SIGTERM raises JobStopped in the job's code, so
``finally`` blocks run and every record written before the stop still arrives.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from .. import _inside
from .._errors import JobStopped, ProtocolError, RemoteError, WorkerError
from .._records import ErrorRecord, Stream, record_time, snapshot
from ._outcome import qualname
from ._procs import Lines
from ._runner import Ended, call, run_guarded
from ._wire import (
    ANSWER,
    CALLER_PYTHONPATH,
    HELLO,
    JOB,
    RECORDS,
    VERSION,
    Answer,
    Done,
    Hello,
    JobMsg,
    Prompt,
    encode_records,
    header,
    load_call,
    recv_frame,
)

Payload = bytes | list[Any]  # one buffer, or buffers written one after the other (no join)

FLUSH_SECONDS = 0.001  # a trickle arrives within about a millisecond...
FLUSH_ITEMS = 1000     # ...and a flood goes in batches that amortize pickling and syscalls


class Channel:
    """Blocking frames over a pair of file descriptors (the same one for a socket)."""

    def __init__(self, rfd: int, wfd: int) -> None:
        self.rfd = rfd
        self.wfd = wfd
        self.lock = threading.Lock()
        self.hello: bytes | None = None  # a HELLO that goes with the first frames sent

    def send(self, kind: int, payload: bytes) -> None:
        self.send_frames([(kind, payload)])
        # A SIGTERM that came while the frame was on its way only set the flag (a frame is never
        # cut in half): act on it now, or a busy job would run on until the SIGKILL.
        _Ctx.raise_stop()

    def send_frames(self, frames: list[tuple[int, Payload]]) -> None:
        """Send frames; small ones in a single write, so the session wakes once for them."""
        sized = [(kind, [p] if isinstance(p, bytes) else p) for kind, p in frames]
        sizes = [sum(len(part) for part in parts) for _, parts in sized]
        heads = [header(kind, size) for (kind, _), size in zip(sized, sizes)]  # the cap, before a byte goes
        with self.lock:
            if self.hello is not None:
                sized.insert(0, (HELLO, [self.hello]))
                sizes.insert(0, len(self.hello))
                heads.insert(0, header(HELLO, len(self.hello)))
                self.hello = None
            _Ctx.sending = True
            try:
                if sum(sizes) < 65536:
                    self._write(b"".join(head + b"".join(parts) for (_, parts), head in zip(sized, heads)))
                else:
                    for (_, parts), head in zip(sized, heads):
                        self._write(head)
                        for part in parts:
                            self._write(part)
            finally:
                _Ctx.sending = False

    def _write(self, data: bytes | bytearray) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.wfd, view)
            view = view[n:]

    def recv(self) -> tuple[int, bytes] | None:
        return recv_frame(self.rfd)


class _Ctx:
    """Process-wide job state the signal handler reads."""

    in_user = False
    sending = False
    stop = False
    raised = False  # JobStopped is raised once: the job's finally blocks must be able to run

    @classmethod
    def raise_stop(cls) -> None:
        """Raise JobStopped in the job's code if a stop is pending and was not raised yet."""
        if cls.stop and cls.in_user and not cls.raised and not cls.sending \
                and threading.current_thread() is threading.main_thread():
            cls.raised = True
            raise JobStopped()


def dumps_batch(streams: bytes, values: list[Any], times: list[float]) -> bytes:
    """A RECORDS payload (see _wire.decode_records); what cannot be pickled becomes a Snapshot."""
    try:
        return pickle.dumps((streams, values, times), protocol=5)
    except Exception:
        pass
    import cloudpickle  # values of classes made at run time (defined in __main__, closures...)

    try:
        data: bytes = cloudpickle.dumps((streams, values, times), protocol=5)
        return data
    except Exception:
        pass
    safe = []
    for value in values:
        try:
            cloudpickle.dumps(value, protocol=5)
            safe.append(value)
        except Exception as exc:
            safe.append(_stand_in(value, exc))
    out: bytes = cloudpickle.dumps((streams, safe, times), protocol=5)
    return out


def _records_frame(streams: bytes, values: list[Any], times: list[float]) -> tuple[int, Payload]:
    """The frame of a batch: large buffers out of band; what cannot be pickled becomes a Snapshot."""
    try:
        return encode_records(streams, values, times)
    except Exception:
        pass
    import cloudpickle  # values of classes made at run time (defined in __main__, closures...)

    try:
        frame: tuple[int, Payload] = encode_records(streams, values, times, cloudpickle.dumps)
        return frame
    except Exception:
        return RECORDS, dumps_batch(streams, values, times)  # value by value, with stand-ins


def _stand_in(payload: Any, exc: BaseException) -> Any:
    if isinstance(payload, ErrorRecord) and payload.exception is not None:
        ex = payload.exception
        return ErrorRecord(payload.message, record_time(payload), payload.computer_name,
                           RemoteError(str(ex), qualname(ex)), payload.traceback)
    return snapshot(payload, f"{type(exc).__name__}: {exc}")


class Writer:
    """Batches records and sends them by time or by count; thread-safe."""

    def __init__(self, channel: Channel, computer_name: str | None) -> None:
        self.channel = channel
        self.computer_name = computer_name
        self.line_buffers: dict[int, str] = {}
        # The batch in columns: one append each is cheaper than a tuple an item, and pickles 6x faster.
        self._streams = bytearray()
        self._buf: list[Any] = []
        self._times: list[float] = []
        self._first = 0.0
        self._lock = threading.Lock()
        self.wake_w = -1
        self._alarm = True
        self.input_items: list[Any] | None = None

    # Emitter protocol ---------------------------------------------------------------------
    def emit(self, stream: int, payload: Any, t: float | None = None) -> None:
        now = time.time() if t is None else t
        with self._lock:
            buf = self._buf
            buf.append(payload)
            self._streams.append(stream)
            self._times.append(now)
            if len(buf) == 1:
                self._first = now
                self._arm()
                return
            if len(buf) < FLUSH_ITEMS and now - self._first < FLUSH_SECONDS:
                return
            self._flush_locked()
        _Ctx.raise_stop()

    def stop_requested(self) -> bool:
        return _Ctx.stop

    def input(self) -> Iterator[Any]:
        return iter(self.input_items or ())

    def read_host(self, prompt: str) -> str:
        self.flush()
        message = Prompt(str(prompt))
        self.channel.send(message.kind, message.encode())
        reply = self.channel.recv()
        if reply is None or reply[0] != ANSWER:
            raise WorkerError("the session went away while the job waited for input")
        return Answer.decode(reply[1]).text

    # batching -----------------------------------------------------------------------------
    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        buf = self._buf
        if not buf:
            return
        streams, times = bytes(self._streams), self._times
        self._buf, self._streams, self._times = [], bytearray(), []
        self.channel.send_frames([_records_frame(streams, buf, times)])
        _Ctx.raise_stop()

    def _arm(self) -> None:
        """Make sure a batch that just started leaves within FLUSH_SECONDS, even if the job goes quiet.

        A one-shot interval timer (SIGALRM) does it without a thread: the first thread made in a
        forked child costs 3-15 ms here (measured), more than a whole job should. Where the job's
        own code took SIGALRM, a flusher thread does it instead.
        """
        if self.wake_w >= 0:
            try:
                os.write(self.wake_w, b"x")
            except BlockingIOError:
                pass
        elif self._alarm and signal.getsignal(signal.SIGALRM) is _on_alarm:
            signal.setitimer(signal.ITIMER_REAL, FLUSH_SECONDS)
        elif self._alarm:
            self._alarm = False
            _Pump(self, {}).start()

    def on_alarm(self) -> None:
        # In a signal handler: the main thread may be inside emit() or a send; never block on it.
        if not self._lock.acquire(blocking=False):
            signal.setitimer(signal.ITIMER_REAL, FLUSH_SECONDS / 2)
            return
        try:
            if not self._buf:
                return
            if not self.channel.lock.acquire(blocking=False):
                signal.setitimer(signal.ITIMER_REAL, FLUSH_SECONDS / 2)
                return
            self.channel.lock.release()
            self._flush_locked()
        finally:
            self._lock.release()

    def finish(self, done: Done) -> None:
        """The last batch and DONE in one write: the session learns the end in one wake-up."""
        with self._lock:
            frames = []
            if self._buf:
                streams, times = bytes(self._streams), self._times
                frames.append(_records_frame(streams, self._buf, times))
                self._buf, self._streams, self._times = [], bytearray(), []
            frames.append((done.kind, done.encode()))
            self.channel.send_frames(frames)

    def due(self) -> float | None:
        """Seconds until the pending batch must go (None: nothing pending)."""
        with self._lock:
            if not self._buf:
                return None
            return max(0.0, self._first + FLUSH_SECONDS - time.time())


class _Pump(threading.Thread):
    """Flushes a batch that waited 1 ms, and turns fd-level stdout/stderr lines into records."""

    def __init__(self, writer: Writer, fds: dict[int, Stream]) -> None:
        super().__init__(name="psjobs-pump", daemon=True)
        self.writer = writer
        self.fds = dict(fds)
        self.lines = {fd: Lines() for fd in fds}
        self.wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        writer.wake_w = wake_w
        self.done = False

    def wake(self) -> None:
        """Make the thread look again (at self.done, or a batch that is due)."""
        if self.writer.wake_w >= 0:
            try:
                os.write(self.writer.wake_w, b"x")
            except OSError:
                pass

    def run(self) -> None:
        poller = select.poll()
        for fd in self.fds:
            poller.register(fd, select.POLLIN)
        poller.register(self.wake_r, select.POLLIN)
        writer = self.writer
        while self.fds or not self.done:
            due = writer.due()
            timeout = None if due is None else int(due * 1000 + 0.999)
            for fd, _ in poller.poll(timeout if not self.done else 10):
                if fd == self.wake_r:
                    os.read(fd, 4096)
                    continue
                chunk = os.read(fd, 65536)
                stream = self.fds.get(fd)
                if stream is None:
                    continue
                if not chunk:
                    poller.unregister(fd)
                    del self.fds[fd]
                    self._lines(stream, self.lines[fd].rest())
                    continue
                self._lines(stream, self.lines[fd].feed(chunk))
            if writer.due() == 0.0:
                try:
                    writer.flush()
                except OSError:
                    return
            if self.done and not self.fds:
                return

    def _lines(self, stream: Stream, lines: list[str]) -> None:
        for line in lines:
            _inside.emit_line(self.writer, stream, line)


_writer: Writer | None = None


def _on_alarm(signum: int, frame: Any) -> None:
    if _writer is not None:
        _writer.on_alarm()


def _on_term(signum: int, frame: Any) -> None:
    _Ctx.stop = True
    _Ctx.raise_stop()


class _Prepared:
    writer: Writer | None = None
    pump: _Pump | None = None


def prepare(*, computer_name: str | None = None, capture_fds: bool = False) -> None:
    """Everything a worker does before it knows its job (a warm spare does it ahead of time).

    Copy-on-write faults after a fork cost 3-8 us a page on the machines measured, so a spare that
    has already touched what the job path touches starts a job in a fraction of a millisecond.
    """
    global _writer
    if _Prepared.writer is not None:
        return
    writer = Writer(Channel(-1, -1), computer_name)
    _writer = writer
    if capture_fds:
        # fd 1 and 2 of C code and child processes: read here (a remote worker has nobody else).
        r1, w1 = os.pipe()
        r2, w2 = os.pipe()
        os.dup2(w1, 1)
        os.dup2(w2, 2)
        os.close(w1)
        os.close(w2)
        _Prepared.pump = _Pump(writer, {r1: Stream.INFORMATION, r2: Stream.ERROR})
        _Prepared.pump.start()
    else:
        # Locally the session reads fd 1 and 2 through pipes of its own; batches leave on a timer.
        signal.signal(signal.SIGALRM, _on_alarm)
        signal.siginterrupt(signal.SIGALRM, False)  # restart system calls the timer interrupts
    _inside.set_process_emitter(writer)
    sys.stdout = _inside.StreamRouter(None, Stream.INFORMATION)
    sys.stderr = _inside.StreamRouter(None, Stream.ERROR)
    _inside.install_routers(whole_process=True)
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Touch the pickling paths once, so their pages are ours before the job comes.
    _records_frame(b"\0", [None], [0.0])
    JobMsg.decode(JobMsg(b"", "", {}, []).encode())
    _Prepared.writer = writer


def rehearse() -> None:
    """Serve one made-up job over a socket pair, so a warm spare's real job runs on its own pages.

    After prepare(), a trivial job still took ~130 copy-on-write and fresh-page faults in the spare
    (about 1 ms here): reference counts of code and modules on the job path, pickle's and
    cloudpickle's loaders, the heap's pools. Going through that path once, while the fork server is
    idle, takes them ahead of time. Nothing leaves the process: the frames go to a pair it closes.
    """
    import socket

    import cloudpickle

    writer = _Prepared.writer
    if writer is None:
        return
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        call = cloudpickle.dumps((lambda: 1, (), {}, None, None), protocol=5)
        ours.sendall(JobMsg(call, os.getcwd(), dict(os.environ), list(sys.path)).frame())
        _serve_one(writer, None, theirs.fileno(), theirs.fileno(), hello_first=False)
    except Exception:
        pass  # a rehearsal only saves time; the real job reports its own problems
    finally:
        ours.close()
        theirs.close()
        writer.channel.rfd = writer.channel.wfd = -1
        writer.channel.hello = None
        writer.input_items = None
        _Ctx.in_user = _Ctx.stop = _Ctx.raised = False


def serve(rfd: int, wfd: int, *, computer_name: str | None = None, capture_fds: bool = True,
          hello_first: bool = True) -> int:
    """Run the one job that arrives on the channel; return the process exit status to use.

    ``hello_first=False`` (a local worker, whose pid the session knows) sends HELLO with the job's
    first frames instead: a trivial job then wakes the session once, not twice. Such a worker
    also honours a withdrawal (see ``_withdrawn``) right before the job's code begins.
    """
    prepare(computer_name=computer_name, capture_fds=capture_fds)
    writer = _Prepared.writer
    assert writer is not None
    return _serve_one(writer, _Prepared.pump, rfd, wfd, hello_first=hello_first)


class _SignalGate:
    """The runner's gate in a process worker: SIGTERM raises JobStopped only while in the job's code."""

    def enter(self) -> None:
        _Ctx.in_user = True
        _Ctx.raise_stop()

    def leave(self) -> None:
        _Ctx.in_user = False

    def stopping(self) -> bool:
        return _Ctx.stop


def _serve_one(writer: Writer, pump: _Pump | None, rfd: int, wfd: int, *, hello_first: bool) -> int:
    channel = writer.channel
    channel.rfd, channel.wfd = rfd, wfd
    channel.hello = Hello(VERSION, os.getpid(), tuple(sys.version_info[:2])).encode()
    if hello_first:
        channel.send_frames([])
    got = channel.recv()
    if got is None:
        return 0  # the session went away before sending the job
    kind, body = got
    if kind != JOB:
        raise ProtocolError(f"expected the job, got frame kind {kind}")
    job = JobMsg.decode(body)
    if not hello_first and _withdrawn(rfd):
        return 0  # stopped or removed before it began: it never runs, and the session expects nothing
    _settle(job)
    ended = run_guarded(lambda: _run(job, writer), _SignalGate())
    _finish(writer, pump, ended)
    return 0


def _withdrawn(fd: int) -> bool:
    """True if a local session shut its sending side of the job socket: it withdrew the job (a
    stop or a remove before the worker was known, backends/process/_call CallHandle.withdraw).

    Only a local worker's channel is a socket the session shuts to say so; a remote worker's is a
    pipe, on which a closed end means something else. One poll: ~1 us on the start path.
    """
    poller = select.poll()
    poller.register(fd, select.POLLRDHUP)
    return any(events & (select.POLLRDHUP | select.POLLHUP) for _, events in poller.poll(0))


def _settle(job: JobMsg) -> None:
    """Put the worker where the caller was: directory, environment, import path."""
    if job.cwd:
        os.chdir(job.cwd)
    env = job.env
    if env is not None:
        # Only what differs: rewriting every variable costs about a millisecond.
        for key in [k for k in os.environ if k not in env]:
            del os.environ[key]
        for key, value in env.items():
            if os.environ.get(key) != value:
                os.environ[key] = value
    if job.sys_path is not None:
        sys.path[:] = job.sys_path


def _run(job: JobMsg, writer: Writer) -> None:
    try:
        target, args, kwargs, init, items = load_call(job.call)
    except Exception as exc:
        raise WorkerError(f"the worker could not unpickle the job's callable or its arguments: "
                          f"{type(exc).__name__}: {exc}") from exc
    writer.input_items = items
    call(target, args, kwargs, init, writer)


def _finish(writer: Writer, pump: _Pump | None, ended: Ended) -> None:
    if pump is None:
        signal.setitimer(signal.ITIMER_REAL, 0)
    _inside.flush_lines(writer)
    try:
        sys.stdout.flush()
    except Exception:
        pass
    if pump is not None:
        # Close our ends of fd 1 and 2 so the pump sees the end of what C code and children
        # printed; a grandchild that keeps them open does not hold the job (bounded wait).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.close(devnull)
        pump.done = True
        pump.wake()
        pump.join(0.2)
    writer.finish(ended.done())


def restore_pythonpath() -> None:
    """Give the environment the caller's PYTHONPATH back (sys.path is already made from ours)."""
    caller = os.environ.pop(CALLER_PYTHONPATH, None)
    if caller is None:
        return
    if caller.startswith("="):
        os.environ["PYTHONPATH"] = caller[1:]
    else:
        os.environ.pop("PYTHONPATH", None)


def main() -> None:
    """``python -m psjobs.worker._process_worker FD``: serve one job on a socket inherited as FD."""
    restore_pythonpath()
    fd = int(sys.argv[1])
    os.setpgid(0, 0) if os.getpgid(0) != os.getpid() else None
    try:
        status = serve(fd, fd, capture_fds=False, hello_first=False)  # the session reads our fd 1 and 2
    except BaseException:
        status = 70
    os._exit(status)


if __name__ == "__main__":
    main()
