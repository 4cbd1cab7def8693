"""The fork server: a small warm Python that forks one worker per process job.

::

    server --fork--> spare: prepares, rehearses a job, then --"ready"--> server
    server --ctl: ("spare", pid) + the spare's socket (SCM_RIGHTS)--> session, which keeps it
    start_job --that socket: token + the job's socket and fd 1/2 pipes--> spare, which becomes the
        job's worker (own process group) and serves the job; it says nothing to the server, which
        counts it a spare until it exits (the session knows the job by the pid)
    no spare left: session --ctl: ("fork", token) + the same descriptors--> server --fork--> worker
    server --ctl: ("forked", token, pid) / ("exited", token or None, pid, wait status)--> session
    command job: session --ctl: ("command", token, argv, cwd, env, umask) + fd 0/1/2--> server
        --posix_spawn (_spawn), own session and cgroup--> the command;
        server --ctl: ("started", token, pid) or ("refused", token, exec's error)--> session
    session closes ctl (or dies) --> server kills every job's processes (cgroup.kill on its directory,
        and every worker group it still has), then exits
    a server lost (killed as unresponsive) --> session --ctl: ("adopt", [its cgroup...])--> the new
        server, which also kills those at the session's end: the lost one's jobs still run

Commands are started here, not from the session, so that they die with it: the server notices the
session's end (the socket closes, even on SIGKILL) and ends them; if the server alone dies, the
session ends them. Where cgroup v2 is writable each job gets a cgroup of its own (see _tree):
nothing it starts can escape its stop or the session's end.

The session hands a job to a spare itself: going through the server woke one more process on the
job's path (~0.4 ms here). The server keeps its own end of each spare's socket, to hear "ready";
a spare that sees the end of that socket was never needed, and exits. A spare that took a job
used to say "taken" at once: that woke the server on the job's path, and it then forked a new
spare while the job ran; now the server hears of it at its exit, and tops up after that.

It is started as a fresh interpreter (never forked from the session, whose size and threads would
make every fork slow and unsafe), preloads the worker runtime, and freezes the GC so children share
its pages. It is a child subreaper, so the orphans a job leaves are reaped here, not left as zombies.
"""

from __future__ import annotations

import array
import contextlib
import gc
import importlib
import os
import pickle
import select
import signal
import socket
import sys
from typing import TYPE_CHECKING, Any

from .._compat import set_child_subreaper
from ._spawn import spawn
from ._tree import (
    Warmer,
    join_cgroup,
    kill_cgroup,
    kill_descendants,
    leave_cgroup,
    make_session_cgroup,
    own_cgroup,
    remove_cgroups,
)

if TYPE_CHECKING:  # only _spawn's Popen fallback loads it (with json: 0.2 MiB here and in spares, bench/FINDINGS.md)
    import subprocess

# Warm spares: children forked ahead of need that wait for a job. A spare pays the copy-on-write
# faults of a new process (3-8 us a page here, several ms in all) before its job arrives, and the
# move into its cgroup, whose first after a quiet moment waits for an RCU grace period (a job
# forked on request pays it: bench/FINDINGS.md, "Born in its cgroup").
SPARES = max(0, int(os.environ.get("PSJOBS_SPARES", "2")))
# Modules of callables pickled by reference are imported here once (when idle), so the next spares
# have them: a worker importing the caller's module itself cost 2.8 ms a job (measured).
PRELOAD = os.environ.get("PSJOBS_PRELOAD", "1") != "0"
FIRST_REQUEST_MS = 5  # how long a new server waits for its first request before it forks spares
QUIET_MS = 2          # spares are forked after this long without a request or an exit


# signal.signal's C function (see _process_worker.set_handler): a child sets handlers with it.
_c_signal: Any = importlib.import_module("_signal")


