"""Cluster jobs at their edges, on the real clusters of test_dask: a stop that comes right after
the start (the task may already run), a Client closed under its jobs, an address that is none.
"""

from __future__ import annotations

import io
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import psjobs
from psjobs import JobState

from . import test_dask as base
from .clusters import local_client as make_client
from .conftest import wait_until
from .test_dask import square

distributed = pytest.importorskip("distributed")
cloudpickle = pytest.importorskip("cloudpickle")

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the command-line workers cannot import us

pytestmark = pytest.mark.dask

# test_dask's fixtures (module-scoped: this module gets clusters of its own, closed at its end)
local_client, cli_address, session = base.local_client, base.cli_address, base.session


@pytest.fixture(scope="module")
def threads_client() -> Iterator[Any]:
    """A LocalCluster of two in-process workers (threads), on 127.0.0.1 over TCP."""
    with make_client(n_workers=2, threads_per_worker=2, processes=False, protocol="tcp") as client:
        yield client


@pytest.fixture(scope="module", params=["local", "threads", "cli"])
def cluster(request: pytest.FixtureRequest) -> Any:
    """test_dask's two cluster kinds, and workers that are threads of this process."""
    return request.getfixturevalue({"local": "local_client", "threads": "threads_client",
                                    "cli": "cli_address"}[request.param])


def test_a_malformed_address_is_a_value_error_before_any_job(session: psjobs.Session) -> None:
    """API.md 7: a bad argument raises TypeError or ValueError before a job exists; an address
    Dask cannot read is one (it was a WorkerError, "cannot reach the Dask scheduler")."""
    for address, why in [("notanaddress", "missing port"), ("http://127.0.0.1:1", "unknown address scheme"),
                         ("tcp://127.0.0.1:notaport", "invalid literal"), ("tcp://127.0.0.1:0", "out of range")]:
        with pytest.raises(ValueError, match=why) as info:
            session.start_job(square, 1, cluster=address)
        assert repr(address) in str(info.value) and "tcp://10.0.0.5:8786" in str(info.value)
        assert not isinstance(info.value, psjobs.WorkerError)
    # A well-formed address nobody listens on is still the scheduler's problem, not the argument's.
    with pytest.raises(psjobs.WorkerError, match="cannot reach the Dask scheduler"):
        session.start_job(square, 1, cluster="tcp://127.0.0.1:1")
    assert session.get_job() == []


# --- a stop right after the start: the task may already run (nothing it wrote is lost) -------------

def writes_then_naps(marker: str, k: int) -> None:
    """Writes its records, then the marker (so a marker means they were written), then naps in a
    call a stop cannot interrupt (its result comes when the nap ends)."""
    psjobs.write_output(f"hello {k}")
    print("info", k)
    Path(marker).touch()
    time.sleep(0.5)


def waits_for_stop(marker: str | None = None) -> None:
    if marker is not None:
        Path(marker).touch()
    while not psjobs.stop_requested():
        time.sleep(0.01)


def _stall(entered: str, flag: str) -> str:
    """Unpickled by the session's dispatcher thread: it waits there until ``flag`` exists."""
    Path(entered).touch()
    deadline = time.monotonic() + 20
    while not os.path.exists(flag) and time.monotonic() < deadline:
        time.sleep(0.005)  # polling a file another thread writes, with a deadline
    return "stalled"


class Staller:
    """A record whose unpickling, in the session, holds up the connection's dispatcher thread: the
    session then learns nothing of the cluster's tasks until the test lets it go."""

    def __init__(self, entered: str, flag: str) -> None:
        self.where = (entered, flag)

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return _stall, self.where


def yields_staller(entered: str, flag: str) -> Iterator[Any]:
    yield Staller(entered, flag)
    while not psjobs.stop_requested():
        time.sleep(0.01)


def _ran_unseen(job: psjobs.Job) -> bool:
    return all(state is not JobState.RUNNING for state, _ in job.child_jobs[0].history)


