"""How a job ended, between the process that ran it and the session: exception <-> bytes, words.

::

    worker: the job's exception --dump_reason (cloudpickle, or a RemoteError stand-in)--> Done.reason
    session: Done.reason + Done.traceback --load_reason--> the exception, the remote traceback as
             its __cause__ (what a user reads in job.reason); one that does not unpickle here
             --_salvage.reason--> itself, or a RemoteError with its class name and text
    a wait status / an exit status --status_text / status_error--> the words in WorkerError and
             ExitStatusError messages
"""

from __future__ import annotations

import os
import pickle
import signal
from typing import Any

from .._errors import ExitStatusError, RemoteError, RemoteTraceback


def qualname(obj: Any) -> str:
    """The class of ``obj`` as a user would write it (``ValueError``, ``mymod.Boom``)."""
    cls = type(obj)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def dump_reason(reason: BaseException) -> bytes:
    """The exception, pickled so the session can rebuild it; a RemoteError with its text when its
    class cannot travel (defined in a closure, holding a lock, ...)."""
    import cloudpickle

    reason.__traceback__ = None
    try:
        data: bytes = cloudpickle.dumps(reason)
        pickle.loads(data)
        return data
    except BaseException:  # its own code raised as it was (un)pickled, even KeyboardInterrupt: the
        try:               # worker ended with it (status 70) and the job's reason was lost
            text = str(reason)
        except BaseException as exc:
            text = f"(its text could not be read: {type(exc).__name__})"
        fallback: bytes = pickle.dumps(RemoteError(text, qualname(reason)))
        return fallback


def load_reason(blob: bytes, tb: str | None) -> BaseException:
    """The exception of dump_reason, its traceback text (from the other process) as __cause__."""
    try:
        reason = pickle.loads(blob)
    except BaseException as exc:  # its class is missing here, or its own code raised (even SystemExit)
        from ._salvage import reason as salvage  # the session only, and only then

        reason = salvage(blob, exc)
    if not isinstance(reason, BaseException):
        reason = RemoteError(f"(the exception could not be brought back: not an exception: "
                             f"{type(reason).__name__})", "Exception")
    if tb:
        reason.__cause__ = RemoteTraceback(tb)
    return reason  # type: ignore[no-any-return]


def status_text(status: int | None) -> str:
    """A wait status as words: 'exited with status 3', 'was killed by SIGSEGV'."""
    if status is None:
        return "ended (its exit status is unknown: the fork server that started it died)"
    if os.WIFSIGNALED(status):
        return f"was killed by {_signal_name(os.WTERMSIG(status))}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


def status_error(what: str, status: int) -> ExitStatusError:
    """The failure of a command that ended with ``status`` (negative: killed by that signal)."""
    if status < 0:
        return ExitStatusError(f"{what} was killed by {_signal_name(-status)}", status)
    return ExitStatusError(f"{what} exited with status {status}", status)


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"
