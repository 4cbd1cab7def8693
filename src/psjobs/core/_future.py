"""Jobs as futures: result(), callbacks, as_completed, ``await job``, and streams as iterators.

::

    backend --port--> Job._set_state / _extend  (session lock held)
                          |  a watched job only: Watch.changed / Watch.news queue a call
                          v
              psjobs' own (core/_dispatch.own) --psjobs-callbacks thread--> FollowingFuture.settle
                 (never a user's code)                                      (Future state, waiters),
                                                                            Executor, as_completed,
                                                                            loop.call_soon_threadsafe
                                                                            (await job, astream)
              users' (core/_dispatch.user) --psjobs-user-callbacks thread--> fn(job, old, new), fn(job),
                                                                            a FollowingFuture's callbacks
    result(): waits on the session's condition, then reads the journal from 0 (the receive
              cursor does not move), or the job's own output stream when it keeps none here (a
              connected session's job: the host's), and shapes the value by what ran (VALUE...)

Callbacks never run with the session lock held: a callback may call any verb. psjobs' own
callbacks and the users' run on separate threads, so that a user's callback that blocks (waits
for another future) never holds up a future's state, an await or an Executor (see _dispatch).
An asyncio waiter costs no thread: its callback only schedules a wake-up in its loop.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from .._compat import cancel_running_future
from .._records import Stream
from . import _dispatch
from ._spin import spin
from ._state import JobState

if TYPE_CHECKING:
    from ._job import Job
    from ._session import Session

log = logging.getLogger("psjobs")

#: what ``result()`` makes of a job's output, set when the job is made (core/_tree.make_tree):
#: a callable's return value (its last output item), a generator's items, a command's lines
VALUE, ITEMS, LINES = "value", "items", "lines"

StateCallback = Callable[["Job", JobState, JobState], Any]
DoneCallback = Callable[["Job"], Any]


class Watch:
    """Who listens to one job: the users' state and done callbacks, psjobs' own (``own_*``: a
    FollowingFuture, an Executor, as_completed, an asyncio waiter) and news (record) callbacks."""

    __slots__ = ("done", "news_fns", "own_done", "own_states", "pending", "states")

    def __init__(self) -> None:
        self.states: list[StateCallback] = []
        self.done: list[DoneCallback] = []
        self.own_states: list[StateCallback] = []
        self.own_done: list[DoneCallback] = []
        self.news_fns: list[DoneCallback] = []  # psjobs' own (astream)
        self.pending = False  # a news call is queued: records coming meanwhile need no other

    # Called with the session lock held: they only queue.
    def changed(self, job: Job, old: JobState, new: JobState) -> None:
        for fn in self.own_states:
            _dispatch.own(_call_state, fn, job, old, new)
        for fn in self.states:
            _dispatch.user(_call_state, fn, job, old, new)
        if new.is_finished:
            own_done, self.own_done = self.own_done, []
            for dfn in own_done:
                _dispatch.own(_call_done, dfn, job)
            done, self.done = self.done, []
            for dfn in done:
                _dispatch.user(_call_done, dfn, job)
        if self.news_fns:
            self.news(job)

    def news(self, job: Job) -> None:
        if self.news_fns and not self.pending:
            self.pending = True
            _dispatch.own(self._fire_news, job)

    def _fire_news(self, job: Job) -> None:
        self.pending = False  # before the calls: a record after this queues another call
        for fn in list(self.news_fns):
            _call_done(fn, job)


def _call_state(fn: StateCallback, job: Job, old: JobState, new: JobState) -> None:
    try:
        fn(job, old, new)
    except Exception:
        log.exception("psjobs: the state callback %r of %r raised", fn, job)


def _call_done(fn: DoneCallback, job: Job) -> None:
    try:
        fn(job)
    except Exception:
        log.exception("psjobs: the done callback %r of %r raised", fn, job)


def _watch(job: Job) -> Watch:
    """The job's Watch, made on first use (the caller holds the session lock)."""
    w = job._watch
    if w is None:
        w = job._watch = Watch()
    return w


