"""Process jobs (BackgroundJob): the session side.

::

    start_job(callable) --JOB frame--> job socket <--RECORDS (HELLO with the first), DONE-- worker
          |                                                                        ^
          +-- job socket + fd 1/2 pipes --> a warm spare the fork server handed over
          +-- (no spare left) ("fork", token) + the same --> fork server --fork--+
                                           fork server --("spare"/"forked"/"exited")--> I/O loop
    start_job("cmd" | [argv]) --Popen(own session)--> stdout lines -> output, stderr lines -> errors,
                                                      pidfd -> exit status
    one I/O loop thread (selectors) reads every job's socket, pipe and pidfd of the session;
    the thread that starts a job registers its descriptors itself (see _SharedSelector)

A callable's job ends at its DONE frame, the worker's last word (what it wrote on fd 1 and 2 is in
the pipes by then, and is read first); a command's when it has exited and its pipes reached their
end. So a receive right after a wait sees the tail. A stop sends SIGTERM to the job's process
group, then SIGKILL after the grace period, and the job is Stopped only when no process of its
group is left.
"""

from __future__ import annotations

import array
import contextlib
import heapq
import itertools
import logging
import os
import pickle
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..._errors import ProtocolError, RemoteError, RemoteTraceback, WorkerError
from ..._records import ErrorRecord, InformationRecord, Stream
from ...core._backend import block, deliver, finish, report, unblock
from ...core._state import Event
from ...worker._remote_boot import group_gone  # stdlib only: the remote side runs the same check
from ...worker._wire import (
    CALLER_PYTHONPATH,
    DONE,
    HELLO,
    JOB,
    PROMPT,
    RECORDS,
    RECORDS_OOB,
    VERSION,
    FrameReader,
    decode_records,
    decode_records_oob,
    frame,
)

if TYPE_CHECKING:
    from ...core._job import Entry, Job
    from ...core._session import Session
    from ...core._spec import JobSpec

_SOCK_BUF = 1 << 20  # 1 MiB socket buffers: large values cross in few syscalls


def status_text(status: int | None) -> str:
    """A wait status as words: 'exited with status 3', 'was killed by SIGSEGV'."""
    if status is None:
        return "ended (its exit status is unknown: the fork server that started it died)"
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return f"was killed by {name}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


class _SharedSelector(selectors.DefaultSelector):
    """The loop's selector, which a thread starting a job may register with directly.

    Registering from the loop thread (call_soon) woke it on every job start, and that wake-up
    and the GIL hand-off that follows cost ~0.5 ms a job (measured: 2.1 -> 1.4 ms start to
    result). epoll itself is thread-safe; ``mutex`` keeps the key map consistent, and the loop
    holds it while it runs handlers, so a job's descriptors are registered all at once as far as
    its handlers can tell (a handler reads every pipe of its job). Lock order: mutex, then the
    session's condition.
    """

    def __init__(self) -> None:
        super().__init__()
        self.mutex = threading.RLock()

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        with self.mutex:
            return super().register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        with self.mutex:
            return super().unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        with self.mutex:
            return super().modify(fileobj, events, data)


class IOLoop:
    """One thread that reads every process job's channel, pipes and pidfd for a session."""

    def __init__(self) -> None:
        self.sel = _SharedSelector()
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self.sel.register(self._r, selectors.EVENT_READ, self._drain_wake)
        self._calls: deque[Callable[[], None]] = deque()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._closing = False
        self.thread = threading.Thread(target=self._run, name="psjobs-io", daemon=True)
        self.thread.start()

    def call_soon(self, fn: Callable[[], None]) -> None:
        self._calls.append(fn)
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._w, b"x")

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        when = time.monotonic() + delay
        self.call_soon(lambda: heapq.heappush(self._timers, (when, next(self._seq), fn)))

    def _drain_wake(self, mask: int) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._r, 4096):
                pass

    def _run(self) -> None:
        while not self._closing:
            timeout = None
            if self._timers:
                timeout = max(0.0, self._timers[0][0] - time.monotonic())
            try:
                events = self.sel.select(timeout)
            except OSError:
                events = []
            with self.sel.mutex:
                self._dispatch(events)

    def _dispatch(self, events: list[tuple[selectors.SelectorKey, int]]) -> None:
        for key, mask in events:
            try:
                key.data(mask)
            except Exception as exc:  # a handler must never take the loop down
                _loop_error(key.data, exc)
        while self._calls:
            fn = self._calls.popleft()
            try:
                fn()
            except Exception as exc:
                _loop_error(fn, exc)
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, fn = heapq.heappop(self._timers)
            try:
                fn()
            except Exception as exc:
                _loop_error(fn, exc)

    def close(self) -> None:
        self._closing = True
        self.call_soon(lambda: None)
        if threading.current_thread() is not self.thread:
            self.thread.join(5)
        with contextlib.suppress(OSError):
            self.sel.close()
        for fd in (self._r, self._w):
            with contextlib.suppress(OSError):
                os.close(fd)


