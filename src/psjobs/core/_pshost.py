"""What shows a job's records to a person: PowerShell's PSHost, here :class:`Host`.

::

    receive_job / wait_job --records the caller does not get back--> Host.write_record
                                                                     --> sys.stdout / sys.stderr
    a Blocked job's prompt --> Host.read_input (a terminal asks) / Host.write_blocked (a notice)
    progress, prompts, failures --a front end set by set_frontend (the IPython extension in a
                                  Jupyter kernel)--> drawn there instead (live displays, the
                                  kernel's input request, the user's own traceback)

Messages name the job the user sees in the job table: a process job's hidden child is named by
its parent; a child of a fan-out by its parent and its computer, since that adds information.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Protocol, TextIO

from .._records import Record, Stream

if TYPE_CHECKING:
    from ._job import Job


class Frontend(Protocol):
    """What a front end that draws for itself provides (see :func:`set_frontend`)."""

    def progress_display(self, total: int | None, force: bool) -> Any: ...
    def read_input(self, job: Job, prompt: str) -> str | None: ...
    def write_blocked(self, job: Job, prompt: str) -> bool: ...
    def write_failure(self, job: Job, reason: BaseException) -> bool: ...


_frontend: Frontend | None = None


def set_frontend(frontend: Frontend | None) -> Frontend | None:
    """Let ``frontend`` show progress, ask for input and show failures for every session of this
    process (the IPython extension does, in a Jupyter kernel); None restores the terminal
    behaviour. Returns the previous one. ``write_blocked`` and ``write_failure`` return False to
    leave a case to the Host."""
    global _frontend
    previous, _frontend = _frontend, frontend
    return previous


def shown_name(job: Job) -> str:
    """``Job 9 'build'``, naming the top-level job the user sees (the table does not list a process
    job's hidden child), with the computer of a fan-out's child: ``Job 9 'deploy' on web1``."""
    top = job
    while top.parent is not None:
        top = top.parent
    if top is job:
        return f"Job {job.id} {job.name!r}"
    where = job.computer_name
    siblings = len(top.child_jobs)
    if siblings > 1 and where and where != "localhost":
        return f"Job {top.id} {top.name!r} on {where}"
    if siblings > 1:
        return f"Job {top.id} {top.name!r} (its child {job.id})"
    return f"Job {top.id} {top.name!r}"


class Host:
    """Shows the records that ``receive_job`` does not return: information, warnings, errors.

    Information goes to ``sys.stdout``; warnings (``WARNING: text``), errors and failure reasons to
    ``sys.stderr``. Verbose and debug records are shown only when asked for. Streams are looked up
    at each call, so redirections made after the session was created apply.
    """

    def __init__(self, *, verbose: bool = False, debug: bool = False, progress: bool | None = None,
                 stdout: TextIO | None = None, stderr: TextIO | None = None) -> None:
        self.verbose = verbose
        self.debug = debug
        #: live progress bars while receive_job(wait=True) waits: None shows them on a terminal
        self.progress = progress
        self._stdout = stdout
        self._stderr = stderr

    def progress_display(self, total: int | None = None, force: bool = False) -> Any:
        """A ProgressDisplay to draw on, or None where bars are not wanted (not a terminal)."""
        if _frontend is not None and self.progress is not False:
            return _frontend.progress_display(total, force)
        wanted = self.progress
        if wanted is None:
            try:
                wanted = self.stderr.isatty()
            except (AttributeError, ValueError):
                wanted = False
        if not wanted and not force:
            return None
        from ._progress import ProgressDisplay

        console = None
        try:
            from rich.console import Console

            console = Console(file=self.stderr)
        except ImportError:
            pass
        return ProgressDisplay(console, file=self.stderr, total=total)

    @property
    def stdout(self) -> TextIO:
        return self._stdout or sys.stdout

    @property
    def stderr(self) -> TextIO:
        return self._stderr or sys.stderr

    def write_record(self, job: Job, record: Record) -> None:
        stream = record.stream
        where = record.computer_name
        prefix = f"[{where}] " if where and where != "localhost" else ""
        if stream is Stream.INFORMATION:
            print(f"{prefix}{record.message}", file=self.stdout)
        elif stream is Stream.WARNING:
            print(f"{prefix}WARNING: {record.message}", file=self.stderr)
        elif stream is Stream.ERROR:
            print(f"{prefix}{record.message}", file=self.stderr)
        elif stream is Stream.VERBOSE and self.verbose:
            print(f"{prefix}VERBOSE: {record.message}", file=self.stderr)
        elif stream is Stream.DEBUG and self.debug:
            print(f"{prefix}DEBUG: {record.message}", file=self.stderr)

    def read_input(self, job: Job, prompt: str) -> str | None:
        """Answer a job's prompt: asks the user when stdin is a terminal (or the front end can), else
        None (no answer)."""
        if _frontend is not None:
            return _frontend.read_input(job, prompt)
        stdin = sys.stdin
        if stdin is None or not stdin.isatty():
            return None
        return input(f"[{shown_name(job)}] {prompt}")

    def write_blocked(self, job: Job, prompt: str) -> None:
        if _frontend is not None and _frontend.write_blocked(job, prompt):
            return
        print(f"WARNING: {shown_name(job)} (Blocked) waits for input: {prompt!r}; answer it with "
              f"job.send_input(text), or receive it from an interactive session", file=self.stderr)

    def write_failure(self, job: Job, reason: BaseException) -> None:
        if _frontend is not None and _frontend.write_failure(job, reason):
            return
        where = job.computer_name
        prefix = f"[{where}] " if where and where != "localhost" else ""
        text = str(reason)
        if text.startswith(f"Job {job.id} "):  # the reason names the job already: say it once
            print(f"{prefix}{text}", file=self.stderr)
        else:
            name = shown_name(job)
            if prefix and name.endswith(f" on {where}"):  # the prefix says where already
                name = name[:-len(f" on {where}")]
            print(f"{prefix}{name} failed: {reason_text(reason)}", file=self.stderr)


def reason_text(reason: BaseException) -> str:
    text = str(reason)
    name = type(reason).__name__
    return text if text.startswith(name) else f"{name}: {text}" if text else name


def describe_job(job: Job) -> str:
    """'Job 3 'backup' (Running)': how every message names a job."""
    return f"Job {job.id} {job.name!r} ({job.state})"