# --- the Job's future methods (Job's methods of the same names call these) --------------------------

def cancel(job: Job) -> bool:
    if job._state.is_finished:
        return False
    job._session.stop_job(job)
    return True


def result(job: Job, timeout: float | None, verb: str = "result") -> Any:
    _wait_finished(job, timeout, verb)
    _raise_unless_completed(job)
    return value_of(job, verb)


def exception(job: Job, timeout: float | None) -> BaseException | None:
    _wait_finished(job, timeout, "exception")
    if job._state is JobState.STOPPED:
        raise concurrent.futures.CancelledError(f"{_describe(job)} was stopped")
    if job._state is JobState.FAILED:
        return job.reason
    if _removed(job):
        # None would promise that result() returns the value; it raises this instead.
        raise _removed_error(job, "exception")
    return None


def add_done_callback(job: Job, fn: DoneCallback, *, own: bool = False) -> None:
    """``fn(job)`` once the job is finished, at once here if it is; ``own``: psjobs' own callback,
    which never blocks (it runs on psjobs' own thread, never behind a user's callback)."""
    with job._session._cond:
        waits = not job._state.is_finished
        if waits:
            w = _watch(job)
            (w.own_done if own else w.done).append(fn)
    if waits:
        job._watched()
        return
    _call_done(fn, job)


def add_state_callback(job: Job, fn: StateCallback, *, own: bool = False) -> None:
    with job._session._cond:
        w = _watch(job)
        (w.own_states if own else w.states).append(fn)
        waits = not job._state.is_finished
    if waits:
        job._watched()


def remove_callback(job: Job, fn: Callable[..., Any]) -> None:
    with job._session._cond:
        w = job._watch
        if w is not None:
            for fns in (w.states, w.done, w.own_states, w.own_done, w.news_fns):
                while fn in fns:
                    fns.remove(fn)


def as_future(job: Job) -> FollowingFuture:
    future = FollowingFuture(job)
    with job._session._cond:  # the job cannot leave NotStarted between the test and the callback
        waits = job._state is JobState.NOT_STARTED
        if waits:
            _watch(job).own_states.append(future.started)
    if not waits:
        future.set_running_or_notify_cancel()
    add_done_callback(job, future.settle, own=True)
    return future


def stream(job: Job, timeout: float | None) -> Iterator[Any]:
    session = job._session
    for leaf, kind, payload, _ in session.read_entries(job, wait=True, timeout=timeout):
        if kind is Stream.OUTPUT:
            yield payload
        elif kind is not Stream.PROGRESS:
            session.host.write_record(leaf, payload)
    if job._state.is_finished:
        _report_failures(job)


