"""Every error psjobs raises, under one root.

::

    PsJobsError (Exception)
    ├── JobNotFoundError (also LookupError)          an id, name or instance id matched no job
    ├── JobNotFinishedError                          remove_job on a job that is still running
    ├── JobStateError                                a verb that the job's kind or state does not allow
    │   └── JobBlockedError                          wait_job on a job that waits for input
    ├── JobFailedError                               receive_job(error_action="stop") met an error
    ├── ExitStatusError                              a command or worker ended with a non-zero status
    ├── WorkerError                                  the worker broke: died, killed, or spoke nonsense
    │   ├── ProtocolError                            a frame was malformed, oversized or of another version
    │   └── RemoteVersionError                       the remote Python or psjobs protocol differs (SSH)
    ├── RemoteError                                  an exception from a worker whose class could not come back
    ├── RemoteTraceback                              the worker's traceback text, chained as ``__cause__``
    ├── RemoteConnectionError                        a computer unreachable, login refused, connection dropped
    │   └── HostKeyError                             the computer's host key is unknown or changed
    ├── MissingDependencyError (also ImportError)    an optional dependency is missing; says what to install
    ├── HostError                                    the session host cannot be reached or started
    │   └── RequestError                             a request the host cannot accept (exit status 2)
    ├── HostReplyError                               the host answered a request with an error (the command's side)
    ├── HostLostError                                a job's reason when its session host ended under it
    ├── UsageError                                   the psjobs command line is wrong (exit status 2)
    └── WaitTimeoutError                             psjobs wait/receive --timeout ran out (exit status 6)

    JobStopped (BaseException)                       raised inside a thread job to stop it, like KeyboardInterrupt

    PsJobsWarning (UserWarning)                      root of the warnings psjobs emits
    └── StopTimeoutWarning                           stop_job gave up waiting for a job that cannot be interrupted

Every message names the job (id and name), says what state it is in and what to do next, so
that the text alone is enough to act on. ``exit_code`` is the status the ``psjobs`` command
turns an error into (``_cli.main``, the one place). tests/test_errors.py checks that this drawing
is the class tree.

Foreign errors (asyncssh, distributed, OSError) are mapped at the backend boundary with
``raise ... from exc``, so the original stays readable as ``__cause__``. Internal errors of psjobs'
own threads (a bug in psjobs itself, not a job's failure) are not raised to anyone: they are
logged with their traceback to the ``psjobs`` logger (``psjobs.process``, ``psjobs.dask``).

Two private exceptions live elsewhere on purpose, since they never reach a user:
``worker._forkserver.SessionGone`` and ``host._server._AlreadyRunning`` (control flow only).
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


class RemoteVersionError(WorkerError):
    """The remote Python (minor version) or psjobs protocol differs from the session's."""


class RemoteConnectionError(PsJobsError):
    """A computer could not be reached, refused the login, or dropped the connection.

    Only the child job of that computer fails; ``computer_name`` says which one.
    """

    def __init__(self, message: str, computer_name: str | None = None) -> None:
        super().__init__(message)
        self.computer_name = computer_name

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.args[0], self.computer_name))


class HostKeyError(RemoteConnectionError):
    """The computer's host key is not in known_hosts (unknown) or differs from it (changed)."""


class MissingDependencyError(PsJobsError, ImportError):
    """A feature needs an optional dependency that cannot be imported (see ``missing_dependency``).

    An ImportError too, so ``except ImportError`` keeps working; ``name`` is the missing module
    (as ImportError's), ``extra`` the psjobs extra that installs it.
    """

    def __init__(self, message: str, *, name: str | None = None, extra: str | None = None) -> None:
        super().__init__(message, name=name)
        self.extra = extra


#: what each extra of pyproject.toml brings, as a message names it
EXTRAS = {"ssh": "asyncssh", "dask": "Dask's distributed", "ipython": "IPython and rich"}


def missing_dependency(needs: str, extra: str, exc: ImportError | None = None, *,
                       what: str | None = None, then: str | None = None) -> MissingDependencyError:
    """The one message for a missing optional dependency: what needs it, what is missing, how to install.

    ``needs`` says what the user asked for ("invoke_command", "psjobs shell"); ``extra`` is the
    psjobs extra that brings the dependency; ``exc`` the import failure (its text says which
    module is missing, and it becomes the ``__cause__`` where the caller raises ``from exc``);
    ``what`` names the dependency when it is only part of the extra; ``then`` a step after
    installing. The install line works from PyPI and from a checkout.
    """
    missing = f" ({exc})" if exc is not None else ""
    after = f"; then {then}" if then else ""
    return MissingDependencyError(
        f"{needs} needs {what or EXTRAS[extra]}, which cannot be imported here{missing}; install it with "
        f"`pip install 'psjobs[{extra}]'` (or, from a checkout of psjobs, `pip install -e '.[{extra}]'`){after}",
        name=exc.name if exc is not None and exc.name else None, extra=extra)


class HostError(PsJobsError):
    """The session host cannot be reached, refused to start, or broke the protocol."""


class RequestError(HostError):
    """A request the host cannot accept: malformed, oversized, another version, bad arguments."""

    exit_code = 2


class HostReplyError(PsJobsError):
    """An error the host replied with; ``exit_code`` is the one the host chose for its class."""

    def __init__(self, message: str, type_name: str, exit_code: int) -> None:
        super().__init__(message)
        self.type_name = type_name
        self.exit_code = exit_code


class HostLostError(PsJobsError):
    """The reason of a job that was running when its session host ended (killed, crashed)."""


class UsageError(PsJobsError):
    """The ``psjobs`` command line is wrong (argparse says so too, with the same status)."""

    exit_code = 2


class WaitTimeoutError(PsJobsError):
    """``psjobs wait --timeout`` or ``receive --wait --timeout`` ran out of time; the jobs go on."""

    exit_code = 6


class JobStopped(BaseException):
    """Raised inside a job's code when the job is stopped.

    It derives from BaseException, as KeyboardInterrupt does, so that ``except Exception`` in
    the job's code cannot swallow a stop; ``finally`` blocks still run.
    """


class PsJobsWarning(UserWarning):
    """Root of the warnings psjobs emits."""


class StopTimeoutWarning(PsJobsWarning):
    """``stop_job`` gave up waiting for a job that cannot be interrupted (see the job's status)."""
