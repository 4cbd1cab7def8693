"""Thread jobs: the work runs in a thread of the session's process.

::

    start_thread_job --> queue (NotStarted) --throttle slot--> worker thread
    worker thread: sets the job's emitter, runs init + target, write_*() append to the journal
    stop_job --> stop flag (stop_requested()) + JobStopped raised in the thread
                 (PyThreadState_SetAsyncExc) + SIGTERM to a command's process group

Workers are reused while jobs keep coming and end after a short idle time; ``close`` ends them.
Output is handed over by reference (no copy, no pickling), as PowerShell's thread jobs do.
"""

from __future__ import annotations

import ctypes
import inspect
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from sys import _current_exceptions
from typing import TYPE_CHECKING, Any

from .._errors import ExitStatusError, JobStateError, JobStopped, exit_failure
from .._inside import _current, emit_line, flush_lines, install_routers
from .._records import Stream
from ..core import CALL, Backend, JobPort, JobSpec, Outcome

if TYPE_CHECKING:
    from ..core import Session

_LINGER = 2.0  # seconds an idle worker thread waits for another job before it ends
_set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc


def _inject(data: _Data) -> None:
    """Raise JobStopped in the job's thread (with data.lock held, in user code)."""
    assert data.thread_id is not None
    _set_async_exc(ctypes.c_ulong(data.thread_id), ctypes.py_object(JobStopped))
    data.injected = True
    data.injected_at = time.monotonic()
    _stopping[data.thread_id] = data
    if sys.unraisablehook is not _unraisable:  # (again, if someone replaced it since)
        global _previous_hook
        _previous_hook = sys.unraisablehook
        sys.unraisablehook = _unraisable


_stopping: dict[int, _Data] = {}  # thread id -> the job a stop was raised in
_previous_hook = sys.unraisablehook


def _unraisable(unraisable: Any) -> None:
    """A stop raised while the thread ran a garbage collector callback or a ``__del__`` is
    printed and dropped by Python: raise it again at once (it is not an error to report)."""
    if isinstance(unraisable.exc_value, JobStopped):
        data = _stopping.get(threading.get_ident())
        if data is not None:
            with data.lock:
                if data.in_user:
                    _inject(data)
            return
    _previous_hook(unraisable)


class _Data:
    """What the thread backend keeps per job."""

    backend_kind = "thread"
    __slots__ = ("in_user", "injected", "injected_at", "lock", "proc", "spec", "stop", "thread_id")

    def __init__(self, spec: JobSpec) -> None:
        self.spec = spec
        self.lock = threading.Lock()
        self.stop = False
        self.in_user = False
        self.injected = False
        self.injected_at = 0.0
        self.thread_id: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None


class _Emitter:
    """Appends records straight to the job's journal (the job is in this process)."""

    computer_name: str | None = None

    def __init__(self, port: JobPort, data: _Data) -> None:
        self.port = port
        self.data = data
        # Safe where a stop is raised asynchronously in this thread: see JobPort's lock.
        self.record = port.record
        self.line_buffers: dict[int, str] = {}

    def emit(self, stream: int, payload: Any, t: float | None = None) -> None:
        self.record((stream, payload, time.time() if t is None else t))

    def stop_requested(self) -> bool:
        return self.data.stop

    def input(self) -> Iterator[Any]:
        src = self.data.spec.input
        return iter(()) if src is None else iter(src)

    def read_host(self, prompt: str) -> str:
        raise JobStateError(f"read_host: {self.port.describe()} is a thread job, which cannot "
                            f"ask for input; run it with start_job to be able to answer it")


