"""Start a command for the fork server: posix_spawn where it can, subprocess.Popen where not.

::

    fork server --spawn(argv, fd 0/1/2, cwd, env)--> posix_spawn[p] (glibc: clone(CLONE_VM|CLONE_VFORK),
        dup2 0/1/2, setsid, SIGPIPE/SIGXFSZ back to default, exec) --> the command's pid
                                                  \\--> Popen: a program not found or not started, a
                                                       cwd we cannot enter (its error, in Popen's words)

Popen spends most of its time in Python around the vfork (an error pipe, the environment
converted, the object built, execve tried on each PATH entry): posix_spawnp did the same start
in 79 us of the server's CPU against Popen's 211 (bench/FINDINGS.md, "Commands and posix_spawn").
glibc looks the program up along PATH (posix_spawnp) when the job's PATH is the server's; else it
is looked up here (one stat per entry), so the job's own PATH decides, as with Popen.
It has no close-the-rest pass, so every descriptor of the server is close-on-exec (its control
socket, and what it receives: see _forkserver._recv_now). Python's binding has no chdir action
(glibc's addchdir_np), and every command has a cwd (the caller's): the server steps into it for the
spawn and back out (two chdir calls), so its own directory never changes between requests.

Standard library only: the fork server imports it.
"""

from __future__ import annotations

import os
import signal
import stat
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported by the fallback only, so the fork server and its children go without it
    import subprocess

# What Popen(restore_signals=True) puts back to default: Python ignores them, and an ignored
# signal stays ignored across exec.
_DEFAULTED = tuple(getattr(signal, name) for name in ("SIGPIPE", "SIGXFZ", "SIGXFSZ") if hasattr(signal, name))


def spawn(argv: Sequence[str], stdin: int, stdout: int, stderr: int, cwd: str | None,
          env: Mapping[str, str] | None) -> tuple[int, subprocess.Popen[bytes] | None]:
    """Start ``argv`` in a session of its own with these descriptors as fd 0, 1, 2; its pid, and
    its Popen when Popen started it (None: posix_spawn did, and the caller reaps it itself)."""
    environ = os.environ if env is None else env
    if argv and _enter(cwd):
        try:
            path: str | None = argv[0]
            start = os.posix_spawn
            if not os.path.dirname(argv[0]) and environ.get("PATH") == os.environ.get("PATH"):
                start = os.posix_spawnp  # glibc walks our PATH, the job's too: no stat per entry here
            else:
                path = _find(argv[0], environ)  # a relative one is relative to cwd, as in Popen
            if path is not None:
                return start(path, list(argv), environ, setsid=True, setsigdef=_DEFAULTED,
                             file_actions=[(os.POSIX_SPAWN_DUP2, stdin, 0), (os.POSIX_SPAWN_DUP2, stdout, 1),
                                           (os.POSIX_SPAWN_DUP2, stderr, 2)]), None
        except (OSError, ValueError):
            pass  # nothing ran (exec failed, or a bad environment): Popen raises it as it always has
        finally:
            _enter(None)
    import subprocess

    proc = subprocess.Popen(argv, stdin=stdin, stdout=stdout, stderr=stderr, cwd=cwd, env=env,
                            start_new_session=True)
    return proc.pid, proc


_HOME = os.getcwd()  # the server's own directory, where it is between spawns
_here = _HOME        # the current one (no chdir when a command's cwd is the server's own)


def _enter(cwd: str | None) -> bool:
    """Make ``cwd`` (None: ours) the current directory; False if it cannot be entered."""
    global _here
    target = _HOME if cwd is None else cwd
    if target != _here:
        try:
            os.chdir(target)
        except OSError:
            return False
        _here = target
    return True


def _find(program: str, environ: Mapping[str, str]) -> str | None:
    """The file Popen would execute for ``program`` (the first executable regular file along the
    job's PATH, as its child tries them in turn), or None."""
    if os.path.dirname(program):
        candidates: Sequence[str] = (program,)
    else:
        candidates = [os.path.join(d, program) for d in os.get_exec_path(environ)]
    for candidate in candidates:
        try:
            if stat.S_ISREG(os.stat(candidate).st_mode) and os.access(candidate, os.X_OK):
                return candidate
        except (OSError, ValueError):
            continue
    return None
