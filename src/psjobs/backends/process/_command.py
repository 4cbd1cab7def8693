"""A command's process job: started by the fork server (so it dies with the session), or straight
from the session (the session host's, or with no fork server) in a session of its own.

::

    session --("command", argv) + pipes--> fork server --posix_spawn, setsid, own cgroup--> the command
    the command --stdout--> lines --> output;  --stderr--> lines --> errors;  input items --stdin-->
    fork server --("exited", token, pid, status)--> its exit status (straight from the session: pidfd)
"""

from __future__ import annotations

import contextlib
import os
import selectors
import time
from typing import TYPE_CHECKING

from ..._errors import WorkerError
from ..._records import Stream
from ...core import Outcome
from ...worker._outcome import status_error
from ...worker._procs import Lines
from ...worker._tree import ProcessTree
from ._handle import Handle, line_entries

if TYPE_CHECKING:
    import subprocess

    from ...core import Entry, JobPort
    from ._backend import ProcessBackend
    from ._forkclient import ForkClient


_CHUNK = 16384  # bytes read (and handed over) at a time, up to 1 MiB per wakeup


class CommandHandle(Handle):
    """A command line or argv run in a session (and, where it can, a cgroup) of its own."""

    def __init__(self, backend: ProcessBackend, port: JobPort, out_r: int, err_r: int, stdin_w: int | None,
                 feed: bytes | None, errors: str = "replace") -> None:
        super().__init__(backend, port)
        self.fds = {out_r: Stream.OUTPUT, err_r: Stream.ERROR}
        self.lines = {fd: Lines(errors) for fd in self.fds}  # errors: see worker/_procs.text
        self.stdin = stdin_w if stdin_w is not None else -1
        self.feed = memoryview(feed) if feed else None
        self.proc: subprocess.Popen[bytes] | None = None  # started straight from the session
        self.server: ForkClient | None = None             # or by this fork server
        self.pidfd = -1

    def on_started(self, pid: int, server: ForkClient | None, proc: subprocess.Popen[bytes] | None) -> None:
        self.pid = pid
        self.server, self.proc = server, proc
        self.tree = ProcessTree(pid, server.cgroup_of(f"cmd-{self.port.job_id}") if server is not None else None)
        if proc is not None:
            self.pidfd = os.pidfd_open(pid)  # our child: its exit is ours to wait for

    def register(self) -> None:
        sel = self.backend.loop.sel
        with sel.mutex:
            for fd in self.fds:
                os.set_blocking(fd, False)
                sel.register(fd, selectors.EVENT_READ, self.on_pipe)
            if self.pidfd >= 0:
                sel.register(self.pidfd, selectors.EVENT_READ, self.on_exit)
            if self.stdin >= 0:
                if self.feed is None:
                    self._close_stdin()
                else:
                    os.set_blocking(self.stdin, False)
                    sel.register(self.stdin, selectors.EVENT_WRITE, self.on_stdin)

    def on_stdin(self, mask: int) -> None:
        assert self.feed is not None
        try:
            n = os.write(self.stdin, self.feed[:262144])
        except BlockingIOError:
            return
        except OSError:
            n = len(self.feed)
        self.feed = self.feed[n:]
        if not self.feed:
            self._close_stdin()

    def on_pipe(self, mask: int) -> None:
        # The selector hands us the callback only; find which pipe is ready.
        for fd in list(self.fds):
            self._read(fd)
        self.maybe_end()

    def _read(self, fd: int) -> None:
        stream = self.fds[fd]
        now = time.time()
        for _ in range(64):
            entries: list[Entry] = []
            try:
                chunk = os.read(fd, _CHUNK)
            except BlockingIOError:
                break
            if not chunk:
                self.backend.loop.sel.unregister(fd)
                del self.fds[fd]
                line_entries(entries, stream, self.lines.pop(fd).rest(), now)
                os.close(fd)
                if entries:
                    self.port.records(entries)
                break
            line_entries(entries, stream, self.lines[fd].feed(chunk), now)
            if entries:
                # Handed over a chunk at a time: what a session host killed now loses beyond the
                # pipe is one chunk, not a megabyte (its journal makes a fast command wait here).
                self.port.records(entries)

    def on_exit(self, mask: int) -> None:
        assert self.proc is not None
        pid, status = os.waitpid(self.proc.pid, os.WNOHANG)
        if pid == 0:
            return
        self.proc.returncode = os.waitstatus_to_exitcode(status)  # we reaped it, not Popen
        self._close_pidfd()
        self.on_exited(status)

    def on_exited(self, status: int | None) -> None:
        """Its exit status: from our pidfd, or the fork server's report."""
        self.status = status
        self.status_known = True
        self.maybe_end()

    def on_server_lost(self) -> None:
        """The fork server died: the command's exit status goes with it (init reaps it), and once
        the server is gone nothing would end it with the session, so it is ended now."""
        if self.tree is not None:
            self.tree.kill()
        self.on_exited(None)

    def maybe_end(self) -> None:
        if self.finished or self.fds or not self.status_known:
            return
        code = None if self.status is None else os.waitstatus_to_exitcode(self.status)
        if self.port.stop_requested:
            outcome = Outcome.stopped(code)
        elif code is None:
            server = self.server.proc.pid if self.server is not None else "?"
            outcome = Outcome.failed(WorkerError(
                f"the fork server (pid {server}) that started Job {self.port.job_id}'s command died, so "
                f"psjobs ended the command (its exit status was lost with the server). Start the job again"))
        elif code == 0:
            outcome = Outcome.completed(code)
        else:
            outcome = Outcome.failed(status_error("the command", code), code)
        self._close_stdin()
        self.backend.handles.discard(self)
        self.backend.server_commands.pop(self.port.job_id, None)
        self.end([], outcome)

    def _close_stdin(self) -> None:
        if self.stdin >= 0:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self.backend.loop.sel.unregister(self.stdin)
            os.close(self.stdin)
            self.stdin = -1

    def close(self) -> None:
        self.backend.handles.discard(self)
        sel = self.backend.loop.sel
        for fd in list(self.fds):
            with contextlib.suppress(KeyError, ValueError, OSError):
                sel.unregister(fd)
            os.close(fd)
        self.fds.clear()
        self._close_pidfd()
        self._close_stdin()
