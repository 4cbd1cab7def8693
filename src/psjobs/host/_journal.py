"""The session host's journals: each job's records go to SQLite as they arrive.

::

    backend --entries--> Job --(session lock)--> SqliteJournal.extend --put--> Writer queue (bounded:
                                                 (counts them; no I/O)          |  a producer waits)
    Session._read --claims [start, end)--> SqliteJournal.read (no session lock) | the writer thread:
                  waits for the writer if that range is not stored yet <--------+ small transactions
                  then SELECTs it: (stream, Stored(seq, json flag, text), time)    (<= 1 MiB): rows,
                                                                                   records, cursors,
                                                                                   final states;
                                                                                   a failed one is
                                                                                   retried as it was

The writer applies items in the order they were put, so a job's final state is written after its
last record, and a removed job's rows are deleted after anything written for it. A pass that fails
because of what it holds, not of the store (a value SQLite refuses), is never retried as it was:
it is written op by op, and what SQLite refuses alone is given up loudly (Writer._give_up). Nothing here
takes the session lock; under it, a producer takes only the writer's small lock, and waits there
for room only while the store works (see Writer).
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import sqlite3
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

from .._errors import HostError
from ..core import result_shape
from ..core._job import Job
from ..core._journal import Entry
from ..core._pshost import describe_job
from ._store import RecordRow, Store, encode, json_str, process_start, store_fails


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
        writer.journals[job_id] = self
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
        if self._writer.put_records(self, entries):
            self.length += len(entries)

    def append(self, entry: Entry) -> None:
        if self._writer.put_records(self, [entry]):
            self.length += 1

    def read(self, start: int, stop: int) -> list[Entry]:
        """The entries once stored; raises HostError if they cannot be (the store fails), rather
        than return fewer: a reader's positions stay those of the records it got."""
        if stop > self.stored:
            self._writer.sync(lambda: self.stored >= stop)
            if stop > self.stored:
                raise HostError(f"receive: records of job {self.job_id} are not stored yet, and storing "
                                f"fails now ({self._writer.problem or 'the store is slow'}); `psjobs receive` "
                                f"leaves them unreceived: receive again once `psjobs host status` no longer "
                                f"shows a storage problem")
        return _Rows(self._writer.store, self.job_id, start, stop)

    def receive_to(self, position: int, seq: int) -> None:
        """Move the cursor to ``position``, the record ``seq`` being the last received (no lookup)."""
        self._cursor = position
        self._writer.put(("cursor_seq", self, seq))

    def close(self) -> None:
        self._writer.put(("close", self))

    def drop(self) -> None:
        self._writer.put(("drop", self))


class _Rows(list):  # type: ignore[type-arg]  # list[Entry] for the Journal protocol
    """A range of a job's records, read from the store in windows as it is iterated, so a receive
    of a big job never holds it whole (``len`` is the range's; only iteration is supported)."""

    WINDOW = 1024

    def __init__(self, store: Store, job_id: int, start: int, stop: int) -> None:
        super().__init__()
        self._where = (store, job_id, start, stop)

    def __iter__(self) -> Iterator[Entry]:
        store, job_id, start, stop = self._where
        for window in store.windows(job_id, start, stop, self.WINDOW):
            yield from window

    def __len__(self) -> int:
        return max(0, self._where[3] - self._where[2])

    def __bool__(self) -> bool:
        return len(self) > 0


def _size(entries: list[Entry]) -> int:
    """About how many bytes the entries take as stored (a line: its length; a record: a guess)."""
    return sum(len(p) + 40 if type(p) is str else 200 for _, p, _ in entries)


