"""A connected session's futures see a running job end (psjobs/_connect_watch): result(timeout),
as_future(), ``await job``, as_completed and callbacks return or fire when the host's job ends, and
the watcher thread ends once nothing waits or the session is closed. Also: `psjobs restart` of a
callable a connected session started runs the same call again. Each test has a host of its own."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import psjobs
from psjobs import JobState

from .clitools import ok
from .conftest import wait_until

pytestmark = pytest.mark.timeout(120)


def watchers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "psjobs-connect-watch"]


def gated(jobs: psjobs.Session, gate: Path) -> psjobs.Job:
    """A job that runs until ``gate`` exists, then prints done."""
    job = jobs.start_job(f"while [ ! -e '{gate}' ]; do sleep 0.02; done; echo done")
    assert not job.state.is_finished
    return job


def open_gate_soon(gate: Path) -> threading.Timer:
    """Let the job end once the caller is waiting (what is asserted does not depend on when)."""
    timer = threading.Timer(0.3, gate.touch)
    timer.start()
    return timer


def _await(job: psjobs.Job) -> Any:
    async def main() -> Any:
        return await asyncio.wait_for(job, 10)  # type: ignore[arg-type]

    return asyncio.run(main())


def _as_completed(job: psjobs.Job) -> Any:
    (done,) = list(psjobs.as_completed([job], timeout=10))
    return done.result(timeout=0)


def _done_callback(job: psjobs.Job) -> Any:
    called = threading.Event()
    seen: list[JobState] = []
    job.add_done_callback(lambda j: (seen.append(j.state), called.set()))
    assert called.wait(10), "the done callback did not fire"
    return seen[0]


WAYS: dict[str, tuple[Callable[[psjobs.Job], Any], Any]] = {
    "result": (lambda job: job.result(timeout=10), ["done"]),
    "as_future": (lambda job: job.as_future().result(10), ["done"]),
    "await": (_await, ["done"]),
    "as_completed": (_as_completed, ["done"]),
    "add_done_callback": (_done_callback, JobState.COMPLETED),
}


@pytest.mark.parametrize("way", list(WAYS))
def test_waiting_on_a_running_connected_job_returns_when_it_ends(jobs: psjobs.Session, tmp_path: Path,
                                                                  way: str) -> None:
    wait, wanted = WAYS[way]
    job = gated(jobs, tmp_path / "gate")
    timer = open_gate_soon(tmp_path / "gate")
    try:
        assert wait(job) == wanted
    finally:
        timer.cancel()
    assert job.state is JobState.COMPLETED
    wait_until(lambda: not watchers(), timeout=10, what="the watcher to end once nothing is watched")


def test_a_state_callback_sees_the_end_and_the_watcher_ends_when_nobody_waits(jobs: psjobs.Session,
                                                                               tmp_path: Path) -> None:
    job = gated(jobs, tmp_path / "gate")
    with pytest.raises(concurrent.futures.TimeoutError, match="goes on"):
        job.result(timeout=0.2)
    wait_until(lambda: not watchers(), timeout=10, what="the watcher to end after the waiter gave up")
    ended = threading.Event()
    changes: list[tuple[JobState, JobState]] = []

    def changed(j: psjobs.Job, old: JobState, new: JobState) -> None:
        changes.append((old, new))
        if new.is_finished:
            ended.set()

    job.add_state_callback(changed)
    assert watchers(), "a state callback on a running job is watched"
    (tmp_path / "gate").touch()
    assert ended.wait(10), "the state callback never saw the job end"
    assert changes[-1] == (JobState.RUNNING, JobState.COMPLETED)
    wait_until(lambda: not watchers(), timeout=10, what="the watcher to end once the job ended")


def test_the_watcher_ends_at_close_and_the_job_goes_on(home: Path, tmp_path: Path) -> None:
    s = psjobs.connect()
    job = gated(s, tmp_path / "gate")
    fired = threading.Event()
    job.add_done_callback(lambda j: fired.set())
    assert watchers()
    s.close()
    wait_until(lambda: not watchers(), timeout=10, what="the watcher to end after close()")
    again = psjobs.connect()
    try:
        (same,) = again.get_job(job.id)
        assert same.state is JobState.RUNNING  # close() leaves the host's job running
        (tmp_path / "gate").touch()
        assert same.result(timeout=10) == ["done"]
    finally:
        again.close()
    assert not fired.is_set()  # the closed session no longer follows its jobs


def seven() -> int:
    return 7


def test_restart_of_a_connected_sessions_callable_runs_the_same_call(jobs: psjobs.Session) -> None:
    job = jobs.start_job(seven)
    assert job.result(timeout=30) == 7
    again = json.loads(ok("restart", "--json", str(job.id)))[0]
    assert again["id"] > job.id and again["command"] == job.command
    (restarted,) = jobs.get_job(again["id"])
    assert restarted.result(timeout=30) == 7
    assert restarted.state is JobState.COMPLETED and not restarted.error


def test_an_older_answer_adopted_late_leaves_a_finished_job_finished(jobs: psjobs.Session, tmp_path: Path) -> None:
    """Two answers from the host may be adopted in the other order than they were given (a verb's
    refresh read while the job ran, adopted after the watcher saw its end): a finished job stays
    finished, and no callback sees it go back to Running."""
    import copy

    from psjobs.host._protocol import GetRequest

    gate = tmp_path / "go"
    job = jobs.start_job(["sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.01; done; echo hi"])
    stale = copy.deepcopy(jobs._call(GetRequest(ids=[str(job.id)], children=True)))  # type: ignore[attr-defined]
    assert stale[0]["state"] in ("NotStarted", "Running")
    seen: list[tuple[str, str]] = []
    job.add_state_callback(lambda _job, old, new: seen.append((str(old), str(new))))
    gate.touch()
    assert job.result(timeout=30) == ["hi"]
    jobs._adopt(stale)  # type: ignore[attr-defined]
    assert job._state is JobState.COMPLETED
    wait_until(lambda: ("Running", "Completed") in seen, 30, "the end's callback")
    assert ("Completed", "Running") not in seen