def test_a_task_that_ran_unseen_keeps_its_records_in_the_stopped_job(
        session: psjobs.Session, cluster: Any, tmp_path: Path) -> None:
    """Bug: stop_job on a job the session still saw NotStarted made it Stopped at once and dropped
    its task, though the task ran on a worker: its records were lost. Here the session is made to
    see nothing (its dispatcher held up by a record of another job) while the task runs."""
    entered, flag, marker = (str(tmp_path / n) for n in ("entered", "flag", "marker"))
    staller = session.start_job(yields_staller, entered, flag, cluster=cluster)
    released = threading.Event()
    try:
        wait_until(lambda: os.path.exists(entered), 30, "the session's dispatcher to be held up")
        job = session.start_job(writes_then_naps, marker, 7, cluster=cluster)
        wait_until(lambda: os.path.exists(marker), 30, "the task to write its records on a worker")
        child = job.child_jobs[0]
        assert child.state is JobState.NOT_STARTED  # the session has not seen it start

        def release() -> None:  # once stop_job made the job Stopped (it waits for the records then)
            wait_until(lambda: child.state is JobState.STOPPED or released.is_set(), 30, "the stop")
            Path(flag).touch()

        helper = threading.Thread(target=release)
        helper.start()
        started = time.monotonic()
        session.stop_job(job)
        elapsed = time.monotonic() - started
        released.set()
        helper.join(30)
        assert job.state is JobState.STOPPED and _ran_unseen(job)
        assert job.output == ["hello 7"] and [str(r) for r in job.information] == ["info 7"]
        assert elapsed < session.stop_grace + 5 + 1
    finally:
        released.set()
        Path(flag).touch()
        session.stop_job(staller)


def test_a_stop_right_after_the_start_loses_no_record_of_a_task_that_ran(
        session: psjobs.Session, cluster: Any, tmp_path: Path) -> None:
    """The reviewer's loop: stopped right after its start, the task ran in some rounds and not in
    others; whenever it ran (its marker exists once its records were written), they are in the job
    when stop_job returns. Whatever runs is stopped: nothing of it runs after stop_job returns."""
    ran = []
    for k in range(20):
        marker = tmp_path / f"marker-{k}"
        job = session.start_job(writes_then_naps, str(marker), k, cluster=cluster)
        session.stop_job(job)
        assert job.state is JobState.STOPPED
        if marker.exists():
            ran.append(k)
            assert job.output == [f"hello {k}"], f"round {k}: the task ran, its output is lost"
            assert [str(r) for r in job.information] == [f"info {k}"], f"round {k}: its print is lost"
        else:  # it did not run, or its stop landed before the marker: what it wrote (if any) is whole
            assert job.output in ([], [f"hello {k}"])
    # Rounds whose task did not run: it never starts later either (the scheduler dropped it).
    late = [k for k in range(20) if k not in ran and (tmp_path / f"marker-{k}").exists()]
    assert not late, f"rounds {late}: the task ran after stop_job returned"


def test_a_queued_task_is_stopped_at_once_and_never_runs(
        session: psjobs.Session, cluster: Any, tmp_path: Path) -> None:
    """Every worker thread busy: the task waits on the scheduler. Its stop does not wait for a result
    that never comes; the task is cancelled, and it never runs once the workers are free."""
    busy = session.start_cluster_job(waits_for_stop, for_each=[None] * 4, cluster=cluster)  # 2 workers x 2 threads
    wait_until(lambda: all(c.state is JobState.RUNNING for c in busy.child_jobs), 30, "every worker thread busy")
    marker = tmp_path / "marker"
    job = session.start_job(waits_for_stop, str(marker), cluster=cluster)
    started = time.monotonic()
    session.stop_job(job)
    elapsed = time.monotonic() - started
    assert job.state is JobState.STOPPED and _ran_unseen(job)
    assert elapsed < session.stop_grace, f"stop_job took {elapsed:.2f}s for a task that never ran"
    session.stop_job(busy)
    again = session.start_job(square, 3, cluster=cluster)  # the threads are free: this runs at once
    assert again.wait(30) and again.receive() == [9]
    client = cluster if isinstance(cluster, distributed.Client) else distributed.Client(cluster, set_as_default=False)
    try:
        wait_until(lambda: not base._psjobs_tasks(client), 30, "the scheduler to forget the stopped task")
    finally:
        if client is not cluster:
            client.close()
    assert not marker.exists(), "the stopped task ran once the workers were free"


