"""What an SSH or Dask job sends back that the session cannot unpickle: kept, as a psjobs.Snapshot, in its place.

A class from a module that only the job's side has on its path (a directory the job adds): its
values come back as Snapshots between the good ones, instead of a whole batch lost.
"""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import psjobs
from psjobs import JobState

from .clusters import local_client as make_client

cloudpickle = pytest.importorskip("cloudpickle")
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # neither side's workers import this module

DEADLINE = 30
_names = itertools.count()


@pytest.fixture
def only_there(tmp_path: Path) -> tuple[str, str]:
    """(directory, module name): a module with a class Point that the session's sys.path lacks."""
    name = f"geo_remote_{os.getpid()}_{next(_names)}"
    (tmp_path / f"{name}.py").write_text("class Point:\n    def __init__(self, x):\n        self.x = x\n")
    return str(tmp_path), name


def points(where: str, name: str) -> Iterator[Any]:
    import importlib
    import sys

    sys.path.insert(0, where)
    geo = importlib.import_module(name)
    yield "before"
    yield geo.Point(1)
    yield "after"


def point(where: str, name: str) -> Any:
    import importlib
    import sys

    sys.path.insert(0, where)
    return importlib.import_module(name).Point(2)


def _check(job: psjobs.Job, name: str) -> None:
    assert job.wait(DEADLINE), f"{job!r} did not finish within {DEADLINE}s"
    assert job.child_jobs[0].state is JobState.COMPLETED
    got = job.receive()
    if len(got) == 3:
        before, snap, after = got
        assert (before, after) == ("before", "after")  # the good values of the batch are kept
        assert isinstance(snap, psjobs.Snapshot) and snap.repr == f"{name}.Point(x=1)" and snap.x == 1
    else:
        (snap,) = got
        assert isinstance(snap, psjobs.Snapshot) and snap.repr == f"{name}.Point(x=2)"
    assert "cannot be imported in this session" in snap.error
    assert job.child_jobs[0].error == []


# --- SSH -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from . import sshd as sshd_helper

    with sshd_helper.module_server(tmp_path_factory) as srv:
        yield srv


@pytest.mark.ssh
@pytest.mark.parametrize("body", [points, point])
def test_a_remote_value_of_a_class_the_session_cannot_import_is_a_snapshot_in_place(
        server: Any, only_there: tuple[str, str], body: Any) -> None:
    where, name = only_there
    with psjobs.Session(stop_grace=2.0) as s:
        psjobs.configure_ssh(s, config=str(server.ssh_config), python=f"{sys.executable} -S")
        _check(s.invoke_command(body, where, name, computer_name="127.0.0.2"), name)


# --- Dask ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def local_client() -> Iterator[Any]:
    with make_client(n_workers=1, threads_per_worker=1) as client:
        yield client


@pytest.mark.dask
@pytest.mark.leaves_processes  # the module's cluster outlives each test
@pytest.mark.parametrize("body", [points, point])
def test_a_cluster_value_of_a_class_the_session_cannot_import_is_a_snapshot_in_place(
        local_client: Any, only_there: tuple[str, str], body: Any) -> None:
    where, name = only_there
    with psjobs.Session(stop_grace=1.0) as s:
        _check(s.start_cluster_job(body, where, name, cluster=local_client), name)
