"""The session's side of its fork server: warm spares handed over, forks on request, exits reported.

::

    ForkClient --("fork", token) + job fds--> fork server --fork--> worker
    ForkClient --("command", token, argv...) + stdio--> fork server --posix_spawn--> command
    fork server --("spare" + socket) / ("forked", pid) / ("started" | "refused") / ("exited", status)
        --> ForkClient.on_message

A server that does not answer a request within ANSWER_TIMEOUT is looked at: stopped (SIGSTOP, a
debugger) or silent for ANSWER_LIMIT, it is killed, and what it had not started goes to a new one
(``unresponsive``/``replace``), so no job waits NotStarted on a frozen server.
"""

from __future__ import annotations

import array
import contextlib
import itertools
import os
import pickle
import selectors
import signal
import socket
import subprocess
import sys
import threading
from collections import deque
from typing import TYPE_CHECKING, Any

from ..._compat import environ_snapshot
from ..._errors import WorkerError
from ...worker._tree import cgroup_members, kill_cgroup
from ...worker._wire import (
    CALLER_PYTHONPATH,
)

if TYPE_CHECKING:
    from ._backend import ProcessBackend



# A fork server answers in milliseconds (a fork, or a spare). Past ANSWER_TIMEOUT it is checked:
# a stopped server is replaced at once. One that runs but stays silent (a machine so loaded that
# nothing gets scheduled) is given up to ANSWER_LIMIT, since killing a slow server costs the jobs
# it is starting right then.
ANSWER_TIMEOUT = 5.0
ANSWER_LIMIT = 60.0
# Commands asked for and not answered yet, per server, before a start waits: each holds its pipes'
# ends until then. Enough to keep the server busy while the session goes on.
IN_FLIGHT = 32
# Empty cgroups kept for the next commands started from the session (take_cgroup).
FREE_CGROUPS = 64


