"""Processes a job starts: their lines, their process group, their descendants.

::

    command's stdout / stderr --64 KiB chunks--> Lines.feed --> whole lines (str) --> the job
    stop --> kill_group: SIGTERM to the group, SIGKILL after the grace period (and to what is left)
    Dask task --> signal_procs: the group, and every descendant found in /proc (a task's process
    may have left its group)

Standard library only at the top: the remote bootstrap runs this module from its source (with
_wire) before psjobs exists on that computer, for group_gone. run_command imports psjobs' bottom
layer when it is called, which only happens in a session or a Dask worker.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # at run time only kill_group needs it: a worker that runs no command never loads it
    import subprocess


def text(raw: bytes, errors: str = "replace") -> str:
    """One line of a program's output as text: UTF-8 (bad bytes replaced by U+FFFD, or with
    ``errors="surrogateescape"`` kept as lone surrogates a face can write back as the very bytes),
    without a final CR."""
    line = raw.decode("utf-8", errors)
    return line[:-1] if line.endswith("\r") else line


#: The longest record a line becomes: 1 MiB of its bytes. A longer line (a program printing 64 MiB
#: without a newline) is split into records of at most this size, cut between UTF-8 characters,
#: in order, so nothing is lost and reading it stays linear: joining the pending bytes on every
#: chunk took 22 s and 1.3 GB for a 64 MiB line (issue 12).
MAX_LINE = 1 << 20


class Lines:
    """Splits what a pipe gives into lines; the one implementation every reader of bytes uses.

    A line ends at ``\\n`` (a ``\\r`` before it is dropped); what comes after the last ``\\n`` waits
    for the next chunk, and ``rest()`` gives it as a last line when the pipe ends. A line longer
    than :data:`MAX_LINE` bytes comes as several records of at most that many bytes each. Reading
    64 KiB chunks and splitting them measured ~16 M lines/s, iterating a text pipe ~10 M/s.
    """

    __slots__ = ("errors", "parts", "size")

    def __init__(self, errors: str = "replace") -> None:
        self.parts: list[bytes] = []  # the line not ended yet, as it came (joined once, when used)
        self.size = 0
        self.errors = errors          # what becomes of bytes that are not UTF-8 (see text)

    def feed(self, data: bytes) -> list[str]:
        *whole, last = data.split(b"\n")
        out: list[str] = []
        if whole:
            if self.parts:
                self.parts.append(whole[0])
                whole[0] = b"".join(self.parts)
                self.parts, self.size = [], 0
            errors = self.errors  # once, not per line: this loop runs for every line a command prints
            for raw in whole:
                if len(raw) > MAX_LINE:
                    raw = _split_long(raw, out, errors)
                line = raw.decode("utf-8", errors)  # text(), inlined
                out.append(line[:-1] if line.endswith("\r") else line)
        if last:
            self.parts.append(last)
            self.size += len(last)
            if self.size > MAX_LINE:  # a long line still open: give its full records now
                rest = _split_long(b"".join(self.parts), out, self.errors)
                self.parts, self.size = [rest], len(rest)
        return out

    def rest(self) -> list[str]:
        raw = b"".join(self.parts)
        self.parts, self.size = [], 0
        if not raw:
            return []
        out: list[str] = []
        out.append(text(_split_long(raw, out, self.errors), self.errors))
        return out


def _split_long(raw: bytes, out: list[str], errors: str = "replace") -> bytes:
    """Append to ``out`` the records of ``raw`` but its last, and return that last one (at most
    MAX_LINE bytes, never empty). Cuts fall between UTF-8 characters (a continuation byte is
    0b10xxxxxx), so no character is broken in two; a piece's ``\\r`` is kept, as it is no line end."""
    start = 0
    while len(raw) - start > MAX_LINE:
        end = start + MAX_LINE
        back = end
        while back > end - 3 and raw[back] & 0xC0 == 0x80:
            back -= 1
        end = back if raw[back] & 0xC0 != 0x80 else end
        out.append(raw[start:end].decode("utf-8", errors))
        start = end
    return raw[start:] if start else raw


