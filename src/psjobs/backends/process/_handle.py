"""What every process job's handle does at its end: hand the records over, stop, end once.

A stop signals the job's whole process tree (see worker/_tree: its cgroup where it has one, else
its group and its descendants), SIGKILLs it after the grace period, and the job is Stopped only
when nothing of it is left, escaped descendants included.
"""

from __future__ import annotations

import functools
import os
import selectors
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..._errors import WorkerError
from ..._records import ErrorRecord, InformationRecord, Stream
from ...core import Outcome
from ...worker._tree import ProcessTree

if TYPE_CHECKING:
    from ...core import Entry, JobPort
    from ._backend import ProcessBackend
    from ._forkclient import ForkClient



class Handle:
    """Common end-of-job logic for a process job (callable or command)."""

    backend_kind = "process"

    def __init__(self, backend: ProcessBackend, port: JobPort) -> None:
        self.backend = backend
        self.port = port
        self.pid: int | None = None
        self.status: int | None = None
        self.status_known = False
        self.finished = False
        self.stop_at: float | None = None
        self.held: list[Entry] = []  # records of the frames of one read, handed over together
        self.tree: ProcessTree | None = None  # every process of the job, once its first one exists
        self.pidfd = -1  # the first process's pidfd, once it exists: its exit, without polling
        self.watched: dict[int, int] = {}  # pid -> pidfd of what a stop waits to see exit
        self.server: ForkClient | None = None  # the fork server that started it, or is to

    def _hand_over(self) -> list[Entry]:
        held, self.held = self.held, []
        return held

    def _close_pidfd(self) -> None:
        """Stop watching the process's pidfd (a worker's or a command's) and close it."""
        if self.pidfd >= 0:
            self.backend.loop.sel.discard(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = -1

    def kill(self, sig: int) -> None:
        if self.tree is None or self.finished:
            return
        if sig == signal.SIGKILL:
            self.tree.kill()
        else:
            self.tree.signal(sig)

    def stop(self, grace: float) -> None:
        def escalate() -> None:
            if not self.finished:
                self.kill(signal.SIGKILL)

        self.stop_at = time.monotonic()
        if self.tree is not None and not self.finished:
            # A suspended job must run to act on its SIGTERM; one look at the tree for both.
            self.tree.signal(signal.SIGTERM, signal.SIGCONT)
        self.backend.loop.call_later(grace, escalate)

    def end(self, entries: list[Entry], outcome: Outcome) -> None:
        """Finish the job, after making sure (on a stop) that nothing of its group is left."""
        if self.finished:
            return
        if self.port.stop_requested and self.tree is not None:
            self._after_stop(entries, outcome, time.monotonic() + 5.0)
            return
        self.finished = True
        self.released()  # before the end is told: whoever waits for it may start the next job
        # Its descriptors are closed before the end is told, and the end is this thread's last
        # work for the job. Closed after it, with the GIL handed to the woken thread, the close
        # met that thread's next start_job: a lambda job right after another, start -> result
        # 1,017 -> 888 us with the close first (load 1.1-1.5; bench/FINDINGS.md, thirteenth session).
        self.close()
        self.port.ended(outcome, entries, own_thread=self.backend.loop.on_loop())

    def _after_stop(self, entries: list[Entry], outcome: Outcome, deadline: float) -> None:
        assert self.tree is not None
        if self.finished:
            return  # a member's exit and the timer both came
        # A job that honoured its stop has usually left nothing: then no kill (a cgroup.kill write
        # and a look at its members, ~35 us on every stop; bench/FINDINGS.md, twelfth session).
        gone = self.tree.gone()
        if not gone:
            self.tree.kill()
            gone = self.tree.gone()
        if gone or time.monotonic() > deadline:
            self.finished = True
            self.close()  # the pidfds this stop watched too
            self.released()
            self.port.ended(outcome, entries)
            return
        # Looked at again as each process left exits (its pidfd), not only every 2 ms: the I/O
        # loop's timers have epoll's millisecond, and a look 2 ms later made half the stops of
        # `sleep 100 | cat` take 1.8-2.8 ms instead of 0.6 (bench/FINDINGS.md, seventh session).
        again = functools.partial(self._after_stop, entries, outcome, deadline)
        self._watch(self.tree.left(), again)
        self.backend.loop.call_later(0.002, again)

    def _watch(self, pids: list[int], again: Callable[[], None]) -> None:
        """Call ``again`` when any of ``pids`` exits (on the I/O loop), once per process."""
        sel = self.backend.loop.sel
        for pid in pids:
            if pid in self.watched:
                continue
            try:
                fd = os.pidfd_open(pid)
            except OSError:
                continue  # gone already, or no pidfd here: the timer looks again
            self.watched[pid] = fd
            sel.register(fd, selectors.EVENT_READ, functools.partial(self._exited_while_stopping, pid, again))

    def _exited_while_stopping(self, pid: int, again: Callable[[], None], mask: int) -> None:
        self._unwatch(pid)
        again()

    def _unwatch(self, only: int | None = None) -> None:
        """Stop watching ``only`` (None: every process a stop waits for), and close its pidfd."""
        for pid in [only] if only is not None else list(self.watched):
            fd = self.watched.pop(pid, None)
            if fd is not None:
                self.backend.loop.sel.discard(fd)
                os.close(fd)

    def awaits_server(self) -> bool:
        """Whether the job still waits for its fork server's answer (see ProcessBackend._check_server)."""
        return False

    def released(self) -> None:
        """The job is over and nothing acts on its processes any more (a stop's last kill is done)."""

    def broken(self, exc: BaseException) -> None:
        """Something went wrong reading this job: fail it (never hang it)."""
        self.kill(signal.SIGKILL)
        self.close()
        err = exc if isinstance(exc, WorkerError) else WorkerError(
            f"{self.port.describe()} failed: psjobs could not start or read its worker ({type(exc).__name__}: "
            f"{exc}); the records that came before are kept. Start it again; if it fails the same way, report it "
            f"as a psjobs bug with the traceback the psjobs.process logger wrote")
        if err is not exc:
            err.__cause__ = exc
        self.status_known = True
        self.end(self._hand_over(), Outcome.failed(err))

    def close(self) -> None:
        raise NotImplementedError




def line_entries(entries: list[Entry], stream: Stream, lines: list[str], now: float, info: bool = False) -> None:
    for text in lines:
        if stream is Stream.INFORMATION:
            entries.append((Stream.INFORMATION, InformationRecord(text, now, "localhost"), now))
        elif stream is Stream.OUTPUT:
            entries.append((Stream.OUTPUT, text, now))
        else:
            entries.append((Stream.ERROR, ErrorRecord(text, now, "localhost"), now))
