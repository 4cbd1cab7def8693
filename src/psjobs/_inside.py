"""What code running inside a job calls: write_output, write_error, ..., stop_requested, job_input.

::

    job code --write_*()--> current emitter --> thread job: the job's journal (under the lock)
                                            --> process job: the worker's batching writer --> frames

The emitter is found through a context variable (thread jobs: set in the job's thread) or, in a
worker process that serves one job, a process-wide one. ``print``, ``warnings.warn`` and
``logging`` reach the same emitter through small routers installed on sys.stdout/sys.stderr,
``warnings.showwarning`` and the root logger; outside a job they fall through untouched.
"""

from __future__ import annotations

import builtins
import contextvars
import io
import logging
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any, Protocol, TextIO

from ._records import ErrorRecord, InformationRecord, ProgressRecord, Record, Stream


class Emitter(Protocol):
    computer_name: str | None
    line_buffers: dict[int, str]

    def emit(self, stream: int, payload: Any, t: float | None = None) -> None: ...

    def stop_requested(self) -> bool: ...

    def input(self) -> Iterator[Any]: ...

    def read_host(self, prompt: str) -> str: ...


_current: contextvars.ContextVar[Emitter | None] = contextvars.ContextVar("psjobs_emitter", default=None)
_process_emitter: Emitter | None = None  # set in a worker process, which serves one job


def current() -> Emitter | None:
    return _current.get() or _process_emitter


def bind(emitter: Emitter) -> contextvars.Token[Emitter | None]:
    """Make ``emitter`` the job of this thread (and of the tasks it starts); ``unbind`` undoes it."""
    return _current.set(emitter)


def unbind(token: contextvars.Token[Emitter | None]) -> None:
    _current.reset(token)


def bound() -> Emitter | None:
    """The emitter ``bind`` set in this context, if any (not the process's own)."""
    return _current.get()


_job_id: contextvars.ContextVar[int | None] = contextvars.ContextVar("psjobs_job_id", default=None)


def bind_job_id(job_id: int) -> contextvars.Token[int | None]:
    """Record that this thread runs job ``job_id`` of a session in this process (thread jobs), so
    that a wait of the job on itself is refused instead of hanging; ``unbind_job_id`` undoes it."""
    return _job_id.set(job_id)


def unbind_job_id(token: contextvars.Token[int | None]) -> None:
    _job_id.reset(token)


def current_job_id() -> int | None:
    """The id of the job this code runs as, in this process (None outside a thread job)."""
    return _job_id.get()


def set_process_emitter(emitter: Emitter | None) -> None:
    global _process_emitter
    _process_emitter = emitter


def write_output(obj: Any) -> None:
    """Add ``obj`` to the job's output (outside a job: print it)."""
    e = current()
    if e is None:
        print(obj)
    else:
        e.emit(_OUTPUT, obj)


_OUTPUT = Stream.OUTPUT  # an enum member through its metaclass costs ~80 ns a lookup on 3.11 (load 0.8)


def write_error(message_or_exception: str | BaseException) -> None:
    """Add a non-terminating error to the job's error stream; the job goes on."""
    exc = message_or_exception if isinstance(message_or_exception, BaseException) else None
    message = str(message_or_exception) if exc is None else (str(exc) or type(exc).__name__)
    e = current()
    if e is None:
        print(message, file=sys.stderr)
        return
    e.emit(Stream.ERROR, ErrorRecord(message, time.time(), e.computer_name, exc))


def _simple(stream: Stream, text: Any) -> None:
    e = current()
    if e is None:
        if stream is Stream.WARNING:
            print(f"WARNING: {text}", file=sys.stderr)
        return
    e.emit(stream, Record(stream, str(text), time.time(), e.computer_name))


def write_warning(text: str) -> None:
    """Add a record to the job's warning stream."""
    _simple(Stream.WARNING, text)


def write_verbose(text: str) -> None:
    """Add a record to the job's verbose stream (shown when the session is verbose)."""
    _simple(Stream.VERBOSE, text)


def write_debug(text: str) -> None:
    """Add a record to the job's debug stream (shown when the session debugs)."""
    _simple(Stream.DEBUG, text)


