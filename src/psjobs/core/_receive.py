"""What a consuming receive gives back when it cannot return what it took.

::

    Session._read_batches --under the lock: claims [start, end) of a journal, cursor = end-->
        Taken.claims: (leaf, start, end), in the order the batches are yielded
    receive_job --each batch it is yielded--> Taken.batches; its position in the last one: ``done``
    an exception (KeyboardInterrupt, a broken stdout, a journal that cannot read) --> give_back:
        per leaf, from its first output item not returned on: the cursor moves back when nothing
        was claimed after it, else the ranges wait in Session._returned for the next claim

So receive_job consumes only what it returns: output items that were taken but never returned
are there for the next receive, once (a concurrent receive never gets them twice, since a given
back range is claimed again like any other). Records of the other streams that were already
shown after the first such item are shown again with it: shown twice rather than lost.

The waits of receive and wait_job are here too (``wait_on``, ``wait_locked``): a wait for every
job of a list waits for one job at a time, released only by that job's state changes. A wait for
one process job looks at it for a moment before it sleeps (``_spin.spin``).
"""

from __future__ import annotations

import _thread
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from .._errors import JobBlockedError, JobFailedError
from .._records import ErrorRecord
from ._journal import Entry, Journal
from ._pshost import describe_job, reason_text
from ._state import JobState
from ._tree import check_timeout

if TYPE_CHECKING:
    from ._job import Job
    from ._session import Session

T = TypeVar("T")

_OUTPUT = 0  # Stream.OUTPUT: entries hold the stream as an int (IntEnum)


class Taken:
    """The ranges one consuming receive claimed, and the batches it was given of them."""

    __slots__ = ("batches", "claims", "session")

    def __init__(self, session: Session, keep: bool) -> None:
        self.session = session
        self.claims: list[tuple[Job, int, int]] | None = None if keep else []
        self.batches: list[list[Entry]] = []

    def give_back(self, done: int) -> None:
        """The receive ends by an exception; ``done`` entries of its last batch were handled."""
        if not self.claims:
            return
        first: dict[int, int] = {}  # leaf id -> the first position given back
        for k, (leaf, start, end) in enumerate(self.claims):
            if k < len(self.batches):
                entries = self.batches[k]
                limit = done if k == len(self.batches) - 1 else len(entries)
                i = next((i for i, e in enumerate(entries[:limit]) if e[0] == _OUTPUT), limit)
            else:
                i = 0  # claimed, never handed out
            if start + i < end and leaf.id not in first:
                first[leaf.id] = start + i
        session = self.session
        with session._cond:
            for leaf, start, end in reversed(self.claims):
                begin = first.get(leaf.id)
                journal = leaf._journal
                if begin is None or end <= begin or journal is None:
                    continue
                start = max(start, begin)
                if journal.cursor == end:
                    journal.cursor = start  # nobody took anything after it: simply not consumed
                elif journal.cursor == start:
                    continue  # interrupted between claiming it and moving the cursor: not taken
                else:
                    session._returned.setdefault(leaf.id, []).insert(0, (start, end))
            session._cond.notify_all()


#: Entries read from a journal at once: a receive of a long backlog (a spilled journal's millions of
#: lines) holds one piece at a time in memory, beside what it returns.
PIECE = 65536


def claim(batch: list[tuple[Job, Journal, int, int]], claims: list[tuple[Job, int, int]] | None, leaf: Job,
          journal: Journal, start: int, end: int) -> None:
    """Claim ``[start, end)`` of ``leaf``'s journal, in pieces of at most PIECE entries (session lock held)."""
    for at in range(start, end, PIECE):
        stop = min(end, at + PIECE)
        batch.append((leaf, journal, at, stop))
        if claims is not None:
            claims.append((leaf, at, stop))


