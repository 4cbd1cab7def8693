"""The session host's SQLite store: every job and every record, written as they arrive.

::

    host journals (see _journal) --Writer thread, one transaction a pass--> SQLite (WAL):
        jobs (one row each: what get shows, the cursor, the pid to end after a crash, the shape
              of its result())
        records (seq, job, stream, time, JSON or readable text)
    SqliteJournal.read --Store.windows--> a job's records by position (its k-th record by seq)
    host start --recover (unfinished jobs of a dead host: Failed), load--> the Session's jobs

The host's Session is the job table; this is its durable copy. A job's final state is written
after its last record, in the order the writer was given them. The host process is the only one
that opens the database, through two connections: the writer's, and one for reads (WAL lets them
read while a transaction is open). The files (jobs.db, -wal, -shm) are 0600; space freed by
``remove`` goes back to the file system (incremental vacuum, then a WAL checkpoint).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from .._errors import HostError, HostLostError
from .._records import ErrorRecord, InformationRecord, ProgressRecord
from ..core._pshost import reason_text as text_of_reason
from ..core._state import JobState
from ._client import check_private, open_private

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY, parent INTEGER, name TEXT NOT NULL, job_type TEXT NOT NULL,
    command TEXT NOT NULL, location TEXT NOT NULL, computer_name TEXT, state TEXT NOT NULL,
    reason TEXT, exit_code INTEGER, begin_time REAL, end_time REAL, instance_id TEXT NOT NULL,
    cwd TEXT, pid INTEGER, pid_start INTEGER, cursor INTEGER NOT NULL DEFAULT 0,
    last_seq INTEGER NOT NULL DEFAULT 0, host_pid INTEGER, shape TEXT NOT NULL DEFAULT 'value'
);
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY, job INTEGER NOT NULL, stream INTEGER NOT NULL, time REAL NOT NULL,
    json INTEGER NOT NULL, data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS records_by_job ON records (job, seq);
"""

_COLUMNS = ("id", "parent", "name", "job_type", "command", "location", "computer_name", "state",
            "reason", "exit_code", "begin_time", "end_time", "instance_id", "cwd", "pid", "pid_start",
            "cursor", "last_seq", "host_pid", "shape")
# Columns added after the first release, with their definitions: a database made before gets them
# when the host opens it (ALTER TABLE: its rows take the default). A column with a default is read
# and written by both versions (each names its columns), so schema_version stays 1: a downgraded
# host still opens the file. shape: what result() makes of a job's output (core.result_shape);
# a job stored before it gives a callable's value, as result() did then.
_ADDED_COLUMNS = {"shape": "TEXT NOT NULL DEFAULT 'value'"}

_FINISHED = {s.value for s in JobState if s.is_finished}
_INSERT_RECORD = "INSERT INTO records (seq, job, stream, time, json, data) VALUES (?, ?, ?, ?, ?, ?)"
json_str: Callable[[str], str] = json.encoder.encode_basestring_ascii
_TEXT_LIMIT = 1_000_000  # a readable form longer than this is cut: it is a stand-in, not the value

Row = dict[str, Any]
RecordRow = tuple[int, int, int, float, int, str]  # seq, job, stream, time, is-json, data


# --- values as stored ------------------------------------------------------------------------

def encode(stream: int, payload: Any) -> tuple[int, str]:
    """(1, JSON text) for a JSON-able value, else (0, a readable text form).

    Output values are stored as themselves; records of the other streams as an object of their
    fields. ASCII escapes keep lone surrogates (undecodable bytes) storable as SQLite text.
    """
    if stream == 0:
        if type(payload) is str:  # the common case: a line of a command's output
            return 1, json_str(payload)  # what json.dumps gives, five times faster
        value = payload
    else:
        value = _record_fields(payload)
    try:
        return 1, json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        return 0, _readable(value)


def _readable(value: Any) -> str:
    try:
        text = repr(value)
    except Exception as exc:  # a broken __repr__ must not lose the record
        text = f"<{type(value).__qualname__}: repr failed: {exc}>"
    text = text if len(text) <= _TEXT_LIMIT else text[:_TEXT_LIMIT] + "..."
    # repr keeps lone surrogates (a str of undecodable bytes, in a set), which SQLite text refuses:
    # a readable form escapes them, as the JSON form does.
    return text if text.isascii() else text.encode("utf-8", "backslashreplace").decode("utf-8")