def _stopped(pid: int) -> bool:
    """True if ``pid`` is stopped by a signal or a tracer (state T or t in /proc)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2:][:1] in (b"T", b"t")


class ServerGone(Exception):
    """The fork server died before it answered: the request goes to a new one."""


class ForkClient:
    """The session's handle on its fork server process."""

    def __init__(self, backend: ProcessBackend) -> None:
        self.backend = backend
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = dict(backend.base_environ())  # every server of the session: one base for the jobs
        find_psjobs(env, [p for p in sys.path if p and os.path.isdir(p)])
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "psjobs.worker._forkserver", str(theirs.fileno())],
                                         pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, env=env, start_new_session=True)
        finally:
            theirs.close()
        self.sock = ours
        ours.settimeout(30)
        try:
            msg = ours.recv(65536)
        except OSError as exc:
            self.proc.kill()
            self.proc.wait()
            raise WorkerError(f"the fork server did not start: {exc}") from exc
        ready: Any = pickle.loads(msg) if msg else ("",)
        if ready[0] != "ready":
            self.proc.wait()
            raise WorkerError(f"the fork server did not start (it exited with status {self.proc.returncode})")
        ours.settimeout(None)
        # The cgroup directory its jobs are in, each in <it>/<pid> (None: no cgroup v2 here; see _tree).
        self.cgroup: str | None = ready[2]
        self.alive = True
        self.gone = False  # lost() or close() ran
        self.in_flight = 0  # commands asked for and not answered (see take_room)
        self.free_cgroups: list[str] = []  # see take_cgroup
        self.cgroup_names = itertools.count()
        self.room = threading.Condition()
        # Warm spares the server handed over (pid, our end of its socket): a job goes straight
        # to one. Threads starting jobs pop them; the loop thread appends.
        self.spares: deque[tuple[int, socket.socket]] = deque()
        backend.loop.sel.register(self.sock, selectors.EVENT_READ, self.on_message)

    def hand_to_spare(self, token: int, fds: list[int]) -> int | None:
        """Give the job to a warm spare; its pid, or None when no spare is left."""
        while True:
            try:
                pid, sock = self.spares.popleft()
            except IndexError:
                return None
            try:
                socket.send_fds(sock, [pickle.dumps(token)], fds)
            except OSError:
                continue  # that spare died: the next one, or a fork
            finally:
                sock.close()
            # Known before the loop thread can read that this spare exited (the caller holds
            # the loop's mutex): if it died with the job, the server's report has no token.
            self.backend.spare_tokens[pid] = token
            return pid

    def unresponsive(self, waited: float) -> str | None:
        """Why this server is to be replaced after ``waited`` seconds without an answer, or None."""
        if not self.alive:
            return None
        if _stopped(self.proc.pid):
            return f"the fork server (pid {self.proc.pid}) is stopped (SIGSTOP?) and did not answer for {waited:.0f}s"
        if waited >= ANSWER_LIMIT:
            return f"the fork server (pid {self.proc.pid}) did not answer for {waited:.0f}s"
        return None

    def replace(self, why: str) -> None:
        """Kill a server that does not answer; the loop then sees it gone (lost()), and the jobs it
        had not started go to a new one."""
        print(f"psjobs: {why}; psjobs killed it and starts jobs on a new one", file=sys.stderr)
        with contextlib.suppress(OSError):
            self.proc.send_signal(signal.SIGKILL)

    def submit(self, token: int, fds: list[int]) -> None:
        socket.send_fds(self.sock, [pickle.dumps(("fork", token))], fds)

    def send_command(self, token: int, argv: list[str], cwd: str | None, env: dict[str, str] | None,
                     stdio: list[int], umask: int | None = None) -> None:
        """Ask the server to start a command (fd 1, fd 2 and maybe fd 0 in ``stdio``; ``umask``:
        None for the server's), without waiting: its answer, ("started", token, pid) or
        ("refused", token, what exec raised), comes to on_message. Call take_room() first.

        Raises ServerGone when the request cannot be sent.
        """
        try:
            socket.send_fds(self.sock, [pickle.dumps(("command", token, argv, cwd, env, umask))], stdio)
        except OSError as exc:
            raise ServerGone(f"the fork server is gone: {exc}") from exc

    def take_room(self, wait: bool) -> None:
        """Count one more command the server has not answered; with ``wait``, first until fewer
        than IN_FLIGHT are (so a burst of starts holds a bounded number of descriptors)."""
        with self.room:
            while wait and self.in_flight >= IN_FLIGHT and self.alive:
                self.room.wait(0.05)
            self.in_flight += 1

    def give_room(self) -> None:
        """A command's answer came (or will never come)."""
        with self.room:
            self.in_flight -= 1
            self.room.notify()

    def may_have_started(self, token: int) -> bool:
        """After this server died during ``command`` (``token``'s): False only when the command
        surely never started (its cgroup was never made); what it did start is killed. Without
        cgroups there is no telling. The soak (bench/soak.py) saw a command run twice when a retry
        followed a server killed between its exec and its answer."""
        with contextlib.suppress(Exception):
            self.proc.kill()  # frozen or gone: dead either way, so nothing is made after the look
            self.proc.wait(timeout=5)
        path = self.cgroup_of(f"cmd-{token}")
        if path is None:
            return True
        if cgroup_members(path) is None:
            return False
        kill_cgroup(path)
        return True

    def take_cgroup(self) -> str:
        """An empty cgroup directory under this server's, for a command started from the session
        (_direct): one a finished command left empty, else a new one. Reused, not made and removed
        each time: a made and removed cgroup cost 1,000 `true` at once a fifth of their rate."""
        assert self.cgroup is not None
        with contextlib.suppress(IndexError):
            return self.free_cgroups.pop()
        while True:
            path = os.path.join(self.cgroup, f"c{next(self.cgroup_names)}")
            try:
                os.mkdir(path)
                return path
            except FileExistsError:
                continue  # left by a server of ours with the same pid: another name

    def give_cgroup(self, path: str, reuse: bool = True) -> None:
        """A command's cgroup once it ended: kept for the next command when nothing is left in it
        (an escapee of the command keeps it, until the session's end kills it). One that
        cgroup.kill emptied (``reuse`` False) is removed: Linux 6.18 kills a child born in it
        (_cspawn.c, which then starts the command the slower way)."""
        if cgroup_members(path) != []:
            return
        if reuse and self.alive and len(self.free_cgroups) < FREE_CGROUPS:
            self.free_cgroups.append(path)
            return
        with contextlib.suppress(OSError):
            os.rmdir(path)

    def cgroup_of(self, name: int | str) -> str | None:
        """The cgroup directory of one of this server's jobs: a worker's is named by its pid, a
        command's ``cmd-<token>`` (it is made before the command's pid exists)."""
        return None if self.cgroup is None else f"{self.cgroup}/{name}"  # on every job's start: no join

    def preload(self, module: str) -> None:
        self.sock.send(pickle.dumps(("preload", module)))

    def adopt(self, cgroups: list[str]) -> None:
        """This server is to end, at the session's end, the jobs of lost servers (their cgroups)."""
        with contextlib.suppress(OSError):
            self.sock.send(pickle.dumps(("adopt", cgroups)))

    def on_message(self, mask: int) -> None:
        while True:
            try:
                msg, fds = recv_fds_now(self.sock)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                msg, fds = b"", []
            if not msg:
                for fd in fds:
                    os.close(fd)
                self.lost()
                return
            what, token, *rest = pickle.loads(msg)
            if what == "spare" and fds and self.alive:
                self.spares.append((token, socket.socket(fileno=fds.pop(0))))
            for fd in fds:
                os.close(fd)
            if what == "spare":
                continue
            if what in ("started", "refused"):
                self.give_room()
                command = self.backend.server_commands.get(token)
                if command is not None:
                    command.on_answer(what, rest[0])
                continue
            if what == "exited":
                # A job handed to a spare comes with no token: the spare never tells the server.
                pid = rest[0]
                by_pid = self.backend.spare_tokens.pop(pid, None)
                token = by_pid if token is None else token
            handle = self.backend.pending_calls.get(token)
            if handle is None:
                command = self.backend.server_commands.get(token) if what == "exited" else None
                if command is not None:
                    command.on_exited(rest[1])
                continue
            if what == "forked":
                handle.on_forked(rest[0])
            elif what == "exited":
                self.backend.pending_calls.pop(token, None)
                handle.on_exited(rest[1])

    def drop_spares(self) -> None:
        """Close our ends of the spares: a spare whose server is gone then ends by itself."""
        while self.spares:
            _, sock = self.spares.popleft()
            sock.close()

    def lost(self) -> None:
        # Once, whoever calls it first; not keyed on ``alive``, which a caller that saw the server
        # fail (ServerGone, a failed send) clears before it schedules this: its jobs must still move.
        if self.gone:
            return
        self.gone = True
        self.alive = False
        self.backend.loop.sel.discard(self.sock)
        self.sock.close()
        self.drop_spares()
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=1)
        self.backend.server_lost(self)

    def close(self) -> None:
        self.alive = False
        self.gone = True
        self.drop_spares()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def recv_fds_now(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One message and the descriptors it carries, without blocking (socket.recv_fds drops its
    flags argument before Python 3.12)."""
    msg, ancdata, _, _ = sock.recvmsg(65536, socket.CMSG_LEN(4 * 4), socket.MSG_DONTWAIT)
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    return msg, list(fds)


def find_psjobs(env: dict[str, str], more: list[str]) -> None:
    """Let a new interpreter import psjobs (and the caller's modules); it puts the caller's own
    PYTHONPATH back at once (``_worker.restore_pythonpath``), so jobs see the environment unchanged."""
    env[CALLER_PYTHONPATH] = "=" + env["PYTHONPATH"] if "PYTHONPATH" in env else ""
    # The directory that holds the psjobs package (src/ in a checkout), wherever this module sits in it.
    package = sys.modules[__name__.partition(".")[0]].__file__ or ""
    top = os.path.dirname(os.path.dirname(os.path.abspath(package)))
    env["PYTHONPATH"] = os.pathsep.join([top, *more])


def environ_now() -> Any:
    return environ_snapshot()  # os.environ's own mapping: cheap to compare (see _compat)