class Writer:
    """One thread that writes what the journals are given, in small transactions, in order.

    Bounded: at most QUEUED records (QUEUED_BYTES) wait for it, the transaction being written
    included. A producer (a job's pipe reader, under the session lock) past that bound waits for
    room, so a fast job is slowed to the store's pace instead of growing the host; what a SIGKILL
    can lose is what is in the pipes, the reader's chunk and at most QUEUED records. While the
    store fails (disk full, database locked, I/O error) producers do not wait (the host keeps
    serving); records are kept in memory up to FAILING_BYTES / FAILING_RECORDS, beyond that they
    are dropped and counted, and every failure is reported (``problem``) and retried.
    """

    QUEUED = 4096                # records waiting for the writer (or being written) before a producer waits
    QUEUED_BYTES = 8 << 20       # ... or this many bytes of them (long lines)
    TX_RECORDS = 1024            # records per transaction at most
    TX_BYTES = 1 << 20           # bytes per transaction at most (a transaction takes what is queued)
    FAILING_BYTES = 64 << 20     # what is kept in memory while nothing can be stored: this much
    FAILING_RECORDS = 500_000    # text, and at most this many records (each costs ~100 bytes more)
    WAIT_FOR_ROOM = 2.0          # seconds a producer waits for room at most (a stalled store)
    RETRY = (0.05, 1.0)          # seconds between attempts while the store fails: first, most

    def __init__(self, store: Store) -> None:
        self.store = store
        self._cond = threading.Condition()
        self._items: collections.deque[tuple[Any, ...]] = collections.deque()
        self._queued = 0             # records in _items (and in the pass being written)
        self._queued_bytes = 0
        self._seq = store.max_seq
        self.live: dict[int, SqliteJournal] = {}      # this run's journals, by job id (for their pids)
        self.journals: dict[int, SqliteJournal] = {}  # every job's journal, by job id
        self.problem: str | None = None   # why storing fails now (None: it works)
        self.since: float | None = None   # when it began to fail
        self.attempts = 0                 # failed attempts since then
        self.dropped = 0                  # records lost because nothing could store them
        self._told: list[str] = []        # news for the next request (storing works again, ...)
        self.thread = threading.Thread(target=self._run, name="psjobs-host-writer", daemon=True)
        self.thread.start()

    # --- what the journals give ------------------------------------------------------------
    def put(self, item: tuple[Any, ...]) -> None:
        with self._cond:
            self._items.append(item)
            self._cond.notify_all()

    def put_records(self, journal: SqliteJournal, entries: list[Entry]) -> bool:
        """Queue a job's records (called with the session lock held); False if they were dropped."""
        size = _size(entries)
        n = len(entries)
        with self._cond:
            if self._full(n, size) and self.problem is None:
                # Backpressure: the writer makes room within a transaction's time (it never takes
                # the session lock); a store that stalls instead turns into a reported problem.
                deadline = time.monotonic() + self.WAIT_FOR_ROOM
                while self._full(n, size) and self.problem is None and self.thread.is_alive():
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or not self._cond.wait(remaining):
                        break
            if self.problem is not None and (self._queued_bytes + size > self.FAILING_BYTES
                                             or self._queued + n > self.FAILING_RECORDS):
                self.dropped += n
                return False
            if n <= self.TX_RECORDS and size <= self.TX_BYTES:
                self._items.append(("records", journal, entries))
            else:  # a big batch goes in transaction-sized pieces, each committed soon
                self._items.extend(("records", journal, piece) for piece in self._pieces(entries))
            self._queued += n
            self._queued_bytes += size
            self._cond.notify_all()
        return True

    def _pieces(self, entries: list[Entry]) -> Iterator[list[Entry]]:
        start = size = 0
        for i, entry in enumerate(entries):
            size += _size([entry])
            if i + 1 - start >= self.TX_RECORDS or size >= self.TX_BYTES:
                yield entries[start:i + 1]
                start, size = i + 1, 0
        if start < len(entries):
            yield entries[start:]

    def _full(self, n: int, size: int) -> bool:
        """No room for n records of ``size`` bytes (an empty queue takes any batch)."""
        return self._queued > 0 and (self._queued + n > self.QUEUED or self._queued_bytes + size > self.QUEUED_BYTES)

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

    def sync(self, until: Callable[[], bool] | None = None, timeout: float = 10.0) -> bool:
        """Wait until everything put before this call is committed (or ``until()`` holds); False
        if it was not within ``timeout``, or at once while the store fails (the caller goes on)."""
        done = threading.Event()
        self.put(("sync", done))
        deadline = time.monotonic() + timeout
        while not done.wait(0.05):
            if (until is not None and until()) or self.problem is not None or time.monotonic() > deadline \
                    or not self.thread.is_alive():
                return until is not None and until()
        return True

    def check(self, verb: str) -> None:
        """Raise HostError unless a job can be recorded now (record first, then start)."""
        try:
            self.store.probe()
        except sqlite3.Error as exc:
            raise HostError(f"{verb}: the job could not be recorded in {self.store.path} ({exc}), so it "
                            f"was not started; free space or end what holds the database, then run it "
                            f"again (`psjobs host status` shows the host's state)") from None

    def notes(self) -> list[str]:
        """What a client should be told with its answer: a storage problem, or news about one."""
        with self._cond:
            told, self._told = self._told, []
            problem, since, attempts, dropped = self.problem, self.since, self.attempts, self.dropped
        if problem is not None:
            when = time.strftime("%H:%M:%S", time.localtime(since))
            lost = f"; {dropped} records were dropped (memory bound)" if dropped else ""
            told.append(f"the psjobs host cannot store records since {when} ({problem}); it retries "
                        f"({attempts} attempts so far) and keeps {self._queued} records in memory until "
                        f"then{lost}; free space in {os.path.dirname(self.store.path)} or end what locks "
                        f"its database")
        return told

    def close(self, timeout: float) -> None:
        """Write what is queued, then end the thread."""
        self.put(("end",))
        self.thread.join(timeout)

    # --- the thread ----------------------------------------------------------------------------
    def _take(self) -> list[tuple[Any, ...]]:
        """The next transaction's items: what is queued, up to TX_RECORDS / TX_BYTES of records."""
        with self._cond:
            while not self._items:
                self._cond.wait()
            items: list[tuple[Any, ...]] = []
            n = size = 0
            while self._items and n < self.TX_RECORDS and size < self.TX_BYTES:
                item = self._items.popleft()
                items.append(item)
                if item[0] == "records":
                    n += len(item[2])
                    size += _size(item[2])
                elif item[0] == "end":
                    break
            return items

    def _run(self) -> None:
        while True:
            items = self._take()
            done = any(item[0] == "end" for item in items)
            ops, n = self._prepare(items)
            pending = [ops]  # the transactions still to commit, in order: the pass, or its ops one by one
            delay = self.RETRY[0]
            while pending:
                try:
                    self._commit(pending[0])
                    pending.pop(0)
                except Exception as exc:  # never let a failure end persistence for every job
                    if not store_fails(exc):
                        # SQLite refuses something this pass holds: the same pass would fail forever and
                        # hold up every job behind it. Its ops go one by one; one that fails alone is
                        # given up, loudly (or stored in a form SQLite takes).
                        pending[:1] = [[op] for op in pending[0]] if len(pending[0]) > 1 else \
                            self._give_up(pending[0][0], exc)
                        continue
                    self._failed(exc, items)
                    if done and self.attempts >= 3:  # shutting down: give up after a few
                        return
                    time.sleep(delay)  # retrying: nothing to wait for but time
                    delay = min(delay * 2, self.RETRY[1])
            self._seq = n
            self._recovered(items)
            if done:
                return

    def _give_up(self, op: tuple[Any, ...], exc: Exception) -> list[list[tuple[Any, ...]]]:
        """What replaces an op SQLite refuses alone: its records a row at a time, a refused row as a
        stand-in that says why (positions stay); anything else is dropped. Every loss is logged and
        told to the next client."""
        kind, what = op[0], op[1]
        if kind == "records":
            return [[("records_each", what, op[2])]]
        if kind == "records_each":  # not even a row at a time: the readers must not wait for them
            for journal, k in op[2].items():
                journal.stored += k
            with self._cond:
                self.dropped += len(what)
            whose = ", ".join(f"job {journal.job_id}" for journal in op[2])
            self._lost(f"{len(what)} records of {whose} could not be stored ({_why(exc)}) and were dropped", exc)
            return []
        target: SqliteJournal | int = what if isinstance(what, SqliteJournal) else what[1]
        job_id = target.job_id if isinstance(target, SqliteJournal) else target
        journal = target if isinstance(target, SqliteJournal) else self.journals.get(target)
        named = f"job {job_id}" if journal is None or journal.job is None else describe_job(journal.job)
        if kind == "drop" and self.journals.get(job_id) is journal:  # gone from the session all the same
            self.live.pop(job_id, None)
            del self.journals[job_id]
        lost = {"job": "was not recorded: it is gone once the host restarts (receive what you need before)",
                "close": "keeps the state stored before it ended once the host restarts",
                "drop": "was removed, but comes back once the host restarts (remove it again then)",
                "cwd": "shows no working directory in `get --json` once the host restarts",
                "pid": "may leave its processes running if the host dies",
                }.get(kind, "may give records it gave already again once the host restarts")  # cursors
        self._lost(f"{named} {lost}: the psjobs host could not store that ({_why(exc)})", exc)
        return []

    def _lost(self, what: str, exc: BaseException) -> None:
        note = (f"{what}; the jobs after it are stored. This is a psjobs bug: please report it with the "
                f"lines of {os.path.join(os.path.dirname(self.store.path), 'host.log')} about it")
        _log(f"psjobs host: {note}")
        with contextlib.suppress(Exception):
            traceback.print_exception(exc)
            sys.stderr.flush()
        with self._cond:
            self._told.append(note)

    def _failed(self, exc: Exception, items: list[tuple[Any, ...]]) -> None:
        with self._cond:
            first = self.problem is None
            self.problem = f"{type(exc).__name__}: {exc}"
            if first:
                self.since = time.time()
            self.attempts += 1
            self._cond.notify_all()  # producers waiting for room stop waiting
        for item in items:  # their callers go on: what they waited for is not stored yet
            if item[0] == "sync":
                item[1].set()
        if first:
            _log(f"psjobs host: cannot store records ({self.problem}); retrying")
            _log_exception()

    def _recovered(self, items: list[tuple[Any, ...]]) -> None:
        records = sum(len(item[2]) for item in items if item[0] == "records")
        with self._cond:
            self._queued -= records
            self._queued_bytes -= sum(_size(item[2]) for item in items if item[0] == "records")
            if self.problem is not None:
                note = (f"the psjobs host stores records again (it could not for "
                        f"{time.time() - (self.since or time.time()):.0f}s: {self.problem})")
                self._told.append(note)
                _log(note)
                self.problem, self.since, self.attempts = None, None, 0
            self._cond.notify_all()
        for item in items:
            if item[0] == "sync":
                item[1].set()

    def _prepare(self, items: list[tuple[Any, ...]]) -> tuple[list[tuple[Any, ...]], int]:
        """The pass's operations in order, its records encoded once (a retry writes the same rows),
        with the last seq it gives. A records op carries how many of its rows are each journal's."""
        records: list[RecordRow] = []
        counted: dict[SqliteJournal, int] = {}
        n = self._seq
        ops: list[tuple[Any, ...]] = []  # in order, after the records of the same pass

        def flush_records() -> None:
            if records:
                ops.append(("records", list(records), dict(counted)))
                records.clear()
                counted.clear()

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
        return ops, n

    def _commit(self, ops: list[tuple[Any, ...]]) -> None:
        dropped = False
        self._marked: list[SqliteJournal] = []
        try:
            self._write(ops)
        except BaseException:
            for journal in self._marked:  # rolled back: their pids are stored by the retry
                journal.pid_known = False
            raise
        for op in ops:
            if op[0] in ("records", "records_each"):
                for journal, k in op[2].items():
                    journal.stored += k
        for kind, what, *_ in ops:
            if kind == "drop":
                dropped = True
                gone: SqliteJournal = what[1]
                self.live.pop(gone.job_id, None)
                if self.journals.get(gone.job_id) is gone:
                    del self.journals[gone.job_id]
        if dropped:
            with contextlib.suppress(sqlite3.Error):  # space comes back at the next removal otherwise
                self.store.give_back_space()

    def _write(self, ops: list[tuple[Any, ...]]) -> None:
        with self.store.transaction():
            for kind, what, *_ in ops:
                if kind == "records":
                    self.store.add_records(what)
                elif kind == "records_each":
                    self.store.add_records_each(what, self._stand_in)
                elif kind == "job":
                    journal = what[1]
                    self.store.add_job(job_row(journal), _final(journal.job))
                    self._store_pid(journal)
                elif kind == "cursor":
                    self.store.set_cursor(what[1].job_id, what[2])
                elif kind == "cursor_seq":
                    self.store.set_cursor_seq(what[1].job_id, what[2])
                elif kind == "close":
                    self.store.update_job(what[1].job_id, _final(what[1].job))
                    self._store_pid(what[1])
                elif kind == "drop":
                    self.store.delete([what[1].job_id])
                elif kind == "cwd":
                    self.store.update_job(what[1], {"cwd": what[2]})
                elif kind == "pid":
                    journal = what if isinstance(what, SqliteJournal) else self.live.get(what[1])
                    if journal is not None:
                        self._store_pid(journal)

    def _stand_in(self, row: RecordRow, exc: Exception) -> RecordRow:
        seq, job_id, stream, t, _, _ = row
        self._lost(f"record {seq} of job {job_id} could not be stored ({_why(exc)}); it reads as a text "
                   f"saying so", exc)
        t = t if isinstance(t, float) and math.isfinite(t) else time.time()  # SQLite stores NaN as NULL
        return seq, job_id, stream, t, 0, f"<a record psjobs could not store: {_why(exc)}>"

    def _store_pid(self, journal: SqliteJournal) -> None:
        if journal.pid_known or journal.job is None:
            return
        pid = pid_of(journal.job)
        start = process_start(pid) if pid else None
        if pid and start is not None:
            journal.pid_known = True
            self._marked.append(journal)
            self.store.update_job(journal.job_id, {"pid": pid, "pid_start": start})


def _log(text: str) -> None:
    """A line in host.log; a log that cannot be written (the same full disk) is no reason to stop."""
    with contextlib.suppress(Exception):
        print(text, file=sys.stderr, flush=True)


def _log_exception() -> None:
    with contextlib.suppress(Exception):
        traceback.print_exc()
        sys.stderr.flush()


def _why(exc: BaseException) -> str:
    """An exception as text SQLite and host.log take (it may quote the lone surrogate it refused)."""
    return f"{type(exc).__name__}: {exc}".encode("utf-8", "backslashreplace").decode("utf-8")


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
            "pid": None, "pid_start": None, "cursor": 0, "last_seq": 0, "host_pid": os.getpid(),
            "shape": result_shape(job)}