def main() -> None:
    ctl = socket.socket(fileno=int(sys.argv[1]))
    ctl.setblocking(True)
    ctl.set_inheritable(False)  # commands are spawned without a closing pass (see _spawn)
    set_child_subreaper()  # orphans of jobs are reaped here (not Linux: they go to init)
    # Ctrl+C is for the session, which stops jobs itself. Caught, not ignored: an ignored signal
    # stays ignored across exec, and the commands started here must not ignore it.
    signal.signal(signal.SIGINT, lambda *_: None)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    cgroup = make_session_cgroup()
    # The cgroup migrations of the first workers, made fast while we import (see _tree.Warmer).
    warmer = Warmer(cgroup) if cgroup is not None else None

    # Preload what every job needs, so a forked child starts with it in shared pages.
    import cloudpickle  # noqa: F401

    from .. import _inside  # noqa: F401
    from . import _process_worker as _worker

    _worker.restore_pythonpath()  # jobs see the caller's environment, not the one we needed
    _worker.prepare_ahead()  # in the shared pages: a child switches it on instead of building it

    if warmer is not None:
        warmer.stop()  # this process is single-threaded again before it forks
    gc.collect()
    gc.freeze()
    ctl.send(pickle.dumps(("ready", os.getpid(), cgroup)))
    server = _Server(ctl, (wake_r, wake_w, ctl.fileno()), cgroup)
    try:
        server.serve(wake_r)
    except SessionGone:
        server.shutdown()


class SessionGone(Exception):
    """The session closed its end: the server must end, and take every worker with it."""


