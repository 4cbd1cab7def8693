"""psjobs in IPython and Jupyter: the background operator ``&``, job magics, rich display.

Load it with ``%load_ext psjobs`` (or ``%load_ext psjobs.ipython``), or open a shell that has it
with ``psjobs shell``. Then::

    total = slow_sum(data) &        # a process job; `total` is the Job
    !make all &                     # a shell command job
    %jobs                           # the Get-Job table
    %receive total                  # its output: [...]

How a line becomes a job::

    cell text --IPython token transforms--> BackgroundOperator.find/transform
        "total = slow_sum(data) &"  -->  "total = get_ipython().run_line_magic('bg', 'slow_sum(data)')"
        "!make all &"               -->  "get_ipython().run_line_magic('bg', '!make all')"
    %bg magic (the cell's frame as local scope)
        --> lambda compiled over the namespace --> psjobs.start_job   (process: names copied)
                                               --> psjobs.start_thread_job (thread: shared)
        --> the Job is the value of the line; the announcer watches it
    post_run_cell --> "[3] Completed  slow_sum(data)" once, before the next prompt

``%config PsJobs.kind = 'thread'`` makes ``&`` start thread jobs (they share the namespace);
``%bg --thread EXPR`` does it for one job. See docs/ipython.md.

The parts: ``_operator`` (the `` &`` transform), ``_magics`` (%bg and the verbs), ``_render``
(tables and announcements); this module holds the settings, the per-shell extension (display
formatters, the announcer) and the entry points.
"""


from __future__ import annotations

import shutil
import sys
from collections.abc import Iterable
from typing import Any

from psjobs._errors import missing_dependency

try:
    import IPython  # noqa: F401  (first, so that a missing IPython gets the install line)
except ImportError as _exc:
    raise missing_dependency("psjobs.ipython (the IPython extension and `psjobs shell`)", "ipython",
                             _exc) from _exc

from traitlets import Bool, Enum
from traitlets.config import Configurable

import psjobs
from psjobs.core._format import JobList, format_table
from psjobs.core._job import Job
from psjobs.core._pshost import set_frontend

from ._kernel import KernelFrontend, StatusWatcher, in_kernel
from ._magics import JobMagics
from ._operator import BackgroundOperator
from ._render import announcement, render_html, render_rich, short_command

__all__ = [
    "BackgroundOperator",
    "JobMagics",
    "PsJobs",
    "announcement",
    "load_ipython_extension",
    "render_html",
    "render_rich",
    "start_shell",
    "unload_ipython_extension",
]


class PsJobs(Configurable):
    """Settings of the psjobs extension (``%config PsJobs`` lists them)."""

    kind = Enum(["process", "thread"], default_value="process",
                help="What a line ending in ' &' starts: 'process' (a BackgroundJob, as PowerShell's & "
                     "does; the names the line uses are copied into it) or 'thread' (a ThreadJob that "
                     "shares the namespace).").tag(config=True)
    announce = Bool(True, help="Say once, before the next prompt, that a job started from the shell "
                               "has finished.").tag(config=True)
    rich = Bool(True, help="Draw job tables with rich in a terminal, when rich is installed."
                ).tag(config=True)


# --- the extension --------------------------------------------------------------------------