def storable(value: Any) -> Any:
    """A column's value as SQLite takes it. SQLite text must be UTF-8, and a Python str may hold lone
    surrogates (an undecodable byte of a file name or an argument: ``'caf\\udce9.txt'``; ``"\\ud800"``
    from a JSON request), so such a str is stored as a BLOB of its surrogatepass bytes instead, which
    ``loaded`` turns back into the very same str: a job keeps its name, command and directory."""
    if type(value) is str and not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "surrogatepass")
    return value


def loaded(value: Any) -> Any:
    """A column's value as it was given to ``storable`` (no column holds bytes of its own)."""
    return value.decode("utf-8", "surrogatepass") if type(value) is bytes else value


def store_fails(exc: BaseException) -> bool:
    """True when ``exc`` says the store cannot write now (locked, full, an I/O error, a damaged
    file): worth retrying as it was. False when it is what was written that SQLite refuses (a value
    it cannot take, a row that breaks a constraint): retrying the same would fail forever."""
    if isinstance(exc, (sqlite3.IntegrityError, sqlite3.DataError, sqlite3.InterfaceError,
                        sqlite3.ProgrammingError, sqlite3.NotSupportedError)):
        return False
    return isinstance(exc, (sqlite3.DatabaseError, OSError, MemoryError))