def claim_one(session: Session, leaf: Job, keep: bool,
              claims: list[tuple[Job, int, int]] | None) -> list[tuple[Job, Journal, int, int]] | None:
    """What Session._read_batches claims for one leaf without waiting (``job.receive()``), without
    its generator, positions and wait loop; None when the leaf asks a question, which that path
    offers to the host. Returned ranges come first, as there."""
    batch: list[tuple[Job, Journal, int, int]] = []
    with session._cond:
        if leaf._state is JobState.BLOCKED and leaf.prompt is not None:
            return None
        journal = leaf._journal
        if journal is not None:
            if session._returned and not keep:
                take_returned(session, leaf, journal, batch, claims)
            start, end = journal.cursor, len(journal)
            if start < end:
                if end - start <= PIECE:  # claim(), inlined: one piece, the common case
                    batch.append((leaf, journal, start, end))
                    if claims is not None:
                        claims.append((leaf, start, end))
                else:
                    claim(batch, claims, leaf, journal, start, end)
                if not keep:
                    journal.cursor = end
    return batch


def wait_on(session: Session, timeout: float | None) -> None:
    """``session._cond.wait(timeout)``, except that an exception while it waits (Ctrl+C) leaves the
    session lock held, as the caller's ``with`` expects.

    CPython's Condition.wait takes the lock back with an interruptible ``acquire``: a SIGINT
    that came while another thread held the lock raised KeyboardInterrupt without it, the
    caller's ``with`` then released the other thread's lock, and that thread failed with
    "release unlocked lock" (seen: a process job failed that way while a receive was
    interrupted). Here the lock is taken back whatever comes, and the exception raised after.
    """
    _wait_in(session, session._cond._waiters, timeout)  # type: ignore[attr-defined]  # what notify_all releases


def wait_locked(session: Session, selected: list[Job], any: bool, deadline: float | None,
                once: bool = False) -> list[Job] | None:
    """Wait with the lock held; with ``once``, None instead of waiting when not done yet."""
    if not any and not once:
        return wait_all_locked(session, selected, deadline)
    while True:
        done = [j for j in selected if j._state.is_persistent]
        if any and done:
            return [done[0]]
        if not any and len(done) == len(selected):
            return selected
        blocked = [j for j in selected if j._state is JobState.BLOCKED]
        if blocked and (not any or len(blocked) + len(done) == len(selected)):
            raise _blocked(blocked[0])
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            return []
        if once:
            return None
        wait_on(session, remaining)


def wait_all_locked(session: Session, selected: list[Job], deadline: float | None) -> list[Job]:
    """Wait for every job: for the first one not done, then from there on.

    Waiting on the session's Condition woke this thread at every record and every change of
    every job (~3 a job), each wake took the GIL from the threads reporting them, and each looked
    at all the jobs again: O(n) a wake. Now it waits for one job at a time (``wait_on_job``) and
    moves past the jobs done, each once; the whole list is looked at again at the end (a
    Suspended job counts as done, and may have been resumed since), and for a job asking for
    input only when one did (``_blocks``). Session CPU a process job, 5,000 started at once:
    272-275 us against 285-332 at load 3.8-6.6 (bench/FINDINGS.md, tenth session).
    """
    i, n, blocks = 0, len(selected), -1
    while True:
        while i < n and selected[i]._state.is_persistent:
            i += 1
        if i == n:
            i = next((k for k, j in enumerate(selected) if not j._state.is_persistent), n)
            if i == n:
                return selected
        if blocks != session._blocks:
            blocks = session._blocks
            job = next((j for j in selected if j._state is JobState.BLOCKED), None)
            if job is not None:
                raise _blocked(job)
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            return []
        wait_on_job(session, selected[i], remaining)


def _blocked(job: Job) -> JobBlockedError:
    return JobBlockedError(f"wait_job: {describe_job(job)} waits for input, so waiting would never end; "
                           f"answer it with receive_job({job.id}) or job.send_input(text), then wait again")


