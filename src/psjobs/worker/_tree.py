"""A job's whole process tree, escaped descendants included: what a stop must end.

::

    fork server start --make_session_cgroup--> <our cgroup>/psjobs-<server pid>/   (cgroup v2, writable)
        while it imports --Warmer (a thread)--> moves it between .../warm-a and warm-b, then home
    a worker or command, before it runs anything --join_cgroup--> .../psjobs-<server pid>/<its pid>/
        (a command the session starts itself: .../c<n>/, born there by clone3, or joined by its vfork child: _direct)
    stop --ProcessTree.signal(TERM)--> every member;  kill --> cgroup.kill (or SIGSTOP, walk, SIGKILL)
    ProcessTree.gone() --> the job is Stopped only then
    the session ends --fork server: cgroup.kill on its whole directory--> nothing of any job is left

Two modes, chosen per fork server by whether it could make its cgroup directory:

- **cgroup v2** (the unified hierarchy is mounted and our cgroup is writable, e.g. as root or under
  a systemd delegation): each process job and each command (started by the fork server, or by the
  session into a cgroup under the server's) has a cgroup of its own, and every process it ever
  forks stays in it whatever it does (``setsid``, double fork, a new process group). A stop signals
  every member and ends with ``cgroup.kill``; the job is over when the cgroup is empty (read from
  ``cgroup.procs``, which lists no zombie: no walk of /proc). This is what ``systemd-run`` does. A
  process that moves itself to another cgroup (it takes write access to the cgroup tree) is no
  longer the job's; a job whose first process could not join its cgroup is looked for by its
  process group.
- **process group and descendants** (elsewhere, and for commands started by Popen: the session
  host's, or where there is no fork server): the job's process group plus
  every descendant found in /proc when the stop begins, frozen with SIGSTOP and walked again until
  no new one appears, then killed. A descendant whose parent had already exited before the stop
  (an orphan, reparented to the fork server, a subreaper, or to init) is no longer known to be the
  job's, and is missed; so is one that leaves the group and outlives its parent between two walks.

Standard library only: the fork server and its children import it.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
from collections.abc import Callable

from ._procs import proc_stats, stat_fields

_MAX_WALKS = 20  # fixed-point walks of a frozen tree; each finds what forked during the last one


def own_cgroup() -> str | None:
    """The directory of this process's cgroup v2 (the unified hierarchy), or None."""
    try:
        with open("/proc/self/cgroup") as f:
            path = next((line[3:].strip() for line in f if line.startswith("0::")), None)
        if path is None:
            return None
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                if right.split()[:1] == ["cgroup2"]:
                    mount = left.split()[4]
                    return os.path.join(mount, path.lstrip("/")).rstrip("/")
    except OSError:
        return None
    return None


def make_session_cgroup() -> str | None:
    """A cgroup directory for one fork server's jobs, beside it in the tree; None where cgroup v2
    is missing or not writable (the other mode then serves)."""
    if os.environ.get("PSJOBS_CGROUPS") == "0":
        return None  # asked for the other mode (its tests; a machine whose cgroups are managed)
    base = own_cgroup()
    if base is None:
        return None
    _prune(base)
    path = os.path.join(base, f"psjobs-{os.getpid()}")
    try:
        os.mkdir(path)
    except FileExistsError:
        pass  # left by an earlier process with our pid: reused
    except OSError:
        return None
    if not os.access(os.path.join(path, "cgroup.kill"), os.W_OK):  # Linux >= 5.14
        with contextlib.suppress(OSError):
            os.rmdir(path)
        return None
    return path


