"""The session host's journals: each job's records go to SQLite as they arrive.

::

    backend --entries--> Job --(session lock)--> SqliteJournal.extend --put--> Writer queue
                                                 (counts them; no I/O)          |
    Session._read --claims [start, end)--> SqliteJournal.read (no session lock) | the writer thread:
                  waits for the writer if that range is not stored yet <--------+ one transaction
                  then SELECTs it: (stream, Stored(seq, json flag, text), time)    per pass: rows,
                                                                                   records, cursors,
                                                                                   final states

The writer applies items in the order they were put, so a job's final state is written after its
last record, and a removed job's rows are deleted after anything written for it. Nothing here
takes the session lock; ``put`` is one ``SimpleQueue.put`` (atomic, no Python lock), which is all
the session lock ever waits for.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import traceback
import uuid
from typing import Any

from .. import _errors
from ..core._job import Job
from ..core._journal import Entry
from ..core._session import Session
from ..core._state import JobState
from ._store import RecordRow, Store, encode, json_str, process_start


class Stored:
    """A record as stored: what a host journal's ``read`` gives in place of the value itself."""

    __slots__ = ("data", "flag", "seq")

    def __init__(self, seq: int, flag: int, data: str) -> None:
        self.seq = seq
        self.flag = flag    # 1: data is JSON text; 0: a readable text form of an unstorable value
        self.data = data


class SqliteJournal:
    """A job's journal in the host's store; only counts stay in memory."""

    __slots__ = ("_cursor", "_writer", "job", "job_id", "length", "pid_known", "stored")

    def __init__(self, writer: Writer, job: Job | None, job_id: int, *, length: int = 0, cursor: int = 0,
                 new: bool = True) -> None:
        self._writer = writer
        self.job = job
        self.job_id = job_id
        self.length = length        # entries appended (counted when put, under the session lock)
        self.stored = length        # entries committed by the writer
        self._cursor = cursor
        self.pid_known = not new
        if new:
            writer.put(("job", self))

    @property
    def cursor(self) -> int:
        return self._cursor

    @cursor.setter
    def cursor(self, value: int) -> None:
        self._cursor = value
        self._writer.put(("cursor", self, value))

    def __len__(self) -> int:
        return self.length

    def extend(self, entries: list[Entry]) -> None:
        self.length += len(entries)
        self._writer.put(("records", self, entries))

    def append(self, entry: Entry) -> None:
        self.length += 1
        self._writer.put(("records", self, [entry]))

    def read(self, start: int, stop: int) -> list[Entry]:
        if stop > self.stored:
            self._writer.sync()
        return self._writer.store.read(self.job_id, start, stop)

    def close(self) -> None:
        self._writer.put(("close", self))

    def drop(self) -> None:
        self._writer.put(("drop", self))


class Writer:
    """One thread that writes what the journals are given, in one transaction per pass."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._queue: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._seq = store.max_seq
        self.live: dict[int, SqliteJournal] = {}  # this run's journals, by job id (for their pids)
        self.thread = threading.Thread(target=self._run, name="psjobs-host-writer", daemon=True)
        self.thread.start()

    def put(self, item: tuple[Any, ...]) -> None:
        self._queue.put(item)

    def journal(self, job: Job) -> SqliteJournal:
        """The Session's journal factory (called with the session lock held)."""
        journal = SqliteJournal(self, job, job.id)
        self.live[job.id] = journal
        return journal

    def started(self, jobs: list[Job], cwd: str | None) -> None:
        """A handler started these jobs: store where they run and, once known, their processes."""
        for job in jobs:
            self.put(("cwd", job.id, cwd))
            self.put(("pid", job.id))

    def sync(self, timeout: float | None = None) -> bool:
        """Wait until everything put before this call is committed."""
        done = threading.Event()
        self._queue.put(("sync", done))
        return done.wait(timeout)

    def close(self, timeout: float) -> None:
        """Write what is queued, then end the thread."""
        self._queue.put(("end",))
        self.thread.join(timeout)

    def _run(self) -> None:
        while True:
            items = [self._queue.get()]
            with contextlib.suppress(queue.Empty):
                while len(items) < 10_000:
                    items.append(self._queue.get_nowait())
            try:
                self._pass(items)
            except Exception:  # never let one bad pass end persistence for every job
                traceback.print_exc()
            for item in items:
                if item[0] == "sync":
                    item[1].set()
            if any(item[0] == "end" for item in items):
                return

    def _pass(self, items: list[tuple[Any, ...]]) -> None:
        records: list[RecordRow] = []
        counted: dict[SqliteJournal, int] = {}
        n = self._seq
        ops: list[tuple[str, Any]] = []  # in order, after the records of the same pass

        def flush_records() -> None:
            if records:
                ops.append(("records", list(records)))
                records.clear()

        for item in items:
            kind = item[0]
            if kind == "records":
                journal, entries = item[1], item[2]
                job_id = journal.job_id
                for stream, payload, t in entries:  # the hot loop
                    n += 1
                    if stream == 0 and type(payload) is str:
                        records.append((n, job_id, 0, t, 1, json_str(payload)))
                    else:
                        records.append((n, job_id, int(stream), t, *encode(stream, payload)))
                counted[journal] = counted.get(journal, 0) + len(entries)
                if not journal.pid_known:
                    ops.append(("pid", journal))
            elif kind != "sync" and kind != "end":
                flush_records()
                ops.append((kind, item))
        flush_records()
        with self.store.transaction():
            for kind, what in ops:
                if kind == "records":
                    self.store.add_records(what)
                elif kind == "job":
                    journal = what[1]
                    self.store.add_job(job_row(journal), _final(journal.job))
                    self._store_pid(journal)
                elif kind == "cursor":
                    self.store.set_cursor(what[1].job_id, what[2])
                elif kind == "close":
                    self.store.update_job(what[1].job_id, _final(what[1].job))
                    self._store_pid(what[1])
                elif kind == "drop":
                    self.store.delete([what[1].job_id])
                    self.live.pop(what[1].job_id, None)
                elif kind == "cwd":
                    self.store.update_job(what[1], {"cwd": what[2]})
                elif kind == "pid":
                    journal = what if isinstance(what, SqliteJournal) else self.live.get(what[1])
                    if journal is not None:
                        self._store_pid(journal)
        self._seq = n
        for journal, k in counted.items():
            journal.stored += k

    def _store_pid(self, journal: SqliteJournal) -> None:
        if journal.pid_known or journal.job is None:
            return
        pid = pid_of(journal.job)
        start = process_start(pid) if pid else None
        if pid and start is not None:
            journal.pid_known = True
            self.store.update_job(journal.job_id, {"pid": pid, "pid_start": start})