class ThreadBackend(Backend):
    """Runs ThreadJobs in worker threads of the session's process, a throttled number at once."""

    def __init__(self, session: Session) -> None:
        super().__init__(session)
        self._cond = threading.Condition()
        self._queue: deque[JobPort] = deque()   # started, waiting for a throttle slot (NotStarted)
        self._ready: deque[JobPort] = deque()   # admitted, waiting for a worker thread
        self._running = 0                   # admitted jobs
        self._idle = 0
        self._threads: set[threading.Thread] = set()
        self._closing = False
        self._seq = 0

    # --- dispatch ------------------------------------------------------------------------
    def start(self, ports: list[JobPort], spec: JobSpec) -> None:
        for port in ports:
            port.data = _Data(spec)
        with self._cond:
            self._queue.extend(ports)
            self._admit_locked()

    def _admit_locked(self) -> None:
        limit = self.session.thread_throttle_limit
        while self._queue and self._running < limit:
            port = self._queue.popleft()
            if port.finished:
                continue  # stopped (or removed) while it waited
            self._running += 1
            self._ready.append(port)
        missing = len(self._ready) - self._idle
        for _ in range(max(0, missing)):
            self._seq += 1
            thread = threading.Thread(target=self._worker, name=f"psjobs-thread-{self._seq}", daemon=True)
            self._threads.add(thread)
            self._idle += 1
            thread.start()
        if self._ready:
            self._cond.notify(len(self._ready))

    def _worker(self) -> None:
        me = threading.current_thread()
        try:
            while True:
                with self._cond:
                    deadline = time.monotonic() + _LINGER
                    while not self._ready:
                        remaining = deadline - time.monotonic()
                        if self._closing or remaining <= 0:
                            self._idle -= 1
                            return
                        self._cond.wait(remaining)
                    port = self._ready.popleft()
                    self._idle -= 1
                try:
                    self._run(port)
                finally:
                    with self._cond:
                        self._running -= 1
                        self._idle += 1
                        self._admit_locked()
        finally:
            with self._cond:
                self._threads.discard(me)

    # --- running -------------------------------------------------------------------------
    def _run(self, port: JobPort) -> None:
        data: _Data | None = port.data
        if data is None or port.finished:
            return  # stopped, or stopped and removed, while it waited for this thread
        data.thread_id = threading.get_ident()
        emitter = _Emitter(port, data)
        token = _current.set(emitter)
        code: int | None
        ended, code = "completed", None  # how it ended: an Outcome's kind
        reason: BaseException | None = None
        try:
            if not port.started():
                return  # stopped between admission and now
            install_routers()
            try:
                with data.lock:
                    data.in_user = True
                if data.stop:
                    raise JobStopped()
                code = self._call(data, emitter)
            finally:
                self._leave_user(data)
        except JobStopped:
            self._leave_user(data)
            ended = "stopped"
        except SystemExit as exc:
            code, failure = exit_failure(exc)
            if failure is not None:
                ended, reason = "failed", failure
        except BaseException as exc:
            ended, reason = "failed", exc
            if isinstance(exc, ExitStatusError):
                code = exc.status
        finally:
            flush_lines(emitter)
            _current.reset(token)
        if isinstance(reason, ExitStatusError) and data.stop:
            ended = "stopped"  # a command's status after a stop is the stop's doing, not a failure
        port.ended(Outcome(ended, reason if ended == "failed" else None, code))
        port.data = None  # the spec (target, arguments, input) is not needed any more

    @staticmethod
    def _leave_user(data: _Data) -> None:
        with data.lock:
            data.in_user = False
            if data.thread_id is not None:
                _stopping.pop(data.thread_id, None)
            if data.injected and data.thread_id is not None:
                # A stop raised at the very end would land in psjobs' own code: take it back.
                _set_async_exc(ctypes.c_ulong(data.thread_id), None)
                data.injected = False

    def _call(self, data: _Data, emitter: _Emitter) -> int | None:
        spec = data.spec
        if spec.kind != CALL:
            return self._command(data, emitter)
        if spec.init is not None:
            spec.init()
        result = spec.target(*spec.args, **spec.kwargs)
        if inspect.isgenerator(result):
            for item in result:
                emitter.emit(Stream.OUTPUT, item)
        elif result is not None:
            emitter.emit(Stream.OUTPUT, result)
        return None

    def _command(self, data: _Data, emitter: _Emitter) -> int:
        spec = data.spec
        feed = b"".join(f"{item}\n".encode() for item in spec.input) if spec.input is not None else None
        proc = subprocess.Popen(spec.argv, stdin=subprocess.PIPE if feed is not None else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=spec.cwd,
                                start_new_session=True)
        data.proc = proc
        status = run_command(proc, feed, emitter, self.session.stop_grace)
        if status != 0:
            raise _status_error("the command", status)
        return status

    # --- stopping ------------------------------------------------------------------------
    def stop(self, port: JobPort, grace: float) -> None:
        data: _Data | None = port.data
        if data is None:
            return  # it just ended
        data.stop = True
        with data.lock:
            if data.in_user and not data.injected and data.thread_id is not None:
                _inject(data)
        proc = data.proc
        if proc is not None and proc.returncode is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass

    def nudge(self, port: JobPort) -> None:
        """Raise a stop again if the first one was lost, which Python allows: raised while the
        thread ran a garbage collector callback or a ``__del__``, it is printed and ignored
        (seen: in WeakSet's callback). Not while the thread handles it (cleaning up in a
        ``finally``, even in a nested exception), and not sooner than 0.25 s after the last."""
        data: _Data | None = port.data
        if data is None or not data.stop or data.thread_id is None:
            return
        if time.monotonic() - data.injected_at < 0.25 or _handling_stop(data.thread_id):
            return
        with data.lock:
            if data.in_user:
                _inject(data)

    def forget(self, port: JobPort) -> None:
        with self._cond:
            try:
                self._queue.remove(port)
            except ValueError:
                pass

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            threads = list(self._threads)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(timeout=0.5)


