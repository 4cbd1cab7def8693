"""Every error psjobs raises, under one root.

::

    PsJobsError (Exception)
    ├── JobNotFoundError (also LookupError)  an id, name or instance id matched no job
    ├── JobNotFinishedError                  remove_job on a job that is still running
    ├── JobStateError                        a verb that the job's kind or state does not allow
    │   └── JobBlockedError                  wait_job on a job that waits for input
    ├── JobFailedError                       receive_job(error_action="stop") met an error
    ├── ExitStatusError                      a command or worker ended with a non-zero status
    ├── WorkerError                          the worker broke: died, killed, or spoke nonsense
    │   └── ProtocolError                    a frame was malformed, oversized or of another version
    ├── RemoteError                          an exception from a worker whose class could not come back
    └── RemoteTraceback                      the worker's traceback text, chained as ``__cause__``

    JobStopped (BaseException)               raised inside a thread job to stop it, like KeyboardInterrupt

Warnings: ``PsJobsWarning`` (UserWarning) and its ``StopTimeoutWarning``.

Every message names the job (id and name), says what state it is in and what to do next, so
that the text alone is enough to act on.
"""

from __future__ import annotations

from typing import Any


class PsJobsError(Exception):
    """Root of every psjobs error."""

    #: exit status the ``psjobs`` command turns this error into
    exit_code = 1


class JobNotFoundError(PsJobsError, LookupError):
    """An id, name or instance id given to a verb matched no job of the session."""

    exit_code = 3


class JobNotFinishedError(PsJobsError):
    """``remove_job`` was asked to drop a job that has not finished."""

    exit_code = 4


class JobStateError(PsJobsError):
    """The verb does not apply to this job as it is now (a child job to remove, ...)."""

    exit_code = 4


class JobBlockedError(JobStateError):
    """``wait_job`` would wait forever: a job waits for input that only ``receive_job`` answers."""


class JobFailedError(PsJobsError):
    """``receive_job(error_action="stop")`` received an error record or a failed job's reason.

    Nothing received is lost: ``output`` holds the items of the call, ``errors`` the error
    records, ``reason`` the first failure reason met (or None).
    """

    exit_code = 5

    def __init__(self, message: str, *, output: list[Any], errors: list[Any],
                 reason: BaseException | None) -> None:
        super().__init__(message)
        self.output = output
        self.errors = errors
        self.reason = reason


class ExitStatusError(PsJobsError):
    """A command, or a worker through ``sys.exit``, ended with a non-zero status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.args[0], self.status))


def exit_failure(exc: SystemExit) -> tuple[int, ExitStatusError | None]:
    """What ``sys.exit(...)`` in a job means: its status, and the reason to fail the job (None for 0).

    Python's own rules: no code or None is 0, an int is itself, anything else (a message) is 1.
    """
    status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    if status == 0:
        return 0, None
    return status, ExitStatusError(f"the job called sys.exit({exc.code!r})", status)


class WorkerError(PsJobsError):
    """The worker of a job broke: it died, was killed, or could not run the job at all."""


class ProtocolError(WorkerError):
    """A frame from a worker was malformed, too large, or of another protocol version."""


class RemoteError(PsJobsError):
    """An exception raised in a worker whose own class could not be brought back.

    ``type_name`` is the qualified name of the original class; the message is its text.
    """

    def __init__(self, message: str, type_name: str = "Exception") -> None:
        super().__init__(message)
        self.type_name = type_name

    def __str__(self) -> str:
        return f"{self.type_name}: {self.args[0]}"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.args[0], self.type_name))


class RemoteTraceback(PsJobsError):
    """The traceback text of an exception raised in a worker, chained as ``__cause__``."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb.rstrip()}\n"""'


class JobStopped(BaseException):
    """Raised inside a job's code when the job is stopped.

    It derives from BaseException, as KeyboardInterrupt does, so that ``except Exception`` in
    the job's code cannot swallow a stop; ``finally`` blocks still run.
    """


class PsJobsWarning(UserWarning):
    """Root of the warnings psjobs emits."""


class StopTimeoutWarning(PsJobsWarning):
    """``stop_job`` gave up waiting for a job that cannot be interrupted (see the job's status)."""