def pid_of(job: Job) -> int | None:
    """The job's process: its own pid, or that of the command a thread job runs."""
    if job.pid is not None:
        return job.pid
    proc = getattr(job.backend_data, "proc", None)
    pid = getattr(proc, "pid", None)
    return pid if isinstance(pid, int) else None


def _final(job: Job | None) -> dict[str, Any]:
    if job is None:
        return {}
    from ..core._pshost import reason_text

    reason = job.reason
    begin, end = job.begin_time, job.end_time
    return {"state": str(job.state), "reason": None if reason is None else reason_text(reason),
            "exit_code": job.exit_code, "begin_time": None if begin is None else begin.timestamp(),
            "end_time": None if end is None else end.timestamp()}


def job_row(journal: SqliteJournal) -> dict[str, Any]:
    """A new job's row (its state is written with it, and again when it ends)."""
    job = journal.job
    assert job is not None
    parent = job.parent
    return {"id": job.id, "parent": None if parent is None else parent.id, "name": job.name,
            "job_type": job.job_type, "command": job.command, "location": job.location,
            "computer_name": job.computer_name, "instance_id": str(job.instance_id), "cwd": None,
            "pid": None, "pid_start": None, "cursor": 0, "last_seq": 0, "host_pid": os.getpid()}


# --- the stored jobs, back in a Session -------------------------------------------------------------

def restore(session: Session, writer: Writer) -> dict[int, str | None]:
    """Load the stored jobs into ``session`` as finished jobs (``Store.recover`` ran first, so a job a
    dead host left running is Failed); return where each job's command ran."""
    jobs: dict[int, Job] = {}
    cwds: dict[int, str | None] = {}
    for row, count, received in writer.store.load():
        state = JobState.parse(row["state"])
        if not state.is_finished:  # recover() made every stored job finished; a restored job never runs
            state = JobState.FAILED
        journal = SqliteJournal(writer, None, row["id"], length=count, cursor=received, new=False)
        job = Job.restored(session, row["id"], parent=jobs.get(row["parent"]), name=row["name"],
                           job_type=row["job_type"], command=row["command"], location=row["location"],
                           computer_name=row["computer_name"], state=state,
                           reason=reason_from_text(row["reason"]), exit_code=row["exit_code"],
                           begin=row["begin_time"], end=row["end_time"],
                           instance_id=uuid.UUID(row["instance_id"]), pid=row["pid"], journal=journal)
        journal.job = job
        jobs[job.id] = job
        cwds[job.id] = row["cwd"]
    session.restore_jobs(list(jobs.values()))
    return cwds


class StoredReason(Exception):
    """A stored job's reason: its text as it was written (the exception itself is gone)."""


_reason_classes: dict[str, type[StoredReason]] = {}


def reason_from_text(text: str | None) -> BaseException | None:
    """An exception that reads as ``text`` did: the psjobs error of that name, else a StoredReason
    subclass named as the original class, so ``reason_text`` gives ``text`` back unchanged."""
    if not text:
        return None
    name, sep, rest = text.partition(": ")
    if not name.isidentifier():
        name, rest = "Exception", text
    known = getattr(_errors, name, None)
    if isinstance(known, type) and issubclass(known, _errors.PsJobsError):
        with contextlib.suppress(TypeError):  # one that takes more than a message: as below
            return known(rest) if sep else known()
    cls = _reason_classes.get(name)
    if cls is None:
        cls = _reason_classes[name] = type(name, (StoredReason,), {"__module__": __name__})
    return cls(text if sep else name)