class _Server:
    def __init__(self, ctl: socket.socket, own: tuple[int, ...], cgroup: str | None) -> None:
        self.ctl = ctl
        self.cgroup = cgroup                             # every job's cgroup is in it (None: no cgroups)
        self.home = own_cgroup()                         # ours, to come back to after a command's spawn
        self.commands: dict[int, tuple[subprocess.Popen[bytes] | None, str | None]] = {}  # pid -> Popen?, cgroup
        self.null = -1                                   # /dev/null, for commands without input
        self.own = own                                   # descriptors no child may keep
        self.workers: dict[int, Any] = {}                # pid -> token of its job (None: unknown)
        self.spares: dict[int, socket.socket] = {}       # pid -> our end of its socket
        self.by_fd: dict[int, int] = {}                  # that end's fd -> pid
        self.unready: set[int] = set()                   # spares forked that have not said "ready"
        self.backoff = 0                                 # ms before the next spare: spares that die unready
        self.poller = select.poll()
        self.held: list[int] = []                        # descriptors of requests read, not handled yet
        self.adopted: list[str] = []                     # cgroups of this session's lost servers: see adopt

    def tell(self, message: tuple[Any, ...], fds: list[int] | None = None) -> None:
        try:
            if fds:
                socket.send_fds(self.ctl, [pickle.dumps(message)], fds)
            else:
                self.ctl.send(pickle.dumps(message))
        except OSError as exc:
            raise SessionGone() from exc

    def serve(self, wake_r: int) -> None:
        preload: list[str] = []
        poller = self.poller
        poller.register(self.ctl.fileno(), select.POLLIN)
        poller.register(wake_r, select.POLLIN)
        # The session starts us for a job, whose request comes ~0.3 ms after our "ready": it is
        # served before the spares are forked (1.2 ms each here), not after them.
        first_wait = FIRST_REQUEST_MS
        quiet = False  # the last poll found nothing to do
        while True:
            # Spares are made when the server is idle, QUIET_MS without a request or an exit:
            # forking one as a job started competed with that job (a sporadic job 1.3 ms instead of
            # 0.8), and forking one as soon as a worker exited slowed what the session did next
            # (a mp fork Process right after a job: 4.3-5.3 ms instead of 3.8-4.9). Then one fork
            # per pass, so a request that comes meanwhile is served first (a fork takes 1.2 ms here).
            # Spares that die before they are ready (no memory?) are forked again after a wait that
            # doubles each time, never in a tight loop.
            short = len(self.spares) < SPARES
            if short:
                idle_ms = max(self.backoff, first_wait, 0 if quiet else QUIET_MS)
            else:
                idle_ms = QUIET_MS if preload else -1
            try:
                events = poller.poll(idle_ms)
            except InterruptedError:
                events = []
            first_wait = 0
            quiet = not events
            if not events:
                if preload:
                    _preload(preload)  # the spares made from now on have the module
                if short:
                    self.fork_spare()
                continue
            for fd, _mask in events:
                if fd == wake_r:
                    try:
                        os.read(wake_r, 4096)
                    except BlockingIOError:
                        pass
                elif fd in self.by_fd:
                    self.from_spare(self.by_fd[fd])
                else:
                    self.from_session(preload)
            self.reap()

    def from_session(self, preload: list[str]) -> None:
        """Every request the session has sent so far: forks in a row, answered after the last.

        A fork shares every page of this process with the child, so each page the server writes
        next is copied: reading, unpickling and answering between forks copied ~100 pages a fork.
        Requests read together (jobs started back to back) are unpickled first, then forked in
        a row, then answered.
        """
        try:
            msg, fds = _recv_now(self.ctl, 0)
        except InterruptedError:
            return
        except OSError:
            msg, fds = b"", []
        requests: list[tuple[Any, list[int]]] = []
        while msg:
            requests.append((pickle.loads(msg), fds))
            if len(requests) == 64:
                break  # the rest at the next poll
            try:
                msg, fds = _recv_now(self.ctl)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                msg, fds = b"", []
        forked: list[tuple[Any, int]] = []
        # Descriptors of the requests not handled yet: no worker forked before them may keep one.
        self.held = [fd for _, fds in requests for fd in fds]
        try:
            for request, fds in requests:
                del self.held[:len(fds)]
                if request[0] == "fork":
                    forked.append((request[1], self.fork(request[1], fds)))
                elif request[0] == "command":
                    self.command(request[1:], fds)
                else:
                    if request[0] == "preload" and PRELOAD:
                        preload.append(request[1])
                    elif request[0] == "adopt":
                        self.adopt(request[1])
                    for extra in fds:
                        os.close(extra)
        finally:
            self.held = []
            for token, pid in forked:
                self.tell(("forked", token, pid))
        if not msg:
            raise SessionGone()

    def from_spare(self, pid: int) -> None:
        sock = self.spares[pid]
        try:
            msg = sock.recv(4096, socket.MSG_DONTWAIT)
        except (InterruptedError, BlockingIOError):
            return
        except OSError:
            msg = b""
        if msg == b"ready":
            self.unready.discard(pid)
            self.backoff = 0
            self.tell(("spare", pid), [sock.fileno()])  # the session now holds an end too
            return
        self.drop_spare(pid)
        # The end of its socket: it is ending, maybe with a job the session gave it; its exit is
        # reported with no token (the session knows the job by the pid).
        self.workers[pid] = None

    def drop_spare(self, pid: int) -> None:
        sock = self.spares.pop(pid)
        self.by_fd.pop(sock.fileno(), None)
        self.poller.unregister(sock.fileno())
        sock.close()

    def fork_spare(self) -> None:
        """Fork one spare (it says "ready" on its socket when it is)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            status = 70
            try:
                _become_worker(self.own, self.spares, self.cgroup)
                ours.close()
                status = _spare(theirs)
            except BaseException:
                status = 70
            finally:
                os._exit(status)
        theirs.close()
        try:
            os.setpgid(pid, pid)
        except OSError:
            pass
        self.spares[pid] = ours
        self.unready.add(pid)
        self.by_fd[ours.fileno()] = pid
        self.poller.register(ours.fileno(), select.POLLIN)

    def fork(self, token: Any, fds: list[int]) -> int:
        """Fork the worker of a job the session could not give a spare; its pid (to be told)."""
        fd = fds[0]
        outputs = fds[1:3]  # the job's fd 1 and 2: pipes the session reads
        for extra in fds[3:]:
            os.close(extra)
        pid = os.fork()
        if pid == 0:
            status = 70
            try:
                _become_worker(self.own + tuple(self.held), self.spares, self.cgroup)
                _take_outputs(outputs)
                from ._process_worker import serve

                status = serve(fd, fd, capture_fds=len(outputs) < 2, hello_first=False)
            except BaseException:
                status = 70
            finally:
                os._exit(status)
        try:
            os.setpgid(pid, pid)  # also here, so the session may signal the group at once
        except OSError:
            pass
        os.close(fd)
        for source in outputs:
            os.close(source)
        self.workers[pid] = token
        return pid

    def command(self, request: tuple[Any, ...], fds: list[int]) -> None:
        """Start a command job: fds are the command's fd 1, fd 2 and (with input) fd 0. The session
        hears ("started", token, pid) or ("refused", token, the error exec raised) on the control
        socket, before this command's ("exited", ...).

        posix_spawn or Popen (vfork, then exec in C: see _spawn) costs ~0.65 ms here; a
        Python-level fork of this server cost ~6 ms (the child's copy-on-write faults). Neither
        runs Python in the child, so the cgroup is entered the other way: this server steps into
        the job's cgroup for the spawn, and the command is born there (cgroup v2 has no other way
        before exec short of clone3's CLONE_INTO_CGROUP: glibc >= 2.41's posix_spawn, not here).
        """
        token, argv, cwd, env, umask = request
        stdio = fds
        cgroup = None if self.cgroup is None else os.path.join(self.cgroup, f"cmd-{token}")
        answer: tuple[Any, ...]
        try:
            if cgroup is not None:
                join_cgroup(cgroup)
            # The command inherits the umask at the spawn; set and put back around it, as the
            # directory is (this server has one thread).
            mask = os.umask(umask) if umask is not None else None
            try:
                pid, proc = spawn(argv, stdio[2] if len(stdio) > 2 else self.devnull(), stdio[0], stdio[1], cwd, env)
            finally:
                if mask is not None:
                    os.umask(mask)
                if cgroup is not None:
                    leave_cgroup(self.home)
        except Exception as exc:
            answer = ("refused", token, exc)
            if cgroup is not None:
                with contextlib.suppress(OSError):
                    os.rmdir(cgroup)
        else:
            # Kept until reaped here: a dropped Popen of a live child would be waited for by
            # subprocess's own clean-up, which would take its exit status from reap().
            self.commands[pid] = (proc, cgroup)
            self.workers[pid] = token
            answer = ("started", token, pid)
        for source in stdio:
            os.close(source)
        try:
            self.tell(answer)
        except (pickle.PicklingError, TypeError, AttributeError):
            self.tell(("refused", token, OSError(repr(answer[2]))))  # an error that cannot be sent as it is

    def adopt(self, paths: list[str]) -> None:
        """Also end, at the session's end, the jobs of the session's servers that were lost (killed
        as unresponsive): theirs still run, and no server watches them. Only a psjobs server's
        directory beside ours is taken."""
        if self.cgroup is None:
            return
        parent = os.path.dirname(self.cgroup)
        for path in paths:
            if isinstance(path, str) and os.path.dirname(path) == parent \
                    and os.path.basename(path).startswith("psjobs-") and path != self.cgroup:
                self.adopted.append(path)

    def devnull(self) -> int:
        if self.null < 0:
            self.null = os.open(os.devnull, os.O_RDWR)  # close-on-exec, as every descriptor here
            self.own += (self.null,)  # and no worker forked from now on keeps it
        return self.null

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in self.unready:  # a spare that died getting ready: wait before the next one
                self.unready.discard(pid)
                self.backoff = min(1000, max(2, 2 * self.backoff))
            if pid in self.spares:  # a spare, or the worker of a job a spare took (see _spare)
                self.drop_spare(pid)
                self.workers[pid] = None
            if pid in self.workers:
                command = self.commands.pop(pid, None)
                cgroup = None
                if command is not None:
                    proc, cgroup = command
                    if proc is not None:
                        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
                elif self.cgroup is not None:
                    cgroup = f"{self.cgroup}/{pid}"
                # With no token, the session finds the job it may have handed that spare by the pid.
                self.tell(("exited", self.workers.pop(pid), pid, status))
                if cgroup is not None:  # empty unless something of the job outlives it; removed
                    try:  # after the word, off the job's path
                        os.rmdir(cgroup)
                    except OSError:  # not contextlib.suppress: each page this server writes after
                        pass  # a fork is copied (see from_session)

    def shutdown(self) -> None:
        """The session is gone: leave nothing of its jobs behind."""
        pids = list(self.workers) + list(self.spares)
        for sock in self.spares.values():
            sock.close()
        if self.cgroup is not None:
            kill_cgroup(self.cgroup)  # every job's processes, those that left their group too
            for path in self.adopted:
                kill_cgroup(path)  # and those of the servers this one replaced
        else:
            kill_descendants(os.getpid())  # the same, found by a walk (setsid'd ones, orphans)
        for pid in pids:
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
        for pid in pids:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        if self.cgroup is not None:
            for path in [self.cgroup, *self.adopted]:
                # Again: a command the session was starting as it died (_direct) joins its cgroup
                # from a child of the session, which may come after the first kill.
                kill_cgroup(path)
                remove_cgroups(path)  # populated ones stay: their members are dying (SIGKILL)


def _spare(theirs: socket.socket) -> int:
    """In a spare: get ready, wait for a job from the session, serve it; the exit status."""
    from ._process_worker import prepare, rehearse, serve

    prepare()
    rehearse()
    theirs.send(b"ready")
    msg, fds, _, _ = socket.recv_fds(theirs, 4096, 4)
    if not msg or len(fds) < 3:
        return 0  # the server went away, or the session closed: this spare was never needed
    # No word to the server (its wake-up was on the job's path): ``theirs`` stays open until this
    # process exits, so the server neither counts it gone nor forks a spare while the job runs.
    _take_outputs(fds[1:3])
    return serve(fds[0], fds[0], capture_fds=False, hello_first=False)


def _recv_now(sock: socket.socket, flags: int = socket.MSG_DONTWAIT) -> tuple[bytes, list[int]]:
    """One message and its descriptors, or BlockingIOError (socket.recv_fds drops its flags
    argument before Python 3.12). The descriptors are close-on-exec: a command spawned here must
    not keep another job's pipe open (nothing closes the rest in the child, see _spawn)."""
    msg, ancdata, _, _ = sock.recvmsg(1 << 20, socket.CMSG_LEN(4 * 4), flags | socket.MSG_CMSG_CLOEXEC)
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    return msg, list(fds)


