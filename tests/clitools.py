"""Helpers shared by the command and host tests: a private state directory with its own host,
and running the command in-process with its output captured."""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from pathlib import Path

import psutil

from psjobs._cli import main
from psjobs._errors import HostError
from psjobs.host._client import Client, Paths, host_free

from .conftest import wait_until


def run(*args: str) -> tuple[int, str, str]:
    """Run ``psjobs ARGS`` in this process; return (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def ok(*args: str) -> str:
    code, out, err = run(*args)
    assert code == 0, f"psjobs {' '.join(args)} exited {code}: {err}"
    return out


def host_pid(home: Path) -> int:
    return int(Client(Paths(home)).call("status", start=False)["pid"])


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def stop_host(home: Path) -> None:
    """Stop the host of ``home`` (if one runs) and wait until it has ended."""
    paths = Paths(home)
    with contextlib.suppress(HostError):
        Client(paths).call("shutdown", start=False)
    wait_until(lambda: host_free(paths), timeout=30, what="the host to end")


@contextlib.contextmanager
def private_home(path: Path) -> Iterator[Path]:
    """PSJOBS_HOME set to ``path`` for the block; its host is stopped at the end."""
    old = os.environ.get("PSJOBS_HOME")
    os.environ["PSJOBS_HOME"] = str(path)
    try:
        yield path
    finally:
        stop_host(path)
        if old is None:
            os.environ.pop("PSJOBS_HOME", None)
        else:
            os.environ["PSJOBS_HOME"] = old


def subprocess_env(**extra: str) -> dict[str, str]:
    """This environment, with the psjobs under test importable from any directory."""
    import psjobs

    src = str(Path(psjobs.__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH", "")
    parts = [src, *(os.path.abspath(p) for p in path.split(os.pathsep) if p)]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(parts), **extra}
