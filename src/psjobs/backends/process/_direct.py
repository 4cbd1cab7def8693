"""A command started straight from the session, born in its job's cgroup under the fork server's.

::

    start_job("cmd" | [argv]) --an empty cgroup under the fork server's (ForkClient.take_cgroup: made,
        or one a finished command left empty), its directory opened-->
        _cspawn.spawn (clone3: the child is born in that cgroup; where clone3 cannot, vfork and the
        child moves itself there; then setsid, fd 0/1/2, exec)
        --> the command, our child: its exit status on a pidfd (the I/O loop), as Popen's would be
    the command's end, its cgroup empty --> ForkClient.give_cgroup: the next command's
    the session ends, however (SIGKILL too) --> the fork server kills its cgroup, this one's with it

So a command costs about what a Popen with its output captured costs (bench/FINDINGS.md, "Commands
straight into their cgroup"), and still never outlives the session: the fork server, not its
parent, is what ends it. Where the extension was not built (no C compiler at install) or the fork
server has no cgroup, the fork server starts commands itself (CommandHandle,
ProcessBackend._send_command); PSJOBS_DIRECT_COMMANDS=0 asks for that path.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from ..._compat import environ_snapshot

try:
    from . import _cspawn
except ImportError:  # built without a C compiler: the fork server starts commands
    _cspawn = None  # type: ignore[assignment]

_STEPS = {1: "cgroup", 2: "stdio", 3: "cwd", 4: "exec"}
# False: every command is moved into its cgroup after a vfork, even where clone3 could have it
# born there (the tests check both ways).
born_in_cgroup = True


def available() -> bool:
    """Whether commands may start straight into their cgroup from this process."""
    return _cspawn is not None and os.environ.get("PSJOBS_DIRECT_COMMANDS") != "0"


def spawn(argv: Sequence[str], env: Mapping[str, str] | None, stdio: Sequence[int], cwd: str | None,
          umask: int | None, cgroup: str) -> int:
    """Start ``argv`` (stdio: fd 1, fd 2, maybe fd 0) in a session of its own, in the empty cgroup
    directory ``cgroup``; its pid. Raises OSError in Popen's words when it cannot run (the
    program not found along the job's PATH, a cwd it cannot enter...)."""
    assert _cspawn is not None
    envp = _environment(env)
    paths = _paths(argv[0], env)
    if any("\0" in a for a in argv):
        raise ValueError("embedded null byte")  # as Popen says it (a C string would end there)
    stdin = stdio[2] if len(stdio) > 2 else _devnull()
    directory = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        pid, err, step, _born_in = _cspawn.spawn(paths, [os.fsencode(a) for a in argv], envp, stdin, stdio[0],
                                                 stdio[1], None if cwd is None else os.fsencode(cwd),
                                                 -1 if umask is None else umask, directory,
                                                 0 if born_in_cgroup else 1)
    finally:
        os.close(directory)
    if pid < 0:
        if _STEPS.get(step) == "cgroup":
            raise OSError(err, f"the command could not join its cgroup {cgroup} ({os.strerror(err)})")
        # As Popen says it: the directory it could not enter, else the program as it was given.
        raise OSError(err, os.strerror(err), cwd if _STEPS.get(step) == "cwd" else argv[0])
    return int(pid)


_cached: tuple[Any, list[bytes]] = (None, [])  # os.environ's data as last encoded, and its lines
_found: dict[tuple[str, str | None], list[bytes]] = {}  # (program, PATH) -> the files to try
_null = -1
_null_lock = threading.Lock()


def _environment(env: Mapping[str, str] | None) -> list[bytes]:
    """The child's environment as "NAME=value" lines: ``env``, or ours as it is now (encoded
    again only when it changed: ~30 us for 40 variables, against ~1 us to compare)."""
    global _cached
    data = None
    if env is not None:
        lines = [os.fsencode(f"{k}={v}") for k, v in env.items()]
    else:
        data = environ_snapshot()
        if data is not None and data == _cached[0]:
            return _cached[1]
        lines = [k + b"=" + v for k, v in os.environb.items()]
    if any(b"\0" in line for line in lines):
        raise ValueError("embedded null byte")  # as Popen says it (a C string would end there)
    if env is None and data is not None:
        _cached = (dict(data), lines)
    return lines


def _paths(program: str, env: Mapping[str, str] | None) -> list[bytes]:
    """The files to exec in turn for ``program``, as Popen's child tries them: itself when it has a
    slash (relative to the job's cwd, since the child execs after its chdir), else it in each entry
    of the job's PATH. Only strings: kept per (program, PATH), a few hundred at most."""
    if os.path.dirname(program):
        return [os.fsencode(program)]
    key = (program, (os.environ if env is None else env).get("PATH"))
    paths = _found.get(key)
    if paths is None:
        paths = [os.fsencode(os.path.join(d, program)) for d in os.get_exec_path(env)] or [b""]
        if len(_found) >= 256:
            _found.clear()
        _found[key] = paths
    return paths


def _devnull() -> int:
    """fd 0 of a command given no input (kept open, close-on-exec: the child gets its own copy)."""
    global _null
    if _null < 0:
        with _null_lock:  # one, whichever thread starts the first such command
            if _null < 0:
                _null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    return _null