def _preload(names: list[str]) -> bool:
    """Import the modules asked for; True if any was imported. A module that fails is skipped."""
    import importlib
    import threading

    imported = False
    while names:
        name = names.pop(0)
        if name in sys.modules:
            continue
        try:
            importlib.import_module(name)
            imported = True
        except BaseException:
            continue  # the worker will import it (and report the error) itself
        if threading.active_count() > 1:
            # The module started a thread: forking a threaded process is unsafe, so stop here.
            global PRELOAD
            PRELOAD = False
            names.clear()
    if imported:
        gc.freeze()
    return imported


def _become_worker(own: tuple[int, ...], spares: dict[int, socket.socket], cgroup: str | None) -> None:
    """In a child just forked: a process group and a cgroup of its own, default signals, and none
    of the server's descriptors (nor its spares' sockets, whose end must be seen by those spares)."""
    os.setpgid(0, 0)
    if cgroup is not None:
        join_cgroup(f"{cgroup}/{os.getpid()}")  # not os.path.join: ~11 pages more to copy (see join_cgroup)
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
        _c_signal.signal(sig, _c_signal.SIG_DFL)  # signal.signal's enums cost page faults here
    for fd in own:
        os.close(fd)
    for sibling in spares.values():
        sibling.close()


def _take_outputs(outputs: list[int]) -> None:
    """The job's fd 1 and 2 become the pipes the session reads."""
    for target, source in zip((1, 2), outputs):
        os.dup2(source, target)
        os.close(source)


if __name__ == "__main__":
    main()