def _handling_stop(thread_id: int) -> bool:
    """Whether that thread is handling a JobStopped, or an exception raised while it did."""
    exc: Any = _current_exceptions().get(thread_id)  # CPython's; to _compat with the thread stopper
    if isinstance(exc, tuple):  # Python < 3.12: (type, value, traceback)
        exc = exc[1]
    while exc is not None:
        if isinstance(exc, JobStopped):
            return True
        exc = exc.__context__
    return False


def run_command(proc: subprocess.Popen[bytes], feed: bytes | None, emitter: Any, grace: float) -> int:
    """Run a started command in this thread: its lines to the job, its group killed on a stop."""
    try:
        _pump(proc, feed, emitter)
        return proc.wait()
    except JobStopped:
        _kill_group(proc, grace)
        raise
    finally:
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def _status_error(what: str, status: int) -> ExitStatusError:
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        return ExitStatusError(f"{what} was killed by {name}", status)
    return ExitStatusError(f"{what} exited with status {status}", status)


def _kill_group(proc: subprocess.Popen[bytes], grace: float) -> None:
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(wait)
            break
        except subprocess.TimeoutExpired:
            continue
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # what the leader left behind in its group
    except (ProcessLookupError, PermissionError):
        pass


def _pump(proc: subprocess.Popen[bytes], feed: bytes | None, emitter: _Emitter) -> None:
    """Stream a command's stdout lines to output and stderr lines to errors, feeding its stdin."""
    sel = selectors.DefaultSelector()
    assert proc.stdout is not None and proc.stderr is not None
    partial = {proc.stdout.fileno(): b"", proc.stderr.fileno(): b""}
    streams = {proc.stdout.fileno(): Stream.OUTPUT, proc.stderr.fileno(): Stream.ERROR}
    sel.register(proc.stdout.fileno(), selectors.EVENT_READ)
    sel.register(proc.stderr.fileno(), selectors.EVENT_READ)
    view = memoryview(feed) if feed else None
    if proc.stdin is not None:
        if view is None:
            proc.stdin.close()
        else:
            os.set_blocking(proc.stdin.fileno(), False)
            sel.register(proc.stdin.fileno(), selectors.EVENT_WRITE)
    try:
        while sel.get_map():
            for key, _ in sel.select(timeout=0.05):  # short, so a stop lands promptly
                fd = key.fd
                if proc.stdin is not None and not proc.stdin.closed and fd == proc.stdin.fileno():
                    assert view is not None
                    try:
                        n = os.write(fd, view[:65536])
                    except BrokenPipeError:
                        n = len(view)
                    view = view[n:]
                    if not view:
                        sel.unregister(fd)
                        proc.stdin.close()
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    sel.unregister(fd)
                    if partial[fd]:
                        _emit_lines(emitter, streams[fd], [partial[fd]])
                    continue
                *lines, partial[fd] = (partial[fd] + chunk).split(b"\n")
                _emit_lines(emitter, streams[fd], lines)
    finally:
        sel.close()


def _emit_lines(emitter: _Emitter, stream: Stream, lines: list[bytes]) -> None:
    for raw in lines:
        line = raw.decode("utf-8", "replace")
        if line.endswith("\r"):
            line = line[:-1]
        if stream is Stream.OUTPUT:
            emitter.emit(Stream.OUTPUT, line)
        else:
            emit_line(emitter, Stream.ERROR, line)
