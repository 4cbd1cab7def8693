"""Live progress bars for jobs: one bar per job, removed when it is done, and a jobs-done counter.

::

    receive_job / wait_job (the reader)
        |  .update(job, ProgressRecord)   .job_done(job)   .close()
        v
    ProgressDisplay --terminal or notebook--> rich Progress (one task per job, + "jobs done" task)
                    --anything else---------> plain lines, only when something visible changed

PowerShell leaves finished bars behind when it replays a job's progress records (PowerShell
#24575): here a bar goes away as soon as its record says ``completed`` or its job is done, and the
whole display is transient, so nothing stays on the screen after ``close()``. ``total`` turns on
the counter that ``Wait-Job`` lacks (PowerShell #12069): "jobs done 3/10".

The display is fed from one reader thread; it draws only when called (no refresh thread of its
own), at most every ``min_interval`` seconds for bar updates, always for bars that go away.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import TYPE_CHECKING, Any, TextIO

from .._errors import missing_dependency

if TYPE_CHECKING:
    from .._records import ProgressRecord
    from ._job import Job


def _job_label(job: Job) -> str:
    """``[9] build``: the top-level job the user knows (``%jobs`` and Get-Job never list a process
    job's hidden child), with the computer of a fan-out's child: ``[9] deploy on web1``."""
    top = job
    while top.parent is not None:
        top = top.parent
    where = job.computer_name if top is not job and len(top.child_jobs) > 1 else None
    return f"[{top.id}] {top.name}" + (f" on {where}" if where and where != "localhost" else "")


def _describe(record: ProgressRecord) -> str:
    return f"{record.activity}: {record.status}" if record.status else record.activity


class ProgressDisplay:
    """Render jobs' progress records as live bars (rich) or as plain lines.

    ``console``: a ``rich.console.Console`` to draw on (default: a new one on ``sys.stderr``).
    ``file``: where plain lines go when rich is missing or the console is not a terminal or a
    notebook (default: the console's file, else ``sys.stderr``). ``total``: how many jobs the
    caller waits for; shows a "jobs done" counter. ``plain``: force (True) or refuse (False) the
    plain-text mode; ``None`` decides from the console. Use it as a context manager::

        with ProgressDisplay(total=len(jobs)) as shown:
            for leaf, stream, record, t in session.read_entries(jobs, wait=True):
                if stream is Stream.PROGRESS:
                    shown.update(leaf, record)
            for job in jobs:
                shown.job_done(job)
    """

    def __init__(self, console: Any = None, *, file: TextIO | None = None, total: int | None = None,
                 plain: bool | None = None, min_interval: float = 0.05) -> None:
        if total is not None and (isinstance(total, bool) or not isinstance(total, int) or total < 0):
            raise ValueError(f"ProgressDisplay: total must be a whole number of jobs >= 0, not {total!r}")
        self.total = total
        self.done = 0
        self._min_interval = float(min_interval)
        self._last_draw = 0.0
        self._closed = False
        self._finished: set[int] = set()
        #: what each live bar shows, by job id (the plain mode keeps the last line it printed)
        self._bars: dict[int, str] = {}
        self._tasks: dict[int, Any] = {}
        self._plain_last: dict[int, tuple[str, int | None]] = {}
        self._progress: Any = None
        self._counter: Any = None
        no_rich: ImportError | None = None
        if console is None and plain is not True:
            try:
                from rich.console import Console
            except ImportError as exc:
                console, no_rich = None, exc
            else:
                console = Console(file=file or sys.stderr)
        self._console = console
        if plain is None:
            plain = console is None or not (console.is_terminal or getattr(console, "is_jupyter", False))
        if not plain and console is None:
            raise missing_dependency("ProgressDisplay(plain=False)", "ipython", no_rich, what="rich")
        self.plain = plain
        self._file = file if file is not None else (getattr(console, "file", None) or sys.stderr)
        if not plain:
            self._start_rich()

    # --- rich ------------------------------------------------------------------------------
    def _start_rich(self) -> None:
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

        self._progress = Progress(
            # markup=False: the text is the job's (its name, its status such as "[/data/file0]"),
            # shown as written; rich would read brackets as style tags, or fail on them.
            TextColumn("{task.description}", markup=False), BarColumn(), TaskProgressColumn(),
            console=self._console, auto_refresh=False, transient=True)
        self._progress.start()
        if self.total is not None:
            self._counter = self._progress.add_task(self._counter_text(), total=self.total or None,
                                                    completed=0)
        self._draw(force=True)

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_draw >= self._min_interval:
            self._last_draw = now
            self._progress.refresh()

    # --- the API ---------------------------------------------------------------------------
    @property
    def bars(self) -> dict[int, str]:
        """What each bar on the screen shows now, by job id (the counter is not a bar)."""
        return dict(self._bars)

    def update(self, job: Job, record: ProgressRecord) -> None:
        """Show ``record`` on ``job``'s bar; a ``completed`` record takes the bar away."""
        if self._closed or job.id in self._finished:
            return  # records replayed after the job was done must not bring its bar back
        if record.completed:
            self._remove(job)
            return
        text = f"{_job_label(job)} {_describe(record)}"
        percent = record.percent_complete
        if self.plain:
            self._bars[job.id] = text
            self._plain_update(job, record, text)
            return
        task = self._tasks.get(job.id)
        total = 100.0 if percent is not None else None
        done = max(0.0, min(100.0, float(percent))) if percent is not None else 0.0
        if task is None:
            self._tasks[job.id] = self._progress.add_task(text, total=total, completed=done)
            self._bars[job.id] = text
            self._draw(force=True)
            return
        self._progress.update(task, description=text, total=total, completed=done)
        self._bars[job.id] = text
        self._draw()

    def job_done(self, job: Job) -> None:
        """The job is finished: take its bar away and count it (once per job)."""
        if self._closed or job.id in self._finished:
            return
        self._finished.add(job.id)
        self.done += 1
        self._remove(job, redraw=False)
        if self.plain:
            if self.total is not None:
                print(f"{_job_label(job)} {job.state}: {self._counter_text()}", file=self._file)
            return
        if self._counter is not None:
            self._progress.update(self._counter, completed=self.done, description=self._counter_text())
        self._draw(force=True)

    def close(self) -> None:
        """Take every bar off the screen (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._bars.clear()
        if self._progress is not None:
            self._progress.stop()

    def __enter__(self) -> ProgressDisplay:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # --- helpers ---------------------------------------------------------------------------
    def _counter_text(self) -> str:
        return f"jobs done {self.done}/{self.total}"

    def _remove(self, job: Job, redraw: bool = True) -> None:
        self._bars.pop(job.id, None)
        self._plain_last.pop(job.id, None)
        task = self._tasks.pop(job.id, None)
        if task is not None:
            self._progress.remove_task(task)
            if redraw:
                self._draw(force=True)

    def _plain_update(self, job: Job, record: ProgressRecord, text: str) -> None:
        # A log gets a line when the activity changes or the percentage crosses a tenth, not one
        # line per record: a job may report progress thousands of times a second.
        percent = record.percent_complete
        step = None if percent is None else int(max(0.0, min(100.0, float(percent))) // 10)
        key = (record.activity, step)
        if self._plain_last.get(job.id) == key:
            return
        self._plain_last[job.id] = key
        shown = f"{text} ({float(percent):g}%)" if percent is not None else text
        print(shown, file=self._file)
