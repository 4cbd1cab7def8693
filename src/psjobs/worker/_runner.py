"""Running a job's work and telling how it ended: one runner for thread, process and Dask jobs.

::

    backend --run_guarded(body, gate)--> gate.enter() (a stop may be raised from now on)
        body(): run_call's init + target (a generator's items streamed to the emitter as they
                come), or a command run by the backend
        gate.leave() --> classified: completed | failed (the exception) | stopped | sys.exit status
    --> Ended (in this process) --Ended.done()--> Done (pickled reason, traceback text) for a
        session in another process

A gate is what stops the job's code in this kind of worker: a ThreadStopper for threads (thread
jobs, Dask tasks), the SIGTERM handler's state in a process worker.
"""

from __future__ import annotations

import inspect
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from .._errors import ExitStatusError, JobStopped, exit_failure
from .._records import Stream
from ._outcome import dump_reason
from ._wire import Done

COMPLETE, FAIL, STOPPED = "complete", "fail", "stopped"  # the values of core's Event of the same names


class Gate(Protocol):
    """Where a stop may be raised in the job's code (see the module docstring)."""

    def enter(self) -> None: ...      # may raise JobStopped: a stop came before the code started
    def leave(self) -> None: ...      # idempotent
    def stopping(self) -> bool: ...   # a stop was asked for


@dataclass(slots=True)
class Ended:
    """How the job's code ended, in the process that ran it."""

    event: str                             # COMPLETE, FAIL or STOPPED
    reason: BaseException | None = None    # why it failed
    code: int | None = None                # sys.exit status, or a command's exit status
    value: Any = None                      # what the call returned (run_call(keep_value=True))

    def done(self) -> Done:
        """The DONE message for a session in another process (the reason pickled, with its traceback)."""
        if self.reason is None:
            return Done(self.event, None, None, self.code)
        reason = self.reason
        tb = "".join(traceback.format_exception(type(reason), reason, reason.__traceback__))
        return Done(self.event, dump_reason(reason), tb, self.code)


def run_guarded(body: Callable[[], Any], gate: Gate, *, status: bool = False) -> Ended:
    """Run ``body`` between ``gate.enter()`` and ``gate.leave()`` and classify its end.

    ``status``: the body is a command and returns its exit status (the job's exit code), not a value.

    ``sys.exit(0)`` completes and ``sys.exit(n)`` fails with exit code n; an ExitStatusError (a
    command's status) keeps its status as the exit code. After a stop, a KeyboardInterrupt or a
    command killed by the stop's signal counts as stopped, not failed.
    """
    ended = Ended(COMPLETE)
    try:
        try:
            gate.enter()
            value = body()
            if status:
                ended.code = value
            else:
                ended.value = value
        finally:
            gate.leave()
    except JobStopped:
        gate.leave()  # raised inside the finally above, before leave() took it back
        ended.event = STOPPED
    except SystemExit as exc:
        ended.code, failure = exit_failure(exc)
        if failure is not None:
            ended.event, ended.reason = FAIL, failure
    except BaseException as exc:
        ended.event, ended.reason = FAIL, exc
        if isinstance(exc, ExitStatusError):
            ended.code = exc.status
    if ended.event == FAIL and isinstance(ended.reason, (KeyboardInterrupt, ExitStatusError)) and gate.stopping():
        ended.event, ended.reason = STOPPED, None
    return ended


# Exact types that are never a generator, an awaitable nor an async generator.
_PLAIN = frozenset({type(None), bool, int, float, complex, str, bytes, list, tuple, dict, set})


def call(target: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
         init: Callable[[], Any] | None, emitter: Any, *, keep_value: bool = False) -> Any:
    """init, then the call: a generator's items go to the output stream as they come; a plain
    value too, unless ``keep_value`` (it is then returned, to travel with the result).

    An ``async def`` target (or init) is run to its end by ``asyncio.run`` in this thread, and an
    async generator's items are streamed like a generator's: a coroutine returned unawaited was
    taken for the job's output (a thread job "completed" with it; a process job hung on the
    warning its finalizer gave: issue 13, case 1).
    """
    if init is not None:
        _settle(init())
    result = target(*args, **kwargs)
    if type(result) in _PLAIN:  # most values: skip the awaitable tests (an ABC check each)
        if keep_value:
            return result
        if result is not None:
            emitter.emit(Stream.OUTPUT, result)
        return None
    if inspect.isgenerator(result):
        # Looked up once: ``Stream.OUTPUT`` costs ~80 ns a time on 3.11 (an enum member through
        # its metaclass; timeit at load 0.8), the bound method ~30: ~10% of a streamed item on a thread job.
        emit, output = emitter.emit, Stream.OUTPUT
        for item in result:
            emit(output, item)
        return None
    if _awaited(result):
        result = _settle(result, emitter)
        if result is None:
            return None
    if keep_value:
        return result
    if result is not None:
        emitter.emit(Stream.OUTPUT, result)
    return None


def _awaited(result: Any) -> bool:
    """A coroutine, an awaitable or an async generator: run to its end. Not a psjobs Job, which is
    awaitable too (``await job``, API.md 8.1) but, returned by a job, is that job's output."""
    return (inspect.isawaitable(result) and not hasattr(result, "child_jobs")) or inspect.isasyncgen(result)


STOP_POLL = 0.05  # seconds: how often a running coroutine looks at the stop flag (see _settle)


def _settle(result: Any, emitter: Any = None) -> Any:
    """What a coroutine, an awaitable or an async generator comes to, run in a loop of this thread;
    anything else as it is. An async generator's items go to ``emitter`` (or are dropped)."""
    if not _awaited(result):
        return result
    import asyncio  # only here: importing it costs a process job ~10 ms

    async def drain(agen: Any) -> None:
        async for item in agen:
            if emitter is not None:
                emitter.emit(Stream.OUTPUT, item)

    async def until_stopped(main: Any) -> Any:
        # A thread job's stop lands only when its thread runs Python code, and a loop waiting in
        # epoll runs none: the flag is looked at every STOP_POLL seconds (a process job's SIGTERM
        # needs no help), and the job's task is cancelled, so its finally blocks run.
        task = asyncio.ensure_future(main)
        while emitter is not None:
            done, _ = await asyncio.wait({task}, timeout=STOP_POLL)
            if done:
                break
            if emitter.stop_requested():
                task.cancel()
                try:
                    return await task  # it may catch the cancellation and return
                except asyncio.CancelledError:
                    raise JobStopped() from None
        return await task

    return asyncio.run(until_stopped(drain(result) if inspect.isasyncgen(result) else result))
