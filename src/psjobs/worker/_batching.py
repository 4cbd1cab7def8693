"""How a process worker's records leave: batched by time or count, framed, sent on its channel.

::

    job code --write_*() / print / warnings / logging--> Writer.emit --(1 ms, or 1000 items; 100 the first time)-->
        Channel.send_frames --RECORDS frames--> the session
    a finalizer that prints inside emit or a send (same thread) --> the side list --> the batch
    SIGALRM (_on_alarm) or the pump thread --> a batch that waited 1 ms goes
    fd 1 and fd 2 (remote workers) --> pipe --> _Pump --> information / error records

Split from _process_worker (which serves the job) to keep each module readable.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

from .. import _inside
from .._errors import JobStopped, ProtocolError, RemoteError, WorkerError
from .._records import ErrorRecord, Stream, record_time, snapshot
from ._outcome import qualname
from ._procs import Lines
from ._runner import COMPLETE, FAIL, Ended
from ._wire import (
    ANSWER,
    HELLO,
    MAX_FRAME,
    RECORDS,
    Answer,
    Prompt,
    encode_records,
    header,
    recv_frame,
)

Payload = bytes | list[Any]  # one buffer, or buffers written one after the other (no join)

FLUSH_SECONDS = 0.001  # a trickle arrives within about a millisecond (in a blocking call too: the
# timer interrupts it; not inside C code that retries its own interrupted calls, os.system)...
FLUSH_ITEMS = 1000     # ...and a flood goes in batches that amortize pickling and syscalls
# ...except its first batch, which leaves at this many: a reader sees a flood begin as soon as
# a trickle's first item (a process job's first of 100,000 items came 0.45 ms later when it
# waited for a thousand, and the session sized a thousand records before it woke the reader).
# A job that writes fewer within the millisecond still sends them with its end, in one write.
FIRST_ITEMS = 100
# The timer fires again at this interval until the batch is sent. Its first signal can come just
# before the job blocks in a system call (after Python's last look at its signals, before the
# call began): the handler then waited for that call to end. Seen: 1 job in ~2,000 whose first
# record, written right before time.sleep(60), was held for the whole minute (load ~2).
RETRY_SECONDS = 0.01


class Channel:
    """Blocking frames over a pair of file descriptors (the same one for a socket)."""

    def __init__(self, rfd: int, wfd: int) -> None:
        self.rfd = rfd
        self.wfd = wfd
        # An RLock with a busy flag, not a Lock: a finalizer (``__del__``, cyclic garbage) that
        # prints, logs or warns while this thread writes a frame comes back here through the
        # Writer; with a Lock it waited for itself forever (issue 13, case 1). The Writer sees
        # ``busy`` and keeps such records aside; a frame is never cut by another.
        self.lock = threading.RLock()
        self.busy = False
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
            if self.busy:
                raise WorkerError("a frame was sent from inside the sending of another (a finalizer?)")
            self.busy = True
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
                self.busy = False

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
    writer: Writer | None = None  # the process's one writer (prepare() makes it)
    job_pid = 0  # the process serving the job (a child it forks has another pid)

    @classmethod
    def raise_stop(cls) -> None:
        """Raise JobStopped in the job's code if a stop is pending and was not raised yet."""
        if cls.stop and cls.in_user and not cls.raised and not cls.sending \
                and threading.current_thread() is threading.main_thread() \
                and not (cls.writer is not None and cls.writer.busy):  # never mid-batch (as sending)
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
    """Batches records and sends them by time or by count; thread-safe, and safe to re-enter.

    A finalizer (``__del__``, cyclic garbage the collector frees) runs wherever an allocation
    triggers it, so inside ``emit`` or a send of this very thread; when it prints, logs or warns
    it comes back here. Then the lock (an RLock) is ours and the batch may be half-updated: such
    records go to a side list in one atomic append, and join the batch, in order, the next time
    the batch is touched (``busy`` marks the half-updated state; it is only read under the lock).
    """

    def __init__(self, channel: Channel, computer_name: str | None) -> None:
        self.channel = channel
        self.computer_name = computer_name
        self.line_buffers: dict[int, str] = {}
        # The batch in columns: one append each is cheaper than a tuple an item, and pickles 6x faster.
        self._streams = bytearray()
        self._buf: list[Any] = []
        self._times: list[float] = []
        self._first = 0.0
        self._limit = FIRST_ITEMS  # items that send a batch: FLUSH_ITEMS after the first one
        self._lock = threading.RLock()
        self.busy = False  # a thread (the lock's holder) is updating or sending the batch
        self._side: list[tuple[int, Any, float]] = []  # records emitted re-entrantly, in order
        self.too_big: ProtocolError | None = None  # an item that could not be sent: the job fails
        self.finished = False  # DONE is sent: no timer, no flush any more
        self.wake_w = -1
        self._alarm = True
        self.input_items: list[Any] | None = None

    # Emitter protocol ---------------------------------------------------------------------
    def emit(self, stream: int, payload: Any, t: float | None = None) -> None:
        now = time.time() if t is None else t
        with self._lock:
            if self.busy or self.channel.busy:
                self._side.append((stream, payload, now))  # re-entered: see the class docstring
                return
            self.busy = True
            try:
                if self._side:
                    self._take_side()
                buf = self._buf
                buf.append(payload)
                self._streams.append(stream)
                self._times.append(now)
                if len(buf) == 1:
                    self._first = now
                    self._arm()
                    return
                if len(buf) < self._limit and now - self._first < FLUSH_SECONDS:
                    return
                self._limit = FLUSH_ITEMS
                self._flush_locked()
            finally:
                if self._side:
                    self._take_side()
                self.busy = False  # _leave(), inlined: this is the path of every item
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
            if self.busy or self.channel.busy or self.finished:
                return  # re-entered: the call under way sends the batch (or DONE went already)
            self.busy = True
            try:
                self._take_side()
                self._flush_locked()
            finally:
                self._leave()

    def _take_side(self) -> None:
        """Put the records emitted re-entrantly into the batch (the caller holds the lock, busy)."""
        while self._side:
            side, self._side = self._side, []  # an append during the loop goes to the new list
            if not self._buf and side:
                self._first = side[0][2]
                self._arm()
            for stream, payload, t in side:
                self._buf.append(payload)
                self._streams.append(stream)
                self._times.append(t)

    def _leave(self) -> None:
        """End a busy stretch: what finalizers emitted meanwhile joins the batch (and its timer)."""
        if self._side:
            self._take_side()
        self.busy = False

    def _flush_locked(self) -> None:
        buf = self._buf
        if not buf:
            return
        streams, times = bytes(self._streams), self._times
        self._buf, self._streams, self._times = [], bytearray(), []
        self.channel.send_frames(self._frames(streams, buf, times))
        _Ctx.raise_stop()

    def _frames(self, streams: bytes, values: list[Any], times: list[float]) -> list[tuple[int, Payload]]:
        """The batch's frames: halved until each is within MAX_FRAME; an item over it alone is
        left out and remembered in ``too_big`` (the job fails with it: issue 13, case 9)."""
        frame = _records_frame(streams, values, times)
        size = _payload_size(frame[1])
        if size <= MAX_FRAME:
            return [frame]
        if len(values) > 1:
            half = len(values) // 2
            return self._frames(streams[:half], values[:half], times[:half]) + \
                self._frames(streams[half:], values[half:], times[half:])
        if self.too_big is None:
            what = "output item" if streams[0] == Stream.OUTPUT else f"{Stream(streams[0]).name.lower()} record"
            self.too_big = ProtocolError(
                f"the job wrote an {what} ({type(values[0]).__name__}) of {size} bytes, over the "
                f"{MAX_FRAME}-byte frame limit; it was not sent and the job fails. Send it in parts, or "
                f"write it to a file and send the path")
        return []

    def _arm(self) -> None:
        """Make sure a batch that just started leaves within FLUSH_SECONDS, even if the job goes quiet.

        A one-shot interval timer (SIGALRM) does it without a thread: the first thread made in a
        forked child costs 3-15 ms here (measured), more than a whole job should. Where the job's
        own code took SIGALRM, a flusher thread does it instead.
        """
        if self.finished:
            return
        if self.wake_w >= 0:
            try:
                os.write(self.wake_w, b"x")
            except BlockingIOError:
                pass
        elif self._alarm and signal.getsignal(signal.SIGALRM) is _on_alarm:
            signal.setitimer(signal.ITIMER_REAL, FLUSH_SECONDS, RETRY_SECONDS)
        elif self._alarm:
            self._alarm = False
            _Pump(self, {}).start()

    def on_alarm(self) -> None:
        # In a signal handler: the main thread may be inside emit() or a send; never block on it.
        if not self._lock.acquire(blocking=False):
            signal.setitimer(signal.ITIMER_REAL, FLUSH_SECONDS / 2, RETRY_SECONDS)
            return
        try:
            if self.finished or (not self._buf and not self._side):
                signal.setitimer(signal.ITIMER_REAL, 0)  # nothing waits: the next batch arms it
                return
            if self.busy or self.channel.busy or not self.channel.lock.acquire(blocking=False):
                signal.setitimer(signal.ITIMER_REAL, FLUSH_SECONDS / 2, RETRY_SECONDS)  # this thread is mid-update
                return
            self.channel.lock.release()
            self.busy = True
            try:
                self._take_side()
                self._flush_locked()
                signal.setitimer(signal.ITIMER_REAL, 0)  # sent (what a finalizer wrote meanwhile arms it again)
            finally:
                self._leave()
        finally:
            self._lock.release()

    def finish(self, ended: Ended) -> bool:
        """The last batch and DONE in one write: the session learns the end in one wake-up.

        False (nothing sent) when this thread is in the middle of a batch or a send already (an
        ``os._exit`` from a finalizer): the session then reports the exit status.
        """
        with self._lock:
            if self.busy or self.channel.busy:
                return False
            self.busy = True
            try:
                frames: list[tuple[int, Payload]] = []
                while True:
                    self._take_side()
                    if not self._buf:
                        break
                    streams, values, times = bytes(self._streams), self._buf, self._times
                    self._buf, self._streams, self._times = [], bytearray(), []
                    frames.extend(self._frames(streams, values, times))
                    # The last items' finalizers (a printing __del__) run now, into the side
                    # list, and go before DONE like everything the job wrote.
                    del values
                if self.too_big is not None and ended.event == COMPLETE:
                    ended = Ended(FAIL, self.too_big)
                done = ended.done()
                frames.append((done.kind, done.encode()))
                self.finished = True
                self.channel.send_frames(frames)
            finally:
                self._leave()
        return True

    def due(self) -> float | None:
        """Seconds until the pending batch must go (None: nothing pending)."""
        with self._lock:
            if not self._buf:
                return 0.0 if self._side else None
            return max(0.0, self._first + FLUSH_SECONDS - time.time())


def _payload_size(payload: Payload) -> int:
    if isinstance(payload, bytes):
        return len(payload)
    return sum(len(part) for part in payload)  # as Channel.send_frames counts them


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
                main = threading.main_thread().ident if _Ctx.stop else None
                if main is not None and _Ctx.in_user and not _Ctx.raised:
                    # A SIGTERM that came during this flush only set the flag (no stop is raised
                    # mid-send, nor from this thread): again, so the job's thread acts on it now
                    # (without, 1 stop in 5 waited for the SIGKILL, finally blocks unrun).
                    signal.pthread_kill(main, signal.SIGTERM)
            if self.done and not self.fds:
                return

    def _lines(self, stream: Stream, lines: list[str]) -> None:
        for line in lines:
            _inside.emit_line(self.writer, stream, line)


def _on_alarm(signum: int, frame: Any) -> None:
    if _Ctx.writer is not None:
        _Ctx.writer.on_alarm()
        # A SIGTERM that came while this flush was under way only set the flag (the writer was
        # busy): act on it now that it is not, or the job ran on until the SIGKILL, its finally
        # blocks unrun (seen in 2 of 3 stops right after a job's first output).
        _Ctx.raise_stop()
