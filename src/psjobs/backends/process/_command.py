"""A command's process job, in a session of its own: started from the session into a cgroup under
the fork server's (_direct), or by the fork server (no cgroup, or no _cspawn), so that it dies with
the session either way; or, the session host's (or with no fork server), by Popen.

::

    session --_direct.spawn--> the command, our child, in a cgroup of the server's --pidfd--> its exit
    session --("command", argv) + pipes--> fork server --posix_spawn, setsid, own cgroup--> the command
    fork server --("started", pid) or ("refused", exec's error)--> on_answer (the I/O loop): Running, or Failed
    the command --stdout--> lines --> output;  --stderr--> lines --> errors;  input items --stdin-->
    fork server --("exited", token, pid, status)--> its exit status (straight from the session: pidfd)
"""

from __future__ import annotations

import os
import select
import selectors
import signal
import threading
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
        self.server = None                                # or by this fork server
        self.pidfd = -1
        self.child = False  # ours (Popen, or straight into its cgroup): reaped here, not by the server
        self.pool_cgroup: str | None = None
        # Until the fork server answers (start_job does not wait for it): the command's ends of
        # its pipes, kept for a new server if this one dies first.
        self.theirs: list[int] = []
        self.request: tuple[list[str], str | None, dict[str, str] | None, int | None] | None = None
        self.answered = threading.Event()  # set once the answer is handled (or never will be)

    def on_answer(self, what: str, value: object) -> None:
        """On the I/O loop: the fork server's answer, the command's pid (it runs) or what exec
        raised (the job fails with it). A server that dies first: ProcessBackend.unanswered."""
        if what != "started":
            self.backend.server_commands.pop(self.port.job_id, None)
            self.failed_start(value if isinstance(value, BaseException) else WorkerError(repr(value)))
            return
        self.close_theirs()
        pid = int(value)  # type: ignore[call-overload]
        self.on_started(pid, self.server, None)
        if not self.port.started(pid=pid):
            self.kill(signal.SIGKILL)  # stopped while it was being started: it goes at once
        self.register()
        self.answered.set()
        self.maybe_end()

    def awaits_server(self) -> bool:
        return not self.answered.is_set()

    def failed_start(self, exc: BaseException) -> None:
        """The command could not start: the job fails with the reason, and nothing of it stays open."""
        self.close()
        self.status_known = self.finished = True
        self.answered.set()
        self.port.ended(Outcome.failed(exc))

    def close_theirs(self) -> None:
        theirs, self.theirs = self.theirs, []
        for fd in theirs:
            os.close(fd)

    def on_started(self, pid: int, server: ForkClient | None, proc: subprocess.Popen[bytes] | None,
                   cgroup: str | None = None) -> None:
        """It runs as ``pid``: the fork server's child, or ours (started by Popen, ``proc``, or
        straight into ``cgroup``, one of the server's, by _direct)."""
        self.pid = pid
        self.server, self.proc = server, proc
        self.pool_cgroup = cgroup  # given back to the server's pool at the end
        if cgroup is None and server is not None:
            cgroup = server.cgroup_of(f"cmd-{self.port.job_id}")  # the server started it there
        self.tree = ProcessTree(pid, cgroup)
        self.child = proc is not None or self.pool_cgroup is not None
        if self.child:
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
        assert self.pid is not None
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:  # reaped by someone else (an os.wait() of the caller's): status lost
            pid, status = self.pid, 255 << 8
        if pid == 0:
            return
        if self.proc is not None:
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
        if self.finished or self.fds or not self.status_known or self.pid is None:
            return  # (no pid: the server's answer is not in yet, though the exit report may be)
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

    def released(self) -> None:
        cgroup, self.pool_cgroup = self.pool_cgroup, None
        if cgroup is not None and self.server is not None:
            # To the next command, if nothing is left in it and it was never killed.
            self.server.give_cgroup(cgroup, reuse=not (self.tree is not None and self.tree.killed))

    def _close_stdin(self) -> None:
        if self.stdin >= 0:
            self.backend.loop.sel.discard(self.stdin)
            os.close(self.stdin)
            self.stdin = -1

    def reap(self, until: float) -> None:
        """Our child (a command started from the session) that has not been waited for: wait for
        it until ``until`` (time.monotonic), so no zombie of it is left in the session's process."""
        if not self.child or self.status_known or self.pid is None:
            return
        while True:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                return
            if pid != 0:
                self.status, self.status_known = status, True
                return
            left = until - time.monotonic()
            if left <= 0:
                return
            if self.pidfd >= 0:
                select.select([self.pidfd], [], [], left)  # readable once it exits (no loop thread now)
            else:
                time.sleep(min(left, 0.005))

    def close(self) -> None:
        self.backend.handles.discard(self)
        self._unwatch()
        sel = self.backend.loop.sel
        for fd in list(self.fds):
            sel.discard(fd)
            os.close(fd)
        self.fds.clear()
        self._close_pidfd()
        self._close_stdin()
        self.close_theirs()
