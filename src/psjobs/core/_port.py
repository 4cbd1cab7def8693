"""The JobPort: the only way a backend tells a job what happened, and the only holder of the lock.

::

    backend thread --port.started(pid, where)--+
                   --port.records(entries)-----+--> with session lock: Job._apply / Job._extend
                   --port.kept_records(...)----+        (state only through _state.next_state)
                   --port.blocked(prompt)------+
                   --port.ended(outcome, tail)-+                     |
                                                                     v
                                          notify_all --> wait_job / receive_job(wait=True)

Like concurrent.futures' ``Future.set_result``: the port takes the session's lock, enforces the
state machine, and absorbs whatever comes after the end (an idempotent ``ended``, records a
dying worker still sent), but the records of work that ran unseen before a stop made its job
Stopped from NotStarted (``kept_records``: nothing the job's code wrote is lost). A backend never
sees the lock nor a Job's private members.

The lock is taken as the raw ``threading.Lock`` under the session's Condition, never through
``Condition.__enter__``: a thread job's stop is raised asynchronously in its thread
(PyThreadState_SetAsyncExc), and one raised inside ``Condition.__enter__`` after it took the lock
left the lock taken for good. A C lock's ``with`` leaves no such gap; notifying the Condition
while holding its lock this way is the same as holding it through the Condition.

A backend's own thread, where nothing is raised asynchronously, may first give the GIL to the
lock's holder (``own_thread=True``, ``wait_free``) instead of blocking on it: the lock convoy.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from sys import getsizeof
from typing import TYPE_CHECKING, Any, NamedTuple

from ._journal import ENTRY, SMALL, MemoryJournal
from ._spill import SpillJournal
from ._state import Event, JobState

_SMALL = SMALL + 1  # a MemoryJournal's list holds its cursor too (as in _job)
#: Types whose sys.getsizeof is their own __sizeof__() (no GC header, no subclass's override), as
#: the spill accounting counts them: the method is ~1,200 instructions cheaper (callgrind: a streamed
#: item 11,755 -> 10,799), since getsizeof parses its arguments and looks the method up by name.
_FLAT = frozenset({int, float, str, bytes, bool, type(None)})

if TYPE_CHECKING:
    from ._job import Entry, Job
    from ._session import Session

_COMPLETED, _FAILED, _STOPPED = "completed", "failed", "stopped"
_EVENTS = {_COMPLETED: Event.COMPLETE, _FAILED: Event.FAIL, _STOPPED: Event.STOPPED}
# The worker wire's names for how a call ended (worker/_wire DONE, the Dask task's outcome).
_WIRE_NAMES = {"complete": _COMPLETED, "fail": _FAILED, "stopped": _STOPPED, "refused": _FAILED}


class Outcome(NamedTuple):
    """How a job's work ended: completed, failed (why, with which exit code) or stopped.

    A named tuple, not a frozen dataclass: every job makes one, and a frozen dataclass's
    ``__init__`` (object.__setattr__ per field) cost ~1 us of a thread job's ~70.

    A job that was asked to stop ends Stopped whatever the outcome says (the transition table
    decides, see _state.TRANSITIONS), so a backend reports what it saw, not what it hopes.
    """

    kind: str
    reason: BaseException | None = None
    exit_code: int | None = None

    @classmethod
    def completed(cls, exit_code: int | None = None) -> Outcome:
        return cls(_COMPLETED, None, exit_code)

    @classmethod
    def failed(cls, reason: BaseException | None = None, exit_code: int | None = None) -> Outcome:
        return cls(_FAILED, reason, exit_code)

    @classmethod
    def stopped(cls, exit_code: int | None = None) -> Outcome:
        return cls(_STOPPED, None, exit_code)

    @classmethod
    def named(cls, name: str, reason: BaseException | None = None, exit_code: int | None = None) -> Outcome:
        """From the worker wire's name of an end ("complete", "fail", "stopped", "refused")."""
        return cls(_WIRE_NAMES.get(name, _FAILED), reason, exit_code)

    @property
    def event(self) -> Event:
        return _EVENTS[self.kind]


