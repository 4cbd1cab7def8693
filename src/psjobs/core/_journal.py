"""A job's journal: its records in production order, and the one read cursor.

::

    backend --entries--> Job._extend / JobPort.record --(session lock held)--> journal.extend / append
                                                                           |   no I/O here
    Session._read:  under the lock: end = len(journal), claim [start, end)  |
                                    (journal.cursor = end unless keep)      v
                    outside it:     journal.read(start, end) ------> the claimed entries
    job finished -----------------> journal.close()   (nothing is appended after it, but what
                                      JobPort.kept_records lets in: work that ran unseen)
    remove_job   -----------------> journal.drop()    (outside the lock: frees, or deletes)

Positions count the entries appended since the job began (0 is the first entry), so a reader
holds a plain integer and two readers can claim disjoint ranges. Entries before ``len(journal)``
never change: that is what lets ``read`` run without the session's lock, and lets a journal keep
them elsewhere than in memory (the session host's SQLite journal, in ``psjobs.host``).

A Session makes its jobs' journals with its ``journal_factory``; without one, a job gets a
:class:`MemoryJournal` on its first records (most jobs of a big session hold one value or none,
so a job without records holds no journal at all), and one that grows past a few records a
spilling journal (see ``_spill``): its records within the session's memory window, the rest on disk.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ._job import Job

Entry = tuple[int, Any, float]

#: a job's records kept in a plain MemoryJournal before it joins the session's memory window
#: (core/_spill); here, so that the job model does not import the spilling machinery
SMALL = 16  # (stream, value or record, time.time())
#: bytes the spill accounting counts for an entry's tuple, time and list slot, beside its value's
#: ``sys.getsizeof`` (core/_spill; JobPort.record adds a thread job's records itself)
ENTRY = 100


class Journal(Protocol):
    """What a Job needs from wherever its records are kept.

    ``extend``, ``append``, ``len`` and ``cursor`` are used with the session's lock held: they
    must be quick and never block on I/O. ``read``, ``close`` and ``drop`` are called without it.
    """

    #: the position of the first record not yet received (moved by consuming reads)
    cursor: int

    def __len__(self) -> int:
        """How many entries were appended: the position after the last one."""
        ...

    def extend(self, entries: list[Entry]) -> None:
        """Append a batch, in production order; the journal may keep the list itself."""
        ...

    def append(self, entry: Entry) -> None:
        """Append one entry (a thread job's records arrive one at a time)."""
        ...

    def read(self, start: int, stop: int) -> list[Entry]:
        """The entries from ``start`` up to ``stop`` (at most ``len(self)``), in order."""
        ...

    def close(self) -> None:
        """The job is finished: nothing more is appended (called with the session's lock held),
        except the records of work that ran before its stop took effect (JobPort.kept_records)."""
        ...

    def drop(self) -> None:
        """The job was removed: free (or delete) every entry."""
        ...


#: makes the journal of each new job (the session host stores records in SQLite)
JournalFactory = Callable[["Job"], Journal]


class MemoryJournal(list[Any]):
    """The in-memory journal: one list, the cursor in its first item, the entries after it.

    Why not a holder of a list and an int: a finished job held by a session must cost no more
    than when the Job kept a bare list and an int (bench: memory per finished job). A holder
    object adds ~48 bytes, a ``cursor`` slot on a list subclass 8, and CPython 3.11 rounds a list
    built from one item up to two; the cursor as item 0 fills that second place, so a job with one
    record costs what it did, and ``append``, ``extend`` and slicing stay the list's C methods on
    the records' hot path. Only ``len`` is Python-level, and it runs per read, not per record.
    """

    __slots__ = ()

    def __init__(self, entries: list[Entry] | tuple[()] = ()) -> None:
        super().__init__((0, *entries))

    @property
    def cursor(self) -> int:
        return int(self[0])

    @cursor.setter
    def cursor(self, value: int) -> None:
        self[0] = value

    def __len__(self) -> int:
        return list.__len__(self) - 1

    def read(self, start: int, stop: int) -> list[Entry]:
        return self[start + 1:stop + 1]

    def close(self) -> None:
        return None  # in memory, the records stay until the job is removed

    def drop(self) -> None:
        del self[1:]
        self[0] = 0

def unread(journal: Journal | None) -> bool:
    """True if ``journal`` holds records not yet received."""
    return journal is not None and journal.cursor < len(journal)

