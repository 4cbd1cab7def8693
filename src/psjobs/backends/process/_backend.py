"""Process jobs (BackgroundJob): the session side.

::

    start_job(callable) --JOB frame--> job socket <--RECORDS (HELLO with the first), DONE-- worker
          |                                                                        ^
          +-- job socket + fd 1/2 pipes --> a warm spare the fork server handed over
          +-- (no spare left) ("fork", token) + the same --> fork server --fork--+
                                           fork server --("spare"/"forked"/"exited")--> I/O loop
    start_job("cmd" | [argv]) --_direct: clone3 (or vfork) into a cgroup under the fork server's, exec--> command
        (no cgroup or no _cspawn: ("command") + pipes --> fork server --posix_spawn--> command;
         the session host's: Popen, own session)  stdout lines -> output, stderr lines -> errors,
                                                      exit status <- pidfd, or fork server ("exited")
    one I/O loop thread (selectors) reads every job's socket, pipe and pidfd of the session;
    the thread that starts a job registers its descriptors itself (see _SharedSelector)

A callable's job ends at its DONE frame, the worker's last word (what it wrote on fd 1 and 2 is in
the pipes by then, and is read first); a command's when it has exited and its pipes reached their
end. So a receive right after a wait sees the tail. A stop sends SIGTERM to the job's whole
process tree, then SIGKILL after the grace period, and the job is Stopped only when no process of
it is left (worker/_tree: the job's cgroup where cgroup v2 is writable, else its process group and
its descendants).

The fork server ends commands when the session's process ends, however it ends (SIGKILL,
``os._exit``, a Session never closed): those the session started itself into cgroups under the
server's (_direct, where cgroup v2 is writable and the _cspawn extension was built) with the
server's cgroup, the others because the server started them. The session host's commands are
started straight from it (``Session.commands_outlive_process``): they outlive the host, whose next
start ends them (host/_store.kill_orphans), as callable jobs never could.
"""

from __future__ import annotations

import contextlib
import functools
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

from ..._errors import ProtocolError, WorkerError
from ...core import CALL, Backend, JobPort, Outcome
from ...worker._wire import JobMsg, pickle_call

if TYPE_CHECKING:
    from ...core import JobSpec, Session

from . import _direct
from ._call import CallHandle
from ._command import CommandHandle
from ._forkclient import ANSWER_TIMEOUT, ForkClient, ServerGone, environ_now, find_psjobs
from ._handle import Handle
from ._loop import SOCK_BUF, IOLoop