class FollowingFuture(concurrent.futures.Future[Any]):
    """A Future that follows a job; cancelling it stops the job (``.job``)."""

    def __init__(self, job: Job | None = None) -> None:
        super().__init__()
        self.job = job
        # Set once ``job`` is known, or known never to come (its Executor could not start the
        # call): cancel() waits for it on a future its Executor has marked running.
        self._attached = threading.Event()
        if job is not None:
            self._attached.set()
        self._starter: int | None = None  # the thread that starts the call's job (start_running)
        self._stop_on_attach = False

    def start_running(self) -> bool:
        """``set_running_or_notify_cancel()``, by an Executor that starts the call's job next, in
        this thread, and then calls ``attach``."""
        self._starter = threading.get_ident()
        return self.set_running_or_notify_cancel()

    def attach(self, job: Job | None) -> None:
        """The job started for this future, or None: no job will be (the future has failed)."""
        self.job = job
        self._attached.set()
        if job is not None and self._stop_on_attach:
            job.cancel()  # asked for while the job was being started, in this very thread

    def cancel(self) -> bool:
        """Stop the job behind this future for real (even a running one, which a plain Future
        cannot cancel); True once the future is cancelled. Without a job (a call still queued
        in its Executor) or once done, what any Future does."""
        if self.job is None and self.running():
            # Its Executor marks a call running, then starts its job (Executor._pump_queue): in
            # between, Future.cancel() would say False and the call would run on. Wait for the job
            # (a moment: one start) and stop it as any running call's.
            if self._starter == threading.get_ident():
                # Asked from within that start, in the thread that starts it (a signal handler
                # that cancels every future, say): waiting would never end. The job is stopped as
                # soon as it exists, in this thread (attach).
                self._stop_on_attach = True
                cancel_running_future(self)
                return True
            self._attached.wait()
        job = self.job
        if job is None or self.done():
            return super().cancel()
        if not job.done():
            job.cancel()  # returns once the job is Stopped (or a thread job outlived the grace)
        self.settle(job)
        return self.cancelled()

    def add_done_callback(self, fn: Callable[[concurrent.futures.Future[Any]], object]) -> None:
        """As any Future's; but where psjobs settles the future on its own callbacks thread, ``fn``
        runs on the user callbacks thread instead: one that blocks (waits for another future) holds
        up no future's settling. What it raises is logged on ``concurrent.futures``, as the stdlib does."""
        super().add_done_callback(functools.partial(_future_callback, fn))

    def started(self, job: Job, old: JobState, new: JobState) -> None:
        """A state callback of a job that was NotStarted: once it starts, the future is running,
        as an executor's future once its call starts (on psjobs' own callbacks thread)."""
        remove_callback(job, self.started)
        if new.is_finished or self.done() or self.running():
            return  # settle() takes a finished job's outcome
        try:
            self.set_running_or_notify_cancel()
        except RuntimeError:
            pass  # settled meanwhile in another thread (a cancel())

    def settle(self, job: Job) -> None:
        """Take the finished job's outcome (idempotent)."""
        if self.done() or not job.done():
            return
        try:
            if job.state is JobState.STOPPED:
                cancel_running_future(self)
                return
            if job.state is JobState.FAILED:
                self.set_exception(job.reason or _failed_without_reason(job))
                return
            try:
                value = value_of(job)
            except BaseException as exc:
                self.set_exception(exc)
                return
            self.set_result(value)
        except concurrent.futures.InvalidStateError:
            pass  # settled meanwhile by another thread (a cancel racing the callback)


_futures_log = logging.getLogger("concurrent.futures")  # where the stdlib logs a callback's exception


def _future_callback(fn: Callable[[concurrent.futures.Future[Any]], object],
                     future: concurrent.futures.Future[Any]) -> None:
    if _dispatch.on_own_thread():
        _dispatch.user(_call_future_callback, fn, future)
    else:
        fn(future)  # where the stdlib calls it: at once, or in the thread that settled the future


def _call_future_callback(fn: Callable[[concurrent.futures.Future[Any]], object],
                          future: concurrent.futures.Future[Any]) -> None:
    try:
        fn(future)
    except Exception:
        _futures_log.exception("exception calling callback for %r", future)


# --- helpers ------------------------------------------------------------------------------------

def _describe(job: Job) -> str:
    return f"Job {job.id} {job.name!r}"


def _failed_without_reason(job: Job) -> BaseException:
    from .._errors import JobFailedError

    return JobFailedError(f"{_describe(job)} is Failed without a reason; read its error stream: job.error",
                          output=[], errors=job.error, reason=None)


def _wait_finished(job: Job, timeout: float | None, verb: str) -> None:
    from ._tree import check_timeout, refuse_waiting_on_itself

    timeout = check_timeout(verb, timeout)
    if job._state.is_finished:
        return
    refuse_waiting_on_itself(verb, [job], every=True)
    deadline = None if timeout is None else time.monotonic() + timeout
    cond = job._session._cond
    job._watched(1)
    try:
        spin(job, finished=True, limit=timeout)
        with cond:
            while not job._state.is_finished:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise concurrent.futures.TimeoutError(
                        f"{verb}: {_describe(job)} is still {job._state} after {timeout} s; it goes on: "
                        f"wait again, or stop it with job.cancel()")
                cond.wait(remaining)
    finally:
        job._watched(-1)


