"""The stored jobs back in the host's Session, and their reasons back as exceptions.

::

    Store.load (rows, record counts, cursors) --restore--> finished Jobs of the Session, each with a
                                                           SqliteJournal that reads its records
    a reason as stored or sent (text) --reason_from_text--> an exception of the same name and text
"""

from __future__ import annotations

import contextlib
import uuid

from .. import _errors
from ..core._job import Job
from ..core._session import Session
from ..core._state import JobState
from ._journal import SqliteJournal, Writer


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