def write_information(obj: Any) -> None:
    """Add ``obj`` to the job's information stream (what ``print`` does, with any object)."""
    e = current()
    if e is None:
        print(obj)
        return
    e.emit(Stream.INFORMATION, InformationRecord(str(obj), time.time(), e.computer_name, obj))


def write_progress(activity: str, status: str | None = None, percent_complete: float | None = None,
                   completed: bool = False) -> None:
    """Report progress: an activity, its status, how far along (0 to 100), whether it is done."""
    if not isinstance(activity, str) or not activity:
        raise ValueError("write_progress: activity must be a non-empty str naming what progresses")
    if percent_complete is not None:
        if isinstance(percent_complete, bool) or not isinstance(percent_complete, (int, float)) \
                or not 0 <= percent_complete <= 100:
            raise ValueError(f"write_progress: percent_complete must be from 0 to 100, not {percent_complete!r}")
    e = current()
    if e is None:
        return
    e.emit(Stream.PROGRESS, ProgressRecord(activity, status, percent_complete, bool(completed),
                                           time.time(), e.computer_name))


def stop_requested() -> bool:
    """True once the job was asked to stop: long loops can end cleanly by checking it."""
    e = current()
    return False if e is None else e.stop_requested()


def job_input() -> Iterator[Any]:
    """The items given as the job's ``input`` (empty outside a job or without input)."""
    e = current()
    return iter(()) if e is None else e.input()


def read_host(prompt: str = "") -> str:
    """Ask the user of the session for a line of text (the job is Blocked until answered)."""
    e = current()
    if e is None:
        return input(prompt)
    return e.read_host(prompt)


# --- routers: print, warnings and logging inside a job ---------------------------------------

#: The longest record one printed line becomes, in characters (a pipe's lines are capped at 1 MiB,
#: worker/_procs.MAX_LINE): a longer line comes as several records, in order.
MAX_LINE_CHARS = 1 << 20


class StreamRouter(io.TextIOBase):
    """sys.stdout/sys.stderr stand-in: lines written inside a job become records of it."""

    def __init__(self, fallback: TextIO | None, stream: Stream) -> None:
        self.fallback = fallback
        self.stream = stream

    def __getattr__(self, name: str) -> Any:
        # What the stream underneath offers beyond a file's methods stays reachable: a Jupyter
        # kernel tells its sys.stdout which cell runs with ``set_parent``; without it, every print
        # after the first thread job went to the cell that started that job (issue 17).
        fallback = self.__dict__.get("fallback")
        if fallback is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(fallback, name)

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        # Code such as faulthandler needs a real descriptor: give the one underneath (in a
        # worker process fds 1 and 2 are pipes whose lines also become records).
        if self.fallback is not None:
            return self.fallback.fileno()
        return 2 if self.stream is Stream.ERROR else 1

    def write(self, text: str) -> int:
        e = current()
        if e is None:
            if self.fallback is not None:
                return self.fallback.write(text)
            return len(text)
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        key = int(self.stream)
        *lines, rest = (e.line_buffers.get(key, "") + text).split("\n")
        for line in lines:
            emit_line(e, self.stream, _emit_long(e, self.stream, line))
        e.line_buffers[key] = _emit_long(e, self.stream, rest)
        return len(text)

    def flush(self) -> None:
        e = current()
        if e is None and self.fallback is not None:
            self.fallback.flush()


def _emit_long(e: Emitter, stream: Stream, line: str) -> str:
    """Emit the full MAX_LINE_CHARS pieces of a long line; return the rest (all of a short one)."""
    start = 0
    while len(line) - start > MAX_LINE_CHARS:
        emit_line(e, stream, line[start:start + MAX_LINE_CHARS])
        start += MAX_LINE_CHARS
    return line[start:] if start else line


def emit_line(e: Emitter, stream: Stream, line: str) -> None:
    t = time.time()
    if stream is Stream.ERROR:
        e.emit(stream, ErrorRecord(line, t, e.computer_name), t)
    else:
        e.emit(Stream.INFORMATION, InformationRecord(line, t, e.computer_name), t)


def flush_lines(e: Emitter) -> None:
    """Emit what was printed without a final newline (at the end of a job)."""
    for key, rest in list(e.line_buffers.items()):
        if rest:
            emit_line(e, Stream(key), rest)
    e.line_buffers.clear()