class _Tree:
    """What the ports of one job tree share: the parent, and where its leaves run."""

    __slots__ = ("follow_where", "parent", "places")

    def __init__(self, parent: Job | None, follow_where: bool) -> None:
        self.parent = parent
        self.follow_where = follow_where  # the parent's location: the sorted places of its leaves
        self.places: set[str] = set()


HAND_OFF = 0.001  # seconds: a thread job gives the GIL to a reader it woke at most this often


def _hand_off(session: Session) -> None:
    """Give the GIL to the reader a thread job's record just woke (one that follows the job:
    read_entries or receive_job with wait). Otherwise it runs only when the job's thread is made
    to let go, every switch interval (5 ms): a busy job's first item reached its reader after
    5.3 ms, and 0.17 ms with this. At most once a HAND_OFF: each item woke the reader again, and
    handing off at every one cut a stream from 1.07 to 0.09 M items/s (measured at load ~0.9)."""
    now = time.monotonic()
    if now - session._handed_at > HAND_OFF:
        session._handed_at = now
        time.sleep(0)  # releases the GIL; the woken reader, waiting for it, takes it


_YIELDS = 50  # GIL hand-offs a thread gives a taken lock before it blocks on it (wait_free)


def wait_free(lock: Any) -> None:
    """Until ``lock`` is free, give the GIL to whoever holds it (at most _YIELDS times), so that
    the ``with lock`` that follows takes it at once. For a backend's own threads only: see below.

    A thread that blocks on a taken C lock waits without the GIL and, once the lock is passed to
    it, waits for the GIL while holding the lock. The thread that had the GIL then blocks on the
    lock at its next trip through it, and so on: both locks pass from thread to thread at every
    trip (a lock convoy), and it lasts. It starts when a forced GIL switch (every 5 ms) lands
    while a thread holds the lock, so it came at random: starting 1,000 thread jobs took 18-20 us
    of CPU a job in some rounds and 40-100 us in others, with ~3.5 voluntary context switches a
    job against none (12 rounds, load 0.5: 15-54k jobs/s; with ``sys.setswitchinterval(1)``, no
    forced switch, 55k/s every round). A thread that yields (``time.sleep(0)`` gives up the GIL)
    never holds the lock while it waits for the GIL, so the convoy ends at its first trip.

    The probe takes the lock and lets it go at once: ``lock.locked()`` does not show a thread
    that has the lock but not yet the GIL, the very state of the convoy. So only where no
    exception is raised asynchronously (not the main thread: Ctrl+C; not a thread job's own
    code: its stop): one landing between the two would leave the lock taken for good.
    """
    for _ in range(_YIELDS):
        if lock.acquire(False):
            lock.release()
            return
        time.sleep(0)