def test_workers_answer_which_stopped_tasks_ran_there_even_ended_ones(
        session: psjobs.Session, local_client: Any) -> None:
    """stop_tasks' answer is what lets the session keep a task it never saw start: a task that
    ended on a worker just before its stop came is named too (its result may still be on its way)."""
    from psjobs.backends.dask._on_worker import stop_tasks

    job = session.start_job(square, 4, cluster=local_client)
    assert job.wait(30)
    leaf = job.child_jobs[0].backend_data
    answers = local_client.run(stop_tasks, [leaf.key, f"{leaf.key}-never"], [], 1.0)
    assert sorted(key for keys in answers.values() for key in keys) == [leaf.key]
    answers = local_client.run(stop_tasks, [], [leaf.group.id], 1.0)  # a fan-out's stop names its group
    assert sorted(key for keys in answers.values() for key in keys) == [leaf.key]


# --- the caller's Client closed under its jobs -------------------------------------------------------

def runs_until_stopped(done: str) -> None:
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline and not psjobs.stop_requested():
            time.sleep(0.01)
    finally:
        Path(done).write_text("stopped" if psjobs.stop_requested() else "ran to its end")


def test_closing_the_client_passed_fails_its_job_saying_so_and_stops_its_task(
        session: psjobs.Session, cluster: Any, tmp_path: Path) -> None:
    """Bug: closing one's own Client failed its running job at once with "the connection to the Dask
    scheduler was lost (the scheduler died...)" while everything was up, and the task ran on."""
    address = cluster.scheduler.address if isinstance(cluster, distributed.Client) else cluster
    done = tmp_path / "done"
    own = distributed.Client(address, set_as_default=False)
    try:
        job = session.start_job(runs_until_stopped, str(done), cluster=own)
        wait_until(lambda: job.child_jobs[0].state is JobState.RUNNING, 30, "the task to run")
    finally:
        own.close()
    assert job.wait(30) and job.state is JobState.FAILED
    reason = job.child_jobs[0].reason
    assert isinstance(reason, psjobs.WorkerError)
    text = str(reason)
    assert f"Job {job.child_jobs[0].id}" in text and "the dask Client passed as cluster= was closed" in text
    assert "Keep that Client open" in text and f"cluster={address!r}" in text
    assert "connection to the Dask scheduler" not in text and "the scheduler died" not in text
    # Its content, not only its existence: write_text creates the file, then writes it (CI read it
    # empty between the two).
    wait_until(lambda: done.exists() and done.read_text(), 20, "the task to end on its worker")
    assert done.read_text() == "stopped", "the task ran on after its Client was closed"
    with pytest.raises(psjobs.WorkerError, match="is closed"):
        session.start_job(square, 1, cluster=own)


# --- workers in this very process ---------------------------------------------------------------------

def says(k: int) -> None:
    print("info", k)


def test_print_reaches_the_job_after_sys_stdout_is_swapped(
        session: psjobs.Session, threads_client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """An in-process worker shares sys.stdout with the session's code: once that code swapped it
    (pytest's capture does, test by test), print in a task went to the new stream, not the job."""
    first = session.start_job(says, 1, cluster=threads_client)
    assert first.wait(30) and [str(r) for r in first.information] == ["info 1"]
    swapped = io.StringIO()
    monkeypatch.setattr(sys, "stdout", swapped)
    second = session.start_job(says, 2, cluster=threads_client)
    assert second.wait(30) and [str(r) for r in second.information] == ["info 2"]
    assert swapped.getvalue() == ""