def _record_fields(record: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {"message": str(getattr(record, "message", record)),
                              "computer_name": getattr(record, "computer_name", None)}
    if isinstance(record, ErrorRecord):
        exc = record.exception
        fields["exception"] = None if exc is None else text_of_reason(exc)
        fields["traceback"] = record.traceback
    elif isinstance(record, ProgressRecord):
        fields.update(activity=record.activity, status=record.status,
                      percent_complete=record.percent_complete, completed=record.completed)
    elif isinstance(record, InformationRecord) and record.data is not record.message:
        try:
            json.dumps(record.data)
            fields["data"] = record.data
        except (TypeError, ValueError, RecursionError):
            fields["data"] = _readable(record.data)
    return fields


def process_start(pid: int) -> int | None:
    """The start time of a process (clock ticks since boot), to tell it from a later one with its pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    if len(fields) < 20 or fields[0] == "Z":
        return None
    return int(fields[19])


def unusable(path: str, exc: sqlite3.DatabaseError) -> HostError:
    """Why the host cannot start on the database at ``path``, and what to do about it."""
    where, name = os.path.split(path)
    if isinstance(exc, sqlite3.OperationalError):  # locked, full, an I/O error: the file may be fine
        return HostError(f"the psjobs database {path} cannot be used now ({exc}); end what holds it or "
                         f"free space in {where}, then run the command again")
    # Its -wal and -shm go with it: a WAL left beside a new database would be replayed into it.
    return HostError(f"the psjobs database {path} is damaged or is not a psjobs database ({exc}); move it "
                     f"away with its -wal and -shm files (`cd {shlex.quote(where)} && mkdir damaged && mv "
                     f"{shlex.quote(name)}* damaged/`) and run the command again: the host starts with no "
                     f"jobs, and the moved files keep what SQLite's `.recover` can still read")


# --- the store -----------------------------------------------------------------------------------

WRITE_BUSY = 1.0   # seconds a write waits for another process's lock before it fails (and is retried)


class Store:
    """The writer's connection behind one lock, and a connection for reads behind another."""

    def __init__(self, path: str) -> None:
        self.path = path
        # Made 0600 before SQLite opens it: SQLite gives the -wal and -shm files the same mode. SQLite
        # follows symbolic links, so the three files are checked first (a link is refused).
        os.close(open_private(path, os.O_RDWR))
        check_private(path + "-wal")
        check_private(path + "-shm")
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=WRITE_BUSY)
        self._lock = threading.RLock()
        with self._lock:
            # Before the first table: a new database returns freed pages to the file system on demand.
            self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a commit survives the host being killed (SIGKILL); only a crash of
            # the machine itself may lose the last commits.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(f"PRAGMA journal_size_limit={8 << 20}")  # the WAL shrinks back after a burst
            self._db.executescript(_SCHEMA)
            if self._db.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
                # A database of an earlier psjobs: switch it over once (VACUUM rewrites the file).
                self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")
                self._db.execute("VACUUM")
            found = self._meta("schema_version")
            if found is None:
                self._set_meta("schema_version", str(SCHEMA_VERSION))
            elif int(found) != SCHEMA_VERSION:
                raise RuntimeError(f"the psjobs database {path} has schema version {found}, this psjobs "
                                   f"reads version {SCHEMA_VERSION}; move the file away to start afresh")
            self._add_columns()
            self.max_seq: int = self._db.execute("SELECT coalesce(max(seq), 0) FROM records").fetchone()[0]
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.chmod(path + suffix, 0o600)  # also those of a database made by an earlier psjobs
        self._rdb = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30.0)
        self._rlock = threading.Lock()
        self.records = 0  # how many records are stored (load() counts them; the writer keeps it)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """One transaction under the lock: committed or rolled back whole. The methods that write
        (add_job, add_records, update_job, set_cursor, delete) are called inside one."""
        with self._lock:
            counts = self.records, self.max_seq
            self._db.execute("BEGIN")
            try:
                yield
                self._db.execute("COMMIT")  # may fail too (a full disk): rolled back like the rest
            except BaseException:
                self.records, self.max_seq = counts
                if self._db.in_transaction:  # SQLite may have rolled back already (SQLITE_FULL)
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                raise

    def _add_columns(self) -> None:
        """Give a jobs table made by an earlier psjobs the columns added since (see _ADDED_COLUMNS)."""
        have = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)").fetchall()}
        for name, definition in _ADDED_COLUMNS.items():
            if name not in have:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {definition}")

    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def _set_meta(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def close(self) -> None:
        with self._rlock:
            self._rdb.close()
        with self._lock:
            self._db.close()

    def probe(self) -> None:
        """Take the write lock and commit: raises sqlite3.Error when nothing can be recorded now
        (the database locked by another process, the disk full, ...)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._set_meta("probe", str(time.time()))
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def give_back_space(self) -> None:
        """Return the pages of deleted rows to the file system (after ``delete``, outside a
        transaction): the file shrinks at the checkpoint that follows."""
        with self._lock:
            # executescript: a cursor's fetchall() steps this pragma once (one page), not to the end
            self._db.executescript("PRAGMA incremental_vacuum;")
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    # --- jobs ------------------------------------------------------------------------------
    def next_id(self) -> int:
        """The first job id this host may give: ids are never reused, across restarts too."""
        with self._lock:
            stored = self._meta("next_id")
            top = int(self._db.execute("SELECT coalesce(max(id), 0) FROM jobs").fetchone()[0])
            return max(int(stored or 1), top + 1)

    def add_job(self, row: Row, final: dict[str, Any]) -> None:
        row = {**row, "state": "NotStarted", **final}
        self._db.execute(f"INSERT INTO jobs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                         tuple(map(storable, row.values())))
        if row["id"] >= int(self._meta("next_id") or 1):
            self._set_meta("next_id", str(row["id"] + 1))

    def update_job(self, job_id: int, fields: dict[str, Any]) -> None:
        if fields:
            sets = ", ".join(f"{k} = ?" for k in fields)
            self._db.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (*map(storable, fields.values()), job_id))

    def delete(self, ids: list[int]) -> None:
        for job_id in ids:
            self.records -= self._db.execute("DELETE FROM records WHERE job = ?", (job_id,)).rowcount
            self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def recover(self, host_pid: int) -> list[tuple[int, int]]:
        """Mark the jobs a dead host left unfinished as Failed; return their (pid, start) to end.

        Jobs cannot be re-attached: their output pipes died with the old host.
        """
        now = time.time()
        with self.transaction():
            rows = self._db.execute("SELECT id, host_pid, pid, pid_start FROM jobs WHERE state NOT IN "
                                    f"({', '.join('?' * len(_FINISHED))})", sorted(_FINISHED)).fetchall()
            for job_id, old_pid, _, _ in rows:
                reason = HostLostError(f"the psjobs host (pid {old_pid}) ended while this job was running "
                                       f"(it was killed or crashed), so the job was ended too; what it "
                                       f"produced until then is kept: `psjobs receive {job_id} --keep`")
                self._db.execute("UPDATE jobs SET state = 'Failed', reason = ?, end_time = ? WHERE id = ?",
                                 (text_of_reason(reason), now, job_id))
        return [(pid, start) for _, _, pid, start in rows if pid and start]

    def load(self) -> list[tuple[Row, int, int]]:
        """Every stored job by ascending id, with how many records it has and how many of them were
        received (its cursor, stored as the seq of the last received record, as a position)."""
        with self._lock:
            rows = [dict(zip(_COLUMNS, map(loaded, r))) for r in
                    self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs ORDER BY id").fetchall()]
            counts = dict(self._db.execute("SELECT job, count(*) FROM records GROUP BY job").fetchall())
            read = dict(self._db.execute("SELECT r.job, count(*) FROM records r JOIN jobs j ON r.job = j.id "
                                         "WHERE r.seq <= j.cursor GROUP BY r.job").fetchall())
            self.records = sum(counts.values())
        return [(row, counts.get(row["id"], 0), read.get(row["id"], 0)) for row in rows]

    # --- records ---------------------------------------------------------------------------
    def add_records(self, records: list[RecordRow]) -> None:
        self._db.executemany(_INSERT_RECORD, records)
        self._added(records)

    def add_records_each(self, records: list[RecordRow], stand_in: Callable[[RecordRow, Exception], RecordRow]) -> None:
        """``add_records`` a row at a time, a row SQLite refuses replaced by ``stand_in(row, why)``, so
        one value that cannot be stored costs that record, not the others, and no position moves."""
        for row in records:
            try:
                self._db.execute(_INSERT_RECORD, row)
            except Exception as exc:
                if store_fails(exc):
                    raise
                self._db.execute(_INSERT_RECORD, stand_in(row, exc))
        self._added(records)

    def _added(self, records: list[RecordRow]) -> None:
        last: dict[int, int] = {}
        for seq, job, *_ in records:
            last[job] = seq
        self._db.executemany("UPDATE jobs SET last_seq = ? WHERE id = ?", [(seq, job) for job, seq in last.items()])
        self.max_seq = max(self.max_seq, records[-1][0])
        self.records += len(records)

    def set_cursor(self, job_id: int, position: int) -> None:
        """Store a job's cursor (a position: how many of its records were received) as the seq of
        its last received record, which is what the table has always held."""
        self._db.execute("UPDATE jobs SET cursor = coalesce((SELECT seq FROM records WHERE job = ?1 "
                         "ORDER BY seq LIMIT 1 OFFSET ?2 - 1), 0) WHERE id = ?1", (job_id, position))

    def windows(self, job_id: int, start: int, stop: int, size: int) -> Iterator[list[tuple[int, Any, float]]]:
        """A job's records from position ``start`` up to ``stop`` as (stream, Stored, time), in lists
        of at most ``size``: the first found by position (OFFSET), the next ones after the last seq
        seen (the index, not a scan from the job's first record)."""
        from ._journal import Stored

        after = None
        while start < stop:
            n = min(size, stop - start)
            with self._rlock:  # committed rows only, without waiting for a write transaction
                if after is None:
                    cur = self._rdb.execute("SELECT seq, stream, time, json, data FROM records WHERE job = ? "
                                            "ORDER BY seq LIMIT ? OFFSET ?", (job_id, n, start))
                else:
                    cur = self._rdb.execute("SELECT seq, stream, time, json, data FROM records WHERE job = ? "
                                            "AND seq > ? ORDER BY seq LIMIT ?", (job_id, after, n))
                rows = cur.fetchall()
            if not rows:
                return
            yield [(stream, Stored(seq, flag, data), t) for seq, stream, t, flag, data in rows]
            start += len(rows)
            after = rows[-1][0]

    def set_cursor_seq(self, job_id: int, seq: int) -> None:
        """Store a job's cursor as the seq of its last received record (known to the caller)."""
        self._db.execute("UPDATE jobs SET cursor = ? WHERE id = ?", (seq, job_id))

    def count_records(self) -> int:
        """How many records are stored (kept as they are written: no scan)."""
        return self.records


def kill_orphans(groups: list[tuple[int, int]], grace: float = 2.0) -> None:
    """End the process groups of jobs whose host died (TERM, then KILL after ``grace``), if their
    leader is still that process: its start time tells it from a later process with its pid."""
    import signal

    def send(sig: int) -> None:
        for pid, start in groups:
            if process_start(pid) == start:
                with contextlib.suppress(OSError):
                    os.killpg(pid, sig)

    if groups:
        send(signal.SIGTERM)
        timer = threading.Timer(grace, send, (signal.SIGKILL,))
        timer.daemon = True
        timer.start()
