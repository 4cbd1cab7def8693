"""Thread jobs: the work runs in a thread of the session's process.

::

    start_thread_job --> queue (NotStarted, "waiting for a thread slot") --throttle slot--> worker thread
    worker thread: sets the job's emitter, runs init + target, write_*() append to the journal
    worker thread: worker._runner.run_guarded classifies the end, worker._thread_stop is the gate
    stop_job --> stop flag (stop_requested()) + JobStopped raised in the thread
                 (worker._thread_stop) + SIGTERM to a command's process group

Workers are reused while jobs keep coming and end after a short idle time; ``close`` ends them.
Output is handed over by reference (no copy, no pickling), as PowerShell's thread jobs do.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .._errors import JobStateError, JobStopped
from .._inside import bind, bind_job_id, flush_lines, install_routers, unbind, unbind_job_id
from .._records import Stream
from ..core import CALL, Backend, Entry, JobPort, JobSpec, Outcome, wait_free
from ..worker._outcome import status_error
from ..worker._procs import run_command
from ..worker._runner import STOPPED, Ended, call, run_guarded
from ..worker._thread_stop import ThreadStopper

if TYPE_CHECKING:
    from ..core import Session

_OUTPUT = Stream.OUTPUT
_LINGER = 2.0  # seconds an idle worker thread waits for another job before it ends


class _Data(ThreadStopper):
    """What the thread backend keeps per job: its stop state (also the runner's gate), its spec
    and its command's process. One object, not three: a job queued behind the throttle holds it,
    and each object more per job showed in starting 10,000 of them (the collector walks them)."""

    backend_kind = "thread"
    __slots__ = ("asked_at", "handled_at", "proc", "spec")

    def __init__(self, spec: JobSpec) -> None:
        super().__init__()
        self.spec = spec
        self.proc: subprocess.Popen[bytes] | None = None
        self.asked_at = 0.0    # monotonic time of the first stop request (see _Emitter._overdue)
        self.handled_at = 0.0  # ...and of the first write while the thread handled a stop


class _Emitter:
    """Appends records straight to the job's journal (the job is in this process)."""

    computer_name: str | None = None

    def __init__(self, port: JobPort, data: _Data, backend: ThreadBackend) -> None:
        self.port = port
        self.data = data
        self.backend = backend
        # Safe where a stop is raised asynchronously in this thread: see JobPort's lock.
        self.record = port.record
        self.line_buffers: dict[int, str] = {}

    def emit(self, stream: int, payload: Any, t: float | None = None) -> None:
        data = self.data
        if data.stop:
            self._stop_here(data)
        self.record((stream, payload, time.time() if t is None else t))

    def last(self, value: Any) -> list[Entry]:
        """The value the call returned, as the output record that goes with the job's end (one
        trip through the session lock, not two); a write like any other for a stop."""
        data = self.data
        if data.stop:
            self._stop_here(data)
        return [(_OUTPUT, value, time.time())]

    def _stop_here(self, data: _Data) -> None:
        if data.take_lost() or self.port.finished or self.backend.closing or self._overdue(data):
            # Python dropped the stop raised (inside a __del__ or a GC callback: worker/_thread_stop
            # marks it lost), or the one asked for half a grace period ago has not ended the work
            # (lost unseen: someone replaced the hook, or code swallowed it and loops in its
            # handler; or none was raised), or the job was declared Stopped, or its session closed:
            # end the work at this write, rather than let it run on unseen.
            data.handled_at = time.monotonic()  # the handler this starts: see _overdue
            raise JobStopped()

    def _overdue(self, data: _Data) -> bool:
        """Whether a write of this job, asked to stop, comes too late (issue 13).

        Outside a handler: half a grace period after the request. Counted from the request, not
        from the last raise (nudge raises again every 0.25 s, which kept this from ever firing).

        In code that handles the stop (a finally block, an except that swallowed it): half a
        grace period from its first write there, but not past three quarters of the grace period
        from the request, so that the job ends within stop_job's wait (the grace period alone,
        API.md 5) even when this write's own raise started the handler half a grace period after
        the request (with half a period from there, such a job ended just past the wait: issue
        11's CI run). Yet a quarter of a period at least: a stop that landed late (the process
        stalled, which stop_job does not count) still lets its cleanup write.
        """
        now = time.monotonic()
        grace = self.backend.session.stop_grace
        if _handling_stop():
            if not data.handled_at:
                data.handled_at = now
            first = data.handled_at
            end = min(first + grace / 2, max(data.asked_at + grace * 0.75, first + grace / 4))
            return now > end
        return now - data.asked_at > grace / 2

    def stop_requested(self) -> bool:
        return self.data.stop

    def input(self) -> Iterator[Any]:
        src = self.data.spec.input
        return iter(()) if src is None else iter(src)

    def read_host(self, prompt: str) -> str:
        raise JobStateError(f"read_host: {self.port.describe()} is a thread job, which cannot "
                            f"ask for input; run it with start_job to be able to answer it")


def _handling_stop() -> bool:
    """Whether this thread runs the handler or the finally block of a JobStopped (or of an
    exception raised while it did)."""
    exc = sys.exc_info()[1]
    while exc is not None:
        if isinstance(exc, JobStopped):
            return True
        exc = exc.__context__
    return False


class ThreadBackend(Backend):
    """Runs ThreadJobs in worker threads of the session's process, a throttled number at once."""

    # No slack past the grace period (API.md 5: a thread stuck where Python cannot interrupt it
    # keeps stop_job waiting "only for the session's stop grace period"). The stop is raised at
    # once, not at the end of the grace period, so Python code has the whole period to let it land
    # and run its finally blocks; a process's slack is for reaping what was killed at its end.
    stop_slack = 0.0

    def __init__(self, session: Session) -> None:
        super().__init__(session)
        # Workers wait on a SimpleQueue, not a Condition: its put and get are C code, where
        # Condition.notify/wait and their ``with`` blocks are Python (~300 of a thread job's 2,500
        # bytecodes). The lock (a plain one, also C) guards the counts and the throttle queue.
        self._lock = threading.Lock()
        self._queue: deque[JobPort] = deque()   # started, waiting for a throttle slot (NotStarted)
        self._ready: queue.SimpleQueue[JobPort | None] = queue.SimpleQueue()  # admitted; None ends a worker
        self._pending = 0                   # ports put in _ready and not yet taken
        self._running = 0                   # admitted jobs
        self._idle = 0                      # worker threads waiting on _ready (or about to)
        self._threads: set[threading.Thread] = set()
        self._closing = False
        self._seq = 0

    # --- dispatch ------------------------------------------------------------------------
    def start(self, ports: list[JobPort], spec: JobSpec) -> None:
        for port in ports:
            port.data = _Data(spec)
        with self._lock:
            told = len(self._queue)  # every port queued before this start was told why it waits
            self._queue.extend(ports)
            self._admit_locked(told)
            if self._queue:  # the last of these ports wait for a slot: say so (what a get_job shows)
                why = f"waiting for a thread slot (thread_throttle_limit={self.session.thread_throttle_limit})"
                for port in ports[-len(self._queue):]:
                    if not port.finished:  # stopped by another thread since its registration: no wait
                        port.waiting(why)

    def _admit_locked(self, told: int = 1 << 62) -> None:
        # ``told``: how many ports at the head of the queue have a status message to take back
        # (all of them but the ones a start is queueing: a job that never waited costs no store).
        limit = self.session.thread_throttle_limit
        while self._queue and self._running < limit:
            port = self._queue.popleft()
            if told:
                told -= 1
                port.waiting("")
            if port.finished:
                continue  # stopped (or removed) while it waited
            self._running += 1
            self._pending += 1
            self._ready.put(port)
        for _ in range(self._pending - self._idle):
            self._seq += 1
            thread = threading.Thread(target=self._worker, name=f"psjobs-thread-{self._seq}", daemon=True)
            self._threads.add(thread)
            self._idle += 1
            thread.start()

    def _worker(self) -> None:
        me = threading.current_thread()
        lock, ready = self._lock, self._ready
        try:
            while True:
                try:
                    port = ready.get(timeout=_LINGER)
                except queue.Empty:
                    with lock:
                        if self._pending and not self._closing:
                            continue  # put just now, and counted on this thread being idle
                        self._idle -= 1
                        return
                with lock:
                    self._idle -= 1
                    if port is None:
                        return  # close
                    self._pending -= 1
                while port is not None:
                    ran = False
                    try:
                        self._run(port)
                        ran = True
                    finally:
                        # The next admitted job, taken in the same trip through the lock that
                        # counts this one's end: one trip a job, not two (see _run's keep_value).
                        # None, put by close, is never there while _closing is False.
                        wait_free(lock)  # the convoy (core/_port); this thread is outside the job's code
                        with lock:
                            self._running -= 1
                            self._idle += 1
                            self._admit_locked()
                            port = None
                            if ran and self._pending and not self._closing:
                                try:
                                    port = ready.get_nowait()
                                except queue.Empty:
                                    pass  # an idle worker woken by the put took it
                                else:
                                    self._idle -= 1
                                    self._pending -= 1
        finally:
            with lock:
                self._threads.discard(me)

    @property
    def closing(self) -> bool:
        """True once the session closes: a job whose stop was lost ends at its next write."""
        return self._closing

    # --- running -------------------------------------------------------------------------
    def _run(self, port: JobPort) -> None:
        data: _Data | None = port.data
        if data is None or port.finished:
            return  # stopped, or stopped and removed, while it waited for this thread
        emitter = _Emitter(port, data, self)
        token = bind(emitter)
        job_token = bind_job_id(port.job_id)
        tail: list[Entry] = []
        try:
            try:
                if not port.started(own_thread=True):  # outside the gate: no stop raised here
                    return  # stopped between admission and now
                install_routers()
                spec = data.spec
                if spec.kind == CALL:
                    # The value comes back (keep_value) and goes with the end: each trip through
                    # the session lock is a chance for the GIL and that lock to be handed from
                    # thread to thread in turn (bench/FINDINGS.md, the convoy).
                    ended = run_guarded(lambda: call(spec.target, spec.args, spec.kwargs, spec.init, emitter,
                                                     keep_value=True), data)
                    if ended.value is not None and any(emitter.line_buffers.values()):
                        # a line printed without its newline comes after the value, as from a
                        # process job (flush_lines, below)
                        emitter.emit(_OUTPUT, ended.value)
                        ended.value = None
                else:
                    ended = run_guarded(lambda: self._command(data, emitter), data, status=True)
            finally:
                try:
                    flush_lines(emitter)  # a write, so it may end the job (_Emitter.emit's fallback)
                finally:
                    unbind_job_id(job_token)
                    unbind(token)
            if ended.value is not None:
                tail = emitter.last(ended.value)
        except JobStopped:
            # A stop that came out of the runner itself (raised in its own epilogue, or by the last
            # line's write): the job did stop. Before this, such a stop killed this thread and the
            # job stayed Stopping for good (issue 13: a tight write loop stopped 100 times, full runs).
            data.leave()
            ended, tail = Ended(STOPPED), []
        port.ended(Outcome.named(ended.event, ended.reason, ended.code), tail, own_thread=True)  # gate left
        if port.data is data:  # not a retry's new run (retries=N starts the job again at once)
            port.data = None  # the spec (target, arguments, input) is not needed any more

    def _command(self, data: _Data, emitter: _Emitter) -> int:
        spec = data.spec
        feed = b"".join(f"{item}\n".encode() for item in spec.input) if spec.input is not None else None
        proc = subprocess.Popen(spec.argv, stdin=subprocess.PIPE if feed is not None else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=spec.cwd,
                                start_new_session=True, umask=spec.options.get("umask", -1))
        data.proc = proc
        status = run_command(proc, feed, emitter, self.session.stop_grace, spec.options.get("output_errors", "replace"))
        if status != 0:
            raise status_error("the command", status)
        return status

    # --- stopping ------------------------------------------------------------------------
    def stop(self, port: JobPort, grace: float) -> None:
        data: _Data | None = port.data
        if data is None:
            return  # it just ended
        if not data.stop:
            data.asked_at = time.monotonic()
        data.request()
        proc = data.proc
        if proc is not None and proc.returncode is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass

    def nudge(self, port: JobPort) -> None:
        """Raise a stop again if the first one was lost (see ThreadStopper.nudge)."""
        data: _Data | None = port.data
        if data is not None:
            data.nudge()

    def forget(self, port: JobPort) -> None:
        # Most jobs forgotten here were admitted long ago and the queue is empty: an empty deque
        # cannot hold the port, and a job is only queued by a ``start`` that returned before its
        # removal, so the test needs no lock. A missed ``deque.remove`` would also format the
        # port's repr into its ValueError (issue 11's A/B: 6 calls a job).
        if not self._queue:
            return
        with self._lock:
            if port in self._queue:
                self._queue.remove(port)

    def close(self) -> None:
        with self._lock:
            self._closing = True
            threads = list(self._threads)
            for _ in threads:
                self._ready.put(None)  # one each, after the jobs already admitted
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(timeout=0.5)

