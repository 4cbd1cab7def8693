"""What ``psjobs receive`` delivered: the records its stdout's reader has taken, for the host's ack.

::

    host --part (records)--> receive --write each record, mark where it ends--> stdout
                                 |                                                | a pipe: the
                                 +--settle(): flush, wait until the reader took   | reader takes
                                 |  it all or went away (FIONREAD: bytes still    | bytes as it
                                 |  unread in the pipe)                           v likes
    host <--ack (records whose last byte the reader took)--+

Written to a pipe, a record is only delivered once the reader has read it: `receive | head -n 1`
leaves in the pipe what head never read, and those records stay unreceived. To know how much the
pipe accepted, stdout is then written with ``os.write`` (counted); any other stdout (a file, a
terminal, a StringIO in tests) has a record delivered once it is written and flushed.
"""

from __future__ import annotations

import fcntl
import os
import select
import stat
import struct
import sys
import termios
from typing import TextIO, cast

_SETTLE_POLL_MS = 20  # how often a settle looks whether the reader went away while it waits


class _PipeOut:
    """Text to a pipe's fd, counting the bytes the pipe accepted; the reader gone: ``broken``."""

    def __init__(self, fd: int, encoding: str, errors: str) -> None:
        self.fd = fd
        self.encoding = encoding
        self.errors = errors
        self.buf = bytearray()
        self.position = 0    # bytes written to this object
        self.accepted = 0    # bytes the pipe took
        self.broken = False

    def write(self, text: str) -> int:
        data = text.encode(self.encoding, self.errors)
        self.position += len(data)
        if not self.broken:
            self.buf += data
            if len(self.buf) >= 1 << 16:
                self.flush()
        return len(text)

    def flush(self) -> None:
        while self.buf and not self.broken:
            try:
                n = os.write(self.fd, self.buf)
            except BrokenPipeError:
                self.broken = True
                break
            except InterruptedError:
                continue
            self.accepted += n
            del self.buf[:n]

    def unread(self) -> int:
        try:
            got = fcntl.ioctl(self.fd, termios.FIONREAD, b"\0\0\0\0")
        except OSError:
            return 0
        return int(struct.unpack("i", got)[0])


class Delivery:
    """The receive command's stdout, and how many of the records written to it were delivered."""

    def __init__(self, stdout: TextIO, track: bool = True) -> None:
        self._stdout = stdout
        self._track = track           # False (receive --keep): nothing to acknowledge, marks ignored
        self._pipe: _PipeOut | None = None
        self._marks: list[int] = []   # per record since the last settle: where it ends in stdout
        self._count = 0               # records since the last settle (without a pipe)
        try:
            fd = stdout.fileno()
            is_pipe = stat.S_ISFIFO(os.fstat(fd).st_mode)
        except (AttributeError, OSError, ValueError):  # a StringIO, a closed stdout
            is_pipe = False
        if is_pipe:
            stdout.flush()
            self._pipe = _PipeOut(fd, getattr(stdout, "encoding", None) or "utf-8",
                                  getattr(stdout, "errors", None) or "strict")

    @property
    def out(self) -> TextIO:
        """Where the records' text goes."""
        return cast(TextIO, self._pipe) if self._pipe is not None else self._stdout

    @property
    def broken(self) -> bool:
        """The reader went away: nothing more can be delivered."""
        return self._pipe is not None and self._pipe.broken

    def mark(self) -> None:
        """A record was written (to stdout or stderr): it is delivered once stdout up to here is."""
        if not self._track:
            return
        if self._pipe is not None:
            self._marks.append(self._pipe.position)
        else:
            self._count += 1

    def settle(self) -> int:
        """Flush; return how many records since the last settle were delivered (with a pipe: wait
        until its reader has taken them all, or went away having taken only some)."""
        pipe = self._pipe
        if pipe is None:
            n, self._count = self._count, 0
            self._stdout.flush()  # a failure here (a full disk) delivers none of them
            return n
        sys.stderr.flush()
        pipe.flush()
        if not pipe.broken:
            poller = select.poll()
            poller.register(pipe.fd, 0)  # no events asked: POLLERR alone says the reader is gone
            while pipe.unread() and not pipe.broken:
                if poller.poll(_SETTLE_POLL_MS):
                    pipe.broken = True
        taken = pipe.accepted - pipe.unread()
        marks, self._marks = self._marks, []
        return sum(1 for end in marks if end <= taken)