def _raise_unless_completed(job: Job) -> None:
    if job._state is JobState.STOPPED:
        raise concurrent.futures.CancelledError(f"{_describe(job)} was stopped, so it has no result")
    if job._state is JobState.FAILED:
        raise job.reason or _failed_without_reason(job)


def value_of(job: Job, verb: str = "result") -> Any:
    """A finished job's value (see ``result``), read without moving the receive cursor."""
    cond = job._session._cond
    with cond:
        removed = _removed(job)
        journal = job._journal
        end = len(journal) if journal is not None else 0
    if removed:
        raise _removed_error(job, verb)
    children = job._children
    if children is not None and journal is None:
        values = [value_of(child, verb) for child in children]
        return values[0] if len(values) == 1 else values
    if journal is not None:
        items = [p for s, p, _ in journal.read(0, end) if s == Stream.OUTPUT]
    else:
        # No journal here: a job without records yet, or one whose records are elsewhere (a
        # connected session's HostJob reads them from the host: its _stream).
        from .._errors import JobNotFoundError

        try:
            items = job._stream(Stream.OUTPUT)
        except JobNotFoundError:  # removed where the records are (`psjobs remove` in a shell)
            raise _removed_error(job, verb) from None
    with cond:
        removed = _removed(job)
    if removed:  # meanwhile: the read may have met the journal dropped (it then reads nothing)
        raise _removed_error(job, verb)
    if job._shape == VALUE:
        return items[-1] if items else None
    return items


def _removed(job: Job) -> bool:
    """True once ``remove_job`` has dropped the job, and its records with it (remove_job takes it
    out of the table, children too, before it drops their journals)."""
    return job._session._all.get(job.id) is not job


def _removed_error(job: Job, verb: str) -> BaseException:
    from .._errors import JobStateError

    return JobStateError(
        f"{verb}: {_describe(job)} is {job._state} but was removed (remove_job, or receive_job with "
        f"auto_remove=True), and its output with it: its value is gone. Ask for job.result() before "
        f"removing the job, or receive with receive_job(job, keep=True) and remove it after")


def _report_failures(job: Job) -> None:
    host = job._session.host
    for leaf in job._leaves():
        if leaf._state is JobState.FAILED and leaf._reason is not None:
            host.write_failure(leaf, leaf._reason)


def session_of(jobs: Any, default: Callable[[], Session]) -> Session:
    """The session of the first Job among ``jobs`` (a job belongs to one), else the default one."""
    from ._job import Job

    items = [jobs] if isinstance(jobs, (Job, str, int)) or not isinstance(jobs, Iterable) else list(jobs)
    for item in items:
        if isinstance(item, Job):
            return item.session
    return default()


def as_completed(session: Session, jobs: Any, timeout: float | None = None) -> Iterator[Job]:
    """Yield the jobs as they finish (the finished ones first); ``TimeoutError`` when ``timeout``
    seconds pass with some unfinished (they go on)."""
    from ._tree import check_timeout

    timeout = check_timeout("as_completed", timeout)
    selected = session._resolve(jobs, "as_completed")
    deadline = None if timeout is None else time.monotonic() + timeout
    finished: queue.SimpleQueue[Job] = queue.SimpleQueue()
    pending = {job.id: job for job in selected}
    for job in selected:
        add_done_callback(job, finished.put, own=True)
    try:
        while pending:
            remaining = None if deadline is None else deadline - time.monotonic()
            try:
                if remaining is not None and remaining <= 0:
                    raise queue.Empty
                job = finished.get(timeout=remaining)
            except queue.Empty:
                raise concurrent.futures.TimeoutError(
                    f"as_completed: {len(pending)} (of {len(selected)}) jobs unfinished after {timeout} s "
                    f"(first: {_describe(next(iter(pending.values())))}); they go on") from None
            if pending.pop(job.id, None) is not None:
                yield job
    finally:
        for job in pending.values():
            remove_callback(job, finished.put)


