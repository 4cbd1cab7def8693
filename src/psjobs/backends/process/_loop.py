"""The I/O loop of process jobs: one thread per session, a selector shared with the threads that start jobs.

::

    starting thread --register fds (under the selector's mutex)--> _SharedSelector <-- select -- loop thread
    loop thread --> handler(mask) of each ready fd (a job's socket, pipes, pidfd; the fork server)
    call_soon --> wake pipe --> the loop runs them between selects
    call_later --> the timer heap (a lock); the wake pipe only if due before the loop's next wake-up
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import math
import os
import select
import selectors
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from ..._errors import WorkerError

SOCK_BUF = 1 << 20  # 1 MiB socket buffers: large values cross in few syscalls


class _SharedSelector:
    """The loop's epoll, which a thread starting a job may register with directly.

    Registering from the loop thread (call_soon) woke it on every job start, and that wake-up
    and the GIL hand-off that follows cost ~0.5 ms a job (measured: 2.1 -> 1.4 ms start to
    result). epoll itself is thread-safe; ``mutex`` keeps the key map consistent, and the loop
    holds it while it runs handlers, so a job's descriptors are registered all at once as far as
    its handlers can tell (a handler reads every pipe of its job). Lock order: mutex, then the
    session's condition.

    selectors.EpollSelector's interface (register, modify, unregister, select), without its
    generic layers: a process job registers three descriptors and unregisters them, and each
    call went through ~20 lines of selectors' key map and file-object lookups, on every job's
    start and end (bench/FINDINGS.md, twelfth session). ``select`` returns (handler, mask) pairs.
    """

    def __init__(self) -> None:
        self.mutex = threading.RLock()
        self._epoll = select.epoll()
        self._keys: dict[int, tuple[Any, Any, int]] = {}  # fd -> (file object, handler, events)

    def _fd(self, fileobj: Any) -> int:
        fd = fileobj if type(fileobj) is int else fileobj.fileno()
        if fd < 0:  # a closed socket: found by the object, as selectors does
            for key, (obj, _, _) in self._keys.items():
                if obj is fileobj:
                    return key
            raise KeyError(f"{fileobj!r} is not registered")
        return fd

    def register(self, fileobj: Any, events: int, data: Any = None) -> None:
        fd = fileobj if type(fileobj) is int else fileobj.fileno()
        if fd < 0:
            raise ValueError(f"Invalid file descriptor: {fd}")
        with self.mutex:
            if fd in self._keys:
                raise KeyError(f"{fileobj!r} (FD {fd}) is already registered")
            self._epoll.register(fd, _POLL[events])
            self._keys[fd] = (fileobj, data, events)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> None:
        with self.mutex:
            fd = self._fd(fileobj)
            obj, _, old = self._keys[fd]
            if events != old:
                self._epoll.modify(fd, _POLL[events])
            self._keys[fd] = (obj, data, events)

    def unregister(self, fileobj: Any) -> None:
        with self.mutex:
            fd = self._fd(fileobj)
            del self._keys[fd]  # KeyError when it is not registered, as selectors'
            try:  # not contextlib.suppress: three more calls, three times at each job's end
                self._epoll.unregister(fd)
            except OSError:
                pass

    def discard(self, fileobj: Any) -> None:
        """unregister, if registered: every descriptor a job closes goes through here, at its end."""
        try:
            self.unregister(fileobj)
        except (KeyError, ValueError, OSError):
            pass

    def select(self, timeout: float | None) -> list[tuple[Any, int]]:
        """The (handler, mask) of each ready descriptor; ``timeout`` in seconds, None for ever."""
        wait = -1.0 if timeout is None else math.ceil(timeout * 1e3) * 1e-3 if timeout > 0 else 0.0
        try:
            ready = self._epoll.poll(wait, max(len(self._keys), 1))
        except InterruptedError:
            return []
        keys = self._keys
        out = []
        for fd, event in ready:
            key = keys.get(fd)
            if key is not None:
                # selectors' reading: an error or a hang-up is both readable and writable.
                mask = (_WRITE if event & ~select.EPOLLIN else 0) | (_READ if event & ~select.EPOLLOUT else 0)
                out.append((key[1], mask & key[2]))
        return out

    def close(self) -> None:
        self._epoll.close()
        self._keys.clear()


_READ, _WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
_POLL = {_READ: select.EPOLLIN, _WRITE: select.EPOLLOUT, _READ | _WRITE: select.EPOLLIN | select.EPOLLOUT}


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
        self._timer_lock = threading.Lock()
        # When the loop wakes by itself (its select's deadline: the first timer, inf for none), or
        # -inf while it is awake, so a timer pushed then is seen before the next select anyway.
        self._wakes_at = -math.inf
        self._seq = itertools.count()
        self._closing = False
        self.thread = threading.Thread(target=self._run, name="psjobs-io", daemon=True)
        self.thread.start()

    def on_loop(self) -> bool:
        """Whether the caller is this loop's thread (which reads the answers, and where nothing is
        raised asynchronously: core wait_free)."""
        return threading.current_thread() is self.thread

    def call_soon(self, fn: Callable[[], None]) -> None:
        self._calls.append(fn)
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._w, b"x")

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop thread in ``delay`` seconds. The loop is woken only if that is
        before it would wake by itself: a fork server's silence is watched with a 5 s timer on
        every job it forks, and waking the loop for each handed it the GIL in the middle of
        start_job (0.32 ms a job started without a spare, measured with cProfile)."""
        when = time.monotonic() + delay
        with self._timer_lock:
            heapq.heappush(self._timers, (when, next(self._seq), fn))
            if when >= self._wakes_at:
                return
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._w, b"x")

    def _drain_wake(self, mask: int) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._r, 4096):
                pass

    def _run(self) -> None:
        while not self._closing:
            with self._timer_lock:
                wakes_at = self._wakes_at = self._timers[0][0] if self._timers else math.inf
            timeout = None if wakes_at == math.inf else max(0.0, wakes_at - time.monotonic())
            try:
                events = self.sel.select(timeout)
            except OSError:
                events = []
            with self._timer_lock:
                self._wakes_at = -math.inf
            with self.sel.mutex:
                self._dispatch(events)

    def _dispatch(self, events: list[tuple[Any, int]]) -> None:
        # BaseException, not Exception: a handler runs code of the jobs' values (unpickling), and a
        # KeyboardInterrupt or SystemExit that escaped one ended this thread (SystemExit silently),
        # after which every process job of the session hung. No signal is delivered to this thread.
        for handler, mask in events:
            try:
                handler(mask)
            except BaseException as exc:  # a handler must never take the loop down
                loop_error(handler, exc)
        while self._calls:
            fn = self._calls.popleft()
            try:
                fn()
            except BaseException as exc:
                loop_error(fn, exc)
        now = time.monotonic()
        while True:
            with self._timer_lock:
                if not self._timers or self._timers[0][0] > now:
                    break
                _, _, fn = heapq.heappop(self._timers)
            try:
                fn()
            except BaseException as exc:
                loop_error(fn, exc)

    def close(self) -> None:
        self._closing = True
        self.call_soon(lambda: None)
        if not self.on_loop():
            self.thread.join(5)
        with contextlib.suppress(OSError):
            self.sel.close()
        for fd in (self._r, self._w):
            with contextlib.suppress(OSError):
                os.close(fd)


def loop_error(where: Any, exc: BaseException) -> None:
    """A handler raised: fail its job with the reason (when it is a job's), and log it; never raise.

    A WorkerError (a bad frame, another protocol version, a channel cut mid-frame by a stop) is the
    worker's doing and the job's reason says it: a debug line, not noise on stderr. Anything else is
    a bug in psjobs: an error with its traceback, said rather than hidden.
    """
    log = logging.getLogger("psjobs.process")
    owner = getattr(where, "__self__", None)
    fail = getattr(owner, "broken", None)
    job = getattr(getattr(owner, "port", None), "job_id", None)
    if isinstance(exc, WorkerError):
        log.debug("psjobs: Job %s failed: %s", job, exc)
    else:
        what = f"reading Job {job}" if job is not None else "the I/O loop"
        log.error("psjobs: internal error in %s (the loop goes on): %r", what, exc, exc_info=exc)
    if callable(fail):
        try:
            fail(exc)  # fails that one job with the reason
        except BaseException as again:
            log.error("psjobs: internal error in the I/O loop while failing Job %s: %r", job, again, exc_info=again)
