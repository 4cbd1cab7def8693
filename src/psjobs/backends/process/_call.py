"""A callable's process job: the session side of one worker (socket frames, fd 1/2 pipes, pidfd).

::

    worker --RECORDS/RECORDS_OOB/PROMPT/DONE frames--> job socket --> CallHandle.on_frame --> the job
           (a batch that does not unpickle here --_salvage.entries--> Snapshots in place, or an error record)
    worker fd 1 / fd 2 --> pipes --> information / error records
    CallHandle --JOB frame (the pickled call), ANSWER--> worker
"""

from __future__ import annotations

import contextlib
import os
import select
import selectors
import signal
import socket
import time
from typing import TYPE_CHECKING

from ..._errors import ProtocolError, WorkerError
from ..._records import Stream
from ...core import Outcome
from ...worker import _salvage as salvage
from ...worker._outcome import load_reason, status_text
from ...worker._procs import Lines
from ...worker._tree import ProcessTree
from ...worker._wire import (
    DONE,
    HELLO,
    PROMPT,
    RECORDS,
    RECORDS_OOB,
    VERSION,
    Answer,
    Done,
    FrameReader,
    Hello,
    Prompt,
    decode_entries,
)
from ._handle import Handle, line_entries

if TYPE_CHECKING:
    from ...core import Entry, JobPort
    from ._backend import ProcessBackend