# --- asyncio: one callback per awaited job, scheduled into the loop; no thread per waiter ----------

async def wait_async(session: Session, jobs: Any, *, any: bool = False, timeout: float | None = None,
                     state: JobState | str | None = None) -> list[Job]:
    """``wait_job`` for asyncio: the loop runs on while the jobs do."""
    import asyncio

    from ._tree import check_timeout

    timeout = check_timeout("async_wait_job", timeout)
    want = JobState.parse(state) if state is not None else None
    selected = session._resolve(jobs, "async_wait_job")
    if want is not None:
        selected = [j for j in selected if j.state is want]
    if not selected:
        return session.wait_job([], timeout=0)
    loop = asyncio.get_running_loop()
    woken = asyncio.Event()

    def poke(*_: Any) -> None:  # on the callbacks thread
        try:
            loop.call_soon_threadsafe(woken.set)
        except RuntimeError:
            pass  # the loop is closed: nobody waits any more

    for job in selected:
        add_state_callback(job, poke, own=True)
    deadline = None if timeout is None else loop.time() + timeout
    try:
        while True:
            woken.clear()
            done = session.wait_job(selected, any=any, timeout=0)
            if done:
                return done
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return done
            try:
                await asyncio.wait_for(woken.wait(), remaining)
            except asyncio.TimeoutError:
                return session.wait_job(selected, any=any, timeout=0)
    finally:
        for job in selected:
            remove_callback(job, poke)


async def receive_async(session: Session, jobs: Any, *, wait: bool = False, timeout: float | None = None,
                        **kwargs: Any) -> list[Any]:
    """``receive_job`` for asyncio: with ``wait=True`` the jobs are awaited without blocking the loop."""
    if wait:
        await wait_async(session, jobs, timeout=timeout)
        return session.receive_job(jobs, wait=True, timeout=0, **kwargs)
    return session.receive_job(jobs, timeout=timeout, **kwargs)


async def await_result(job: Job) -> Any:
    while not job._state.is_finished:
        await wait_async(job._session, job)  # returns on Suspended too: wait again until finished
        if not job._state.is_finished:
            await _next_change(job)
    return result(job, 0, "await job")


async def _next_change(job: Job) -> None:
    import asyncio

    loop = asyncio.get_running_loop()
    woken = asyncio.Event()

    def poke(*_: Any) -> None:
        try:
            loop.call_soon_threadsafe(woken.set)
        except RuntimeError:
            pass

    add_state_callback(job, poke, own=True)
    try:
        if not job._state.is_finished:
            await woken.wait()
    finally:
        remove_callback(job, poke)


async def astream(job: Job, timeout: float | None) -> AsyncIterator[Any]:
    import asyncio

    from ._tree import check_timeout

    timeout = check_timeout("astream", timeout)
    session = job._session
    loop = asyncio.get_running_loop()
    woken = asyncio.Event()
    leaves = job._leaves()

    def poke(*_: Any) -> None:
        try:
            loop.call_soon_threadsafe(woken.set)
        except RuntimeError:
            pass

    with session._cond:
        for leaf in leaves:
            _watch(leaf).news_fns.append(poke)
    for leaf in leaves:
        leaf._watched()
    deadline = None if timeout is None else loop.time() + timeout
    try:
        while True:
            woken.clear()
            ended = all(leaf._state.is_persistent for leaf in leaves)
            for item in _drain(job):
                yield item
            if ended:
                _report_failures(job)
                return
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return
            try:
                await asyncio.wait_for(woken.wait(), remaining)
            except asyncio.TimeoutError:
                return
    finally:
        for leaf in leaves:
            remove_callback(leaf, poke)


def _drain(job: Job) -> list[Any]:
    session = job._session
    out: list[Any] = []
    for leaf, stream, payload, _ in session.read_entries(job):
        if stream is Stream.OUTPUT:
            out.append(payload)
        elif stream is not Stream.PROGRESS:
            session.host.write_record(leaf, payload)
    return out