class ProcessBackend(Backend):
    """Runs BackgroundJob children: callables in forked workers, commands straight from here."""

    can_pause = True       # SIGSTOP / SIGCONT to the job's process group
    can_send_input = True  # an ANSWER frame to the worker's read_host
    # A callable's job is NotStarted until its worker exists, yet its JOB frame is on the way: a
    # stop then must withdraw it (CallHandle.withdraw), or the worker would run it unseen.
    stops_unstarted = True
    # Its processes are killed at the end of the grace period; what can outlast that holds a pipe.
    stuck_stop = ("a process it started left its process group (setsid, a daemon) and still holds its output "
                  "open, or cannot be killed (an uninterruptible wait); it ends Stopped once that process ends")

    def __init__(self, session: Session) -> None:
        super().__init__(session)
        self.loop = IOLoop()
        self.pending_calls: dict[int, CallHandle] = {}  # token -> handle, until the worker exited
        self.spare_tokens: dict[int, int] = {}           # pid of a spare given a job -> its token
        self.spawned: dict[int, subprocess.Popen[bytes]] = {}  # workers started as fresh interpreters
        self.handles: set[Handle] = set()                # every handle whose descriptors are open
        self.server_commands: dict[int, CommandHandle] = {}  # token -> a command the fork server started
        self._server: ForkClient | None = None
        # The cgroups of servers that were lost while their jobs ran: each new server is told, so
        # that it ends those jobs with the session (no server watches them any more).
        self.lost_cgroups: list[str] = []
        self._server_lock = threading.Lock()
        self._preloaded: set[tuple[int, str]] = set()  # (server pid, module) asked for
        self._closed = False
        self.start_method = os.environ.get("PSJOBS_START_METHOD", "fork")
        self._base: dict[str, str] | None = None  # the environment the fork servers start with
        self._base_data: Any = None
        self._base_lock = threading.Lock()

    def base_environ(self) -> dict[str, str]:
        """The environment of every fork server of this session: the caller's at the first one.

        A server restarted after a death gets the same one, so a job compared against it at its
        start is still right if it is handed to the new server.
        """
        base = self._base
        if base is None:
            with self._base_lock:
                base = self._base
                if base is None:
                    # Both from one copy of the mapping, published environment last: another thread
                    # that starts a job meanwhile, or changes os.environ, sees a pair that agrees
                    # (two reads of os.environ could differ, and a job then ran in the wrong one).
                    data = environ_now()
                    if data is None:
                        base = dict(os.environ)
                    else:
                        self._base_data = dict(data)
                        base = {os.fsdecode(k): os.fsdecode(v) for k, v in self._base_data.items()}
                    self._base = base
        return base

    def _job_environ(self, spec: JobSpec) -> dict[str, str] | None:
        """What the worker must set: None when it already has the caller's environment."""
        if spec.env is not None:
            return spec.env
        if self.start_method == "spawn":
            return None  # a fresh interpreter inherits the caller's environment as it is now
        if self._base is None:
            self.base_environ()  # the first server is about to start with this environment
        data = environ_now()
        if data is not None and data == self._base_data:
            return None
        return dict(os.environ)

    def prepare(self, spec: JobSpec) -> None:
        if spec.kind != CALL or spec.payload is not None:
            return  # a command, or a call pickled by a connected client (core/_shipped)
        try:
            spec.payload = pickle_call(spec.target, spec.args, spec.kwargs, spec.init, spec.input)
        except Exception as exc:
            raise TypeError(f"start_job: the callable {spec.command!r} or its arguments cannot be sent to "
                            f"another process ({type(exc).__name__}: {exc}); pass picklable values, or use "
                            f"start_thread_job to share objects") from exc

    # --- starting ----------------------------------------------------------------------------
    def start(self, ports: list[JobPort], spec: JobSpec) -> None:
        for port in ports:
            try:
                if spec.kind == CALL:
                    self._start_call(port, spec)
                else:
                    self._start_command(port, spec)
            except (OSError, ProtocolError) as exc:
                # Only at the start can it fail so (EMFILE from socketpair, pipe or Popen; a frame
                # over the limit): the job exists already, so it fails with the reason instead of
                # staying NotStarted with its parent Running for good (issue 13, case 7).
                handle = port.data
                if isinstance(handle, Handle):
                    self.pending_calls.pop(port.job_id, None)
                    handle.close()
                err = WorkerError(f"start_job: {port.describe()} could not start: {type(exc).__name__}: {exc}; "
                                  f"free some descriptors (or shrink its arguments) and start it again")
                err.__cause__ = exc
                port.ended(Outcome.failed(err))

    def _start_call(self, port: JobPort, spec: JobSpec) -> None:
        if port.finished:
            return  # stopped by another thread between its registration and now: it never runs
        assert spec.payload is not None  # prepare() pickled it
        path = spec.options.get("sys_path") or sys.path  # a connected client's (core/_shipped), else ours
        job_frame = JobMsg(spec.payload, spec.cwd, self._job_environ(spec), list(path),
                           spec.options.get("umask")).frame()  # a host client's umask (core/_shipped)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for s in (ours, theirs):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCK_BUF)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCK_BUF)
        ours.setblocking(False)
        try:
            sent = ours.send(job_frame)  # usually all of it: the loop writes any rest
        except BlockingIOError:
            sent = 0
        try:
            handle = CallHandle(self, port, ours, theirs, job_frame[sent:])  # its pipes: EMFILE here too
        except OSError:
            ours.close()
            theirs.close()
            raise
        handle.module = getattr(spec.target, "__module__", None)
        port.data = handle
        self.handles.add(handle)
        self.pending_calls[port.job_id] = handle
        handle.register()  # here, not on the loop thread: see _SharedSelector
        if port.finished:
            handle.withdraw()  # a stop that came before port.data was set did not see the handle
        self._submit(handle)

    def _live_server(self) -> ForkClient | None:
        """The session's fork server, started if need be; None where none can serve (spawn)."""
        with self._server_lock:
            if self._closed:
                raise WorkerError("the session is closing; no new process job can start")
            server = self._server
            if server is None or not server.alive:
                try:
                    server = self._server = ForkClient(self)
                    if self.lost_cgroups:
                        server.adopt(list(self.lost_cgroups))
                except (OSError, WorkerError) as exc:
                    # Forking cannot serve here: a fresh interpreter per job still works.
                    print(f"psjobs: no fork server ({exc}); starting process jobs as fresh "
                          f"interpreters", file=sys.stderr)
                    self.start_method = "spawn"
                    return None
            return server

    def _submit(self, handle: CallHandle) -> None:
        assert handle.worker_sock is not None
        if self.start_method == "spawn":
            self._spawn(handle)
            return
        for _attempt in range(3):
            server = self._live_server()
            if server is None:
                self._spawn(handle)
                return
            try:
                handle.server = server
                token = handle.port.job_id
                with self.loop.sel.mutex:  # no handler runs meanwhile (see hand_to_spare)
                    if handle.worker_sock is None or handle.pid is not None:
                        return  # a resubmit after a server's death, but its worker had said HELLO
                    fds = handle.worker_fds()
                    pid = server.hand_to_spare(token, fds)
                    if pid is not None:
                        handle.on_forked(pid)
                if pid is None:
                    server.submit(token, fds)
                    self.loop.call_later(ANSWER_TIMEOUT, functools.partial(
                        self._check_server, weakref.ref(handle), server, time.monotonic()))
                self._ask_preload(server, handle.module)
                return
            except OSError:
                handle.server = None  # this loop sends it again: server_lost must not as well
                server.alive = False
                self.loop.call_soon(server.lost)
        raise WorkerError("the fork server keeps dying; process jobs cannot start")

    def _check_server(self, ref: weakref.ref[Handle], server: ForkClient, began: float) -> None:
        """On the loop: the server has not answered for a job yet (forked its worker, or started
        its command); a frozen one goes, and the job goes to a new one. (A weak reference: a job
        removed meanwhile is not kept, nor its arguments, for the wait.)"""
        handle = ref()
        if handle is None or handle.server is not server or not handle.awaits_server():
            return
        why = server.unresponsive(time.monotonic() - began)
        if why is None:
            if server.alive:
                self.loop.call_later(ANSWER_TIMEOUT, functools.partial(self._check_server, ref, server, began))
            return
        server.replace(why)

    def _ask_preload(self, server: ForkClient, module: str | None) -> None:
        if not module or module == "__main__" or module.startswith("psjobs"):
            return  # __main__'s functions travel by value; psjobs is loaded already
        key = (server.proc.pid, module)
        if key not in self._preloaded:
            self._preloaded.add(key)
            server.preload(module)

    def _spawn(self, handle: CallHandle) -> None:
        assert handle.worker_sock is not None
        fd = handle.worker_sock.fileno()
        env = dict(os.environ)
        find_psjobs(env, [env.get("PYTHONPATH", "")])
        proc = subprocess.Popen([sys.executable, "-m", "psjobs.worker._process_worker", str(fd)], pass_fds=[fd],
                                stdin=subprocess.DEVNULL, stdout=handle.w_out, stderr=handle.w_err,
                                env=env, start_new_session=True)
        pidfd = os.pidfd_open(proc.pid)
        self.spawned[proc.pid] = proc

        def on_exit(mask: int) -> None:
            pid, status = os.waitpid(proc.pid, os.WNOHANG)
            if pid == 0:
                return
            proc.returncode = os.waitstatus_to_exitcode(status)
            self.spawned.pop(proc.pid, None)
            self.loop.sel.unregister(pidfd)
            os.close(pidfd)
            self.pending_calls.pop(handle.port.job_id, None)
            handle.on_exited(status)

        def register() -> None:
            self.loop.sel.register(pidfd, selectors.EVENT_READ, on_exit)

        self.loop.call_soon(register)
        self.loop.call_soon(lambda: handle.on_forked(proc.pid))

    def server_lost(self, server: ForkClient) -> None:
        """The fork server died: jobs it had not forked yet go to a new one; the others finish."""
        if server.cgroup is not None and server.cgroup not in self.lost_cgroups:
            self.lost_cgroups.append(server.cgroup)  # the next server ends what still runs there
            current = self._server
            if current is not None and current is not server and current.alive:
                current.adopt([server.cgroup])  # it started before this report: told now
        for handle in list(self.pending_calls.values()):
            if handle.server is not server:
                continue  # already sent to the new server
            if handle.pid is None and handle.worker_sock is not None:
                threading.Thread(target=self._resubmit, args=(handle,), daemon=True).start()
            elif handle.pid is not None:
                self.pending_calls.pop(handle.port.job_id, None)
                self.spare_tokens.pop(handle.pid, None)
                handle.on_server_lost()
        for command in list(self.server_commands.values()):
            if command.server is server:
                if command.pid is None:
                    self.unanswered(command, server)
                    continue
                self.server_commands.pop(command.port.job_id, None)
                command.on_server_lost()

    def _resubmit(self, handle: CallHandle) -> None:
        try:
            self._submit(handle)
        except Exception as exc:
            err = exc  # the name of an except clause does not outlive it
            self.loop.call_soon(lambda: handle.broken(err))

    def _start_command(self, port: JobPort, spec: JobSpec) -> None:
        if port.finished:
            return  # stopped by another thread between its registration and now: it never runs
        feed = None
        if spec.input is not None:
            feed = b"".join(f"{item}\n".encode() for item in spec.input)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        in_r, in_w = os.pipe() if feed is not None else (-1, None)
        handle = CommandHandle(self, port, out_r, err_r, in_w, feed, spec.options.get("output_errors", "replace"))
        handle.theirs = [out_w, err_w] + ([in_r] if in_r >= 0 else [])  # closed with the handle
        try:
            server = None
            if not self.session.commands_outlive_process and self.start_method != "spawn":
                server = self._live_server()
            if server is None:
                self._popen_command(handle, spec)
                port.data = handle
                self.handles.add(handle)
                return
            port.data = handle  # before the start: a stop meanwhile waits for it (answered)
            self.handles.add(handle)
            if server.cgroup is not None and _direct.available():
                self._spawn_command(handle, spec, server)
                return
            env = spec.env if spec.env is not None else self._job_environ(spec)
            handle.request = (list(spec.argv), spec.cwd, env, spec.options.get("umask"))
            self._send_command(handle, server)
        except Exception as exc:  # EMFILE, Popen's or exec's error, a dead server...: the job fails
            handle.failed_start(exc)  # with it, and nothing of the handle stays open

    def _spawn_command(self, handle: CommandHandle, spec: JobSpec, server: ForkClient) -> None:
        """Start the command from here, into a cgroup of its own under the fork server's (_direct):
        our child, so its exit comes on a pidfd; the server still ends it with the session."""
        cgroup = server.take_cgroup()
        try:
            pid = _direct.spawn(spec.argv, spec.env, handle.theirs, spec.cwd, spec.options.get("umask"), cgroup)
        except BaseException:
            server.give_cgroup(cgroup)
            raise
        finally:
            handle.close_theirs()
        handle.on_started(pid, server, None, cgroup=cgroup)
        if not handle.port.started(pid=pid):
            handle.kill(signal.SIGKILL)  # stopped while it was being started: it goes at once
        handle.register()
        handle.answered.set()

    def _popen_command(self, handle: CommandHandle, spec: JobSpec) -> None:
        """Start the command straight from here (the session host's, or with no fork server)."""
        theirs = handle.theirs
        try:
            proc = subprocess.Popen(spec.argv, stdin=theirs[2] if len(theirs) > 2 else subprocess.DEVNULL,
                                    stdout=theirs[0], stderr=theirs[1], cwd=spec.cwd, env=spec.env,
                                    start_new_session=True, umask=spec.options.get("umask", -1))
        finally:
            handle.close_theirs()
        handle.on_started(proc.pid, None, proc)
        if not handle.port.started(pid=proc.pid):
            handle.kill(signal.SIGKILL)  # stopped while Popen ran: the job is over, its process too
        handle.register()  # reaps it and closes its pipes either way
        handle.answered.set()

    def _send_command(self, handle: CommandHandle, server: ForkClient | None) -> None:
        """Ask the fork server to start the command, and return: its answer comes to the I/O loop
        (handle.on_answer), so commands started back to back are spawned while the next is asked for."""
        token = handle.port.job_id
        assert handle.request is not None
        on_loop = self.loop.on_loop()  # it reads the answers: no wait
        for _attempt in range(3):
            if server is None:
                raise WorkerError("the fork server died, and no other can start; the command was not started")
            server.take_room(wait=not on_loop)
            # Under the loop's mutex: the answer is not handled before the handle knows its server.
            with self.loop.sel.mutex:
                self.server_commands[token] = handle
                handle.server = server
                try:
                    server.send_command(token, *handle.request[:3], handle.theirs, handle.request[3])
                except ServerGone as exc:
                    server.give_room()
                    self.server_commands.pop(token, None)
                    server.alive = False
                    self.loop.call_soon(server.lost)
                    if server.may_have_started(token):  # then never again: a command runs at most once
                        raise WorkerError(f"the fork server (pid {server.proc.pid}) died while it started "
                                          f"Job {token}'s command ({exc}); psjobs ended what it may have "
                                          f"begun and did not start it twice. Start the job again") from None
                else:
                    self.loop.call_later(ANSWER_TIMEOUT, functools.partial(
                        self._check_server, weakref.ref(handle), server, time.monotonic()))
                    return
            # A new server outside the loop's mutex: starting one registers it with the loop, and
            # another thread may be doing so under _server_lock (the soak deadlocked here).
            server = self._live_server()
        raise WorkerError("the fork server keeps dying; command jobs cannot start")

    def unanswered(self, handle: CommandHandle, server: ForkClient) -> None:
        """On the loop: the fork server died before it answered for a command. It starts on a new
        server if it surely never ran; else its job fails (a command runs at most once)."""
        self.server_commands.pop(handle.port.job_id, None)
        threading.Thread(target=self._restart_command, args=(handle, server), name="psjobs-command-again",
                         daemon=True).start()

    def _restart_command(self, handle: CommandHandle, server: ForkClient) -> None:
        token = handle.port.job_id
        try:
            if server.may_have_started(token):
                raise WorkerError(f"the fork server (pid {server.proc.pid}) died while it started Job {token}'s "
                                  f"command; psjobs ended what it may have begun and did not start it twice. "
                                  f"Start the job again")
            if handle.port.finished:
                raise WorkerError(f"Job {token} was stopped before its command started")
            self._send_command(handle, self._live_server())
        except Exception as exc:
            err = exc  # the name of an except clause does not outlive it
            self.loop.call_soon(lambda: handle.failed_start(err))

    def _until_answered(self, handle: Handle, most: float = ANSWER_TIMEOUT) -> None:
        """A command the fork server has not answered for yet: until it has, for ``most`` seconds
        at most (a stop or a suspend then reaches the process; one that starts later is killed
        as it starts, CommandHandle.on_answer)."""
        if isinstance(handle, CommandHandle) and not self.loop.on_loop():
            handle.answered.wait(most)

    # --- stopping and the rest -----------------------------------------------------------------
    def stop(self, port: JobPort, grace: float) -> None:
        handle = port.data
        if isinstance(handle, CallHandle) and handle.pid is None:
            # No worker known yet (the job is Stopped already): withdraw the job now, in this
            # thread, so that a worker that has not begun it never does; one that raced past
            # is killed as soon as it is known (CallHandle._started).
            handle.withdraw()
        elif isinstance(handle, Handle):
            self._until_answered(handle, grace)
            self.loop.call_soon(lambda: handle.stop(grace))

    def can_rerun(self, port: JobPort) -> bool:
        # The fork server reports a worker's exit by the job's id, and may do so after the job
        # ended: a retry started before that report would take it for its own worker's.
        job_id = port.job_id
        return job_id not in self.pending_calls and job_id not in self.server_commands

    def forget(self, port: JobPort) -> None:
        # Nothing is dropped here: a handle stays in pending_calls until its worker's exit is
        # reported (the fork client pops it), so a stop still in flight finds it and nothing of
        # the job (a worker, its descriptors) outlives the removal unseen (issue 13, case 2).
        pass

    def suspend(self, port: JobPort) -> None:
        """SIGSTOP to the whole process group: nothing of the job runs until resume."""
        handle = port.data
        if isinstance(handle, Handle):
            self._until_answered(handle)
            handle.kill(signal.SIGSTOP)
        port.suspended()

    def resume(self, port: JobPort) -> None:
        handle = port.data
        if isinstance(handle, Handle):
            self._until_answered(handle)
            handle.kill(signal.SIGCONT)
        port.resumed()

    def send_input(self, port: JobPort, text: str) -> None:
        handle = port.data
        if isinstance(handle, CallHandle):
            handle.send_input(text)
        else:
            port.unblocked()

    def close(self) -> None:
        with self._server_lock:
            self._closed = True
            server, self._server = self._server, None
        if server is not None:
            server.close()
        self.loop.close()
        until = time.monotonic() + 2.0  # the server's end killed what is left of them (cgroup.kill)
        for handle in list(self.handles):
            if isinstance(handle, CommandHandle):
                handle.reap(until)
            handle.close()
        # Spawned workers a job was done with may still be exiting; the rest go, as with a fork
        # server (the session stopped its jobs before it came here).
        for proc in list(self.spawned.values()):
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        self.spawned.clear()