def wait_on_job(session: Session, job: Job, timeout: float | None) -> None:
    """``wait_on``, woken only by a change of ``job``'s state (and by any job's BLOCKED), not by
    every record and every change of every job of the session (see Session._targets)."""
    try:
        _wait_in(session, session._targets.setdefault(job.id, []), timeout)
    finally:  # timed out or interrupted (Ctrl+C): an empty list left behind would be looked at
        waiting = session._targets.get(job.id)
        if waiting is not None and not waiting:
            del session._targets[job.id]


def _wait_in(session: Session, waiters: Any, timeout: float | None) -> None:
    lock = session._lock
    waiter = _thread.allocate_lock()
    waiter.acquire()
    waiters.append(waiter)
    lock.release()
    interrupted: BaseException | None = None
    try:
        waiter.acquire(True, -1 if timeout is None else timeout)
    except BaseException as exc:
        interrupted = exc
    while True:
        try:
            lock.acquire()
            break
        except BaseException as exc:  # the lock is not taken: take it, then raise
            interrupted = exc
    try:  # not contextlib.suppress: three Python calls on every wait
        waiters.remove(waiter)
    except ValueError:
        pass  # gone if notified
    if interrupted is not None:
        raise interrupted


def take_returned(session: Session, leaf: Job, journal: Journal,
                  batch: list[tuple[Job, Journal, int, int]], claims: list[tuple[Job, int, int]] | None) -> None:
    """Claim the ranges an interrupted receive gave back for ``leaf`` (session lock held)."""
    for start, end in session._returned.pop(leaf.id, ()):
        claim(batch, claims, leaf, journal, start, end)


def after_receive(session: Session, selected: list[Job], auto_remove: bool, action: str, output: list[Any],
                  errors: list[ErrorRecord], reasons: list[BaseException]) -> list[Any]:
    """receive_job's end: auto_remove, and error_action="stop"'s exception (carrying the output)."""
    if auto_remove:
        finished = [j for j in selected if j.parent is None and j.state.is_finished]
        if finished:
            session.remove_job(finished)
    if action == "stop" and (errors or reasons):
        first = selected[0] if selected else None
        what = describe_job(first) if first is not None else "the jobs"
        detail = reason_text(reasons[0]) if reasons else errors[0].message
        raise JobFailedError(f"receive_job: {what} reported an error: {detail}. What was received is on "
                             f"this exception's .output and .errors", output=output, errors=errors,
                             reason=reasons[0] if reasons else None)
    return output


_ERROR_ACTIONS = {"continue": "continue", "stop": "stop", "silentlycontinue": "silent",
                  "silently_continue": "silent", "ignore": "silent"}


def check_receive(error_action: str, auto_remove: bool, wait: bool,
                  timeout: float | None) -> tuple[str, float | None]:
    """receive_job's arguments, checked before anything is read (every Session kind shares it):
    the error action's canonical name, and the timeout."""
    action = _ERROR_ACTIONS.get(str(error_action).lower())
    if action is None:
        raise ValueError(f"receive_job: error_action must be 'continue', 'stop', 'silentlycontinue' "
                         f"or 'ignore', not {error_action!r}")
    if auto_remove and not wait:
        raise ValueError("receive_job: auto_remove=True needs wait=True (a job is removed only once "
                         "it is finished)")
    return action, check_timeout("receive_job", timeout)


def followed(session: Session, leaves: list[Job], batches: Iterator[T]) -> Iterator[T]:
    """``batches``, with ``leaves`` counted as followed by a waiting reader meanwhile: a thread
    job hands the GIL to the reader its record woke (_port._hand_off). No lock: this clean-up may
    run in a collection inside a thread that holds the session's, and a count that races costs
    one hand-off more or less."""
    counts = session._followed
    for leaf in leaves:
        counts[leaf.id] = counts.get(leaf.id, 0) + 1
    try:
        yield from batches
    finally:
        for leaf in leaves:
            n = counts.pop(leaf.id, 1) - 1
            if n > 0:
                counts[leaf.id] = n
