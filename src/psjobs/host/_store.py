"""The session host's SQLite store: every job and every record, written as they arrive.

::

    backends --> Session journals (in the host) --read_entries--> Persister thread
                                                                   | encode: JSON, or readable text
                                                                   | one transaction per pass
                                                                   v
    client --receive--> host handler --Store.receive_page--> SQLite (WAL): jobs, records
                        (rows after the job's cursor; the cursor moves in the same transaction
                         unless --keep)

The database is the source of truth: once a job is finished and its last record is stored, the
Persister removes it from the host's Session, and the records of a running job leave the
journal as soon as they are stored. A job's final state is written only after its last record,
so "finished" in the database means "everything is receivable". The host process is the only
one that opens the database.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from .._errors import HostLostError, JobNotFoundError
from .._records import ErrorRecord, InformationRecord, ProgressRecord
from ..core._pshost import reason_text as text_of_reason
from ..core._state import JobState

if TYPE_CHECKING:
    from ..core._job import Job
    from ..core._session import Session

SCHEMA_VERSION = 1

_SCHEMA = """
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

_COLUMNS = ("id", "parent", "name", "job_type", "command", "location", "computer_name", "state",
            "reason", "exit_code", "begin_time", "end_time", "instance_id", "cwd", "pid", "pid_start",
            "cursor", "last_seq", "host_pid")

_FINISHED = {s.value for s in JobState if s.is_finished}
_json_str: Callable[[str], str] = json.encoder.encode_basestring_ascii
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
            return 1, _json_str(payload)  # what json.dumps gives, five times faster
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
    return text if len(text) <= _TEXT_LIMIT else text[:_TEXT_LIMIT] + "..."


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


def reason_text(job: Job) -> str | None:
    reason = job.reason
    return None if reason is None else text_of_reason(reason)


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


# --- the store -----------------------------------------------------------------------------------

