"""The threads that run job callbacks, outside every psjobs lock: psjobs' own, and the users'.

::

    Watch.changed / news (session lock held: they only queue)
        |-- own()  --> psjobs-callbacks       psjobs' own settling: a Future's state (its waiters
        |                                     wake), the Executor's queue, asyncio wake-ups,
        |                                     as_completed; never a user's code
        '-- user() --> psjobs-user-callbacks  the callbacks users add: job.add_done_callback,
                                              add_state_callback, future.add_done_callback

Two queues, so that a user's callback that blocks (one that waits for another future's result,
as ThreadPoolExecutor allows) never holds up a result(), an await, as_completed or an Executor:
those are settled on ``own``. ``user`` runs its calls in order; one that has run for HAND_OFF
seconds while others wait hands the queue to a new thread and finishes in its own, so that one
blocked callback does not hold up the others for ever either (the stdlib runs a future's
callbacks in the worker thread that finished its call, so one that blocks holds up no other).

A thread ends after IDLE seconds without work, and one handed off ends when its call returns.
They are daemon threads: an interpreter's exit does not wait for a callback that never returns.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("psjobs")

_local = threading.local()  # .dispatcher: the Dispatcher whose thread this is


class Dispatcher:
    """A queue of calls run in order by its threads, made on demand, that end when idle."""

    IDLE = 1.0  # seconds without work before a thread ends (tests check no psjobs thread lingers)

    def __init__(self, name: str, hand_off: float | None = None) -> None:
        self.name = name
        self.hand_off = hand_off
        self.cond = threading.Condition(threading.Lock())  # a leaf lock: put() runs under the session lock
        self.calls: collections.deque[tuple[Callable[..., Any], tuple[Any, ...]]] = collections.deque()
        self.threads = 0      # this dispatcher's threads, except those handed off (they end after their call)
        self.waiting = 0      # threads in cond.wait: free to take the next call, or to watch the one running
        self.turn: int | None = None      # the thread whose turn it is: calls run one after the other
        self.since: float | None = None   # when the turn's current call started (None: between calls)

    def put(self, fn: Callable[..., Any], *args: Any) -> None:
        with self.cond:
            self.calls.append((fn, args))
            if self.waiting:
                self.cond.notify_all()  # the waiting one takes it, or watches the one running
            elif self.threads == 0 or self.hand_off is not None:
                # No thread at all; or (hand_off) every one is inside a call, which may block:
                # a new one takes this call, or takes over if that call runs too long.
                self._spawn()

    def _spawn(self) -> None:
        # Counted as waiting from now: until it reaches cond.wait, a put() need not start another.
        self.threads += 1
        self.waiting += 1
        try:
            threading.Thread(target=self._run, name=self.name, daemon=True).start()
        except BaseException:
            self.threads -= 1
            self.waiting -= 1
            raise

    def _run(self) -> None:
        _local.dispatcher = self
        me = threading.get_ident()
        cond = self.cond
        with cond:
            self.waiting -= 1  # counted by _spawn
            while True:
                if self.turn is None and self.calls:
                    self.turn = me
                if self.turn == me:
                    if not self.calls:
                        self.turn = None  # between bursts: whichever thread is free takes the next
                        continue
                    fn, args = self.calls.popleft()
                    self.since = time.monotonic()
                    if self.hand_off is not None and self.calls and not self.waiting:
                        self._spawn()  # someone to take over, should this call block those behind it
                    cond.release()
                    try:
                        _call(fn, args)
                    finally:
                        cond.acquire()
                    if self.turn != me:  # handed off while the call ran: the queue went on without it
                        return
                    self.since = None
                    continue
                timeout = self.IDLE
                if self.hand_off is not None and self.turn is not None and self.since is not None and self.calls:
                    late = self.since + self.hand_off - time.monotonic()
                    if late <= 0:
                        self.turn = me  # its call blocks the queue: go on with it here
                        self.threads -= 1  # ... and that thread ends once its call returns
                        continue
                    timeout = late
                self.waiting += 1
                woken = cond.wait(timeout)
                self.waiting -= 1
                if not woken and not self.calls:
                    self.threads -= 1  # idle: a put() after this starts another thread if none is left
                    return


def _call(fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        fn(*args)
    except BaseException:
        log.exception("psjobs: a job callback %r raised; the other callbacks run on", fn)


#: seconds a user's callback holds up those due after it before they go on in another thread:
#: long enough that quick callbacks keep their order, short enough that a blocked one is noticed
#: by nobody but the callbacks behind it
HAND_OFF = 0.2

_own = Dispatcher("psjobs-callbacks")
_user = Dispatcher("psjobs-user-callbacks", hand_off=HAND_OFF)


def _after_fork() -> None:
    global _own, _user
    # The parent's threads do not exist in the child.
    _own = Dispatcher(_own.name)
    _user = Dispatcher(_user.name, hand_off=_user.hand_off)


os.register_at_fork(after_in_child=_after_fork)


def own(fn: Callable[..., Any], *args: Any) -> None:
    """Run ``fn(*args)`` on psjobs' own callbacks thread: psjobs' code only, which never blocks."""
    _own.put(fn, *args)


def user(fn: Callable[..., Any], *args: Any) -> None:
    """Run ``fn(*args)``, a user's callback, on the user callbacks thread (its exception is logged)."""
    _user.put(fn, *args)


def on_own_thread() -> bool:
    """True in psjobs' own callbacks thread, where no user's callback may run."""
    return getattr(_local, "dispatcher", None) is _own
