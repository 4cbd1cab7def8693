"""result() of a connected session's jobs: what the job gave, shaped by what ran (a command's lines,
a callable's value, a generator's items), as in-process, and against an older host that does not
send the shape.
Each test has a state directory and a session host of its own."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Iterator
from pathlib import Path

import pytest

import psjobs
from psjobs.host._client import Client, Paths
from psjobs.host._protocol import GetRequest, ProtocolError, StartCallRequest

from .clitools import ok, private_home

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    with private_home(tmp_path / "h") as h:
        yield h


@pytest.fixture
def jobs(home: Path) -> Iterator[psjobs.Session]:
    s = psjobs.connect()
    try:
        yield s
    finally:
        s.close()


def answer() -> int:
    return 42


def squares(n: int) -> Iterator[int]:
    for i in range(n):
        yield i * i


def three(jobs: psjobs.Session) -> list[psjobs.Job]:
    started = [jobs.start_job("echo hi; echo there"), jobs.start_job(answer), jobs.start_job(squares, 3)]
    for job in started:
        assert job.wait(30), job
    return started


WANTED = [["hi", "there"], 42, [0, 1, 4]]


def test_result_is_a_commands_lines_a_callables_value_a_generators_items(jobs: psjobs.Session) -> None:
    started = three(jobs)
    assert [job.result(timeout=10) for job in started] == WANTED
    assert [job.as_future().result(timeout=10) for job in started] == WANTED

    async def awaited() -> list[object]:
        return [await asyncio.wait_for(job, 10) for job in started]  # type: ignore[arg-type]

    assert asyncio.run(awaited()) == WANTED
    by_id = {job.id: job.result() for job in psjobs.as_completed(started, timeout=10)}
    assert [by_id[job.id] for job in started] == WANTED
    # result() moves no cursor: a receive still gets every item, as they came
    assert jobs.receive_job(started, wait=True, timeout=30) == ["hi", "there", 42, 0, 1, 4]
    assert [job.result() for job in started] == WANTED


def test_result_of_a_job_removed_from_the_shell_says_it_was_removed(jobs: psjobs.Session) -> None:
    job = jobs.start_job(answer)
    assert job.wait(30)
    ok("remove", str(job.id))
    with pytest.raises(psjobs.JobStateError, match="was removed"):
        job.result()  # not None, which would read as the value


def test_result_without_a_shape_from_an_older_host_is_a_callables_value(jobs: psjobs.Session, home: Path) -> None:
    job = jobs.start_job(squares, 3)
    assert job.wait(30)
    views = Client(Paths(home)).call(GetRequest(ids=[str(job.id)], children=True))
    for view in views:
        view.pop("shape")
    jobs._adopt(views)  # what an older host answers: no shape, which parses as before
    assert job.result() == 4


def test_a_shape_that_is_not_one_is_refused(home: Path) -> None:
    request = StartCallRequest(payload="", command="f", cwd=str(home), env={}, shape="lines").to_json()["args"]
    assert StartCallRequest.from_json(request).shape == "lines"
    with pytest.raises(ProtocolError, match="a shape is one of value, items, lines, not 'rows'"):
        StartCallRequest.from_json({**request, "shape": "rows"})


def test_result_still_times_out_on_a_running_connected_job(jobs: psjobs.Session) -> None:
    job = jobs.start_job("sleep 30")
    with pytest.raises(concurrent.futures.TimeoutError):
        job.result(timeout=0.2)
    jobs.stop_job(job)