def _loop_error(where: Any, exc: BaseException) -> None:
    owner = getattr(where, "__self__", None)
    fail = getattr(owner, "broken", None)
    try:
        if callable(fail):
            fail(exc)  # fails that one job with the reason
            return
    except Exception as again:
        exc = again
    # A bug in psjobs itself: say it rather than hide it, and keep the loop (and every other job) alive.
    logging.getLogger("psjobs.process").error("psjobs: internal error in the I/O loop: %r", exc, exc_info=exc)


class _Handle:
    """Common end-of-job logic for a process job (callable or command)."""

    backend_kind = "process"

    def __init__(self, backend: ProcessBackend, job: Job) -> None:
        self.backend = backend
        self.job = job
        self.pid: int | None = None
        self.status: int | None = None
        self.status_known = False
        self.finished = False
        self.stop_at: float | None = None
        self.held: list[Entry] = []  # records of the frames of one read, handed over together

    def _hand_over(self) -> list[Entry]:
        held, self.held = self.held, []
        return held

    def kill(self, sig: int) -> None:
        if self.pid is None or self.finished:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def stop(self, grace: float) -> None:
        def escalate() -> None:
            if not self.finished:
                self.kill(signal.SIGKILL)

        self.stop_at = time.monotonic()
        self.kill(signal.SIGTERM)
        self.kill(signal.SIGCONT)  # a suspended job must run to act on its SIGTERM
        self.backend.loop.call_later(grace, escalate)

    def end(self, entries: list[Entry], event: Event, reason: BaseException | None,
            code: int | None) -> None:
        """Finish the job, after making sure (on a stop) that nothing of its group is left."""
        if self.finished:
            return
        if self.job._stop_requested and self.pid is not None:
            self._after_stop(entries, event, reason, code, time.monotonic() + 5.0)
            return
        self.finished = True
        finish(self.job, entries, event, reason=reason, exit_code=code)

    def _after_stop(self, entries: list[Entry], event: Event, reason: BaseException | None,
                    code: int | None, deadline: float) -> None:
        assert self.pid is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        if group_gone(self.pid) or time.monotonic() > deadline:
            self.finished = True
            finish(self.job, entries, event, reason=reason, exit_code=code)
            return
        self.backend.loop.call_later(0.002, lambda: self._after_stop(entries, event, reason, code, deadline))

    def broken(self, exc: BaseException) -> None:
        """Something went wrong reading this job: fail it (never hang it)."""
        self.kill(signal.SIGKILL)
        self.close()
        err = exc if isinstance(exc, WorkerError) else WorkerError(
            f"psjobs could not read the worker of Job {self.job.id}: {type(exc).__name__}: {exc}")
        if err is not exc:
            err.__cause__ = exc
        self.status_known = True
        self.end(self._hand_over(), Event.FAIL, err, None)

    def close(self) -> None:
        raise NotImplementedError


