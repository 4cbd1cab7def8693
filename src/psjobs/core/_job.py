"""The Job: the contract's attributes, a journal of records, and state changed only by events.

::

    backend --JobPort (started, records, ended...)--> Job._apply / Job._extend   (under the session's lock)
                                     |  state: only through _state.next_state
                                     |  parent: only through _state.derive_parent_state
                                     v
                                  journal (see _journal): entries in order + one read cursor
                                     |
                 receive_job <-------+  reads from the cursor (keep=True leaves it where it is)
                 job.output etc. <---+  every record of a stream, whatever was received

Every mutation happens with the session's condition held, and ends with a notify so that
waiters (wait_job, receive_job(wait=True)) see it.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from .._records import ErrorRecord, InformationRecord, ProgressRecord, Record, Stream
from ._journal import SMALL, Journal, MemoryJournal
from ._journal import Entry as Entry  # backends import it from here
from ._state import Event, JobState, derive_parent_state_counts, next_state

if TYPE_CHECKING:
    from ._future import FollowingFuture, Watch
    from ._session import Session
    from ._spec import JobSpec

_SMALL = SMALL + 1  # a MemoryJournal's list holds its cursor too

# PowerShell takes ids from one counter for the whole process, parents before their children.
_last_id = 0
_ids_lock = threading.Lock()


def _next_ids(n: int) -> list[int]:
    global _last_id
    with _ids_lock:
        first = _last_id + 1
        _last_id += n
        return list(range(first, first + n))


def _next_id() -> int:
    """``_next_ids(1)[0]`` without the list and range (a thread job's start)."""
    global _last_id
    with _ids_lock:
        _last_id += 1
        return _last_id


def skip_ids(first: int) -> None:
    """Give no id below ``first`` from now on: a Session whose jobs were numbered before (the
    session host's stored jobs) resumes after them. The counter only ever moves forward."""
    global _last_id
    with _ids_lock:
        _last_id = max(_last_id, first - 1)


class JobStateInfo:
    """A job's state and, for a failed job, the exception that failed it."""

    __slots__ = ("reason", "state")

    def __init__(self, state: JobState, reason: BaseException | None) -> None:
        self.state = state
        self.reason = reason

    def __str__(self) -> str:
        return str(self.state)

    def __repr__(self) -> str:
        return f"JobStateInfo(state={self.state}, reason={self.reason!r})"


class Job:
    """A unit of background work, and the handle to manage it (see the module verbs)."""

    __slots__ = (
        "_attempts",
        "_begin",
        "_children",
        "_counts",
        "_end",
        "_history",
        "_iid",
        "_journal",
        "_kind",
        "_name",
        "_parent",
        "_reason",
        "_recipe",
        "_session",
        "_shape",
        "_state",
        "_stop_requested",
        "_tree",
        "_watch",
        "backend_data",
        "command",
        "computer_name",
        "exit_code",
        "id",
        "job_type",
        "location",
        "pid",
        "prompt",
        "status_message",
    )

    def __init__(self, session: Session, job_id: int, *, job_type: str, name: str | None,
                 command: str, location: str = "localhost", state: JobState = JobState.NOT_STARTED,
                 parent: Job | None = None, computer_name: str | None = None) -> None:
        self.id = job_id
        self._name = name or None  # None: "Job<id>", made when asked (56 bytes a job otherwise)
        self.job_type = job_type
        self.command = command
        self.location = location
        self.computer_name = computer_name
        self._session = session
        self._parent = parent
        self._children: list[Job] | None = None
        self._counts: dict[JobState, int] | None = None  # children per state, for _rederive
        self._state = state
        self._reason: BaseException | None = None
        self._iid: uuid.UUID | None = None
        self._begin: float | None = time.time() if state is JobState.RUNNING else None
        self._end: float | None = None
        self._journal: Journal | None = None  # made on the first records, or by the session's factory
        self._stop_requested = False
        # state, time, state, time...: flat (a tuple per change cost 44 bytes a finished job), and a
        # tuple, not a list: 72 bytes for a job's usual two changes against a list's 120 (tracemalloc:
        # the list's items are a second block, over-allocated when it grows)
        self._history: tuple[JobState | float, ...] | None = None
        # A top-level job's spec, with how it was started, for restart_job (core/_sched): a slot,
        # not a session dict keyed by id (49 bytes a finished job more).
        self._recipe: JobSpec | None = None
        self._attempts = 0  # runs started (retries=N runs a failed one again: core/_sched)
        self.exit_code: int | None = None
        self.pid: int | None = None
        self.status_message = ""
        #: the question a Blocked job waits to have answered (see send_input)
        self.prompt: str | None = None
        #: what the backend keeps for this job (process handle, thread, connection, ...)
        self.backend_data: Any = None
        # Set by its JobPort when the Session makes a leaf: which backend runs it, and its tree.
        self._kind: str | None = None
        self._tree: Any = None
        self._shape = "value"  # what result() makes of the output (_future.VALUE; set by make_tree)
        self._watch: Watch | None = None  # callbacks and async waiters (see _future), made on first use
        if parent is not None:
            if parent._children is None:
                parent._children = []
                parent._counts = {}
            parent._children.append(self)
            counts = parent._counts
            assert counts is not None
            counts[state] = counts.get(state, 0) + 1

    # --- identity ------------------------------------------------------------------------
    @property
    def instance_id(self) -> uuid.UUID:
        """The job's unique key (made on first use: most jobs are never asked for it)."""
        iid = self._iid
        if iid is None:
            # Two threads may ask first at once (the host's journal writer and a request):
            # both must get the key the job keeps, so it is set under the lock, once.
            made = uuid.uuid4()
            with _ids_lock:
                if self._iid is None:
                    self._iid = made
                return self._iid
        return iid

    @property
    def name(self) -> str:
        """The name given at the start, or ``Job<id>``."""
        return self._name or f"Job{self.id}"

    @name.setter
    def name(self, value: str) -> None:
        self._name = value

    @property
    def parent(self) -> Job | None:
        """The parent job, or None for a top-level job."""
        return self._parent

    @property
    def child_jobs(self) -> list[Job]:
        return list(self._children) if self._children else []

    @property
    def session(self) -> Session:
        return self._session

    # --- state -----------------------------------------------------------------------------
    @property
    def state(self) -> JobState:
        return self._state

    @property
    def job_state_info(self) -> JobStateInfo:
        return JobStateInfo(self._state, self._reason)

    @property
    def reason(self) -> BaseException | None:
        """The exception that failed this job or, for a parent, its first failed child's."""
        if self._reason is not None or not self._children:
            return self._reason
        for child in self._children:
            if child.reason is not None:
                return child.reason
        return None

    @property
    def attempts(self) -> int:
        """How many times the job's work was started: 1 once it ran, more with ``retries=N``."""
        if self._children:
            return max(c.attempts for c in self._children)
        return self._attempts or (1 if self._begin is not None and self._kind is None else 0)

    @property
    def begin_time(self) -> datetime | None:
        return None if self._begin is None else datetime.fromtimestamp(self._begin, timezone.utc).astimezone()

    @property
    def end_time(self) -> datetime | None:
        return None if self._end is None else datetime.fromtimestamp(self._end, timezone.utc).astimezone()

    @property
    def history(self) -> list[tuple[JobState, datetime]]:
        """Every state the job entered after its first, with when."""
        flat: tuple[Any, ...] = self._history or ()
        return [(s, datetime.fromtimestamp(t, timezone.utc).astimezone()) for s, t in zip(flat[::2], flat[1::2])]

    @property
    def has_more_data(self) -> bool:
        """True while the job is not finished or records remain that were not received."""
        if not self._state.is_finished:
            return True
        if self._children:
            return any(c.has_more_data for c in self._children)
        journal = self._journal
        return journal is not None and journal.cursor < len(journal)

    def _watched(self, waiters: int = 0) -> None:
        """Someone has started waiting on this unfinished job (core/_future: ``waiters`` 1 as a
        thread begins to wait in result(), -1 as it stops; 0: a callback was added), outside the
        session lock. Nothing to do here: a backend reports each change. A connected session's
        job changes only when the host is asked (psjobs/_connect_watch: its override asks)."""

    def _leaves(self) -> list[Job]:
        if not self._children:
            return [self]
        out: list[Job] = []
        for child in self._children:
            out.extend(child._leaves())
        return out

    # --- streams ---------------------------------------------------------------------------
    def _stream(self, stream: Stream) -> list[Any]:
        with self._session._cond:
            ends = [(leaf._journal, len(leaf._journal)) for leaf in self._leaves() if leaf._journal]
        out: list[Any] = []
        for journal, end in ends:  # outside the lock: a journal may read from storage
            out.extend(p for s, p, _ in journal.read(0, end) if s == stream)
        return out

    @property
    def output(self) -> list[Any]:
        return self._stream(Stream.OUTPUT)

    @property
    def error(self) -> list[ErrorRecord]:
        return self._stream(Stream.ERROR)

    @property
    def warning(self) -> list[Record]:
        return self._stream(Stream.WARNING)

    @property
    def verbose(self) -> list[Record]:
        return self._stream(Stream.VERBOSE)

    @property
    def debug(self) -> list[Record]:
        return self._stream(Stream.DEBUG)

    @property
    def information(self) -> list[InformationRecord]:
        return self._stream(Stream.INFORMATION)

    @property
    def progress(self) -> list[ProgressRecord]:
        return self._stream(Stream.PROGRESS)

    # --- verbs -----------------------------------------------------------------------------
    def receive(self, **kwargs: Any) -> list[Any]:
        """``receive_job(self, **kwargs)``."""
        return self._session.receive_job(self, **kwargs)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the job is done; True if it is, False on timeout."""
        return bool(self._session.wait_job(self, timeout=timeout))

    def stop(self) -> None:
        """``stop_job(self)``."""
        self._session.stop_job(self)

    def remove(self, force: bool = False) -> None:
        """``remove_job(self, force=force)``."""
        self._session.remove_job(self, force=force)

    def send_input(self, text: str) -> None:
        """Answer the prompt of a Blocked job (or of its Blocked child); the job runs on."""
        self._session.send_input(self, text)

    def suspend(self) -> None:
        """``suspend_job(self)``."""
        self._session.suspend_job(self)

    def resume(self) -> None:
        """``resume_job(self)``."""
        self._session.resume_job(self)

    # --- as a future (API.md 8.1; the work is in _future, imported by each method on first use so
    # that concurrent.futures and logging stay out of the command's `psjobs get`) ------------------
    def done(self) -> bool:
        """True once the job is finished (Completed, Failed or Stopped)."""
        return self._state.is_finished

    def running(self) -> bool:
        """True while the job has started and is not finished."""
        return self._state is not JobState.NOT_STARTED and not self._state.is_finished

    def cancelled(self) -> bool:
        """True if the job was stopped."""
        return self._state is JobState.STOPPED

    def cancel(self) -> bool:
        """Stop the job for real (``stop_job``); True if it was not finished yet."""
        from . import _future  # on first use: concurrent.futures and logging stay out of `psjobs get`
        return _future.cancel(self)

    def result(self, timeout: float | None = None) -> Any:
        """The job's value once it is finished: a callable's return value, a generator's items as a
        list, a command's output lines as a list; for a parent of several children, their values in
        child order. A Failed job raises its reason, a Stopped one
        ``concurrent.futures.CancelledError``; ``TimeoutError`` if it is not finished within
        ``timeout`` (the job goes on). The receive cursor does not move."""
        from . import _future
        return _future.result(self, timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The exception that failed the job, None if it completed (waits as ``result`` does)."""
        from . import _future
        return _future.exception(self, timeout)

    def add_done_callback(self, fn: Callable[[Job], Any]) -> None:
        """``fn(job)`` once the job is finished: at once in this thread if it already is, else from
        psjobs' user callbacks thread. An exception in ``fn`` is logged on the ``psjobs`` logger."""
        from . import _future
        _future.add_done_callback(self, fn)

    def add_state_callback(self, fn: Callable[[Job, JobState, JobState], Any]) -> None:
        """``fn(job, old_state, new_state)`` on every state change from now on (PowerShell's
        StateChanged event), in order, from psjobs' user callbacks thread, never under a psjobs lock."""
        from . import _future
        _future.add_state_callback(self, fn)

    def remove_callback(self, fn: Callable[..., Any]) -> None:
        """Forget ``fn`` as a done or state callback of this job (nothing happens if it is not one)."""
        from . import _future
        _future.remove_callback(self, fn)

    def as_future(self) -> FollowingFuture:
        """A ``concurrent.futures.Future`` following the job (``.job`` is the job); cancelling it
        stops the job."""
        from . import _future
        return _future.as_future(self)

    def __await__(self) -> Generator[Any, None, Any]:
        """``await job`` gives ``job.result()`` without blocking the event loop."""
        from . import _future
        return _future.await_result(self).__await__()

    def stream(self, timeout: float | None = None) -> Iterator[Any]:
        """Output items as they arrive, consumed as ``receive_job`` does, until the job ends (or
        ``timeout``: the job goes on); other records go to the session's host."""
        from . import _future
        return _future.stream(self, timeout)

    def astream(self, timeout: float | None = None) -> AsyncIterator[Any]:
        """``stream`` as an async iterator."""
        from . import _future
        return _future.astream(self, timeout)

    # --- events (the session's lock is held by the caller) ---------------------------------
    def _apply(self, event: Event, *, reason: BaseException | None = None,
               exit_code: int | None = None, now: float | None = None) -> None:
        new = next_state(self._state, event)
        if exit_code is not None and self.exit_code is None and not self._state.is_finished:
            self.exit_code = exit_code
        if new is self._state:
            return
        if new is JobState.FAILED and reason is not None:
            self._reason = reason
        self._set_state(new, now)

    def _set_state(self, new: JobState, now: float | None = None) -> None:
        t = time.time() if now is None else now
        old = self._state
        self._state = new
        if self._history is None:
            self._history = (new, t)
        else:
            self._history += (new, t)  # a new tuple: a job changes state a few times
        if self._begin is None and new is not JobState.NOT_STARTED:
            self._begin = t
        if new.is_finished:
            self._end = t
            if self._journal is not None:
                self._journal.close()
        parent = self._parent
        if parent is not None:
            counts = parent._counts
            assert counts is not None
            counts[old] -= 1
            counts[new] = counts.get(new, 0) + 1
            parent._rederive(t)
        if self._watch is not None:
            self._watch.changed(self, old, new)  # only queues: the callbacks run outside the lock
        if new is not JobState.RUNNING:
            # Nobody waits for a job to run (waits are for data, a prompt or the end), and each
            # wake-up of a waiting thread costs a GIL hand-off with the I/O thread on the job's path.
            session = self._session
            session._cond.notify_all()
            targets = session._targets
            if targets:  # wait_job's waiters: this job's, or all of them when a job asks for input
                for waiter in (targets.pop(self.id, ()) if new is not JobState.BLOCKED
                               else [w for ws in targets.values() for w in ws]):
                    waiter.release()
                if new is JobState.BLOCKED:
                    targets.clear()
            if new is JobState.BLOCKED:
                session._blocks += 1
        elif self._session._sched._held:
            # But the scheduler, while it holds jobs: their status_message names the state of the
            # jobs they run after ("... (Running) to complete"), and it rewrites them when woken.
            self._session._cond.notify_all()

    def _rederive(self, now: float) -> None:
        assert self._children is not None and self._counts is not None
        new = derive_parent_state_counts(self._counts, self._stop_requested)
        if new is self._state:
            return
        if new.is_finished:
            codes = [c.exit_code for c in self._children]
            nonzero = [c for c in codes if c]
            self.exit_code = nonzero[0] if nonzero else (0 if any(c == 0 for c in codes) else None)
        self._set_state(new, now)

    def _extend(self, entries: list[Entry], late: bool = False) -> None:
        if (self._state.is_finished and not late) or not entries:
            return  # a finished job absorbs late records (late: JobPort.kept_records let them in)
        journal = self._journal
        if journal is None:
            self._journal = journal = MemoryJournal(entries)
        else:
            journal.extend(entries)
        if type(journal) is MemoryJournal and list.__len__(journal) > _SMALL:
            self._journal = self._session._spill.adopt(self, journal)  # now within the memory window
        if self._watch is not None:
            self._watch.news(self)
        self._session._cond.notify_all()

    @classmethod
    def restored(cls, session: Session, job_id: int, *, parent: Job | None, name: str, job_type: str,
                 command: str, location: str, computer_name: str | None, state: JobState,
                 reason: BaseException | None, exit_code: int | None, begin: float | None,
                 end: float | None, instance_id: uuid.UUID, pid: int | None, journal: Journal,
                 shape: str = "value") -> Job:
        """A finished job as it was stored (the session host's jobs of earlier runs), with its journal
        and what its ``result()`` makes of its output (``shape``: see ``result_shape``).

        Register it with ``Session.restore_jobs``; it never runs again, so no event reaches it.
        """
        if not state.is_finished:
            raise ValueError(f"a restored job is finished, not {state}")
        job = cls(session, job_id, job_type=job_type, name=name, command=command, location=location,
                  state=state, parent=parent, computer_name=computer_name)
        job._reason, job.exit_code, job._begin, job._end = reason, exit_code, begin, end
        job._iid, job.pid, job._journal = instance_id, pid, journal
        job._shape = shape
        return job

    # --- display ---------------------------------------------------------------------------
    def __repr__(self) -> str:
        pid = f" pid={self.pid}" if self.pid is not None and not self._state.is_finished else ""
        where = self.location
        return f"<Job {self.id} {self.name!r} {self._state} {where}{pid}>"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        from ._format import format_table

        p.text(format_table([self]))


def result_shape(job: Job) -> str:
    """What ``job.result()`` makes of the job's output, set when the job was made (core/_tree.shape_of):
    ``"value"`` (a callable's return value: its last output item), ``"items"`` (a generator's items,
    as a list) or ``"lines"`` (a command's output lines): core/_future's VALUE, ITEMS, LINES. The
    session host stores it and sends it with each job, so a connected session's result() is the same."""
    return job._shape
