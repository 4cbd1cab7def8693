"""A command's process job: run straight from the session in its own process group.

::

    Popen(start_new_session) --stdout--> lines --> output;  --stderr--> lines --> errors
    input items --stdin--> the command;  pidfd --> exit status --> the job's end
"""

from __future__ import annotations

import contextlib
import os
import selectors
import subprocess
import time
from typing import TYPE_CHECKING

from ..._records import Stream
from ...core import Outcome
from ...worker._outcome import status_error
from ...worker._procs import Lines
from ._handle import Handle, line_entries

if TYPE_CHECKING:
    from ...core import Entry, JobPort
    from ._backend import ProcessBackend


class CommandHandle(Handle):
    """A command line or argv run straight from the session in its own process group."""

    def __init__(self, backend: ProcessBackend, port: JobPort, proc: subprocess.Popen[bytes],
                 feed: bytes | None) -> None:
        super().__init__(backend, port)
        self.proc = proc
        self.pid = proc.pid
        self.pidfd = os.pidfd_open(proc.pid)
        assert proc.stdout is not None and proc.stderr is not None
        self.fds = {proc.stdout.fileno(): Stream.OUTPUT, proc.stderr.fileno(): Stream.ERROR}
        # Popen's file objects own the descriptors: close through them, never twice.
        self.files = {proc.stdout.fileno(): proc.stdout, proc.stderr.fileno(): proc.stderr}
        self.lines = {fd: Lines() for fd in self.fds}
        self.feed = memoryview(feed) if feed else None

    def register(self) -> None:
        sel = self.backend.loop.sel
        with sel.mutex:
            for fd in self.fds:
                os.set_blocking(fd, False)
                sel.register(fd, selectors.EVENT_READ, self.on_pipe)
            sel.register(self.pidfd, selectors.EVENT_READ, self.on_exit)
            stdin = self.proc.stdin
            if stdin is not None:
                if self.feed is None:
                    stdin.close()
                else:
                    os.set_blocking(stdin.fileno(), False)
                    sel.register(stdin.fileno(), selectors.EVENT_WRITE, self.on_stdin)

    def on_stdin(self, mask: int) -> None:
        stdin = self.proc.stdin
        assert stdin is not None and self.feed is not None
        try:
            n = os.write(stdin.fileno(), self.feed[:262144])
        except BlockingIOError:
            return
        except OSError:
            n = len(self.feed)
        self.feed = self.feed[n:]
        if not self.feed:
            self.backend.loop.sel.unregister(stdin.fileno())
            stdin.close()

    def on_pipe(self, mask: int) -> None:
        # The selector hands us the callback only; find which pipe is ready.
        for fd in list(self.fds):
            self._read(fd)
        self.maybe_end()

    def _read(self, fd: int) -> None:
        stream = self.fds[fd]
        entries: list[Entry] = []
        now = time.time()
        for _ in range(16):
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                self.backend.loop.sel.unregister(fd)
                del self.fds[fd]
                line_entries(entries, stream, self.lines.pop(fd).rest(), now)
                self.files.pop(fd).close()
                break
            line_entries(entries, stream, self.lines[fd].feed(chunk), now)
        if entries:
            self.port.records(entries)

    def on_exit(self, mask: int) -> None:
        pid, status = os.waitpid(self.proc.pid, os.WNOHANG)
        if pid == 0:
            return
        self.proc.returncode = os.waitstatus_to_exitcode(status)  # we reaped it, not Popen
        self.backend.loop.sel.unregister(self.pidfd)
        os.close(self.pidfd)
        self.pidfd = -1
        self.status = status
        self.status_known = True
        self.maybe_end()

    def maybe_end(self) -> None:
        if self.finished or self.fds or not self.status_known:
            return
        assert self.status is not None
        code = os.waitstatus_to_exitcode(self.status)
        if self.port.stop_requested:
            outcome = Outcome.stopped(code)
        elif code == 0:
            outcome = Outcome.completed(code)
        else:
            outcome = Outcome.failed(status_error("the command", code), code)
        self._close_stdin()
        self.backend.handles.discard(self)
        self.end([], outcome)

    def _close_stdin(self) -> None:
        stdin = self.proc.stdin
        if stdin is not None and not stdin.closed:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self.backend.loop.sel.unregister(stdin.fileno())
            stdin.close()

    def close(self) -> None:
        self.backend.handles.discard(self)
        sel = self.backend.loop.sel
        for fd in list(self.fds):
            with contextlib.suppress(KeyError, ValueError, OSError):
                sel.unregister(fd)
            self.files.pop(fd).close()
        self.fds.clear()
        if self.pidfd >= 0:
            with contextlib.suppress(KeyError, ValueError, OSError):
                sel.unregister(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = -1
        self._close_stdin()