class CallHandle(Handle):
    """A Python callable served by a forked (or spawned) worker over a socket."""

    def __init__(self, backend: ProcessBackend, port: JobPort, sock: socket.socket, worker_sock: socket.socket,
                 job_frame: bytes) -> None:
        super().__init__(backend, port)
        self.sock = sock
        self.worker_sock: socket.socket | None = worker_sock
        self.reader = FrameReader()
        self.out = memoryview(job_frame)
        self.done: Done | None = None
        self.eof = False
        self.server_lost = False
        self.registered = False
        self.prompt: str | None = None
        self.server = None  # where it was submitted (a new one after a death)
        self.pidfd = -1        # the worker's pidfd, from its HELLO: its exit, without the server
        self.module: str | None = None  # the target's module, for the fork server to preload
        self.exited = False
        self.hello_pid: int | None = None
        # fd 1 and 2 of the worker (C code, child processes): their lines become records.
        r_out, self.w_out = os.pipe2(os.O_CLOEXEC)
        r_err, self.w_err = os.pipe2(os.O_CLOEXEC)
        self.pipes = {r_out: Stream.INFORMATION, r_err: Stream.ERROR}
        self.lines = {r_out: Lines(), r_err: Lines()}

    def worker_fds(self) -> list[int]:
        assert self.worker_sock is not None
        return [self.worker_sock.fileno(), self.w_out, self.w_err]

    def _close_worker_ends(self) -> None:
        if self.worker_sock is not None:
            self.worker_sock.close()
            self.worker_sock = None
        for fd in (self.w_out, self.w_err):
            if fd >= 0:
                os.close(fd)
        self.w_out = self.w_err = -1

    def on_pipe(self, mask: int) -> None:
        for fd in list(self.pipes):
            entries: list[Entry] = []
            self._read_pipe(fd, entries, final=False)
            if entries:
                self.port.records(entries)

    def _read_last(self, entries: list[Entry]) -> None:
        """What fd 1 and 2 hold now, their last partial lines included (the worker is done)."""
        for fd in list(self.pipes):
            self._read_pipe(fd, entries, final=True)

    def _read_pipe(self, fd: int, entries: list[Entry], final: bool) -> None:
        stream = self.pipes[fd]
        now = time.time()
        for _ in range(64 if final else 16):
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                if final:
                    # Nothing more now: its last partial line is taken, and maybe_end closes the
                    # pipe after the job's end is told (two system calls fewer before it).
                    line_entries(entries, stream, self.lines[fd].rest(), now, info=True)
                break
            if not chunk:
                self.backend.loop.sel.discard(fd)
                del self.pipes[fd]
                line_entries(entries, stream, self.lines.pop(fd).rest(), now, info=True)
                os.close(fd)
                break
            line_entries(entries, stream, self.lines[fd].feed(chunk), now, info=True)

    def register(self) -> None:
        if self.sock.fileno() < 0:
            return  # closed before the loop came to it (the session is closing)
        mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.out else 0)
        sel = self.backend.loop.sel
        with sel.mutex:
            self.registered = True
            for fd in self.pipes:
                os.set_blocking(fd, False)
                sel.register(fd, selectors.EVENT_READ, self.on_pipe)
            sel.register(self.sock, mask, self.on_event)

    def on_event(self, mask: int) -> None:
        if mask & selectors.EVENT_WRITE and self.out:
            try:
                n = self.sock.send(self.out)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError:
                n, self.out = 0, memoryview(b"")
            self.out = self.out[n:]
            if not self.out:
                # Not the empty slice: a slice keeps the whole job frame (the call's pickled
                # arguments, maybe large) alive for as long as the job runs.
                self.out = memoryview(b"")
                self.backend.loop.sel.modify(self.sock, selectors.EVENT_READ, self.on_event)
        if mask & selectors.EVENT_READ:
            frames: list[tuple[int, bytes | bytearray]] = []
            try:
                alive = self.reader.read(self.sock, frames)
            except ConnectionResetError:
                alive = False
            for kind, payload in frames:
                self.on_frame(kind, payload)
            if self.hello_pid is not None:
                pid, self.hello_pid = self.hello_pid, None
                if not self.exited:  # a DONE in the same read (a short job) needs no pidfd
                    self._watch_exit(pid)
            if self.held and not self.finished:
                self.port.records(self._hand_over())
            if not alive:
                # What the worker wrote to fd 1 and 2 before its end of stream is taken now, before
                # close() closes the pipes: not only when their events happen to come first.
                last: list[Entry] = []
                self._read_last(last)
                if last:
                    self.port.records(last)
                self.eof = True
                self.close()
                self.maybe_end()

    def on_frame(self, kind: int, payload: bytes | bytearray) -> None:
        if kind == RECORDS or kind == RECORDS_OOB:
            try:
                entries = decode_entries(kind, payload)
            except BaseException as exc:  # a value's own code raised, even SystemExit: never out of the loop
                entries = salvage.entries(kind, payload, exc, self.port.describe(), "localhost")
            # Held until the read's frames are all seen: with DONE they go in the job's last
            # step, one lock and one wake-up of the waiting thread instead of two.
            self.held.extend(entries)
        elif kind == DONE:
            self.done = Done.decode(payload)
            if self.done.event in ("complete", "fail") and not self.port.stop_requested:
                # DONE is the worker's last word and comes after everything it wrote: the job is
                # over now. Waiting for its exit too cost ~0.5 ms a job (the kernel tears down
                # the worker's memory before it closes the socket); the fork server reaps it.
                self.eof = self.exited = True
                self.maybe_end()  # reads what fd 1 and 2 hold, closes them, then finishes the job
                if not self.finished:
                    self.close()  # a stop came meanwhile: it finishes once nothing of the job is left
        elif kind == HELLO:
            hello = Hello.decode(payload)
            if hello.version != VERSION:
                raise ProtocolError(f"the worker speaks protocol {hello.version}, this session {VERSION}; "
                                    f"install the same psjobs on both sides")
            self._started(hello.pid)
            self.hello_pid = hello.pid  # its exit watched once this read's frames are seen
        elif kind == PROMPT:
            if self.held:
                self.port.records(self._hand_over())  # what it wrote before it asked comes first
            self.prompt = Prompt.decode(payload).text
            self.port.blocked(self.prompt)
        else:
            raise ProtocolError(f"unexpected frame kind {kind} from a worker")

    def on_forked(self, pid: int) -> None:
        self._close_worker_ends()
        self._started(pid)

    def _started(self, pid: int) -> None:
        """The worker exists (its HELLO or the server's word, whichever comes first)."""
        if self.pid is not None:
            return
        self.pid = pid
        self.tree = ProcessTree(pid, self.server.cgroup_of(pid) if self.server is not None else None)
        if not self.port.started(pid=pid, own_thread=self.backend.loop.on_loop()):
            # Stopped (or removed) before its worker existed: the job is over for the user, so a
            # worker that began it before it saw the withdrawal (withdraw) goes at once.
            self.kill(signal.SIGKILL)
        elif self.port.stop_requested:  # asked to stop while it was being handed over
            self.stop(self.backend.session.stop_grace)

    def awaits_server(self) -> bool:
        return self.pid is None and not self.port.finished  # its worker not forked yet

    def withdraw(self) -> None:
        """The job ended before its worker was known: shut our sending side, which the worker checks
        right before it begins the job's code (worker/_process_worker._withdrawn), so it never runs.

        Called from the thread that stops the job, not the loop: the withdrawal must be in place
        when stop_job returns. A job frame not fully sent yet cannot be completed any more; the
        worker then sees a truncated frame and runs nothing either.
        """
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)

    def _watch_exit(self, pid: int) -> None:
        # The worker's exit seen here, not through the fork server's report: that report waits
        # for the server, which may be busy forking a spare (measured: up to 30 ms late).
        try:
            self.pidfd = os.pidfd_open(pid)
        except (ProcessLookupError, OSError):
            self.exited = True
            return
        self.backend.loop.sel.register(self.pidfd, selectors.EVENT_READ, self.on_pidfd)

    def on_pidfd(self, mask: int) -> None:
        self._close_pidfd()
        self.exited = True
        self._kill_leftovers()
        if not self.eof and not self.finished:
            # Everything the worker wrote is in the socket now. A child it forked (os.fork, a
            # multiprocessing Pool) may hold the socket and the pipes, and no end of stream would
            # come until it ends, or ever (issue 13, case 3): the worker's exit is the end.
            self._read_rest()
            self.eof = True
        self.maybe_end()
        if self.finished:
            self.close()

    def _read_rest(self) -> None:
        """Read the frames left in the socket of a worker that exited (bounded: its children,
        which could go on writing, were just killed)."""
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        for _ in range(256):  # 16 reads of up to 256 KiB each: 1 GiB, a frame's limit
            if self.finished or self.sock.fileno() < 0 or not poller.poll(0):
                return
            self.on_event(selectors.EVENT_READ)
            if self.eof:
                return

    def _kill_leftovers(self) -> None:
        """Nothing of a job outlives its worker: what it forked goes with its process group."""
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)

    def on_exited(self, status: int | None) -> None:
        self.status = status
        self.status_known = True
        self._kill_leftovers()
        self.maybe_end()

    def on_server_lost(self) -> None:
        self.server_lost = True
        self.maybe_end()

    def maybe_end(self) -> None:
        if self.finished or not self.eof:
            return
        # With DONE, the worker's exit is enough; without it, wait for its status: it says why. A
        # stopped DONE at the end of its stream needs neither where the job has a cgroup: end()
        # waits for its members to be gone (_after_stop, by their pidfds), and the server's word on
        # the exit came ~0.2-0.3 ms later (bench/FINDINGS.md, twelfth session). Without a cgroup,
        # that wait would walk /proc (~1 ms) while the worker still exits: the word is sooner.
        done = self.done
        contained = self.tree is not None and self.tree.cgroup is not None
        over = done is not None and (self.exited or (done.event == "stopped" and contained))
        if not (self.status_known or self.server_lost or over):
            return
        # What the worker printed at fd level is in the pipes now; a grandchild that keeps
        # them open does not hold the job (we take what is there and close).
        entries = self._hand_over()
        self._read_last(entries)
        if self.done is not None:
            done = self.done
            code = done.exit_code
            outcome = Outcome.named(done.event, load_reason(done.reason, done.traceback)
                                    if done.reason is not None else None, code)
            if self.status_known and self.status is not None and self.status != 0 and done.event == "complete":
                outcome = Outcome.failed(WorkerError(f"the worker process {self.pid} {status_text(self.status)} "
                                                     f"after it finished the job"), code)
        elif self.port.stop_requested:
            outcome = Outcome.stopped()
        else:
            status = self.status if self.status_known else None
            # Its exit status is the job's exit code (os._exit(3), or C code's exit(3)).
            code = os.waitstatus_to_exitcode(status) if status is not None and os.WIFEXITED(status) else None
            why = "os._exit, or C code that called exit" if code is not None else "it crashed or was killed"
            outcome = Outcome.failed(WorkerError(
                f"the worker process {self.pid} of Job {self.port.job_id} {status_text(status)} before it "
                f"reported the end of the job ({why}); the records it wrote before are kept. Run the code "
                f"in a thread job or under a debugger to see where"), code)
        self.end(entries, outcome)  # closes every descriptor of the job, unless a stop still waits
        self._close_pipes()  # what the worker wrote to them is in the job now

    def send_input(self, text: str) -> None:
        data = Answer(text).frame()
        self.prompt = None

        def write() -> None:
            self.out = memoryview(bytes(self.out) + data)
            if self.registered:
                self.backend.loop.sel.modify(self.sock, selectors.EVENT_READ | selectors.EVENT_WRITE,
                                             self.on_event)

        # Answered as far as the session knows before the answer can reach the worker: reported
        # after, a worker quick to ask again had its next prompt (Blocked) undone by this report,
        # and nobody answered it (seen: receive_job(wait=True) ran out of time under load).
        self.port.unblocked()
        self.backend.loop.call_soon(write)

    def close(self) -> None:
        self.backend.handles.discard(self)
        self._unwatch()
        if self.registered:
            self.backend.loop.sel.discard(self.sock)
            self.registered = False
        self.sock.close()
        self._close_pidfd()
        self._close_pipes()
        self._close_worker_ends()

    def _close_pipes(self) -> None:
        for fd in list(self.pipes):
            self.backend.loop.sel.discard(fd)
            os.close(fd)
        self.pipes.clear()

