"""What a finished job costs the session that keeps it (issue 11: 769 bytes before the restructure,
1,295 after it and the restart recipe), and that the compact forms keep every behaviour."""

from __future__ import annotations

import gc
import os
import tracemalloc
import weakref
from pathlib import Path

import pytest

import psjobs


def trivial() -> int:
    return 1


def add(a: int, b: int = 0) -> int:
    return a + b


@pytest.mark.timeout(120)
def test_a_finished_thread_job_costs_under_a_kilobyte(session: psjobs.Session) -> None:
    for job in [session.start_thread_job(trivial) for _ in range(50)]:  # the session's own first costs
        session.wait_job(job)
    n = 2000
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        jobs = [session.start_thread_job(trivial) for _ in range(n)]
        session.wait_job(jobs, timeout=60)
        del jobs
        gc.collect()
        per_job = (tracemalloc.get_traced_memory()[0] - base) / n
    finally:
        tracemalloc.stop()
    assert per_job < 1000, f"{per_job:.0f} bytes per finished thread job"
    # and each is still whole: restartable, named, its output kept
    last = session.get_job()[-1]
    assert last.name == f"Job{last.id}" and last.output == [1]
    assert [state for state, _ in last.history] == [psjobs.JobState.RUNNING, psjobs.JobState.COMPLETED]
    assert [when for _, when in last.history] == [last.begin_time, last.end_time]
    again = session.restart_job(last)
    session.wait_job(again, timeout=10)
    assert again.receive() == [1] and again.name == f"Job{again.id}"


@pytest.mark.timeout(30)
def test_a_job_is_named_when_started_renamed_when_set_and_restarted_with_its_name(session: psjobs.Session) -> None:
    named = session.start_thread_job(add, 1, b=2, name="sum")
    plain = session.start_thread_job(add, 5)
    session.wait_job([named, plain], timeout=10)
    assert named.name == "sum" and plain.name == f"Job{plain.id}"
    assert session.get_job(name="sum") == [named]
    assert session.get_job(name=f"Job{plain.id}") == [plain]
    again = session.restart_job(named)  # same name, same keyword arguments
    session.wait_job(again, timeout=10)
    assert again.name == "sum" and again.receive() == [3]
    plain.name = "renamed"
    assert session.get_job(name="renamed") == [plain]
    assert session.restart_job(plain).name != "renamed"  # started without a name: gets its own Job<id>


@pytest.mark.timeout(60)
def test_a_process_job_runs_in_its_callers_directory_of_the_moment(session: psjobs.Session, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # The session shares the working directory's text between jobs while it does not change.
    here = session.start_job(os.getcwd)
    monkeypatch.chdir(tmp_path)
    there = session.start_job(os.getcwd)
    given = session.start_job(os.getcwd, working_directory=tmp_path.parent)
    command = session.start_thread_job(["pwd"])  # a thread job's command too (a callable needs none)
    monkeypatch.chdir(tmp_path.parent)
    session.wait_job([here, there, given, command], timeout=30)
    assert here.receive() != [str(tmp_path)]
    assert there.receive() == [str(tmp_path)]
    assert given.receive() == [str(tmp_path.parent)]
    assert command.receive() == [str(tmp_path)]


class _Target:
    def __call__(self) -> int:
        return 1


@pytest.mark.timeout(30)
def test_a_finished_job_keeps_its_target_for_restart_until_it_is_removed(session: psjobs.Session) -> None:
    target = _Target()
    ref = weakref.ref(target)
    job = session.start_thread_job(target)
    session.wait_job(job, timeout=10)
    del target
    gc.collect()
    assert ref() is not None  # kept: restart_job runs it again
    session.remove_job(job)
    gc.collect()
    assert ref() is None, "a removed job (still referenced here) keeps its target alive"
    with pytest.raises(psjobs.JobNotFoundError):
        session.restart_job(job)


def test_the_options_shared_by_specs_without_any_refuse_a_write() -> None:
    from psjobs.core._spec import make_spec

    first, second = make_spec(trivial, (), {}), make_spec(add, (1,), {"b": 2})
    assert first.options is second.options and first.kwargs == {} and second.kwargs == {"b": 2}
    with pytest.raises(TypeError, match="give the spec its own dict"):
        first.options["computers"] = ["a"]
    assert second.options == {}