# --- process groups and descendants ------------------------------------------------------------

def proc_stats() -> list[tuple[int, list[str]]] | None:
    """(pid, the fields of /proc/PID/stat after the command name) of every process; None where
    /proc cannot be read (not Linux)."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    out = []
    for name in entries:
        if name.isdigit():
            fields = stat_fields(name)
            if fields is not None:
                out.append((int(name), fields))
    return out


def stat_fields(pid: int | str) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name; None when there is no such process.

    One os.read, no file object: a walk of /proc with ``open()`` took 0.94 ms for 71 processes
    here, 0.63 ms so (timeit, best of 5, load 1.1; the rest is the kernel's). The whole line comes
    in one read (~300 bytes)."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
    except OSError:
        return None
    try:
        stat = os.read(fd, 4096).decode("ascii", "replace")
    except OSError:
        return None
    finally:
        os.close(fd)
    return stat[stat.rfind(")") + 2:].split()


def group_gone(pgid: int) -> bool:
    """True when no live process is left in the group (zombies that nobody reaps do not count)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    stats = proc_stats()
    if stats is None:
        return False  # cannot look: assume something is left
    target = str(pgid)
    return not any(len(f) > 2 and f[2] == target and f[0] != "Z" for _, f in stats)


def descendants(root: int) -> list[int]:
    """Every live descendant of ``root`` (Linux /proc; elsewhere none, and the group kill must do)."""
    children: dict[int, list[int]] = {}
    for pid, fields in proc_stats() or []:
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(pid)
    out: list[int] = []
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            out.append(child)
            todo.append(child)
    return out


def signal_procs(procs: list[subprocess.Popen[Any]], sig: int) -> None:
    """``sig`` to each running process's group (when it leads one) and to all its descendants."""
    for proc in procs:
        if proc.returncode is not None:
            continue
        pids = {proc.pid, *descendants(proc.pid)}
        with contextlib.suppress(OSError):
            if os.getpgid(proc.pid) == proc.pid:
                os.killpg(proc.pid, sig)
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)


def kill_group(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM to the command's group, SIGKILL if it is still there after ``grace`` seconds."""
    import subprocess

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


# --- a command run in the calling thread (thread jobs, Dask tasks) ------------------------------

def run_command(proc: subprocess.Popen[bytes], feed: bytes | None, emitter: Any, grace: float,
                errors: str = "replace") -> int:
    """Run a started command in this thread: its lines to the job (``errors``: see text), its
    group killed on a stop."""
    from .._errors import JobStopped

    try:
        _pump(proc, feed, emitter, errors)
        return proc.wait()
    except JobStopped:
        kill_group(proc, grace)
        raise
    finally:
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def _pump(proc: subprocess.Popen[bytes], feed: bytes | None, emitter: Any, errors: str) -> None:
    """Stream a command's stdout lines to output and stderr lines to errors, feeding its stdin."""
    from .._inside import emit_line
    from .._records import Stream

    output, error = Stream.OUTPUT, Stream.ERROR  # looked up once: ~80 ns a time on 3.11 (load 0.8)

    def emit(stream: Stream, lines: list[str]) -> None:
        for line in lines:
            if stream is output:
                emitter.emit(output, line)
            else:
                emit_line(emitter, error, line)

    sel = selectors.DefaultSelector()
    assert proc.stdout is not None and proc.stderr is not None
    readers = {proc.stdout.fileno(): (Stream.OUTPUT, Lines(errors)),
               proc.stderr.fileno(): (Stream.ERROR, Lines(errors))}
    for fd in readers:
        sel.register(fd, selectors.EVENT_READ)
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
                stream, lines = readers[fd]
                if not chunk:
                    sel.unregister(fd)
                    emit(stream, lines.rest())
                    continue
                emit(stream, lines.feed(chunk))
    finally:
        sel.close()