class _Extension:
    """What one shell has loaded: the transform, the magics, the formatters, the announcer."""

    #: more finished jobs than this at once are announced in one summary line
    MAX_LINES = 5

    def __init__(self, shell: Any) -> None:
        self.shell = shell
        self.config = PsJobs(parent=shell)
        self.magics = JobMagics(shell, self)
        self._watched: dict[int, Job] = {}
        self._told_blocked: set[int] = set()
        self._last_id = 0
        self._printers: list[tuple[str, type | str]] = []
        #: in a Jupyter kernel: status lines in the starting cell instead of notices in later ones
        self.in_kernel = in_kernel(shell)
        self.status = StatusWatcher() if self.in_kernel else None
        self._previous_frontend: Any = None

    # --- lifetime --------------------------------------------------------------------------
    def load(self) -> None:
        shell = self.shell
        shell.configurables.append(self.config)
        shell.input_transformer_manager.token_transformers.append(BackgroundOperator)
        shell.register_magics(self.magics)
        plain = shell.display_formatter.formatters["text/plain"]
        rich_html = shell.display_formatter.formatters["text/html"]
        # A connected session's HostJob defines its own __repr__, which IPython's plain-text
        # printer prefers to a printer registered for a base class: it is named too (by name, so
        # that loading the extension does not import the host's client).
        for cls in (Job, JobList, "psjobs._connect.HostJob"):
            plain.for_type(cls, self._pretty)
            rich_html.for_type(cls, self._html)
            self._printers += [("text/plain", cls), ("text/html", cls)]
        self._last_id = max((j.id for j in self._jobs_now()), default=0)
        shell.events.register("post_run_cell", self.post_run_cell)
        if self.in_kernel:
            self._previous_frontend = set_frontend(KernelFrontend(shell))

    def unload(self) -> None:
        shell = self.shell
        with _suppress():
            shell.events.unregister("post_run_cell", self.post_run_cell)
        transformers = shell.input_transformer_manager.token_transformers
        while BackgroundOperator in transformers:
            transformers.remove(BackgroundOperator)
        for kind in ("line", "cell"):
            registry = shell.magics_manager.magics[kind]
            for name in self.magics.magics[kind]:  # every magic of ours, %suspend and %%bg too
                fn = registry.get(name)
                if getattr(fn, "__self__", None) is self.magics:
                    del registry[name]
        if self.in_kernel:
            set_frontend(self._previous_frontend)
        if self.status is not None:
            self.status.close()
        shell.magics_manager.registry.pop(type(self.magics).__name__, None)
        for mime, cls in self._printers:
            with _suppress():
                shell.display_formatter.formatters[mime].pop(cls)
        self._printers.clear()
        if self.config in shell.configurables:
            shell.configurables.remove(self.config)

    # --- display ---------------------------------------------------------------------------
    def _jobs_of(self, obj: Any) -> list[Job] | None:
        if isinstance(obj, Job):
            return [obj]
        if obj and all(isinstance(j, Job) for j in obj):
            return list(obj)
        return None

    def _pretty(self, obj: Any, p: Any, cycle: bool) -> None:
        if isinstance(obj, JobList) and not obj:
            p.text(_NO_JOBS)
            return
        jobs = self._jobs_of(obj)
        if jobs is None:
            p.text(list.__repr__(obj))
            return
        if self._use_rich():
            width = shutil.get_terminal_size((100, 24)).columns
            color = str(getattr(self.shell, "colors", "")).lower() != "nocolor"
            p.text(render_rich(jobs, width=width, color=color))
        else:
            p.text(format_table(jobs))

    def _html(self, obj: Any) -> str | None:
        if isinstance(obj, JobList) and not obj:
            return f"<i>{_NO_JOBS}</i>"
        jobs = self._jobs_of(obj)
        return None if jobs is None else render_html(jobs)

    def _use_rich(self) -> bool:
        # By name: importing IPython.terminal would pull prompt_toolkit into a notebook kernel.
        terminal = any(c.__name__ == "TerminalInteractiveShell" for c in type(self.shell).__mro__)
        if not self.config.rich or not terminal:
            return False
        try:
            if not sys.stdout.isatty():
                return False
            import rich  # noqa: F401
        except (ImportError, AttributeError, ValueError):
            return False
        return True

    # --- announcements ---------------------------------------------------------------------
    def started(self, job: Job) -> None:
        """A job this shell started: a status line in its cell (kernel), or a notice when done."""
        if self.status is not None:
            self.status.add(job)
        else:
            self.watch(job)

    def watch(self, job: Job) -> None:
        """Announce this job once when it is finished."""
        self._watched[job.id] = job

    def seen(self, jobs: Iterable[Any]) -> None:
        """The user has just waited for or received these: a finished one needs no announcement."""
        for job in jobs:
            if isinstance(job, Job) and job.state.is_finished:
                self._watched.pop(job.id, None)
            elif isinstance(job, int):
                found = self._watched.get(job)
                if found is not None and found.state.is_finished:
                    del self._watched[job]

    def forget(self, jobs: Iterable[Any]) -> None:
        for job in jobs:
            self._watched.pop(job.id if isinstance(job, Job) else job, None)

    @staticmethod
    def _jobs_now() -> list[Job]:
        from psjobs._api import existing_default_session

        if existing_default_session() is None:
            return []  # nothing started yet: do not create the session just to look
        return list(psjobs.get_job())

    def post_run_cell(self, result: Any = None) -> None:
        # Jobs this cell started some other way (psjobs.start_job(...)) that are still running
        # when it ends are background jobs too; those it waited for itself are not announced.
        jobs = self._jobs_now()
        before = newest = self._last_id  # jobs above it were started by this cell
        for job in jobs:
            if job.id > self._last_id:
                newest = max(newest, job.id)
                if not job.state.is_finished:
                    if self.status is not None:
                        self.status.add_once(job)  # still this cell's output: its status line
                    else:
                        self._watched.setdefault(job.id, job)
        self._last_id = newest
        if self.status is not None:
            self.status.refresh()  # what changed during the cell shows before it ends
            return  # a kernel prints nothing into later cells: the status lines say it
        if not self._watched:
            return
        live = {j.id for j in jobs}
        done: list[Job] = []
        asking: list[Job] = []
        for jid, job in list(self._watched.items()):
            if jid not in live:
                del self._watched[jid]  # removed by the user: nothing to announce
            elif job.state.is_finished and jid <= before:
                done.append(job)
                del self._watched[jid]
            # A job that ended within the cell that started it is announced after the next cell,
            # as a shell says "Done" at the prompt after the one its `&` returned to: where the
            # notice appears does not depend on how fast the job was.
            elif job.state is psjobs.JobState.BLOCKED and jid not in self._told_blocked:
                asking.append(job)  # a shell says "Stopped (tty input)": say it once too
                self._told_blocked.add(jid)
        self._told_blocked.intersection_update(self._watched)
        if not self.config.announce:
            return
        for job in asking:
            prompt = next((j.prompt for j in [job, *job.child_jobs] if j.prompt), None)
            asked = f" {prompt.strip()!r}" if prompt else ""
            print(f"[{job.id}] Blocked  {short_command(job.command)}  (waits for input{asked}: "
                  f"%receive {job.id} to answer)")
        if done:
            print(announcement(done, self.MAX_LINES))


