"""The host's view of its jobs: stored rows, with the live state of the jobs the host still runs.

::

    handlers --rows/select/wait_stored/register/delete--> JobTable
                                                            |-- Store (SQLite rows and records)
                                                            |-- Persister.live (jobs still running)
                                                            +-- Session (their live state)

A row is finished only once its last record is stored, so waiting here means waiting on the store.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from datetime import datetime, timezone

from ..core._job import Job
from ..core._session import Session
from ._protocol import JobView
from ._store import Persister, Row, Store, fill_more_data, is_finished, job_row, select, subtree, tree


def iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, timezone.utc).astimezone().isoformat()


def view(row: Row) -> JobView:
    """A job as clients see it (``--json``)."""
    return JobView(id=row["id"], name=row["name"], job_type=row["job_type"], state=row["state"],
                   has_more_data=row["has_more_data"], location=row["location"], command=row["command"],
                   parent_id=row["parent"], child_ids=row["child_ids"], computer_name=row["computer_name"],
                   exit_code=row["exit_code"], reason=row["reason"], begin_time=iso(row["begin_time"]),
                   end_time=iso(row["end_time"]), instance_id=row["instance_id"], pid=row["pid"],
                   cwd=row["cwd"])


def describe(row: Row) -> str:
    return f"Job {row['id']} {row['name']!r} ({row['state']})"


class JobTable:
    """The jobs as the host answers for them: the store's rows merged with the live Session."""

    def __init__(self, session: Session, store: Store, persister: Persister) -> None:
        self.session = session
        self.store = store
        self.persister = persister
        self._read_locks: dict[int, threading.Lock] = {}
        self._read_locks_guard = threading.Lock()

    def rows(self) -> list[Row]:
        """Every job: stored rows, with the live state of jobs the host still runs."""
        rows = self.store.rows()
        with self.session._cond:
            live = self.persister.live
            for row in rows:
                job = live.get(row["id"])
                if job is None:
                    continue
                state = job._state
                if not state.is_finished:
                    row["state"] = str(state)
                elif row["state"] == "NotStarted":
                    row["state"] = "Running"  # finished, its last records on their way to the store
                row["begin_time"] = job._begin
                row["pid"] = row["pid"] or job.pid
        fill_more_data(rows)
        return rows

    def select(self, ids: list[str], verb: str) -> tuple[list[Row], list[Row]]:
        rows = self.rows()
        return rows, select(rows, ids, verb)

    def live(self, rows: list[Row]) -> list[Job]:
        with self.session._cond:
            return [self.persister.live[r["id"]] for r in rows if r["id"] in self.persister.live]

    def running(self, rows: list[Row]) -> list[Job]:
        return [j for j in self.live(rows) if not j.state.is_finished]

    def wait_stored(self, ids: list[int], timeout: float | None, any: bool = False) -> list[int]:
        """Wait until the jobs are finished in the store (all, or one with ``any``); the done ids."""
        done: list[int] = []

        def check() -> bool:
            nonlocal done
            finished = {r["id"] for r in self.store.rows(ids) if is_finished(r)}
            done = [i for i in ids if i in finished]
            return bool(done) if any else len(done) == len(ids)

        self.store.wait_for(check, timeout)
        return done

    def register(self, job: Job, cwd: str | None) -> JobView:
        self.store.add_jobs([job_row(n, cwd=cwd, host_pid=os.getpid()) for n in tree(job)])
        self.persister.add(job)
        return next(view(r) for r in self.rows() if r["id"] == job.id)

    def views(self, ids: list[int]) -> list[JobView]:
        now = {r["id"]: r for r in self.rows()}
        return [view(now[i]) for i in ids if i in now]

    @contextlib.contextmanager
    def reading(self, leaves: list[int]) -> Iterator[None]:
        """One reader at a time per job, so concurrent receives never get a record twice."""
        with self._read_locks_guard:
            locks = [self._read_locks.setdefault(i, threading.Lock()) for i in sorted(leaves)]
        for lock in locks:
            lock.acquire()
        try:
            yield
        finally:
            for lock in reversed(locks):
                lock.release()

    def delete(self, tops: list[Row]) -> list[int]:
        ids = subtree(self.store.rows(), tops, leaves_only=False)
        self.store.delete(ids)
        with self._read_locks_guard:
            for i in ids:
                self._read_locks.pop(i, None)
        return sorted(r["id"] for r in tops)

    def running_tops(self) -> list[int]:
        with self.session._cond:
            return sorted(j.id for j in self.persister.live.values()
                          if j._parent is None and not j._state.is_finished)
