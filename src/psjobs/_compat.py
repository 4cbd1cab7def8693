"""Every reach into CPython's or another library's private parts, each with a fallback.

Nothing else in psjobs touches a private name of the interpreter, of ``os`` or of a library it
talks to: when one of these changes, this is the one module to fix. Standard library only (it is
part of the bottom layer a remote computer receives).
"""

from __future__ import annotations

import os
import sys
from typing import Any


def set_async_exc(thread_id: int, exc_type: type[BaseException] | None) -> bool:
    """Raise ``exc_type`` in another thread of this process at its next bytecode; False where the
    interpreter has no such call. None takes back a pending one but leaves the eval loop signalled:
    take it back with take_back_async_exc instead.

    Needed because Python has no public way to interrupt a thread: a thread job's stop must land
    in user code that never looks at ``stop_requested()``. ``PyThreadState_SetAsyncExc`` is part of
    CPython's C API (not the limited one); PyPy and others may lack it.
    """
    try:
        import ctypes

        call = ctypes.pythonapi.PyThreadState_SetAsyncExc
    except (ImportError, AttributeError):
        return False
    exc: Any = None if exc_type is None else ctypes.py_object(exc_type)
    return int(call(ctypes.c_ulong(thread_id), exc)) == 1


class _TakenBack(BaseException):
    """Raised by take_back_async_exc into its own thread, and caught there at once."""


def take_back_async_exc() -> None:
    """Take back an exception ``set_async_exc`` raised in *this* thread that has not landed yet.

    Not ``set_async_exc(this thread, None)``: CPython (3.11 here) signals its eval loop even for
    None, and only an exception that lands clears that signal. Left set, every thread handles it
    at every check, and one with a profiler or tracer on (cProfile, a debugger) loops forever at
    the start of its next generator (seen: a script that stopped a thread job under
    ``sys.setprofile`` hung in ``stop_job``). So the pending exception is replaced by one of ours,
    which lands at once, here, and is caught.
    """
    import threading

    try:
        if set_async_exc(threading.get_ident(), _TakenBack):
            _landing()  # lands at the latest here, at this call's first instruction
    except _TakenBack:
        pass


def _landing() -> None:
    pass


def current_exception(thread_id: int) -> BaseException | None:
    """The exception another thread is handling right now (None: none, or it cannot be known).

    Needed to tell whether a thread is still cleaning up after a stop (a second stop raised there
    would cut its ``finally`` short). ``sys._current_exceptions`` is private; it gave
    (type, value, traceback) tuples before Python 3.12.
    """
    getter = getattr(sys, "_current_exceptions", None)
    if getter is None:
        return None
    exc: Any = getter().get(thread_id)
    if isinstance(exc, tuple):  # Python < 3.12
        exc = exc[1]
    return exc if isinstance(exc, BaseException) else None


PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
_libc: Any = None            # libc, loaded once


def _prctl(option: int, value: int) -> bool:
    """prctl(2) on Linux; False where there is none. The stdlib has no prctl, so libc is called."""
    global _libc
    try:
        if _libc is None:
            import ctypes

            _libc = ctypes.CDLL(None, use_errno=True)
        return int(_libc.prctl(option, value, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def set_child_subreaper() -> bool:
    """Make this process reap the orphans of its descendants (Linux); False elsewhere.

    Needed by the fork server: a job's grandchildren that outlive it are reaped there instead of
    being left to init as zombies of nobody's (not Linux: orphans go to init, as they would anyway).
    """
    return _prctl(PR_SET_CHILD_SUBREAPER, 1)


def environ_snapshot() -> Any:
    """A cheap token that changes when ``os.environ`` changes: its private bytes mapping.

    Comparing it costs ~1 us where ``dict(os.environ)`` costs ~50 us (measured), and it is asked
    for on every process job's start. None where ``os.environ`` has no ``_data`` (the caller then
    copies the environment).
    """
    return getattr(os.environ, "_data", None)


def scheduler_forget_topic(scheduler: Any, topic: str) -> bool:
    """Drop the events a Dask scheduler keeps for ``topic``; False where it has no way to.

    distributed keeps the last events of every topic in its private ``_broker``
    (``distributed.admin.low-level-log-length``) and offers no public call to drop them.
    """
    broker = getattr(scheduler, "_broker", None)
    truncate = getattr(broker, "truncate", None)
    if not callable(truncate):
        return False
    truncate(topic)
    return True


def worker_backlog(worker: Any) -> Any:
    """The list of messages a Dask worker holds for its scheduler (None: not reachable).

    ``Worker.batched_stream.buffer`` is not documented; it is the only way to apply backpressure
    to ``log_event``, which queues without limit.
    """
    stream = getattr(worker, "batched_stream", None)
    return getattr(stream, "buffer", None)


def cancel_running_future(future: Any) -> None:
    """Mark a running ``concurrent.futures.Future`` cancelled, waking its waiters and callbacks.

    Needed because a Future cannot be cancelled once running (its executor could not stop the
    call), but a psjobs job can be stopped for real: its future must then say so, as one cancelled
    before it ran does (``cancelled()``, ``wait``, ``as_completed``). Reaches into ``_base.Future``'s
    ``_condition``, ``_state``, ``_waiters`` and ``_invoke_callbacks`` (stable since 3.2); where
    they are missing, the future gets a ``CancelledError`` as its exception instead.
    """
    import concurrent.futures

    condition = getattr(future, "_condition", None)
    invoke = getattr(future, "_invoke_callbacks", None)
    waiters = getattr(future, "_waiters", None)
    if condition is None or invoke is None or waiters is None or not hasattr(future, "_state"):
        try:
            future.set_exception(concurrent.futures.CancelledError())
        except concurrent.futures.InvalidStateError:
            pass
        return
    with condition:
        if getattr(future, "_state") in ("FINISHED", "CANCELLED_AND_NOTIFIED"):  # noqa: B009
            return
        setattr(future, "_state", "CANCELLED_AND_NOTIFIED")  # noqa: B010
        for waiter in waiters:
            waiter.add_cancelled(future)
        condition.notify_all()
    invoke()


def register_before_exit(fn: Any) -> None:
    """Run ``fn()`` when the interpreter exits, before ``atexit`` handlers (so before the default
    session closes and stops every job): where the standard executors wait for their work.

    ``threading._register_atexit`` is private (3.9+); where it is missing, or once the interpreter
    is already shutting down, ``atexit`` stands in (it runs last-registered first).
    """
    import atexit
    import threading

    register = getattr(threading, "_register_atexit", None)
    if register is not None:
        try:
            register(fn)
            return
        except RuntimeError:  # "can't register atexit after shutdown"
            pass
    atexit.register(fn)