_NO_JOBS = "No jobs. Start one with `expr &`, %bg EXPR or psjobs.start_job(...)."


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> bool:
        return exc_type is not None and issubclass(exc_type, (ValueError, KeyError, LookupError))


_loaded: dict[int, _Extension] = {}


def load_ipython_extension(ip: Any) -> None:
    """Called by ``%load_ext psjobs.ipython``: install ``&``, the magics and the display."""
    if id(ip) in _loaded:
        return  # loaded already, perhaps under the other name (psjobs / psjobs.ipython)
    ext = _Extension(ip)
    ext.load()
    _loaded[id(ip)] = ext


def unload_ipython_extension(ip: Any) -> None:
    """Called by ``%unload_ext``: take everything out again (running jobs go on)."""
    ext = _loaded.pop(id(ip), None)
    if ext is not None:
        ext.unload()


def start_shell(argv: list[str] | None = None) -> int:
    """Open an IPython terminal shell with the extension loaded; return its exit status.

    ``argv`` are IPython's own command-line options (``--no-banner``, ``--colors=NoColor``...).
    """
    from IPython import start_ipython

    args = ["--ext", "psjobs.ipython",
            "--TerminalInteractiveShell.banner2=psjobs: end a line with ' &' to run it as a job; "
            "%jobs, %receive, %wait, %stop, %remove manage them.\n",
            *(argv or [])]
    try:
        start_ipython(argv=args)  # type: ignore[no-untyped-call]
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0
