"""psjobs in a Jupyter kernel: live progress, prompts through the kernel, a status line per job in
the cell that started it, and failures shown as the user's own traceback.

::

    every Session's Host --core._pshost.set_frontend--> KernelFrontend
        progress_display(total)  --> CellProgress: one display per activity (display_id), updated
                                     in place, marked done at the end (no bar left half drawn)
        read_input(job, prompt)  --> kernel.raw_input (the front end's input box) when the front
                                     end allows stdin, else None and a notice saying how
        write_failure(job, exc)  --> the user's traceback: psjobs' frames left out, source lines
                                     from this kernel's cells filled in
    %bg / `&` / %%bg ----------> StatusLine(job): a display in the starting cell, updated by one
                                 watcher thread ("psjobs-ipython-status") on every state change,
                                 so a job that ends while the kernel is idle shows it in its own
                                 cell, and nothing is printed into later cells

In a terminal none of this is installed: the terminal keeps its bars and its notices.
"""

from __future__ import annotations

import html
import linecache
import os
import re
import sys
import threading
from typing import Any

import psjobs
from psjobs.core._job import Job
from psjobs.core._pshost import shown_name

from ._cell import RUNNER_FILENAME
from ._render import short_command

_PSJOBS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(psjobs.__file__)))
_FRAME = re.compile(r'^  File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<func>.*)$')


def in_kernel(shell: Any) -> bool:
    """Whether ``shell`` is a Jupyter kernel's (by name: importing ipykernel would be heavy)."""
    return any(c.__name__ == "ZMQInteractiveShell" for c in type(shell).__mro__)


def _display(obj: Any, **kwargs: Any) -> Any:
    from IPython.display import display

    return display(obj, **kwargs)  # type: ignore[no-untyped-call]


class _Text:
    """A display value with a plain and an HTML form (the notebook shows the HTML)."""

    def __init__(self, text: str, markup: str) -> None:
        self.text = text
        self.markup = markup

    def __repr__(self) -> str:
        return self.text

    def _repr_html_(self) -> str:
        return self.markup


# --- progress ---------------------------------------------------------------------------------