class Store:
    """One SQLite connection behind one lock; a condition tells waiters that something was committed."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.RLock()
        self.changed = threading.Condition(self._lock)
        self.generation = 0  # counts commits that waiters may care about
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a commit survives the host being killed (SIGKILL); only a crash of
            # the machine itself may lose the last commits.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            found = self._meta("schema_version")
            if found is None:
                self._set_meta("schema_version", str(SCHEMA_VERSION))
            elif int(found) != SCHEMA_VERSION:
                raise RuntimeError(f"the psjobs database {path} has schema version {found}, this psjobs "
                                   f"reads version {SCHEMA_VERSION}; move the file away to start afresh")
            self.max_seq: int = self._db.execute("SELECT coalesce(max(seq), 0) FROM records").fetchone()[0]

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One transaction under the lock: committed (and waiters told) or rolled back whole."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            self.generation += 1
            self.changed.notify_all()

    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def _set_meta(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- jobs ------------------------------------------------------------------------------
    def next_id(self) -> int:
        """The first job id this host may give: ids are never reused, across restarts too."""
        with self._lock:
            stored = self._meta("next_id")
            top = int(self._db.execute("SELECT coalesce(max(id), 0) FROM jobs").fetchone()[0])
            return max(int(stored or 1), top + 1)

    def add_jobs(self, rows: list[Row]) -> None:
        with self._transaction():
            self._db.executemany(
                f"INSERT INTO jobs ({', '.join(rows[0])}) VALUES ({', '.join('?' * len(rows[0]))})",
                [tuple(r.values()) for r in rows])
            self._set_meta("next_id", str(max(r["id"] for r in rows) + 1))

    def rows(self, ids: Iterable[int] | None = None) -> list[Row]:
        """Job rows by ascending id (all of them, or those of ``ids``)."""
        with self._lock:
            if ids is None:
                cur = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs ORDER BY id")
            else:
                wanted = sorted(set(ids))
                cur = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE id IN "
                                       f"({', '.join('?' * len(wanted))}) ORDER BY id", wanted)
            return [dict(zip(_COLUMNS, r)) for r in cur.fetchall()]

    def recover(self, host_pid: int) -> list[tuple[int, int]]:
        """Mark the jobs a dead host left unfinished as Failed; return their (pid, start) to end.

        Jobs cannot be re-attached: their output pipes died with the old host.
        """
        now = time.time()
        with self._lock:
            rows = self._db.execute("SELECT id, host_pid, pid, pid_start FROM jobs WHERE state NOT IN "
                                    f"({', '.join('?' * len(_FINISHED))})", sorted(_FINISHED)).fetchall()
            with self._transaction():
                for job_id, old_pid, _, _ in rows:
                    reason = HostLostError(f"the psjobs host (pid {old_pid}) ended while this job was running "
                                           f"(it was killed or crashed), so the job was ended too; what it "
                                           f"produced until then is kept: `psjobs receive {job_id} --keep`")
                    self._db.execute("UPDATE jobs SET state = 'Failed', reason = ?, end_time = ? WHERE id = ?",
                                     (text_of_reason(reason), now, job_id))
        return [(pid, start) for _, _, pid, start in rows if pid and start]

    def delete(self, ids: list[int]) -> None:
        with self._transaction():
            for job_id in ids:
                self._db.execute("DELETE FROM records WHERE job = ?", (job_id,))
                self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    # --- records ---------------------------------------------------------------------------
    def commit_pass(self, records: list[RecordRow], last_seq: dict[int, int],
                    updates: list[tuple[int, dict[str, Any]]]) -> None:
        """Store a pass of the Persister in one transaction: records, then what changed on jobs."""
        with self._transaction():
            if records:
                self._db.executemany("INSERT INTO records (seq, job, stream, time, json, data) "
                                     "VALUES (?, ?, ?, ?, ?, ?)", records)
                self._db.executemany("UPDATE jobs SET last_seq = ? WHERE id = ?",
                                     [(seq, job) for job, seq in last_seq.items()])
            for job_id, fields in updates:
                sets = ", ".join(f"{k} = ?" for k in fields)
                self._db.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (*fields.values(), job_id))

    def cursors(self, leaves: list[int]) -> dict[int, int]:
        """Where each job's reading stands (the seq of its last received record)."""
        with self._lock:
            marks = self._db.execute(f"SELECT id, cursor FROM jobs WHERE id IN "
                                     f"({', '.join('?' * len(leaves))})", leaves).fetchall()
            return {job: cur for job, cur in marks}

    def receive_page(self, leaves: list[int], positions: dict[int, int],
                     max_bytes: int, limit: int = 5000) -> tuple[list[RecordRow], dict[int, int]]:
        """The next records of ``leaves`` after ``positions``, in production order (all leaves'
        records are numbered by one sequence), at most ``limit`` of them and about ``max_bytes``;
        and the positions after them. Reading moves nothing: see move_cursors."""
        if not positions:
            return [], {}
        clauses = " OR ".join("(job = ? AND seq > ?)" for _ in positions)
        params = [x for item in positions.items() for x in item]
        with self._lock:
            cur = self._db.execute(f"SELECT seq, job, stream, time, json, data FROM records WHERE {clauses} "
                                   f"ORDER BY seq LIMIT ?", [*params, limit])
            rows: list[RecordRow] = []
            size = 0
            for row in cur:
                rows.append(row)
                size += len(row[5]) + 40
                if size >= max_bytes:
                    break
            cur.close()
        moved = dict(positions)
        for row in rows:
            moved[row[1]] = row[0]
        return rows, moved

    def move_cursors(self, moved: dict[int, int], before: dict[int, int]) -> None:
        with self._transaction():
            self._db.executemany("UPDATE jobs SET cursor = ? WHERE id = ?",
                                 [(seq, job) for job, seq in moved.items() if seq != before.get(job)])

    def count_records(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM records").fetchone()[0])

    def wait_for(self, predicate: Callable[[], bool], timeout: float | None) -> bool:
        """Block until ``predicate()`` (called with the lock held) is true; False on timeout."""
        with self.changed:
            return self.changed.wait_for(predicate, timeout)


# --- choosing jobs from rows ---------------------------------------------------------------------

def is_finished(row: Row) -> bool:
    return row["state"] in _FINISHED


def children(rows: list[Row]) -> dict[int, list[Row]]:
    """Each job's child rows, by the parent's id."""
    out: dict[int, list[Row]] = {}
    for row in rows:
        if row["parent"] is not None:
            out.setdefault(row["parent"], []).append(row)
    return out


def subtree(rows: list[Row], selected: list[Row], leaves_only: bool) -> list[int]:
    """The ids under the selected jobs (themselves included), or only their leaves; each once."""
    kids = children(rows)
    out: dict[int, None] = {}

    def walk(row: Row) -> None:
        below = kids.get(row["id"], [])
        if not (leaves_only and below):
            out[row["id"]] = None
        for kid in below:
            walk(kid)

    for row in selected:
        walk(row)
    return list(out)


def fill_more_data(rows: list[Row]) -> None:
    """HasMoreData: a job not finished, or a leaf with records after its cursor, or such a child."""
    by_parent = children(rows)

    def more(row: Row) -> bool:
        if not is_finished(row):
            return True
        kids = by_parent.get(row["id"])
        if kids:
            return any(more(k) for k in kids)
        return bool(row["cursor"] < row["last_seq"])

    for row in rows:
        row["has_more_data"] = more(row)
        row["child_ids"] = [k["id"] for k in by_parent.get(row["id"], ())]


def select(rows: list[Row], selectors: list[str], verb: str) -> list[Row]:
    """The rows that ids, instance ids or names (wildcards allowed) select, in the order given.

    An id, instance id or plain name that matches nothing raises JobNotFoundError; a wildcard that
    matches nothing selects nothing, as in PowerShell.
    """
    by_id = {r["id"]: r for r in rows}
    out: list[Row] = []
    for sel in selectors:
        text = sel.strip()
        if text.isdigit():
            row = by_id.get(int(text))
            if row is None:
                raise JobNotFoundError(f"{verb}: cannot find a job with the id {text}; list the jobs "
                                       f"with `psjobs get`")
            out.append(row)
            continue
        with contextlib.suppress(ValueError):
            iid = str(uuid.UUID(text))
            match = [r for r in rows if r["instance_id"] == iid]
            if not match:
                raise JobNotFoundError(f"{verb}: cannot find a job with the instance id {iid}; list "
                                       f"the jobs with `psjobs get --json`")
            out.extend(match)
            continue
        wild = any(c in text for c in "*?[")
        pattern = re.compile(fnmatch.translate(text), re.IGNORECASE | re.DOTALL)
        match = [r for r in rows if pattern.fullmatch(r["name"])]
        if not match and not wild:
            raise JobNotFoundError(f"{verb}: cannot find a job named {text!r}; list the jobs with "
                                   f"`psjobs get`")
        out.extend(match)
    unique: dict[int, Row] = {}
    for row in out:
        unique.setdefault(row["id"], row)
    return list(unique.values())


# --- the persister ---------------------------------------------------------------------------------

class Persister:
    """One thread that moves what the host's jobs produce into the store.

    It sleeps on the session's condition until a job it follows has unread records or has
    finished, takes everything unread with ``Session.read_entries`` (which moves the jobs'
    cursors), stores it in one transaction, then drops the stored records from the journals.
    A job whose last record is stored gets its final state written and leaves the Session.
    """

    def __init__(self, session: Session, store: Store) -> None:
        self._session = session
        self._store = store
        self._cond = session._cond
        self.live: dict[int, Job] = {}       # every node of the trees not yet finished in the store
        self._leaves: dict[int, Job] = {}    # the leaves among them that still produce records
        self._tops: dict[int, Job] = {}
        self._pid_known: set[int] = set()
        self._dirty = False
        self._closing = False
        self._seq = store.max_seq
        self.thread = threading.Thread(target=self._run, name="psjobs-persist", daemon=True)
        self.thread.start()

    def add(self, top: Job) -> None:
        with self._cond:
            nodes = tree(top)
            for node in nodes:
                self.live[node.id] = node
            self._tops[top.id] = top
            for leaf in top._leaves():
                self._leaves[leaf.id] = leaf
                if leaf.pid is not None:
                    self._pid_known.add(leaf.id)  # stored with the job's row
            self._dirty = True
            self._cond.notify_all()

    def close(self, timeout: float) -> None:
        """Store what is left and end, within ``timeout`` (jobs still running are left as they are)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self.thread.join(timeout)

    def _news(self) -> bool:
        if self._dirty or self._closing:
            return True
        for leaf in self._leaves.values():
            entries = leaf._entries
            if (entries and leaf._cursor < len(entries)) or leaf._state.is_finished:
                return True
        return False

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._news():
                    self._cond.wait()
                self._dirty = False
                leaves = list(self._leaves.values())
                closing = self._closing
            try:
                self._pass(leaves)
            except Exception:  # never let a bad pass end persistence for every job
                import traceback

                traceback.print_exc()
                time.sleep(0.1)  # back off: the next pass retries what is still unread
            if closing and not self._pending_work():
                return

    def _pending_work(self) -> bool:
        with self._cond:
            return any(leaf._entries and leaf._cursor < len(leaf._entries) for leaf in self._leaves.values())

    def _pass(self, leaves: list[Job]) -> None:
        with self._cond:
            # A leaf the session no longer has (removed behind our back) has nothing more to give.
            gone = [leaf for leaf in leaves if leaf.id not in self._session._all]
            for leaf in gone:
                self._leaves.pop(leaf.id, None)
            leaves = [leaf for leaf in leaves if leaf.id in self._session._all]
            before = {leaf.id: leaf._cursor for leaf in leaves}
        records: list[RecordRow] = []
        append = records.append
        last: dict[int, int] = {}
        n = self._seq
        for leaf, stream, payload, t in self._session.read_entries(leaves):  # the hot loop
            n += 1
            if stream == 0 and type(payload) is str:
                append((n, leaf.id, 0, t, 1, _json_str(payload)))
            else:
                append((n, leaf.id, int(stream), t, *encode(stream, payload)))
            last[leaf.id] = n
        updates: list[tuple[int, dict[str, Any]]] = []
        done_leaves: list[Job] = []
        done_tops: list[Job] = []
        with self._cond:
            for leaf in leaves:
                if leaf.id not in self._pid_known:
                    pid = _pid_of(leaf)
                    start = process_start(pid) if pid else None
                    if pid and start is not None:
                        self._pid_known.add(leaf.id)
                        updates.append((leaf.id, {"pid": pid, "pid_start": start}))
                entries = leaf._entries
                if leaf._state.is_finished and (not entries or leaf._cursor >= len(entries)):
                    done_leaves.append(leaf)
                    updates.append((leaf.id, _final(leaf)))
            remaining = set(self._leaves) - {leaf.id for leaf in done_leaves}
            for leaf in done_leaves:
                top = _top(leaf)
                if top.id in self._tops and top not in done_tops \
                        and not any(x.id in remaining for x in top._leaves()):
                    done_tops.append(top)
                    updates += [(node.id, _final(node)) for node in tree(top) if node._children]
        try:
            self._store.commit_pass(records, last, updates)
        except BaseException:
            with self._cond:  # read again next pass: nothing was stored, nothing is lost
                for leaf in leaves:
                    leaf._cursor = before[leaf.id]
            raise
        self._seq += len(records)
        with self._cond:
            for leaf in leaves:
                entries = leaf._entries
                if entries is not None:
                    # What is before the cursor is stored now: free it (only this thread reads the
                    # host's journals). Later records stay for the next pass.
                    leaf._entries = entries[leaf._cursor:] or None
                    leaf._cursor = 0
            for leaf in done_leaves:
                self._leaves.pop(leaf.id, None)
            for top in done_tops:
                self._tops.pop(top.id, None)
                for node in tree(top):
                    self.live.pop(node.id, None)
                    self._pid_known.discard(node.id)
        for top in done_tops:
            # The store holds it all now: drop the job from the session to free its memory.
            with contextlib.suppress(Exception):
                self._session.remove_job(top)


def tree(job: Job) -> list[Job]:
    out = [job]
    for child in job._children or ():
        out.extend(tree(child))
    return out


def _top(job: Job) -> Job:
    while job._parent is not None:
        job = job._parent
    return job


def _pid_of(leaf: Job) -> int | None:
    if leaf.pid is not None:
        return leaf.pid
    proc = getattr(leaf.backend_data, "proc", None)  # a thread job's command
    pid = getattr(proc, "pid", None)
    return pid if isinstance(pid, int) else None


def _final(job: Job) -> dict[str, Any]:
    return {"state": str(job._state), "reason": reason_text(job), "exit_code": job.exit_code,
            "begin_time": job._begin, "end_time": job._end}


def job_row(job: Job, *, cwd: str | None, host_pid: int) -> Row:
    """A new job's row. A state that is already final is stored as Running: only the Persister
    writes the final state, after the last record."""
    state = job._state
    shown = JobState.RUNNING if state.is_finished else state
    return {"id": job.id, "parent": None if job._parent is None else job._parent.id, "name": job.name,
            "job_type": job.job_type, "command": job.command, "location": job.location,
            "computer_name": job.computer_name, "state": str(shown), "reason": None, "exit_code": None,
            "begin_time": job._begin, "end_time": None, "instance_id": str(job.instance_id),
            "cwd": cwd, "pid": job.pid, "pid_start": process_start(job.pid) if job.pid else None,
            "cursor": 0, "last_seq": 0, "host_pid": host_pid}


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
