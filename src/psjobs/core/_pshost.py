"""What shows a job's records to a person: PowerShell's PSHost, here :class:`Host`.

::

    receive_job / wait_job --records the caller does not get back--> Host.write_record
                                                                     --> sys.stdout / sys.stderr
    a Blocked job's prompt --> Host.read_input (a terminal asks) / Host.write_blocked (a notice)
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, TextIO

from .._records import Record, Stream

if TYPE_CHECKING:
    from ._job import Job


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
        """Answer a job's prompt: asks the user when stdin is a terminal, else None (no answer)."""
        stdin = sys.stdin
        if stdin is None or not stdin.isatty():
            return None
        return input(f"[Job {job.id} {job.name}] {prompt}")

    def write_blocked(self, job: Job, prompt: str) -> None:
        print(f"WARNING: Job {job.id} {job.name!r} (Blocked) waits for input: {prompt!r}; answer it with "
              f"job.send_input(text), or receive it from an interactive session", file=self.stderr)

    def write_failure(self, job: Job, reason: BaseException) -> None:
        where = job.computer_name
        prefix = f"[{where}] " if where and where != "localhost" else ""
        text = str(reason)
        if text.startswith(f"Job {job.id} "):  # the reason names the job already: say it once
            print(f"{prefix}{text}", file=self.stderr)
        else:
            print(f"{prefix}Job {job.id} {job.name!r} failed: {reason_text(reason)}", file=self.stderr)


def reason_text(reason: BaseException) -> str:
    text = str(reason)
    name = type(reason).__name__
    return text if text.startswith(name) else f"{name}: {text}" if text else name


def describe_job(job: Job) -> str:
    """'Job 3 'backup' (Running)': how every message names a job."""
    return f"Job {job.id} {job.name!r} ({job.state})"