def _bar(percent: int | None, width: int = 30) -> str:
    if percent is None or percent < 0:
        return "-" * width
    filled = min(width, max(0, percent * width // 100))
    return "#" * filled + "." * (width - filled)


class CellProgress:
    """Live progress in the cell that waits: one display per (job, activity), updated in place."""

    def __init__(self, total: int | None = None) -> None:
        self.total = total
        self.done = 0
        self._bars: dict[tuple[int, str], Any] = {}   # (job id, activity) -> display handle
        self._last: dict[tuple[int, str], str] = {}
        self._counter: Any = None
        if total:
            self._counter = _display(self._count_text(), display_id=True)

    def _count_text(self) -> _Text:
        text = f"jobs done {self.done}/{self.total}"
        return _Text(text, f"<code>{html.escape(text)}</code>")

    def update(self, job: Job, record: Any) -> None:
        activity = str(getattr(record, "activity", "") or "progress")
        key = (job.id, activity)
        percent = getattr(record, "percent_complete", None)
        status = getattr(record, "status", "") or ""
        if getattr(record, "completed", False):
            text = f"{shown_name(job)} {activity}: done"
        else:
            pct = f"{percent:3d}%" if isinstance(percent, int) and percent >= 0 else "    "
            text = f"{shown_name(job)} {activity} [{_bar(percent)}] {pct} {status}".rstrip()
        if self._last.get(key) == text:
            return
        self._last[key] = text
        value = _Text(text, f"<pre style='margin:0'>{html.escape(text)}</pre>")
        handle = self._bars.get(key)
        if handle is None:
            self._bars[key] = _display(value, display_id=True)
        else:
            handle.update(value)

    def job_done(self, job: Job) -> None:
        for (jid, activity), handle in self._bars.items():
            if jid == job.id and not self._last.get((jid, activity), "").endswith(": done"):
                text = f"{shown_name(job)} {activity}: done ({job.state})"
                self._last[(jid, activity)] = text
                handle.update(_Text(text, f"<pre style='margin:0'>{html.escape(text)}</pre>"))
        if self._counter is not None:
            self.done += 1
            self._counter.update(self._count_text())

    def close(self) -> None:
        # Every bar says "done" by now or keeps its last state: nothing is left half drawn.
        return None

    def __enter__(self) -> CellProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --- failures ---------------------------------------------------------------------------------

def user_traceback(reason: BaseException) -> str:
    """The traceback of the job's own code: the remote text (``__cause__``) with psjobs' frames
    left out and source lines filled in from this kernel (cells are in its linecache)."""
    cause = reason.__cause__
    text = str(cause).strip().strip('"').strip() if cause is not None else ""
    if "Traceback (most recent call last):" not in text:
        return f"{type(reason).__name__}: {reason}"
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        m = _FRAME.match(line)
        if m is None:
            out.append(line)
            i += 1
            continue
        # the frame's own source line(s) and caret marks follow, indented by 4 spaces
        j = i + 1
        while j < len(lines) and lines[j].startswith("    "):
            j += 1
        body = lines[i + 1:j]
        path = m.group("file")
        if path == RUNNER_FILENAME or os.path.abspath(path).startswith(_PSJOBS_DIR + os.sep):
            i = j
            continue  # psjobs' own frames: the worker, the runner of %%bg (compiled, not a file)
        out.append(line)
        if body:
            out.extend(body)
        else:
            source = linecache.getline(path, int(m.group("line"))).strip()
            if source:
                out.append(f"    {source}")
        i = j
    return "\n".join(out)


# --- status lines -----------------------------------------------------------------------------

def _status(job: Job) -> _Text:
    state = str(job.state)
    text = f"[{job.id}] {state}  {short_command(job.command)}"
    if job.state is psjobs.JobState.FAILED and job.reason is not None:
        text += f"  ({type(job.reason).__name__}: {job.reason}; %receive {job.id} shows the traceback)"
    elif job.state is psjobs.JobState.BLOCKED:
        text += f"  (waits for input: %receive {job.id} to answer)"
    color = {"Completed": "#2a7", "Failed": "#c33", "Stopped": "#a70", "Blocked": "#a70"}.get(state, "#36c")
    markup = (f"<code>[{job.id}] <span style='color:{color}'>{html.escape(state)}</span> "
              f"{html.escape(text.split('  ', 1)[1])}</code>")
    return _Text(text, markup)


class StatusWatcher:
    """One thread updates every status line when its job changes state; it ends when nothing is
    left to watch (and on unload), so no thread outlives its use."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lines: dict[int, tuple[Job, Any, str]] = {}   # job id -> (job, display, last text)
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()

    def add(self, job: Job) -> None:
        shown = _status(job)
        handle = _display(shown, display_id=True)
        with self._lock:
            self._lines[job.id] = (job, handle, shown.text)
            if self._thread is None or not self._thread.is_alive():
                self._closing.clear()
                self._thread = threading.Thread(target=self._run, name="psjobs-ipython-status", daemon=True)
                self._thread.start()

    def add_once(self, job: Job) -> None:
        with self._lock:
            if job.id in self._lines:
                return
        self.add(job)

    def refresh(self) -> bool:
        """Update the lines whose job changed; True while some job is not finished."""
        with self._lock:
            items = list(self._lines.items())
        live = False
        for jid, (job, handle, last) in items:
            shown = _status(job)
            if shown.text != last:
                handle.update(shown)
                with self._lock:
                    self._lines[jid] = (job, handle, shown.text)
            if job.state.is_finished:
                with self._lock:
                    self._lines.pop(jid, None)
            else:
                live = True
        return live

    def _run(self) -> None:
        while not self._closing.is_set():
            with self._lock:
                jobs = [job for job, _, _ in self._lines.values()]
            if not jobs:
                with self._lock:
                    if not self._lines:
                        self._thread = None
                        return
                continue
            try:
                session = jobs[0].session
                session.wait_job(jobs, any=True, timeout=0.25)
            except Exception:
                self._closing.wait(0.25)  # removed or closed under us: look again
            self.refresh()

    def close(self) -> None:
        self._closing.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2)


# --- the front end ----------------------------------------------------------------------------

class KernelFrontend:
    """What every psjobs Session of this kernel shows through (see core._pshost.set_frontend)."""

    def __init__(self, shell: Any) -> None:
        self.shell = shell

    def progress_display(self, total: int | None, force: bool) -> CellProgress | None:
        if threading.current_thread() is not threading.main_thread():
            return None  # a display from another thread would land in whatever cell runs
        return CellProgress(total)

    def _kernel(self) -> Any:
        return getattr(self.shell, "kernel", None)

    def can_ask(self) -> bool:
        kernel = self._kernel()
        return bool(kernel is not None and getattr(kernel, "_allow_stdin", False)
                    and threading.current_thread() is threading.main_thread())

    def read_input(self, job: Job, prompt: str) -> str | None:
        if not self.can_ask():
            return None
        try:
            return str(self._kernel().raw_input(f"[{shown_name(job)}] {prompt}"))
        except Exception:
            return None  # the front end refused (StdinNotImplementedError) or went away

    def write_blocked(self, job: Job, prompt: str) -> bool:
        top = job
        while top.parent is not None:
            top = top.parent
        print(f"{shown_name(job)} (Blocked) waits for input: {prompt!r}. This front end does not "
              f"allow input requests, so answer it with psjobs.get_job({top.id})[0].send_input(text) "
              f"(or run %receive {top.id} from a front end that allows input, such as JupyterLab)",
              file=sys.stderr)
        return True

    def write_failure(self, job: Job, reason: BaseException) -> bool:
        print(f"{shown_name(job)} failed: {type(reason).__name__}: {reason}", file=sys.stderr)
        trace = user_traceback(reason)
        if "\n" in trace:
            print(trace, file=sys.stderr)
        return True
