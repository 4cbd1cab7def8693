"""``psjobs.Executor``: a ``concurrent.futures.Executor`` whose calls are psjobs jobs.

::

    submit(fn, *args) --> a Future (PENDING) on the executor's queue
        _pump: while fewer than max_workers run --> future RUNNING, a job started for it
               (process: start_job, thread: start_thread_job, computer_name: invoke_command on
               the next computer, cluster: start_job(cluster=...)), future.attach(the job)
    job finished --psjobs-callbacks thread--> future settled from the job (result, exception,
               or cancelled if it was stopped) --> _pump starts the next queued call
               (the future's own callbacks run on psjobs-user-callbacks: never in the way)
    future.cancel() on a running call --> stop_job: the call is stopped for real
    map()'s clean-up (timeout, iterator dropped) --> Future.cancel: only the calls not started,
               at once, as the standard executors' map (running calls go on)

A drop-in for ProcessPoolExecutor and ThreadPoolExecutor (the same submit, map, shutdown and
context manager), with the psjobs job behind each future on ``future.job``: its streams, its
stop, its state. The jobs live in the session's job table (the default session unless
``session=`` is given), so ``psjobs.get_job()`` shows them; remove them as any job.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import functools
import itertools
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ._api import default_session
from ._compat import register_before_exit
from .core import _future
from .core._future import FollowingFuture
from .core._job import Job
from .core._sched import forget_recipe
from .core._session import Session

_KINDS = ("process", "thread")


def _process_chunk(fn: Callable[..., Any], chunk: tuple[tuple[Any, ...], ...]) -> list[Any]:
    """One job's share of ``map(..., chunksize=n)``: the calls of a chunk, in order (CPython's
    ``process._process_chunk``)."""
    return [fn(*args) for args in chunk]


def _finish_at_exit(ref: weakref.ref[Executor], pid: int) -> None:
    executor = ref()
    if executor is not None and os.getpid() == pid:  # a forked child's copy has no calls to wait for
        executor.shutdown(wait=True)


def _chunks(iterables: tuple[Iterable[Any], ...], size: int) -> Iterator[tuple[tuple[Any, ...], ...]]:
    it = zip(*iterables)
    while True:
        chunk = tuple(itertools.islice(it, size))
        if not chunk:
            return
        yield chunk


def _result_or_withdraw(future: concurrent.futures.Future[Any], timeout: float | None) -> Any:
    """``future.result(timeout)``, then the call withdrawn if it has not started (CPython's
    ``_base._result_or_cancel``, but with ``Future.cancel``: a FollowingFuture's would stop a
    running call, and wait until it is stopped)."""
    try:
        try:
            return future.result(timeout)
        finally:
            concurrent.futures.Future.cancel(future)
    finally:
        del future  # no reference cycle through the exception's traceback


def _flatten(results: Iterator[list[Any]]) -> Iterator[Any]:
    for chunk in results:
        chunk.reverse()  # pop from the end: a consumer that stops early leaves nothing held
        while chunk:
            yield chunk.pop()


class Executor(concurrent.futures.Executor):
    """Run calls as psjobs jobs: ``kind="process"`` (a process per call, as start_job) or
    ``"thread"`` (start_thread_job); ``computer_name=`` runs each call on one of the given
    computers over SSH in turn, ``cluster=`` on a Dask cluster.

    ``max_workers`` bounds how many of its jobs run at once (default: the number of CPUs for
    processes, ``min(32, CPUs + 4)`` for threads, as the standard executors). A thread executor
    raises its session's ``thread_throttle_limit`` to ``max_workers`` if it is lower, so that
    ``max_workers`` calls really run at once. ``future.job`` is the job of a started call (None while
    it waits in the executor's queue); cancelling a running future stops its job for real.
    """

    def __init__(self, kind: str = "process", *, max_workers: int | None = None,
                 computer_name: str | Iterable[str] | None = None, cluster: Any = None,
                 session: Session | None = None) -> None:
        if kind not in _KINDS:
            raise ValueError(f"Executor: kind must be 'process' or 'thread', not {kind!r}")
        if computer_name is not None and cluster is not None:
            raise ValueError("Executor: give computer_name= (SSH) or cluster= (Dask), not both")
        if max_workers is None:
            cpus = os.cpu_count() or 1
            max_workers = cpus if kind == "process" else min(32, cpus + 4)
        if isinstance(max_workers, bool) or not isinstance(max_workers, int):
            raise TypeError(f"Executor: max_workers must be a whole number, not {type(max_workers).__name__}")
        if max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        computers: list[str] = []
        if computer_name is not None:
            computers = [computer_name] if isinstance(computer_name, str) else list(computer_name)
            if not computers or not all(isinstance(c, str) and c for c in computers):
                raise ValueError(f"Executor: computer_name must be a name or a list of names, not {computer_name!r}")
        self._kind = kind
        self._max_workers = max_workers
        self._computers = itertools.cycle(computers) if computers else None
        self._cluster = cluster
        self._session = session
        self._lock = threading.Lock()  # a leaf lock: no job is started or settled while it is held
        self._idle = threading.Condition(self._lock)
        self._queue: collections.deque[tuple[FollowingFuture, Callable[[], Any]]] = collections.deque()
        self._running = 0
        self._shutdown = False
        self._throttle_checked = False
        self._local = threading.local()
        # At exit, wait for the calls as the standard executors do (their atexit join), before
        # the default session closes and stops what still runs. A weak reference: a forgotten
        # executor is not kept alive by the hook.
        register_before_exit(functools.partial(_finish_at_exit, weakref.ref(self), os.getpid()))

    @property
    def session(self) -> Session:
        """The session whose table holds this executor's jobs."""
        return self._session if self._session is not None else default_session()

    @property
    def max_workers(self) -> int:
        return self._max_workers

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        """Schedule ``fn(*args, **kwargs)``; the future's ``.job`` is its job once it starts."""
        if not callable(fn):
            raise TypeError(f"Executor.submit: fn must be a callable, not {type(fn).__name__}")
        # One callable, the arguments bound in: a call's own keyword arguments never meet the
        # start verbs' (name=, input=...), and a process job ships it whole.
        call = functools.partial(fn, *args, **kwargs) if args or kwargs else fn
        future = FollowingFuture()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._queue.append((future, call))
        self._pump()
        return future

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int = 1) -> Iterator[Any]:
        """``fn`` over the iterables' items, results in order, as ProcessPoolExecutor.map:
        ``timeout`` bounds the whole iteration, and ``chunksize`` calls run in one job (processes;
        a thread executor ignores it, as ThreadPoolExecutor does)."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if self._kind == "thread" or chunksize == 1:
            return self._map(fn, zip(*iterables), timeout)
        calls = ((chunk,) for chunk in _chunks(iterables, chunksize))
        return _flatten(self._map(functools.partial(_process_chunk, fn), calls, timeout))

    def _map(self, fn: Callable[..., Any], calls: Iterable[tuple[Any, ...]], timeout: float | None) -> Iterator[Any]:
        # concurrent.futures.Executor.map, but for its clean-up: on a timeout, an exception, or the
        # iterator dropped, it withdraws only the calls not started, and at once, as there; the
        # calls already running go on (cancel them one by one to stop them: future.cancel()).
        end = None if timeout is None else time.monotonic() + timeout
        fs = [self.submit(fn, *args) for args in calls]

        def results() -> Iterator[Any]:  # a generator of its own: the calls are submitted before the first next()
            try:
                fs.reverse()  # pop from the end: a consumer that stops early leaves nothing held
                while fs:
                    yield _result_or_withdraw(fs.pop(), None if end is None else end - time.monotonic())
            finally:
                for future in fs:
                    concurrent.futures.Future.cancel(future)

        return results()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Accept no more calls; ``cancel_futures`` cancels the calls not started yet (running ones
        go on, as in the standard executors); ``wait`` returns when every started call is done."""
        with self._lock:
            self._shutdown = True
            dropped = list(self._queue) if cancel_futures else []
            if cancel_futures:
                self._queue.clear()
        for future, _ in dropped:
            future.cancel()
            future.set_running_or_notify_cancel()  # wakes concurrent.futures.wait on it
        if wait:
            with self._idle:
                while self._running or self._queue:
                    self._idle.wait()

    # --- the queue --------------------------------------------------------------------------
    def _pump(self) -> None:
        # A call may end before its done callback is added, which then runs at once, here: it
        # only counts the call, and this loop starts the next one (no recursion per call).
        if getattr(self._local, "pumping", False):
            return
        self._local.pumping = True
        try:
            self._pump_queue()
        finally:
            self._local.pumping = False

    def _pump_queue(self) -> None:
        while True:
            with self._lock:
                if self._running >= self._max_workers or not self._queue:
                    return
                future, call = self._queue.popleft()
                if not future.start_running():
                    self._idle.notify_all()
                    continue  # cancelled while it waited
                self._running += 1
            try:
                job = self._start(call)
            except BaseException as exc:  # refused before a job existed (an unpicklable call...)
                with contextlib.suppress(concurrent.futures.InvalidStateError):  # cancelled meanwhile
                    future.set_exception(exc)
                future.attach(None)
                self._finished()
                continue
            future.attach(job)  # a cancel() waiting since start_running goes on: it stops the job
            _future.add_done_callback(job, functools.partial(self._settle, future), own=True)

    def _start(self, call: Callable[[], Any]) -> Job:
        session = self.session
        if self._cluster is not None:
            return session.start_job(call, cluster=self._cluster)
        if self._computers is not None:
            job: Job = session.invoke_command(call, computer_name=next(self._computers))
            return job
        if self._kind == "thread":
            if not self._throttle_checked and session.thread_throttle_limit < self._max_workers:
                session.thread_throttle_limit = self._max_workers
            self._throttle_checked = True
            return session.start_thread_job(call)
        return session.start_job(call)

    def _settle(self, future: FollowingFuture, job: Job) -> None:
        try:
            forget_recipe(job)  # the call is not kept alive by restart_job's recipe
            future.settle(job)
        finally:
            self._finished()

    def _finished(self) -> None:
        with self._lock:
            self._running -= 1
            self._idle.notify_all()
        self._pump()

    def __repr__(self) -> str:
        with self._lock:
            queued, running = len(self._queue), self._running
        return (f"<psjobs.Executor {self._kind} max_workers={self._max_workers} running={running} "
                f"queued={queued}{' shut down' if self._shutdown else ''}>")