def _prune(base: str) -> None:
    """Remove the empty directories of fork servers that died without their clean-up (SIGKILL);
    one whose server lives, or that still holds a process, stays."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(base):
            pid = entry.name.removeprefix("psjobs-")
            if entry.name.startswith("psjobs-") and pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                remove_cgroups(entry.path)


# A cgroup migration takes the kernel's cgroup_threadgroup_rwsem for writing, and the first one
# after an idle moment waits for an RCU grace period: 3-20 ms here, against 25-60 us for one that
# follows another within 10 ms (load 0.1) (bench/FINDINGS.md, "The first job and the RCU grace
# period"). A fork server's first workers join their cgroups right after its start-up, so while
# it imports, a Warmer keeps migrations coming: the grace period is paid beside the imports, not
# on the first job's path.
WARM_EVERY = 0.004   # between moves: a move 10 ms after the last was still fast here, one 50 ms after was not
WARM_AT_MOST = 2.0   # a bound, should the server never stop it


class Warmer:
    """A thread that moves this process between two cgroups under its session cgroup ``cgroup``
    until ``stop()``, which leaves the process back in its own (``cgroup``'s parent, where
    make_session_cgroup made it) and removes the two cgroups."""

    def __init__(self, cgroup: str) -> None:
        import threading  # the fork server's children never see it: stop() joins it before any fork

        self._dirs = (os.path.join(cgroup, "warm-a"), os.path.join(cgroup, "warm-b"))
        self._home = os.path.dirname(cgroup)
        self._r, self._w = os.pipe()
        self._thread = threading.Thread(target=self._run, name="psjobs-warm", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + WARM_AT_MOST
        moves = 0
        try:
            for path in self._dirs:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(path)
            while time.monotonic() < deadline:
                _write(self._dirs[moves & 1], "cgroup.procs", b"0")
                moves += 1
                if select.select([self._r], [], [], WARM_EVERY)[0]:
                    break
        except OSError:
            pass  # a cgroup we may not move into (a managed tree): no warming, nothing else changes
        finally:
            if moves:
                leave_cgroup(self._home)
            for path in self._dirs:
                with contextlib.suppress(OSError):
                    os.rmdir(path)

    def stop(self) -> None:
        os.close(self._w)
        self._thread.join()
        os.close(self._r)


def join_cgroup(path: str) -> None:
    """Move this process into the cgroup ``path``, made if need be.

    Called before the job's code runs (or its command is spawned), so that whatever it starts is
    born inside. A failure leaves it where it is: its process group still covers what stays in it.
    System calls and little else: in a worker just forked, each page of the server's objects that
    Python writes (a reference count) is copied. With contextlib.suppress and os.path.join the
    join copied ~38 pages a worker; now ~17, the system calls alone ~6-8 (bench/FINDINGS.md,
    thirteenth session).
    """
    try:
        try:
            os.mkdir(path)
        except FileExistsError:
            pass
        _write(path, "cgroup.procs", b"0")  # 0: the writing process
    except OSError:
        pass


def leave_cgroup(home: str | None) -> None:
    """Move this process back to its own cgroup ``home`` (after spawning a command from another)."""
    if home is None:
        return
    with contextlib.suppress(OSError):
        _write(home, "cgroup.procs", b"0")


def kill_cgroup(path: str) -> None:
    """SIGKILL every process of the cgroup ``path`` and of its children, at once (cgroup.kill)."""
    with contextlib.suppress(OSError):
        _write(path, "cgroup.kill", b"1")


def _write(cgroup: str, name: str, data: bytes) -> None:
    """One write to a cgroup control file (a single write(2): the kernel acts on each one)."""
    fd = os.open(f"{cgroup}/{name}", os.O_WRONLY)  # not os.path.join: see join_cgroup
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def remove_cgroups(path: str) -> None:
    """Remove the empty cgroup ``path`` and its empty children (a populated one stays)."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(path):
            if entry.is_dir(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    os.rmdir(entry.path)
        os.rmdir(path)


def cgroup_members(path: str) -> list[int] | None:
    """The pids in the cgroup ``path``; None when it does not exist (it was emptied and removed)."""
    try:
        return _read_members(path)
    except OSError:
        return []


def _read_members(path: str) -> list[int] | None:
    """As cgroup_members, but an error other than a missing cgroup is raised."""
    try:
        fd = os.open(f"{path}/cgroup.procs", os.O_RDONLY)
    except FileNotFoundError:
        return None
    # os.read, not open(): no buffered file object for a file read on every stop (three times);
    # the kernel gives the whole list in one read while it fits the buffer.
    try:
        data = b""
        while chunk := os.read(fd, 65536):
            data += chunk
    finally:
        os.close(fd)
    return [int(pid) for pid in data.split()]


class ProcessTree:
    """Every process of one job: its cgroup's members where it has one, its process group, and
    (without a cgroup) the descendants seen since its stop began."""

    def __init__(self, pid: int, cgroup: str | None) -> None:
        self.pid = pid          # the job's first process, leader of its group
        self.cgroup = cgroup
        self.seen: dict[int, str] = {}  # descendant pid -> its start time (a reused pid is not it)
        # The first process was seen in the cgroup: every process it started was born there, so
        # an empty cgroup is the whole answer (a join that failed leaves this False: see gone).
        self.contained = False
        self.killed = False  # cgroup.kill was written: no child may be born in that cgroup again (_direct)

    def signal(self, *sigs: int) -> list[int]:
        """Each of ``sigs``, in order, to every process of the job; the members it found."""
        # Found before any is signalled: once a parent dies its children are reparented, and a
        # walk from the job's first process would no longer find them. One look for all the
        # signals: without a cgroup a look is a walk of /proc (~1.2 ms with 90 processes).
        members = self._members()
        self._send(members, sigs)
        return members

    def _send(self, members: list[int], sigs: tuple[int, ...]) -> None:
        for sig in sigs:
            try:
                os.killpg(self.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
            for pid in members:
                if pid != self.pid:  # the group's leader has it from killpg
                    try:
                        os.kill(pid, sig)
                    except (ProcessLookupError, PermissionError):
                        pass

    def kill(self) -> None:
        """SIGKILL every process of the job, including those that left its group."""
        if self.cgroup is not None:
            kill_cgroup(self.cgroup)
            self.killed = True
            self.signal(signal.SIGKILL)
            return
        # Frozen first, so none forks between the walk that finds it and the kill. A walk that
        # found no new process leaves them all frozen: the kill goes to those, with no new walk.
        for _ in range(_MAX_WALKS):
            known = set(self.seen)
            members = self.signal(signal.SIGSTOP)
            if set(self.seen) == known:
                self._send(members, (signal.SIGKILL,))
                return
        self.signal(signal.SIGKILL)  # still forking after every walk: one more look, as it is

    def gone(self) -> bool:
        """True when no live process of the job is left (zombies being reaped do not count).

        Without reading every /proc/PID/stat where it can: that walk cost ~1.2 ms with 90
        processes on the machine (more with more), on every stop's path (issue 11's A/B).
        """
        if self.cgroup is not None:
            try:
                members = _read_members(self.cgroup)  # no zombie is listed (Linux drops it at exit)
            except OSError:
                pass  # cannot tell now: the group is looked at instead (as before the cgroups)
            else:
                if members and _alive(members):
                    return False
                if self.contained:
                    return True
        for pid, start in self.seen.items():  # descendants seen leaving the group, by their pid
            fields = stat_fields(pid)
            if fields is not None and fields[0] != "Z" and _start(fields) == start:
                return False
        try:
            os.killpg(self.pid, 0)
        except ProcessLookupError:
            return True  # not even a zombie is left in the group
        except PermissionError:
            pass
        stats = proc_stats()  # the group still has a process, maybe only its unreaped leader
        if stats is None:
            return False  # cannot look: assume something is left
        group = str(self.pid)
        return not any(len(fields) > 2 and fields[0] != "Z" and fields[2] == group for _, fields in stats)

    def left(self) -> list[int]:
        """The live processes of the job now (no zombie): what a wait for its end waits for."""
        return [pid for pid in self._members() if _alive([pid])]

    def _members(self) -> list[int]:
        if self.cgroup is not None:
            members = cgroup_members(self.cgroup) or []
            self.contained = self.contained or self.pid in members
            return members
        # Who is still the job's: the descendants of its first process and of any process seen
        # before (an orphan of a descendant seen earlier is found again through that one).
        found, starts = _descendants(lambda starts: [
            self.pid, *(pid for pid, start in self.seen.items() if starts.get(pid) == start)])
        for pid in found:
            self.seen.setdefault(pid, starts[pid])
        return [pid for pid, start in self.seen.items() if starts.get(pid) == start]


def kill_descendants(root: int) -> None:
    """SIGKILL every descendant of ``root`` (not ``root``): the fork server's end without cgroups.

    The server is a child subreaper, so what its jobs orphaned (a double fork, a setsid'd process
    whose parent died) is its child by now, and a walk from it finds every process of its jobs,
    those that left their process group too. Frozen first, walk after walk, so that none forks
    between the walk that finds it and the kill.
    """
    seen: dict[int, str] = {}  # pid -> its start time: a pid reused meanwhile is not signalled
    for _ in range(_MAX_WALKS):
        found, starts = _descendants(lambda _starts: [root])
        new = found - set(seen)
        if not new:
            break
        for pid in new:
            seen[pid] = starts[pid]
            _signal_if_same(pid, starts[pid], signal.SIGSTOP)
    for pid, start in seen.items():
        _signal_if_same(pid, start, signal.SIGKILL)


def _descendants(roots: Callable[[dict[int, str]], list[int]]) -> tuple[set[int], dict[int, str]]:
    """One walk of /proc: the live descendants of ``roots(starts)`` (chosen once every process's
    start time is known), and the start time of every live process."""
    children: dict[int, list[int]] = {}
    starts: dict[int, str] = {}
    for pid, fields in proc_stats() or []:
        if len(fields) > 19 and fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(pid)
            starts[pid] = _start(fields)
    found: set[int] = set()
    todo = roots(starts)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found, starts


def _signal_if_same(pid: int, start: str, sig: int) -> None:
    """``sig`` to ``pid`` if it is still the process that started at ``start`` (its parent may have
    reaped it since the walk, and the pid been given to another process)."""
    fields = stat_fields(pid)
    if fields is None or _start(fields) != start:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _start(fields: list[str]) -> str:
    return fields[19] if len(fields) > 19 else ""  # starttime: field 22 of /proc/PID/stat


def _alive(pids: list[int]) -> bool:
    """True if one of ``pids`` is a live process (each read alone: no walk of /proc)."""
    return any((fields := stat_fields(pid)) is not None and fields[:1] != ["Z"] for pid in pids)
