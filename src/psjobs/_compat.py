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
    """Raise ``exc_type`` in another thread of this process at its next bytecode (None: take back a
    pending one); False where the interpreter has no such call.

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


_pickler: Any = None


def cloudpickle_dumps(obj: Any, protocol: int = 5) -> bytes:
    """``cloudpickle.dumps``, keeping the file name of each function shipped by value.

    cloudpickle 3 writes ``<dynamic-code>`` in place of a code object's file name (for payloads
    that do not depend on where a function was defined). A worker's traceback then names no file,
    and no one can show the failing line: neither the worker, for a function of a script, nor the
    session's Jupyter kernel, for a function of a cell (issue 17). Reaches into cloudpickle's
    ``_code_reduce``; without it, plain ``dumps``.
    """
    import io

    import cloudpickle

    global _pickler
    if _pickler is None:
        reduce = getattr(getattr(cloudpickle, "cloudpickle", None), "_code_reduce", None)
        table = getattr(cloudpickle.Pickler, "dispatch_table", None)
        if reduce is None or table is None:
            _pickler = False
        else:
            import collections
            import types

            def keep_name(code: types.CodeType) -> Any:
                rebuild, args = reduce(code)
                return rebuild, tuple(code.co_filename if type(a) is str and a == "<dynamic-code>" else a
                                      for a in args)

            base: Any = table

            class Pickler(cloudpickle.Pickler):  # type: ignore[misc]
                dispatch_table = collections.ChainMap({types.CodeType: keep_name}, base)

            _pickler = Pickler
    if _pickler is False:
        data: bytes = cloudpickle.dumps(obj, protocol=protocol)
        return data
    out = io.BytesIO()
    _pickler(out, protocol=protocol).dump(obj)
    return out.getvalue()