class _CallHandle(_Handle):
    """A Python callable served by a forked (or spawned) worker over a socket."""

    def __init__(self, backend: ProcessBackend, job: Job, sock: socket.socket, worker_sock: socket.socket,
                 job_frame: bytes) -> None:
        super().__init__(backend, job)
        self.sock = sock
        self.worker_sock: socket.socket | None = worker_sock
        self.reader = FrameReader()
        self.out = memoryview(job_frame)
        self.done: tuple[str, bytes | None, str | None, int | None] | None = None
        self.eof = False
        self.server_lost = False
        self.registered = False
        self.prompt: str | None = None
        self.server: _ForkServer | None = None  # where it was submitted (a new one after a death)
        self.pidfd = -1        # the worker's pidfd, from its HELLO: its exit, without the server
        self.module: str | None = None  # the target's module, for the fork server to preload
        self.exited = False
        # fd 1 and 2 of the worker (C code, child processes): their lines become records.
        r_out, self.w_out = os.pipe2(os.O_CLOEXEC)
        r_err, self.w_err = os.pipe2(os.O_CLOEXEC)
        self.pipes = {r_out: Stream.INFORMATION, r_err: Stream.ERROR}
        self.partial = {r_out: b"", r_err: b""}

    def worker_fds(self) -> list[int]:
        assert self.worker_sock is not None
        return [self.worker_sock.fileno(), self.w_out, self.w_err]

    def _close_worker_ends(self) -> None:
        if self.worker_sock is not None:
            self.worker_sock.close()
            self.worker_sock = None
        for fd in (self.w_out, self.w_err):
            if fd >= 0:
                os.close(fd)
        self.w_out = self.w_err = -1

    def on_pipe(self, mask: int) -> None:
        for fd in list(self.pipes):
            entries: list[Entry] = []
            self._read_pipe(fd, entries, final=False)
            if entries:
                deliver(self.job, entries)

    def _read_pipe(self, fd: int, entries: list[Entry], final: bool) -> None:
        stream = self.pipes[fd]
        now = time.time()
        for _ in range(64 if final else 16):
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                if not final:
                    break
                chunk = b""
            if not chunk:
                with contextlib.suppress(KeyError, ValueError, OSError):
                    self.backend.loop.sel.unregister(fd)
                del self.pipes[fd]
                rest = self.partial.pop(fd)
                if rest:
                    _lines(entries, stream, [rest], now, info=True)
                os.close(fd)
                break
            *lines, self.partial[fd] = (self.partial[fd] + chunk).split(b"\n")
            _lines(entries, stream, lines, now, info=True)

    def register(self) -> None:
        if self.sock.fileno() < 0:
            return  # closed before the loop came to it (the session is closing)
        mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.out else 0)
        sel = self.backend.loop.sel
        with sel.mutex:
            self.registered = True
            for fd in self.pipes:
                os.set_blocking(fd, False)
                sel.register(fd, selectors.EVENT_READ, self.on_pipe)
            sel.register(self.sock, mask, self.on_event)

    def on_event(self, mask: int) -> None:
        if mask & selectors.EVENT_WRITE and self.out:
            try:
                n = self.sock.send(self.out)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError:
                n, self.out = 0, memoryview(b"")
            self.out = self.out[n:]
            if not self.out:
                self.backend.loop.sel.modify(self.sock, selectors.EVENT_READ, self.on_event)
        if mask & selectors.EVENT_READ:
            frames: list[tuple[int, bytes | bytearray]] = []
            try:
                alive = self.reader.read(self.sock, frames)
            except ConnectionResetError:
                alive = False
            for kind, payload in frames:
                self.on_frame(kind, payload)
            if self.held and not self.finished:
                deliver(self.job, self._hand_over())
            if not alive:
                self.eof = True
                self.close()
                self.maybe_end()

    def on_frame(self, kind: int, payload: bytes | bytearray) -> None:
        if kind == RECORDS or kind == RECORDS_OOB:
            try:
                entries = decode_records(payload) if kind == RECORDS else decode_records_oob(payload)
            except Exception as exc:
                entries = [(Stream.ERROR, ErrorRecord(
                    f"psjobs could not unpickle records from the worker ({type(exc).__name__}: {exc}); "
                    f"they are lost, the job goes on", time.time(), "localhost", exc), time.time())]
            # Held until the read's frames are all seen: with DONE they go in the job's last
            # step, one lock and one wake-up of the waiting thread instead of two.
            self.held.extend(entries)
        elif kind == DONE:
            self.done = pickle.loads(payload)
            if self.done[0] in ("complete", "fail") and not self.job._stop_requested:
                # DONE is the worker's last word and comes after everything it wrote: the job is
                # over now. Waiting for its exit too cost ~0.5 ms a job (the kernel tears down
                # the worker's memory before it closes the socket); the fork server reaps it.
                self.eof = self.exited = True
                self.maybe_end()  # reads what fd 1 and 2 hold, then finishes the job
                self.close()
        elif kind == HELLO:
            version, pid, _python = pickle.loads(payload)
            if version != VERSION:
                raise ProtocolError(f"the worker speaks protocol {version}, this session {VERSION}; "
                                    f"install the same psjobs on both sides")
            self._started(pid)
            self._watch_exit(pid)
        elif kind == PROMPT:
            if self.held:
                deliver(self.job, self._hand_over())  # what it wrote before it asked comes first
            self.prompt = pickle.loads(payload)
            block(self.job, str(self.prompt))
        else:
            raise ProtocolError(f"unexpected frame kind {kind} from a worker")

    def on_forked(self, pid: int) -> None:
        self._close_worker_ends()
        self._started(pid)

    def _started(self, pid: int) -> None:
        """The worker exists (its HELLO or the server's word, whichever comes first)."""
        if self.pid is not None:
            return
        self.pid = pid
        with self.job.session._cond:
            self.job.pid = pid
            self.job._apply(Event.START)
        if self.job._stop_requested:  # stopped before the worker existed
            self.stop(self.backend.session.stop_grace)

    def _watch_exit(self, pid: int) -> None:
        # The worker's exit seen here, not through the fork server's report: that report waits
        # for the server, which may be busy forking a spare (measured: up to 30 ms late).
        try:
            self.pidfd = os.pidfd_open(pid)
        except (ProcessLookupError, OSError):
            self.exited = True
            return
        self.backend.loop.sel.register(self.pidfd, selectors.EVENT_READ, self.on_pidfd)

    def on_pidfd(self, mask: int) -> None:
        self._close_pidfd()
        self.exited = True
        self.maybe_end()

    def _close_pidfd(self) -> None:
        if self.pidfd >= 0:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self.backend.loop.sel.unregister(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = -1

    def on_exited(self, status: int | None) -> None:
        self.status = status
        self.status_known = True
        self.maybe_end()

    def on_server_lost(self) -> None:
        self.server_lost = True
        self.maybe_end()

    def maybe_end(self) -> None:
        if self.finished or not self.eof:
            return
        # With DONE, the worker's exit is enough; without it, wait for its status: it says why.
        if not (self.status_known or self.server_lost or (self.done is not None and self.exited)):
            return
        # What the worker printed at fd level is in the pipes now; a grandchild that keeps
        # them open does not hold the job (we take what is there and close).
        entries = self._hand_over()
        for fd in list(self.pipes):
            self._read_pipe(fd, entries, final=True)
        stopped = self.job._stop_requested
        if self.done is not None:
            name, blob, tb, code = self.done
            event = {"complete": Event.COMPLETE, "fail": Event.FAIL, "stopped": Event.STOPPED}[name]
            reason = _load_reason(blob, tb) if blob is not None else None
            if self.status_known and self.status is not None and self.status != 0 and name == "complete":
                event, reason = Event.FAIL, WorkerError(f"the worker process {self.pid} {status_text(self.status)} "
                                                        f"after it finished the job")
        else:
            code = None
            event = Event.STOPPED if stopped else Event.FAIL
            status = self.status if self.status_known else None
            reason = WorkerError(f"the worker process {self.pid} {status_text(status)} before it reported "
                                 f"the end of the job")
        self.end(entries, event, reason, code)

    def send_input(self, text: str) -> None:
        from ...worker._wire import ANSWER

        data = frame(ANSWER, pickle.dumps(text))
        self.prompt = None

        def write() -> None:
            self.out = memoryview(bytes(self.out) + data)
            if self.registered:
                self.backend.loop.sel.modify(self.sock, selectors.EVENT_READ | selectors.EVENT_WRITE,
                                             self.on_event)

        self.backend.loop.call_soon(write)
        unblock(self.job)

    def close(self) -> None:
        self.backend.handles.discard(self)
        if self.registered:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self.backend.loop.sel.unregister(self.sock)
            self.registered = False
        self.sock.close()
        self._close_pidfd()
        for fd in list(self.pipes):
            with contextlib.suppress(KeyError, ValueError, OSError):
                self.backend.loop.sel.unregister(fd)
            os.close(fd)
        self.pipes.clear()
        self._close_worker_ends()


def _load_reason(blob: bytes, tb: str | None) -> BaseException:
    try:
        reason = pickle.loads(blob)
        if not isinstance(reason, BaseException):
            raise TypeError(f"not an exception: {type(reason).__name__}")
    except Exception as exc:
        reason = RemoteError(f"(the exception could not be brought back: {exc})", "Exception")
    if tb:
        reason.__cause__ = RemoteTraceback(tb)
    return reason  # type: ignore[no-any-return]


class _CommandHandle(_Handle):
    """A command line or argv run straight from the session in its own process group."""

    def __init__(self, backend: ProcessBackend, job: Job, proc: subprocess.Popen[bytes], feed: bytes | None) -> None:
        super().__init__(backend, job)
        self.proc = proc
        self.pid = proc.pid
        self.pidfd = os.pidfd_open(proc.pid)
        assert proc.stdout is not None and proc.stderr is not None
        self.fds = {proc.stdout.fileno(): Stream.OUTPUT, proc.stderr.fileno(): Stream.ERROR}
        # Popen's file objects own the descriptors: close through them, never twice.
        self.files = {proc.stdout.fileno(): proc.stdout, proc.stderr.fileno(): proc.stderr}
        self.partial = {fd: b"" for fd in self.fds}
        self.feed = memoryview(feed) if feed else None

    def register(self) -> None:
        sel = self.backend.loop.sel
        with sel.mutex:
            for fd in self.fds:
                os.set_blocking(fd, False)
                sel.register(fd, selectors.EVENT_READ, self.on_pipe)
            sel.register(self.pidfd, selectors.EVENT_READ, self.on_exit)
            stdin = self.proc.stdin
            if stdin is not None:
                if self.feed is None:
                    stdin.close()
                else:
                    os.set_blocking(stdin.fileno(), False)
                    sel.register(stdin.fileno(), selectors.EVENT_WRITE, self.on_stdin)

    def on_stdin(self, mask: int) -> None:
        stdin = self.proc.stdin
        assert stdin is not None and self.feed is not None
        try:
            n = os.write(stdin.fileno(), self.feed[:262144])
        except BlockingIOError:
            return
        except OSError:
            n = len(self.feed)
        self.feed = self.feed[n:]
        if not self.feed:
            self.backend.loop.sel.unregister(stdin.fileno())
            stdin.close()

    def on_pipe(self, mask: int) -> None:
        # The selector hands us the callback only; find which pipe is ready.
        for fd in list(self.fds):
            self._read(fd)
        self.maybe_end()

    def _read(self, fd: int) -> None:
        stream = self.fds[fd]
        entries: list[Entry] = []
        now = time.time()
        for _ in range(16):
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                self.backend.loop.sel.unregister(fd)
                del self.fds[fd]
                rest = self.partial.pop(fd)
                if rest:
                    _lines(entries, stream, [rest], now)
                self.files.pop(fd).close()
                break
            *lines, self.partial[fd] = (self.partial[fd] + chunk).split(b"\n")
            _lines(entries, stream, lines, now)
        if entries:
            deliver(self.job, entries)

    def on_exit(self, mask: int) -> None:
        pid, status = os.waitpid(self.proc.pid, os.WNOHANG)
        if pid == 0:
            return
        self.proc.returncode = os.waitstatus_to_exitcode(status)  # we reaped it, not Popen
        self.backend.loop.sel.unregister(self.pidfd)
        os.close(self.pidfd)
        self.pidfd = -1
        self.status = status
        self.status_known = True
        self.maybe_end()

    def maybe_end(self) -> None:
        if self.finished or self.fds or not self.status_known:
            return
        assert self.status is not None
        code = os.waitstatus_to_exitcode(self.status)
        if self.job._stop_requested:
            event, reason = Event.STOPPED, None
        elif code == 0:
            event, reason = Event.COMPLETE, None
        else:
            from .._thread import _status_error

            event, reason = Event.FAIL, _status_error("the command", code)
        self._close_stdin()
        self.backend.handles.discard(self)
        self.end([], event, reason, code)

    def _close_stdin(self) -> None:
        stdin = self.proc.stdin
        if stdin is not None and not stdin.closed:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self.backend.loop.sel.unregister(stdin.fileno())
            stdin.close()

    def close(self) -> None:
        self.backend.handles.discard(self)
        sel = self.backend.loop.sel
        for fd in list(self.fds):
            with contextlib.suppress(KeyError, ValueError, OSError):
                sel.unregister(fd)
            self.files.pop(fd).close()
        self.fds.clear()
        if self.pidfd >= 0:
            with contextlib.suppress(KeyError, ValueError, OSError):
                sel.unregister(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = -1
        self._close_stdin()


def _lines(entries: list[Entry], stream: Stream, lines: list[bytes], now: float, info: bool = False) -> None:
    for raw in lines:
        text = raw.decode("utf-8", "replace")
        if text.endswith("\r"):
            text = text[:-1]
        if stream is Stream.INFORMATION:
            entries.append((Stream.INFORMATION, InformationRecord(text, now, "localhost"), now))
        elif stream is Stream.OUTPUT:
            entries.append((Stream.OUTPUT, text, now))
        else:
            entries.append((Stream.ERROR, ErrorRecord(text, now, "localhost"), now))


class _ForkServer:
    """The session's handle on its fork server process."""

    def __init__(self, backend: ProcessBackend) -> None:
        self.backend = backend
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = dict(backend.base_environ())  # every server of the session: one base for the jobs
        _find_psjobs(env, [p for p in sys.path if p and os.path.isdir(p)])
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "psjobs.worker._forkserver", str(theirs.fileno())],
                                         pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, env=env, start_new_session=True)
        finally:
            theirs.close()
        self.sock = ours
        ours.settimeout(30)
        try:
            msg = ours.recv(65536)
        except OSError as exc:
            self.proc.kill()
            self.proc.wait()
            raise WorkerError(f"the fork server did not start: {exc}") from exc
        if not msg or pickle.loads(msg)[0] != "ready":
            self.proc.wait()
            raise WorkerError(f"the fork server did not start (it exited with status {self.proc.returncode})")
        ours.settimeout(None)
        self.alive = True
        # Warm spares the server handed over (pid, our end of its socket): a job goes straight
        # to one. Threads starting jobs pop them; the loop thread appends.
        self.spares: deque[tuple[int, socket.socket]] = deque()
        backend.loop.sel.register(self.sock, selectors.EVENT_READ, self.on_message)

    def hand_to_spare(self, token: int, fds: list[int]) -> int | None:
        """Give the job to a warm spare; its pid, or None when no spare is left."""
        while True:
            try:
                pid, sock = self.spares.popleft()
            except IndexError:
                return None
            try:
                socket.send_fds(sock, [pickle.dumps(token)], fds)
            except OSError:
                continue  # that spare died: the next one, or a fork
            finally:
                sock.close()
            # Known before the loop thread can read that this spare exited (the caller holds
            # the loop's mutex): if it died with the job, the server's report has no token.
            self.backend.spare_tokens[pid] = token
            return pid

    def submit(self, token: int, fds: list[int]) -> None:
        socket.send_fds(self.sock, [pickle.dumps(("fork", token))], fds)

    def preload(self, module: str) -> None:
        self.sock.send(pickle.dumps(("preload", module)))

    def on_message(self, mask: int) -> None:
        while True:
            try:
                msg, fds = _recv_fds_now(self.sock)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                msg, fds = b"", []
            if not msg:
                for fd in fds:
                    os.close(fd)
                self.lost()
                return
            what, token, *rest = pickle.loads(msg)
            if what == "spare" and fds and self.alive:
                self.spares.append((token, socket.socket(fileno=fds.pop(0))))
            for fd in fds:
                os.close(fd)
            if what == "spare":
                continue
            if what == "exited":
                # A job handed to a spare that died before it said "taken" comes with no token.
                pid = rest[0]
                by_pid = self.backend.spare_tokens.pop(pid, None)
                token = by_pid if token is None else token
            handle = self.backend.pending_calls.get(token)
            if handle is None:
                continue
            if what == "forked":
                handle.on_forked(rest[0])
            elif what == "exited":
                self.backend.pending_calls.pop(token, None)
                handle.on_exited(rest[1])

    def drop_spares(self) -> None:
        """Close our ends of the spares: a spare whose server is gone then ends by itself."""
        while self.spares:
            _, sock = self.spares.popleft()
            sock.close()

    def lost(self) -> None:
        if not self.alive:
            return
        self.alive = False
        with contextlib.suppress(KeyError, ValueError, OSError):
            self.backend.loop.sel.unregister(self.sock)
        self.sock.close()
        self.drop_spares()
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=1)
        self.backend.server_lost(self)

    def close(self) -> None:
        self.alive = False
        self.drop_spares()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _recv_fds_now(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One message and the descriptors it carries, without blocking (socket.recv_fds drops its
    flags argument before Python 3.12)."""
    msg, ancdata, _, _ = sock.recvmsg(65536, socket.CMSG_LEN(4 * 4), socket.MSG_DONTWAIT)
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    return msg, list(fds)


def _find_psjobs(env: dict[str, str], more: list[str]) -> None:
    """Let a new interpreter import psjobs (and the caller's modules); it puts the caller's own
    PYTHONPATH back at once (``_worker.restore_pythonpath``), so jobs see the environment unchanged."""
    env[CALLER_PYTHONPATH] = "=" + env["PYTHONPATH"] if "PYTHONPATH" in env else ""
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))), *more])


def _environ_now() -> Any:
    # os.environ's own bytes mapping: comparing it costs ~1 us where dict(os.environ) cost ~50 us.
    return getattr(os.environ, "_data", None)


class ProcessBackend:
    """Runs BackgroundJob children: callables in forked workers, commands straight from here."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.loop = IOLoop()
        self.pending_calls: dict[int, _CallHandle] = {}  # token -> handle, until the worker exited
        self.spare_tokens: dict[int, int] = {}           # pid of a spare given a job -> its token
        self.spawned: dict[int, subprocess.Popen[bytes]] = {}  # workers started as fresh interpreters
        self.handles: set[_Handle] = set()                # every handle whose descriptors are open
        self._server: _ForkServer | None = None
        self._server_lock = threading.Lock()
        self._preloaded: set[tuple[int, str]] = set()  # (server pid, module) asked for
        self._closed = False
        self.start_method = os.environ.get("PSJOBS_START_METHOD", "fork")
        self._base: dict[str, str] | None = None  # the environment the fork servers start with
        self._base_data: Any = None

    def base_environ(self) -> dict[str, str]:
        """The environment of every fork server of this session: the caller's at the first one.

        A server restarted after a death gets the same one, so a job compared against it at its
        start is still right if it is handed to the new server.
        """
        if self._base is None:
            self._base = dict(os.environ)
            data = _environ_now()
            self._base_data = dict(data) if data is not None else None
        return self._base

    def _job_environ(self, spec: JobSpec) -> dict[str, str] | None:
        """What the worker must set: None when it already has the caller's environment."""
        if spec.env is not None:
            return spec.env
        if self.start_method == "spawn":
            return None  # a fresh interpreter inherits the caller's environment as it is now
        if self._base is None:
            self.base_environ()  # the first server is about to start with this environment
            return None
        data = _environ_now()
        if data is not None and data == self._base_data:
            return None
        return dict(os.environ)

    def prepare(self, spec: JobSpec) -> None:
        from ...core._spec import CALL

        if spec.kind != CALL:
            return
        try:
            spec.payload = spec.pickled_call()
        except Exception as exc:
            raise TypeError(f"start_job: the callable {spec.command!r} or its arguments cannot be sent to "
                            f"another process ({type(exc).__name__}: {exc}); pass picklable values, or use "
                            f"start_thread_job to share objects") from exc

    # --- starting ----------------------------------------------------------------------------
    def start(self, job: Job, spec: JobSpec) -> None:
        from ...core._spec import CALL

        if spec.kind == CALL:
            self._start_call(job, spec)
        else:
            self._start_command(job, spec)

    def _start_call(self, job: Job, spec: JobSpec) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for s in (ours, theirs):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCK_BUF)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCK_BUF)
        meta = {"cwd": spec.cwd, "env": self._job_environ(spec), "sys_path": list(sys.path),
                "call": spec.payload}
        job_frame = frame(JOB, pickle.dumps(meta, protocol=5))
        ours.setblocking(False)
        try:
            sent = ours.send(job_frame)  # usually all of it: the loop writes any rest
        except BlockingIOError:
            sent = 0
        handle = _CallHandle(self, job, ours, theirs, job_frame[sent:])
        handle.module = getattr(spec.target, "__module__", None)
        job.backend_data = handle
        self.handles.add(handle)
        self.pending_calls[job.id] = handle
        handle.register()  # here, not on the loop thread: see _SharedSelector
        self._submit(handle)

    def _submit(self, handle: _CallHandle) -> None:
        assert handle.worker_sock is not None
        if self.start_method == "spawn":
            self._spawn(handle)
            return
        for _attempt in range(3):
            with self._server_lock:
                if self._closed:
                    raise WorkerError("the session is closing; no new process job can start")
                server = self._server
                if server is None or not server.alive:
                    try:
                        server = self._server = _ForkServer(self)
                    except (OSError, WorkerError) as exc:
                        # Forking cannot serve here: a fresh interpreter per job still works.
                        print(f"psjobs: no fork server ({exc}); starting process jobs as fresh "
                              f"interpreters", file=sys.stderr)
                        self.start_method = "spawn"
                        self._spawn(handle)
                        return
            try:
                handle.server = server
                token = handle.job.id
                with self.loop.sel.mutex:  # no handler runs meanwhile (see hand_to_spare)
                    pid = server.hand_to_spare(token, handle.worker_fds())
                    if pid is not None:
                        handle.on_forked(pid)
                if pid is None:
                    server.submit(token, handle.worker_fds())
                self._ask_preload(server, handle.module)
                return
            except OSError:
                server.alive = False
                self.loop.call_soon(server.lost)
        raise WorkerError("the fork server keeps dying; process jobs cannot start")

    def _ask_preload(self, server: _ForkServer, module: str | None) -> None:
        if not module or module == "__main__" or module.startswith("psjobs"):
            return  # __main__'s functions travel by value; psjobs is loaded already
        key = (server.proc.pid, module)
        if key not in self._preloaded:
            self._preloaded.add(key)
            server.preload(module)

    def _spawn(self, handle: _CallHandle) -> None:
        assert handle.worker_sock is not None
        fd = handle.worker_sock.fileno()
        env = dict(os.environ)
        _find_psjobs(env, [env.get("PYTHONPATH", "")])
        proc = subprocess.Popen([sys.executable, "-m", "psjobs.worker._process_worker", str(fd)], pass_fds=[fd],
                                stdin=subprocess.DEVNULL, stdout=handle.w_out, stderr=handle.w_err,
                                env=env, start_new_session=True)
        pidfd = os.pidfd_open(proc.pid)
        self.spawned[proc.pid] = proc

        def on_exit(mask: int) -> None:
            pid, status = os.waitpid(proc.pid, os.WNOHANG)
            if pid == 0:
                return
            proc.returncode = os.waitstatus_to_exitcode(status)
            self.spawned.pop(proc.pid, None)
            self.loop.sel.unregister(pidfd)
            os.close(pidfd)
            self.pending_calls.pop(handle.job.id, None)
            handle.on_exited(status)

        def register() -> None:
            self.loop.sel.register(pidfd, selectors.EVENT_READ, on_exit)

        self.loop.call_soon(register)
        self.loop.call_soon(lambda: handle.on_forked(proc.pid))

    def server_lost(self, server: _ForkServer) -> None:
        """The fork server died: jobs it had not forked yet go to a new one; the others finish."""
        for handle in list(self.pending_calls.values()):
            if handle.server is not server:
                continue  # already sent to the new server
            if handle.pid is None and handle.worker_sock is not None:
                threading.Thread(target=self._resubmit, args=(handle,), daemon=True).start()
            elif handle.pid is not None:
                self.pending_calls.pop(handle.job.id, None)
                self.spare_tokens.pop(handle.pid, None)
                handle.on_server_lost()

    def _resubmit(self, handle: _CallHandle) -> None:
        try:
            self._submit(handle)
        except Exception as exc:
            err = exc  # the name of an except clause does not outlive it
            self.loop.call_soon(lambda: handle.broken(err))

    def _start_command(self, job: Job, spec: JobSpec) -> None:
        feed = None
        if spec.input is not None:
            feed = b"".join(f"{item}\n".encode() for item in spec.input)
        try:
            proc = subprocess.Popen(spec.argv, stdin=subprocess.PIPE if feed is not None else subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=spec.cwd, env=spec.env,
                                    start_new_session=True)
        except OSError as exc:
            report(job, Event.FAIL, reason=exc)
            return
        handle = _CommandHandle(self, job, proc, feed)
        job.backend_data = handle
        self.handles.add(handle)
        with self.session._cond:
            job.pid = proc.pid
            job._apply(Event.START)
        handle.register()

    # --- stopping and the rest -----------------------------------------------------------------
    def stop(self, job: Job, grace: float) -> None:
        handle = job.backend_data
        if isinstance(handle, _Handle):
            self.loop.call_soon(lambda: handle.stop(grace))

    def forget(self, job: Job) -> None:
        self.pending_calls.pop(job.id, None)

    def suspend(self, job: Job) -> None:
        """SIGSTOP to the whole process group: nothing of the job runs until resume."""
        handle = job.backend_data
        report(job, Event.SUSPEND)
        if isinstance(handle, _Handle):
            handle.kill(signal.SIGSTOP)
        report(job, Event.SUSPENDED)

    def resume(self, job: Job) -> None:
        handle = job.backend_data
        if isinstance(handle, _Handle):
            handle.kill(signal.SIGCONT)
        report(job, Event.RESUME)

    def send_input(self, job: Job, text: str) -> None:
        handle = job.backend_data
        if isinstance(handle, _CallHandle):
            handle.send_input(text)
        else:
            unblock(job)

    def close(self) -> None:
        with self._server_lock:
            self._closed = True
            server, self._server = self._server, None
        if server is not None:
            server.close()
        self.loop.close()
        for handle in list(self.handles):
            handle.close()
        # Spawned workers a job was done with may still be exiting; the rest go, as with a fork
        # server (the session stopped its jobs before it came here).
        for proc in list(self.spawned.values()):
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        self.spawned.clear()
