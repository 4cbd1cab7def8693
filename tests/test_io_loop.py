"""The process backend's I/O loop runs timers set from any thread in time, in order, without being
woken for each one (backends/process/_loop.IOLoop.call_later)."""

from __future__ import annotations

import selectors
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from psjobs.backends.process._loop import IOLoop

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def loop() -> Iterator[IOLoop]:
    io = IOLoop()
    try:
        yield io
    finally:
        io.close()


def _wait(event: threading.Event, what: str) -> None:
    assert event.wait(10), f"{what} did not run within 10 s"


def test_a_timer_set_while_the_loop_sleeps_with_none_runs(loop: IOLoop) -> None:
    done = threading.Event()
    loop.call_later(0.01, done.set)  # the loop blocks with no deadline: this one must wake it
    _wait(done, "the timer")


def test_an_earlier_timer_set_from_another_thread_runs_before_a_later_one(loop: IOLoop) -> None:
    order: list[str] = []
    both = threading.Event()

    def note(name: str) -> None:
        order.append(name)
        if len(order) == 2:
            both.set()

    loop.call_later(2.0, lambda: note("late"))  # the loop now sleeps until this one...
    loop.call_later(0.01, lambda: note("early"))  # ...and must be woken for this one
    began = time.monotonic()
    while not order and time.monotonic() - began < 10:
        time.sleep(0.001)
    assert order == ["early"], "the earlier timer waited for the later one's deadline"
    _wait(both, "the later timer")
    assert order == ["early", "late"]


def test_timers_set_on_the_loop_thread_and_from_many_threads_all_run(loop: IOLoop) -> None:
    ran: list[int] = []
    lock = threading.Lock()
    n = 200
    done = threading.Event()

    def one(i: int) -> None:
        with lock:
            ran.append(i)
            if len(ran) == 2 * n:
                done.set()

    def from_thread(start: int) -> None:
        for i in range(start, start + n // 4):
            loop.call_later(0.001 * (i % 7), lambda i=i: one(i))

    threads = [threading.Thread(target=from_thread, args=(k * n // 4,)) for k in range(4)]
    for t in threads:
        t.start()
    for i in range(n, 2 * n):  # and from inside the loop, as its own handlers do
        loop.call_soon(lambda i=i: loop.call_later(0.001 * (i % 5), lambda: one(i)))
    for t in threads:
        t.join()
    _wait(done, f"all {2 * n} timers")
    assert sorted(ran) == list(range(2 * n))


def test_the_loop_calls_a_descriptors_handler_when_it_is_ready_and_not_after_it_is_unregistered(loop: IOLoop) -> None:
    """The loop's own epoll selector (not selectors'): a handler runs with the ready mask; a hang-up
    reads as readable; a registered descriptor cannot be registered twice; unregister forgets it,
    even once its socket is closed (found by the object, as selectors does)."""
    a, b = socket.socketpair()
    seen: list[int] = []
    ready = threading.Event()

    def handler(mask: int) -> None:
        seen.append(mask)
        a.recv(100)
        ready.set()

    try:
        loop.sel.register(a, selectors.EVENT_READ, handler)
        with pytest.raises(KeyError):
            loop.sel.register(a.fileno(), selectors.EVENT_READ, handler)
        b.send(b"x")
        _wait(ready, "the handler of a readable socket")
        assert seen[0] == selectors.EVENT_READ
        ready.clear()
        b.close()  # a hang-up: readable (recv gives b""), and only what was asked for is reported
        _wait(ready, "the handler of a socket whose peer closed")
        assert seen[-1] == selectors.EVENT_READ
        with loop.sel.mutex:  # no handler runs meanwhile
            a.close()
            loop.sel.unregister(a)  # closed: fileno() is -1, found by the object
            with pytest.raises(KeyError):
                loop.sel.unregister(a)
            loop.sel.discard(a)  # discard forgets quietly
    finally:
        a.close()
        b.close()
