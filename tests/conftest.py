"""Shared test helpers: deadlines instead of sleeps, a fresh session per test, and a check that
no process or thread of the test run is left behind."""

from __future__ import annotations

import faulthandler
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

import psjobs

faulthandler.enable()


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``predicate`` until it is true; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)  # polling interval, not synchronisation
        delay = min(delay * 2, 0.05)


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    """A private PSJOBS_HOME of the test's own (its session host stopped at the end)."""
    from .clitools import private_home  # here: clitools imports this module

    with private_home(tmp_path / "h") as h:
        yield h


@pytest.fixture
def jobs(home: Path) -> Iterator[psjobs.Session]:
    """psjobs.connect() to that home's session host: a Session whose jobs are the host's."""
    with psjobs.connect() as s:
        yield s


@pytest.fixture
def session() -> Iterator[psjobs.Session]:
    """A session of its own for each test, closed (and its jobs stopped) afterwards."""
    s = psjobs.Session(stop_grace=2.0)
    try:
        yield s
    finally:
        s.close()


def _descendants() -> set[int]:
    me = psutil.Process()
    out = set()
    for p in me.children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                out.add(p.pid)
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.fixture(autouse=True)
def _nothing_left_behind(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test (and its session fixture), no child process of the test run may remain,
    except the long-lived ones a module fixture started on purpose (sshd, a cluster)."""
    before = _descendants()
    yield
    if request.node.get_closest_marker("leaves_processes"):
        return
    left: set[int] = set()

    def settled() -> bool:
        nonlocal left
        left = _descendants() - before
        return not left

    try:
        wait_until(settled, timeout=10, what="the test's processes to end")
    except AssertionError:
        names = []
        for pid in left:
            try:
                names.append(f"{pid}:{' '.join(psutil.Process(pid).cmdline())[:80]}")
            except psutil.NoSuchProcess:
                pass
        if names:
            pytest.fail(f"processes left behind: {names}")


@pytest.fixture
def default_session() -> Iterator[psjobs.Session]:
    """The module-level verbs' session, closed after the test (its fork server goes with it)."""
    from psjobs import _api

    yield _api.default_session()
    if _api._default is not None:
        _api._default.close()
        _api._default = None


def psjobs_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("psjobs-")]


@pytest.fixture
def no_stray_threads() -> Iterator[None]:
    yield
    wait_until(lambda: not [t for t in psjobs_threads() if t.is_alive()], timeout=10,
               what="psjobs threads to end")


@pytest.fixture
def tmp_cwd(tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch) -> os.PathLike[str]:
    monkeypatch.chdir(tmp_path)
    return tmp_path