class JobPort:
    """One leaf job as its backend sees it. Thread-safe; made by the Session, one per leaf job."""

    # No spec here: the backend gets it in ``start`` and keeps what it needs only while the work
    # runs (a spec held for as long as the job kept every finished job's target and arguments:
    # 770 -> 1,230 bytes a job).
    # A view on its job, made again whenever needed (``JobPort.of``) and equal to every other view
    # of the same job: the job keeps its backend's name and its tree, not a port object, since
    # one more object per job, kept as long as the job, cost 10% in starting 10,000 thread jobs
    # (the collector walks every object the table holds).
    __slots__ = ("_job", "_lock")

    def __init__(self, job: Job, kind: str | None = None, tree: _Tree | None = None) -> None:
        self._job = job
        self._lock = job._session._lock
        if kind is not None:  # made by the Session for a new leaf
            job._kind = kind
            job._tree = tree

    @classmethod
    def of(cls, job: Job) -> JobPort | None:
        """The port of a leaf job (None for a parent, or a job restored from storage)."""
        return cls(job) if job._kind is not None else None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, JobPort) and other._job is self._job

    def __hash__(self) -> int:
        return id(self._job)

    @property
    def kind(self) -> str:
        """The backend's name in the registry (the Session finds the backend of a job by it)."""
        kind = self._job._kind
        assert kind is not None
        return kind

    @property
    def _tree(self) -> _Tree | None:
        tree: _Tree | None = self._job._tree
        return tree

    # --- what a backend may read ------------------------------------------------------------
    @property
    def job_id(self) -> int:
        return self._job.id

    @property
    def name(self) -> str:
        return self._job.name

    @property
    def location(self) -> str:
        return self._job.location

    @property
    def computer_name(self) -> str | None:
        return self._job.computer_name

    @property
    def stop_requested(self) -> bool:
        """True once the user asked this job (or its parent) to stop."""
        return self._job._stop_requested

    @property
    def finished(self) -> bool:
        """True once the job is Completed, Failed or Stopped: it will not change again."""
        return self._job.state.is_finished

    @property
    def data(self) -> Any:
        """What the backend keeps for this job (a handle, a thread, a connection...)."""
        return self._job.backend_data

    @data.setter
    def data(self, value: Any) -> None:
        self._job.backend_data = value

    def describe(self) -> str:
        """``Job 3 'backup'``: how messages name the job."""
        job = self._job
        return f"Job {job.id} {job.name!r}"

    # --- what a backend reports ---------------------------------------------------------------
    def waiting(self, why: str) -> None:
        """The job waits, NotStarted, in the backend's own queue: ``why`` is its status_message
        ("" once it leaves the queue). Without the session's lock: a backend calls it under its own,
        and one attribute's store is atomic."""
        self._job.status_message = why

    def started(self, *, pid: int | None = None, where: str | None = None, own_thread: bool = False) -> bool:
        """The work runs (in process ``pid``, at ``where``). False if the job ended before (a stop
        while it waited): the backend must then not run it. ``own_thread``: called from a thread
        of the backend's own, where nothing is raised asynchronously (see wait_free)."""
        job = self._job
        lock = self._lock
        if own_thread:
            wait_free(lock)
        with lock:
            if job.state.is_finished:
                return False
            job._attempts += 1
            if pid is not None:
                job.pid = pid
            if where is not None:
                self._moved(job, where)
            job._apply(Event.START, now=time.time())
            return True

    def _moved(self, job: Job, where: str) -> None:
        job.location = where
        job.computer_name = where
        tree = self._tree
        if tree is not None and tree.follow_where and tree.parent is not None and where not in tree.places:
            tree.places.add(where)
            tree.parent.location = ", ".join(sorted(tree.places))

    def records(self, entries: list[Entry]) -> None:
        """Records of the job, in production order: one lock round for the whole batch."""
        if entries:
            with self._lock:
                self._job._extend(entries)
            self._relieve()

    def kept_records(self, entries: list[Entry]) -> None:
        """Records of work that ran before its stop took effect: kept even if the job is Stopped.

        A backend may learn only after the fact that its work had started (a cluster task says so
        10 ms in, or with its first records); a stop_job in between made the job Stopped at once, as
        every job stopped NotStarted is, while the work ran. What the work wrote is kept: appended
        as ``records`` appends while the job is unfinished, and to a job Stopped from NotStarted.
        Any other finished job absorbs them, as does a removed job. The state is not touched (the
        transition table stays the only rule for it), and the job still reads as never started.
        """
        if not entries:
            return
        job = self._job
        with self._lock:
            if job._state.is_finished:
                # Its one change of state was to Stopped: NotStarted -> Stopped (stop_job on a queued job).
                history = job._history
                unseen = job._state is JobState.STOPPED and history is not None and len(history) == 2
                if not unseen or job._session._all.get(job.id) is not job:
                    return  # it ended as the port saw it run; or it was removed (its journal dropped)
            job._extend(entries, late=True)
        self._relieve()

    def record(self, entry: Entry) -> None:
        """One record (a thread job's write: the job runs in this process, nothing to batch).

        Job._extend for one entry, inlined with _relieve: this runs for every item a thread job
        yields, and each Python call on it cost ~5% of the streaming rate.
        """
        job = self._job
        with self._lock:
            if job._state.is_finished:
                return  # a finished job absorbs late records
            journal: Any = job._journal
            if type(journal) is SpillJournal:  # the streaming case first: past SMALL records
                # SpillJournal.append, inlined (a Python call per streamed item, ~10% of one). The
                # record is appended last: a stop raised into this thread lands at a call's end, so
                # it finds the record counted and in place, or neither.
                value = entry[1]
                size = value.__sizeof__() if type(value) in _FLAT else getsizeof(value)
                journal._sizes.append(size)  # for the spill pass's blocks
                n = ENTRY + size
                spill = journal._spill
                journal._bytes += n
                spill.held += n
                journal._mem_at[1].append(entry)
            else:
                spill = job._session._spill
                if journal is None:
                    job._journal = MemoryJournal([entry])
                else:
                    journal.append(entry)
                    if type(journal) is MemoryJournal and list.__len__(journal) > _SMALL:
                        job._journal = spill.adopt(job, journal)  # now within the memory window
            if job._watch is not None:
                job._watch.news(job)
            session = job._session
            cond = session._cond
            woke = False
            if cond._waiters:  # type: ignore[attr-defined]  # most records have no reader waiting
                cond.notify_all()
                woke = job.id in session._followed
        if spill.held > spill.window:
            spill.relieve()
        if woke:
            _hand_off(session)

    def _relieve(self) -> None:
        # After the lock: past the session's memory window, this thread writes the oldest
        # records to disk (core/_spill), and so reads nothing more from its job meanwhile.
        spill = self._job._session._spill
        if spill.held > spill.window:
            spill.relieve()

    def blocked(self, prompt: str) -> None:
        """The job's code asks for input: Blocked until someone answers ``prompt``."""
        job = self._job
        with self._lock:
            if job.state.is_finished:
                return
            job.prompt = prompt
            job.status_message = f"waiting for input: {prompt!r}"
            job._apply(Event.BLOCK)

    def unblocked(self) -> None:
        """The prompt was answered: the job runs again."""
        job = self._job
        with self._lock:
            job.prompt = None
            job.status_message = ""
            job._apply(Event.UNBLOCK)

    def suspended(self) -> None:
        """The work is paused for real (confirmed, not only requested)."""
        with self._lock:
            self._job._apply(Event.SUSPENDED)

    def resumed(self) -> None:
        """The work runs again (confirmed)."""
        with self._lock:
            self._job._apply(Event.RESUME)

    def ended(self, outcome: Outcome, tail: Iterable[Entry] = (), *, own_thread: bool = False) -> bool:
        """The last records and the end, in one step, so no reader sees the end before the tail.

        Idempotent: True the first time, False (and nothing changes) once the job is finished.
        ``own_thread``: as for ``started``. No GIL hand-off here, unlike ``records``: a backend's
        thread tells the end as its last work for the job, so the thread it wakes meets none of
        that work later (bench/FINDINGS.md, thirteenth session).
        """
        job = self._job
        lock = self._lock
        if own_thread:
            wait_free(lock)
        with lock:
            if job.state.is_finished:
                return False
            if job.id in job._session._sched.retries:  # started with retries=N (core/_sched)
                tail = tail if isinstance(tail, list) else list(tail)
                if job._session._sched.retry_locked(job, outcome, tail):
                    return True  # it runs again
            if tail:
                job._extend(tail if isinstance(tail, list) else list(tail))
            job._apply(outcome.event, reason=outcome.reason, exit_code=outcome.exit_code)
        self._relieve()
        return True

    def __repr__(self) -> str:
        return f"<JobPort {self.kind} {self._job!r}>"
