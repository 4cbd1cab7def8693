"""The stored jobs back in the host's Session, and their reasons back as exceptions.

::

    Store.load (rows, record counts, cursors) --restore--> finished Jobs of the Session, each with a
                                                           SqliteJournal that reads its records
    a reason as stored and sent ("ValueError: bad value") --reason_from_text--> an exception of that
                                                          class name whose str() is "bad value"
"""

from __future__ import annotations

import contextlib
import re
import uuid

from .. import _errors
from ..core._job import Job
from ..core._session import Session
from ..core._state import JobState
from ._journal import SqliteJournal, Writer
from ._protocol import SHAPES


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
                           instance_id=uuid.UUID(row["instance_id"]), pid=row["pid"], journal=journal,
                           shape=row["shape"] if row["shape"] in SHAPES else "value")
        journal.job = job
        jobs[job.id] = job
        cwds[job.id] = row["cwd"]
    session.restore_jobs(list(jobs.values()))
    return cwds


class StoredReason(Exception):
    """A stored job's reason: named as the original class, with its text (the exception is gone)."""


_reason_classes: dict[str, type[StoredReason]] = {}
_NAME = re.compile(r"[^\W\d]\w*")  # an identifier, at the start of a text


def reason_from_parts(name: str, message: str) -> BaseException:
    """An exception of class name ``name`` whose str() is ``message``: the psjobs error of that name,
    else a StoredReason subclass of that name."""
    known = getattr(_errors, name, None)
    if isinstance(known, type) and issubclass(known, _errors.PsJobsError) and known.__name__ == name:
        with contextlib.suppress(Exception):  # one that takes more than a message, or words it: as below
            reason: BaseException = known(message) if message else known()
            if str(reason) == message:
                return reason
    cls = _reason_classes.get(name)
    if cls is None:
        cls = _reason_classes[name] = type(name, (StoredReason,), {"__module__": __name__})
    return cls(message) if message else cls()


def reason_from_text(text: str | None) -> BaseException | None:
    """An exception that reads as ``text`` (what ``reason_text`` gave, as stored and as sent) did, with
    the original's own text as its str(): "ValueError: bad value" gives a ValueError whose str() is
    "bad value", as the exception in the job was. ``reason_text`` gives a message that begins with its
    class's name alone, so such a text comes back whole, named as the identifier it begins with: either
    way ``reason_text`` gives ``text`` back unchanged, and a reason reads the same after any number of
    host restarts."""
    if not text:
        return None
    name, sep, rest = text.partition(": ")
    if sep and name.isidentifier() and rest and not rest.startswith(name):
        return reason_from_parts(name, rest)
    match = _NAME.match(text)
    name = match.group() if match else "Exception"
    return reason_from_parts(name, "" if text == name else text)
