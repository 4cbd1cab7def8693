"""result() of a connected session's jobs: what the job gave, shaped by what ran (a command's lines,
a callable's value, a generator's items), as in-process, and the same after a host restart, in a
database made before the shape was stored, and against an older host that does not send it.
Each test has a state directory and a session host of its own."""

from __future__ import annotations

import asyncio
import concurrent.futures
import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import psjobs
from psjobs.host._client import Client, Paths
from psjobs.host._protocol import GetRequest, ProtocolError, StartCallRequest

from .clitools import ok, private_home, stop_host

pytestmark = pytest.mark.timeout(120)


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


def test_result_is_the_same_after_a_host_restart(jobs: psjobs.Session, home: Path) -> None:
    started = three(jobs)
    stop_host(home)
    again = psjobs.connect()  # a new host, whose jobs are those it stored
    try:
        restored = [again.get_job(job.id)[0] for job in started]
        assert [job.result(timeout=10) for job in restored] == WANTED
        assert [job.result(timeout=10) for job in started] == WANTED  # the old session's mirrors too
    finally:
        again.close()


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


# The jobs table as the first release made it (host/_store.py), without the shape column.
OLD_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY, parent INTEGER, name TEXT NOT NULL, job_type TEXT NOT NULL,
    command TEXT NOT NULL, location TEXT NOT NULL, computer_name TEXT, state TEXT NOT NULL,
    reason TEXT, exit_code INTEGER, begin_time REAL, end_time REAL, instance_id TEXT NOT NULL,
    cwd TEXT, pid INTEGER, pid_start INTEGER, cursor INTEGER NOT NULL DEFAULT 0,
    last_seq INTEGER NOT NULL DEFAULT 0, host_pid INTEGER
);
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY, job INTEGER NOT NULL, stream INTEGER NOT NULL, time REAL NOT NULL,
    json INTEGER NOT NULL, data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS records_by_job ON records (job, seq);
"""


def old_database(home: Path) -> None:
    """jobs.db as a host of the first release left it: job 1, a command (a parent and its child
    2) that printed two lines, one of them received."""
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    db = sqlite3.connect(home / "jobs.db", isolation_level=None)
    try:
        db.executescript(OLD_SCHEMA)
        db.execute("INSERT INTO meta VALUES ('schema_version', '1'), ('next_id', '3')")
        now = time.time()
        for jid, parent, job_type in ((1, None, "BackgroundJob"), (2, 1, "")):
            db.execute("INSERT INTO jobs (id, parent, name, job_type, command, location, state, exit_code, "
                       "begin_time, end_time, instance_id, cwd, cursor, last_seq, host_pid) VALUES "
                       "(?, ?, ?, ?, 'echo hi; echo there', 'localhost', 'Completed', 0, ?, ?, ?, ?, ?, ?, 1)",
                       (jid, parent, f"Job{jid}", job_type, now - 1, now, str(uuid.uuid4()), str(home),
                        1 if jid == 2 else 0, 2 if jid == 2 else 0))
        db.executemany("INSERT INTO records VALUES (?, 2, 0, ?, 1, ?)", [(1, now, '"hi"'), (2, now, '"there"')])
    finally:
        db.close()
    (home / "jobs.db").chmod(0o600)


def test_a_database_of_the_old_schema_opens_and_its_jobs_read_back(tmp_path: Path) -> None:
    home = tmp_path / "old"
    old_database(home)
    with private_home(home):
        jobs = psjobs.connect()
        try:
            (old,) = jobs.get_job(1)
            assert old.state is psjobs.JobState.COMPLETED
            assert old.output == ["hi", "there"]
            assert old.result() == "there"  # stored without a shape: read as before, a callable's value
            assert jobs.receive_job(old) == ["there"]  # its cursor was kept
            new = jobs.start_job("echo a; echo b")  # the table has the column now: stored with its shape
            assert new.wait(30) and new.id == 3
            stop_host(home)
            (new,) = jobs.get_job(3)
            assert new.result() == ["a", "b"]
            assert jobs.get_job(1)[0].output == ["hi", "there"]
        finally:
            jobs.close()
    columns = sqlite3.connect(home / "jobs.db").execute("PRAGMA table_info(jobs)").fetchall()
    assert [c[1] for c in columns][-1] == "shape"


def test_result_still_times_out_on_a_running_connected_job(jobs: psjobs.Session) -> None:
    job = jobs.start_job("sleep 30")
    with pytest.raises(concurrent.futures.TimeoutError):
        job.result(timeout=0.2)
    jobs.stop_job(job)