_original_input = builtins.input


def _input(prompt: object = "") -> str:
    """``input()`` inside a job asks the session's user (the job is Blocked until answered)."""
    e = current()
    if e is None:
        return _original_input(prompt)
    return e.read_host(str(prompt))


class StdinReader(io.TextIOBase):
    """sys.stdin of a worker process: reading a line asks the session's user for one."""

    def readable(self) -> bool:
        return True

    def readline(self, size: int | None = -1) -> str:  # type: ignore[override]
        e = current()
        return "" if e is None else e.read_host("") + "\n"

    def read(self, size: int | None = -1) -> str:
        return self.readline()


# Where a warning outside a job goes: whatever showed warnings when the routers were installed (the
# session host's collector, which sends it to the client of the request), not the one at import.
_outside_showwarning = warnings.showwarning
_PYTHONS_SHOWWARNING = warnings.showwarning  # what a hook that chains back to ours falls back to
_outside = threading.local()


def _showwarning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: TextIO | None = None, line: str | None = None) -> None:
    e = current()
    if e is None:
        if getattr(_outside, "showing", False):
            # The hook we pass it to wrapped ours and calls it back (the usual chaining idiom, set
            # after a first job installed ours): Python's own shows it, instead of a RecursionError.
            _PYTHONS_SHOWWARNING(message, category, filename, lineno, file, line)
            return
        _outside.showing = True
        try:
            _outside_showwarning(message, category, filename, lineno, file, line)
        finally:
            _outside.showing = False
        return
    e.emit(Stream.WARNING, Record(Stream.WARNING, str(message), time.time(), e.computer_name))


_LEVELS = ((logging.ERROR, Stream.ERROR), (logging.WARNING, Stream.WARNING),
           (logging.INFO, Stream.INFORMATION), (0, Stream.DEBUG))


class JobLogHandler(logging.Handler):
    """Turns logging records made inside a job into records of the stream of their level."""

    def emit(self, record: logging.LogRecord) -> None:
        e = current()
        if e is None:
            # Our handler must not silence the process: with no handler of the user's, Python
            # would have shown warnings through its last resort handler, so keep doing that.
            last = logging.lastResort
            if last is not None and record.levelno >= last.level \
                    and all(h is self for h in logging.getLogger().handlers):
                last.handle(record)
            return
        try:
            message = record.getMessage()
        except Exception:
            message = str(record.msg)
        stream = next(s for level, s in _LEVELS if record.levelno >= level)
        t = record.created
        tb = None
        if record.exc_info and record.exc_info[1] is not None:
            tb = logging.Formatter().formatException(record.exc_info)
        if stream is Stream.ERROR:
            exc = record.exc_info[1] if record.exc_info else None
            e.emit(stream, ErrorRecord(message, t, e.computer_name, exc, tb))
        elif stream is Stream.INFORMATION:
            e.emit(stream, InformationRecord(message, t, e.computer_name))
        else:
            e.emit(stream, Record(stream, message, t, e.computer_name))


_log_handler = JobLogHandler()


def install_routers(*, whole_process: bool = False) -> None:
    """Route print, warnings and logging of job code to the job; idempotent.

    In a thread job this wraps whatever sys.stdout is now (a test runner may swap it), and leaves
    other threads' output where it was. In a worker process (``whole_process``) the root logger
    also takes every level, since the process belongs to the job.
    """
    if not isinstance(sys.stdout, StreamRouter):
        sys.stdout = StreamRouter(sys.stdout, Stream.INFORMATION)
    if not isinstance(sys.stderr, StreamRouter):
        sys.stderr = StreamRouter(sys.stderr, Stream.ERROR)
    global _outside_showwarning
    if warnings.showwarning is not _showwarning:
        _outside_showwarning = warnings.showwarning
        warnings.showwarning = _showwarning
    if builtins.input is not _input:
        builtins.input = _input
    root = logging.getLogger()
    if _log_handler not in root.handlers:
        root.addHandler(_log_handler)
    if whole_process:
        sys.stdin = StdinReader()
        root.setLevel(logging.DEBUG)
        warnings.simplefilter("default")
