"""The scheduler: jobs that wait for a group slot, their dependencies or a delay; retries; restart.

::

    start_* --checks (make_when: before any job exists)--> make_tree (top NotStarted)
            --> Scheduler.submit(top, ports, backend, recipe)         [no group/after/delay:
                                                                       backend.start at once]
    psjobs-sched thread, waiting on the session's condition (every end, stop and group change
    notifies it; a delay sets its timeout):
        under the lock, held jobs in the order they came: a dependency Failed/Stopped -> the
            leaves Fail (reason names it); finished while held (a stop) -> dropped; waiting ->
            status_message says for what; ready -> counted in its group, taken out
        outside the lock: backend.start(ports, spec) for what was taken out, in order
    JobPort.ended(failed) of a leaf with retries left --> retry_locked: its tail and a warning
        kept, the leaf stays Running --> psjobs-sched thread: once backend.can_rerun(port),
        backend.start([port], spec) again (or Stopped, if a stop came in between)
    Session.on_finished(job, fn) --> psjobs-sched thread calls fn(job) once it is finished
        (the session host's PSJOBS_CALLBACK)
    a pass that raises is logged on the psjobs logger and the thread goes on; a held job that
        cannot be checked fails alone (its reason says why)

A group's ``parallel`` counts its top-level jobs between their release and their end (a fan-out
over 5 computers is one job, as a pueue task is one). Pausing a group holds its waiting jobs; the
running ones go on (pueue's ``pause --wait``). Every decision is made under the session's lock
and no backend is called under it, as everywhere in the core.

The thread throttle (``thread_throttle_limit``) stays in the thread backend's own queue, below
any group: there a finishing worker thread admits the next job itself, with no hop through this
thread, on the path that starts a thread job in ~70 us.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import reprlib
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from .._errors import JobNotFinishedError, JobStateError
from .._records import Record, Stream
from ._job import Job
from ._pshost import describe_job, reason_text
from ._spec import CALL
from ._state import Event, JobState

if TYPE_CHECKING:
    from ._backend import Backend
    from ._port import JobPort, Outcome
    from ._session import Session
    from ._spec import JobSpec

_GROUP_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
# The latest start a delay may ask for: the status message shows it as a datetime, which ends with
# the year 9999 (a delay of 1e12 s, the year 33715, raised there, in the scheduler's thread).
_LAST_START = datetime(9999, 1, 1, tzinfo=timezone.utc).timestamp()
# The longest the scheduler's thread waits at once: a delay is wall-clock time and a wait is not
# (a suspend or a clock change moves one and not the other), and Condition.wait raises
# OverflowError past threading.TIMEOUT_MAX (~292 years), which killed the thread.
_LONGEST_WAIT = 60.0
_log = logging.getLogger("psjobs")


@dataclass
class When:
    """A start's scheduling options, checked: which group, after which jobs, not before when."""

    group: str | None = None
    after: list[Job] = field(default_factory=list)
    not_before: float | None = None       # time.time()
    delay: float | datetime | None = None  # as given, for a restart
    retries: int = 0

    @property
    def holds(self) -> bool:
        """True when the job must wait in the scheduler (NotStarted) before it runs."""
        return self.group is not None or bool(self.after) or self.not_before is not None


@dataclass
class Group:
    """A named queue: at most ``parallel`` of its jobs run at once; ``paused`` holds the rest."""

    name: str
    parallel: int = 1
    paused: bool = False
    active: list[Job] = field(default_factory=list)  # released, not finished yet

    def running(self) -> int:
        self.active = [j for j in self.active if not j._state.is_finished]
        return len(self.active)


@dataclass
class _Held:
    top: Job
    ports: list[JobPort]
    spec: JobSpec
    backend: Backend
    when: When


@dataclass
class _Retry:
    left: int
    total: int
    spec: JobSpec
    backend: Backend


_PLAIN: dict[tuple[str, str, bool, None, None], tuple[str, str, bool, None, None]] = {}  # shared


def keep_recipe(kind: str, spec: JobSpec, job_type: str, name: str | None, parent: bool,
                when: When | None) -> JobSpec:
    """Write what restart_job needs on the spec, which the top-level job keeps until remove_job.

    Every finished top-level job keeps it: it was a tuple of its own beside the spec, ~100 bytes a
    finished thread job. A start without a name or scheduling options shares one tuple per verb.
    """
    if name is None and when is None:
        plain = (kind, job_type, parent, None, None)
        spec.recipe = _PLAIN.setdefault(plain, plain)
    else:
        spec.recipe = (kind, job_type, parent, name, when)
    return spec


def check_group_name(verb: str, name: Any) -> str:
    if not isinstance(name, str):
        raise TypeError(f"{verb}: a group name must be a str, not {type(name).__name__}")
    if not _GROUP_NAME.fullmatch(name):
        raise ValueError(f"{verb}: group name {name!r} is not valid; use 1 to 64 letters, digits, '_', "
                         f"'-' or '.', not starting with '-' or '.'")
    return name


def check_parallel(verb: str, parallel: Any) -> int:
    if isinstance(parallel, bool) or not isinstance(parallel, int) or not 1 <= parallel <= 1_000_000:
        raise ValueError(f"{verb}: parallel must be a whole number from 1 to 1000000, not {parallel!r}")
    return parallel


def make_when(session: Session, verb: str, group: Any, after: Any, delay: Any, retries: Any) -> When | None:
    """Check a start's scheduling options (TypeError/ValueError/JobNotFoundError before any job
    exists); None when there are none, the common case, which costs nothing more."""
    if group is None and after is None and delay is None and retries == 0 and type(retries) is int:
        return None
    when = When()
    if group is not None:
        check_group_name(verb, group)
        if group not in session._sched.groups:
            raise ValueError(f"{verb}: there is no group {group!r}; make it first with "
                             f"configure_group({group!r}, parallel=N)")
        when.group = group
    if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 1000:
        raise ValueError(f"{verb}: retries must be a whole number from 0 to 1000 (runs after a failed "
                         f"one), not {retries!r}")
    when.retries = retries
    if delay is not None:
        when.delay = delay
        when.not_before = not_before(verb, delay)
    if after is not None:
        if isinstance(after, (str, bytes)) or not isinstance(after, Iterable):
            after = [after]
        jobs: list[Job] = []
        for item in after:
            if isinstance(item, Job):
                with session._cond:
                    known = session._all.get(item.id) is item
                if not known:
                    raise ValueError(f"{verb}: after= names {describe_job(item)}, which is not a job of this "
                                     f"session (removed, or started in another one); name a job it has")
                jobs.append(item)
            else:
                jobs.extend(session._resolve(item, verb))
        when.after = list({j.id: j for j in jobs}.values())
    return when


def not_before(verb: str, delay: Any) -> float:
    """When a job given ``delay`` may start (time.time()); ValueError for a delay that is no time
    from now to the end of the year 9998."""
    what = "delay must be finite seconds >= 0 or a datetime before the year 9999"
    if isinstance(delay, datetime):
        try:
            at = (delay if delay.tzinfo is not None else delay.astimezone()).timestamp()
        except (OverflowError, ValueError, OSError) as exc:  # the ends of datetime's range
            raise ValueError(f"{verb}: delay={delay!r} is no time this system can wait for ({exc}); "
                             f"{what}") from None
    elif isinstance(delay, bool) or not isinstance(delay, (int, float)):
        raise ValueError(f"{verb}: {what}, not {reprlib.repr(delay)}")
    else:
        try:
            seconds = float(delay)
        except OverflowError:  # an int past float's range
            seconds = math.inf
        if math.isnan(seconds) or seconds < 0:
            raise ValueError(f"{verb}: {what}, not {delay!r}")
        at = time.time() + seconds
    if not at < _LAST_START:
        shown = reprlib.repr(delay) if type(delay) is int else repr(delay)  # not 400 digits
        raise ValueError(f"{verb}: delay={shown} would start the job after 9998-12-31, the "
                         f"latest start (about {(_LAST_START - time.time()) / 31_557_600:,.0f} years from now); "
                         f"{what}")
    return at


class Scheduler:
    """One per session: its groups, held jobs, retries and restart recipes (see the module doc)."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.groups: dict[str, Group] = {}
        self.retries: dict[int, _Retry] = {}    # leaf id -> retries left (read by JobPort.ended)
        self._held: list[_Held] = []
        self._again: list[tuple[JobPort, _Retry]] = []  # failed runs to start again
        self._again_at = 0.0  # not before (time.time()): a backend not ready for one yet
        self.watch: list[tuple[Job, Callable[[Job], None]]] = []  # on_finished: the host's callback
        self._thread: threading.Thread | None = None

    # --- starting ----------------------------------------------------------------------------
    def submit(self, top: Job, ports: list[JobPort], backend: Backend, spec: JobSpec) -> None:
        """Start a new job's leaves now, or hold them until they may run (``spec`` carries its
        recipe: keep_recipe)."""
        when: When | None = spec.recipe[4] if spec.recipe is not None else None
        top._recipe = spec  # how it was started (keep_recipe), for restart_job; dropped by remove_job
        if when is None:
            if ports:
                backend.start(ports, spec)
            return
        with self.session._cond:
            if when.retries:
                for port in ports:
                    self.retries[port.job_id] = _Retry(when.retries, when.retries + 1, spec, backend)
            if when.holds:
                self._held.append(_Held(top, ports, spec, backend, when))
                self._scan_messages_locked(top, when)
                self.session._cond.notify_all()  # a scheduler thread already waiting looks again
        self._ensure_thread()
        if not when.holds and ports:
            backend.start(ports, spec)

    def _scan_messages_locked(self, top: Job, when: When) -> None:
        # A first status message at once, so a get_job right after the start says why it waits;
        # the jobs of its group held before it take the free slots first.
        ahead: dict[str, int] = {}
        if when.group is not None:
            ahead[when.group] = sum(1 for h in self._held[:-1] if h.when.group == when.group
                                    and not h.top._state.is_finished)
        try:
            why = _waiting_for(self, when, time.time(), ahead)
        except Exception:  # the job exists: not raised to its start, the scheduler's thread fails it
            why = ""
        _set_status(top, why or "starting")

    def _ensure_thread(self) -> None:
        with self.session._cond:
            if self._thread is not None or not (self._held or self.retries or self.watch):
                return
            thread = self._thread = threading.Thread(target=self._loop, name="psjobs-sched", daemon=True)
        thread.start()

    def _loop(self) -> None:
        cond = self.session._cond
        try:
            while True:
                try:
                    if not self._pass():
                        return
                except Exception:
                    # One failed pass must not leave every held job NotStarted for good (a far-off
                    # delay's OverflowError did, silently): say so and go on, not in a tight loop.
                    _log.exception("psjobs: the scheduler thread (psjobs-sched) failed; it goes on")
                    with cond:
                        cond.wait(0.1)
        finally:
            with cond:
                if self._thread is threading.current_thread():
                    self._thread = None  # ended by anything else: the next start starts another

    def _pass(self) -> bool:
        """Wait until something can be done, and do it; False when nothing is left to wait for."""
        cond = self.session._cond
        with cond:
            while True:
                release, deadline = self._scan_locked(time.time())
                again: list[tuple[JobPort, _Retry]] = []
                if self._again and time.time() >= self._again_at:
                    again, self._again = self._again, []
                done = [w for w in self.watch if w[0]._state.is_finished]
                if done:
                    self.watch = [w for w in self.watch if not w[0]._state.is_finished]
                if release or again or done:
                    break
                if not self._held and not self.retries and not self.watch and not self._again:
                    self._thread = None  # checked after the scan, which drops some
                    return False
                if self._again:
                    # A retry waits for its backend to let go of the last run, which it reports
                    # to nobody: poll, briefly (a process job's exit report comes in ~1 ms).
                    deadline = min(deadline or math.inf, self._again_at)
                cond.wait(None if deadline is None else min(max(0.0, deadline - time.time()), _LONGEST_WAIT))
        for held in release:
            self._start(held.backend, held.ports, held.spec)
        later = []
        for port, retry in again:
            if port.stop_requested:
                from ._port import Outcome

                port.ended(Outcome.stopped())
                continue
            try:
                ready = retry.backend.can_rerun(port)  # asked outside the lock, as every backend call
            except Exception as exc:
                self._start_failed([port], exc)
                continue
            if ready:
                self._start(retry.backend, [port], retry.spec)
            else:
                later.append((port, retry))
        if later:
            with cond:
                self._again.extend(later)
                self._again_at = time.time() + 0.002
        for job, fn in done:
            try:
                fn(job)
            except BaseException:  # logged, never lost, and never stops the queue (a sys.exit too)
                _log.exception("psjobs: the finish callback of %r failed", job)
        return True

    @staticmethod
    def _start(backend: Backend, ports: list[JobPort], spec: JobSpec) -> None:
        try:
            backend.start(ports, spec)
        except Exception as exc:  # a job must fail, never hang NotStarted, when its start breaks
            Scheduler._start_failed(ports, exc)

    @staticmethod
    def _start_failed(ports: list[JobPort], exc: Exception) -> None:
        from ._port import Outcome

        for port in ports:
            port.ended(Outcome.failed(exc))

    def _scan_locked(self, now: float) -> tuple[list[_Held], float | None]:
        release: list[_Held] = []
        keep: list[_Held] = []
        deadline: float | None = None
        for held in self._held:
            top, when = held.top, held.when
            if top._state.is_finished or self.session._all.get(top.id) is not top:
                for leaf in top._leaves():  # stopped (or removed) while it waited: it never runs
                    self.retries.pop(leaf.id, None)
                _set_status(top, "")
                continue
            try:
                failed = next((d for d in when.after if d._state in (JobState.FAILED, JobState.STOPPED)), None)
                if failed is not None:
                    self._fail_locked(top, f"it runs after {describe_job(failed)}, which did not complete; "
                                           f"restart that one, then this one with restart_job({top.id}) "
                                           f"(`psjobs restart {top.id}`)")
                    continue
                if when.not_before is not None and when.not_before > now:
                    deadline = when.not_before if deadline is None else min(deadline, when.not_before)
                why = _waiting_for(self, when, now, {})
            except Exception as exc:  # this job fails, and the others are not held up by it
                _log.exception("psjobs: the scheduler could not check %r", top)
                self._fail_locked(top, f"the scheduler could not check when it may run ({reason_text(exc)}); "
                                       f"start it again with restart_job({top.id})")
                continue
            if why:
                _set_status(top, why)
                keep.append(held)
                continue
            _set_status(top, "")
            if when.group is not None:  # its slot is taken from now on (and for the jobs after it)
                self.groups[when.group].active.append(top)
            release.append(held)
        self._held = keep
        return release, deadline

    def _fail_locked(self, top: Job, why: str) -> None:
        """A held job ends Failed without running; ``why`` says why and what to do."""
        err = JobStateError(f"{describe_job(top)} did not run: {why}")
        _set_status(top, "")  # it waits no more: "waiting for Job 1 ... (Running)" stayed on it
        for leaf in top._leaves():
            self.retries.pop(leaf.id, None)
            leaf._apply(Event.FAIL, reason=err)

    # --- retries (JobPort.ended, under the session's lock) -------------------------------------
    def retry_locked(self, job: Job, outcome: Outcome, tail: list[Any]) -> bool:
        """A leaf's run failed: True if it runs again (its tail and a warning kept, still Running)."""
        retry = self.retries.get(job.id)
        if retry is None or outcome.kind != "failed" or job._stop_requested or retry.left <= 0:
            self.retries.pop(job.id, None)
            return False
        retry.left -= 1
        if retry.left == 0:
            del self.retries[job.id]
        runs = retry.total - retry.left
        why = reason_text(outcome.reason) if outcome.reason is not None else f"exit code {outcome.exit_code}"
        text = f"attempt {runs - 1} of {retry.total} failed ({why}); running it again"
        t = time.time()
        job._extend([*tail, (Stream.WARNING, Record(Stream.WARNING, text, t, job.computer_name), t)])
        job.status_message = f"attempt {runs} of {retry.total} (the last one failed: {why})"
        from ._port import JobPort

        self._again.append((JobPort(job), retry))
        self.session._cond.notify_all()
        return True

    # --- groups --------------------------------------------------------------------------------
    def changed(self) -> None:
        """A group changed: wake the scheduler thread (or start it) to look again."""
        with self.session._cond:
            self.session._cond.notify_all()
        self._ensure_thread()


def _set_status(top: Job, text: str) -> None:
    top.status_message = text
    for leaf in top._leaves():
        if leaf is not top:
            leaf.status_message = text


def _waiting_for(sched: Scheduler, when: When, now: float, taken: dict[str, int]) -> str:
    """What a held job waits for, or "" when it may run now."""
    for dep in when.after:
        if dep._state is not JobState.COMPLETED:
            return f"waiting for Job {dep.id} {dep.name!r} ({dep.state}) to complete"
    if when.not_before is not None and when.not_before > now:
        at = datetime.fromtimestamp(when.not_before)
        day = "" if at.date() == datetime.fromtimestamp(now).date() else f"{at:%Y-%m-%d} "
        return f"waiting until {day}{at:%H:%M:%S} (delay)"
    if when.group is not None:
        group = sched.groups[when.group]
        if group.paused:
            return f"waiting: group {group.name!r} is paused (resume_group({group.name!r}))"
        running = group.running() + taken.get(group.name, 0)
        if running >= group.parallel:
            return f"waiting for a slot in group {group.name!r} (parallel={group.parallel})"
    return ""


class SchedulingVerbs:
    """The Session's scheduling verbs (a mixin, to keep _session.py within its size)."""

    _sched: Scheduler
    _cond: threading.Condition

    def configure_group(self, name: str, parallel: int = 1) -> None:
        """Make group ``name`` (or change it): at most ``parallel`` of its jobs run at once."""
        check_group_name("configure_group", name)
        check_parallel("configure_group", parallel)
        with self._cond:
            group = self._sched.groups.setdefault(name, Group(name))
            group.parallel = parallel
        self._sched.changed()

    def pause_group(self, name: str) -> None:
        """Start none of the group's waiting jobs until resume_group; running ones go on."""
        self._group("pause_group", name).paused = True

    def resume_group(self, name: str) -> None:
        """Start the group's waiting jobs again, up to its ``parallel``."""
        self._group("resume_group", name).paused = False
        self._sched.changed()

    def get_group(self, name: str | None = None) -> list[dict[str, Any]]:
        """The groups, by name: ``{"name", "parallel", "paused", "running", "waiting"}`` each."""
        with self._cond:
            groups = [g for g in self._sched.groups.values() if name is None or g.name == name]
            waiting: dict[str, int] = {}
            for held in self._sched._held:
                if held.when.group is not None:
                    waiting[held.when.group] = waiting.get(held.when.group, 0) + 1
            return [{"name": g.name, "parallel": g.parallel, "paused": g.paused, "running": g.running(),
                     "waiting": waiting.get(g.name, 0)} for g in sorted(groups, key=lambda g: g.name)]

    def _group(self, verb: str, name: str) -> Group:
        check_group_name(verb, name)
        with self._cond:
            group = self._sched.groups.get(name)
        if group is None:
            raise ValueError(f"{verb}: there is no group {name!r}; make it with configure_group({name!r}, "
                             f"parallel=N)")
        return group

    def on_finished(self, job: Job, fn: Callable[[Job], None]) -> None:
        """Call ``fn(job)`` from the psjobs-sched thread once ``job`` is finished (the session host's
        completion hook). An exception in ``fn`` is logged on the ``psjobs`` logger."""
        with self._cond:
            self._sched.watch.append((job, fn))
            self._cond.notify_all()
        self._sched._ensure_thread()

    def restart_job(self, job: Any) -> Job:
        """A new job with the same target, arguments and options as finished ``job`` (not its
        ``after=``: those jobs have run); it gets a new id, and the old job stays as it is."""
        session: Any = self
        (old,) = _one(session._resolve(job, "restart_job"))
        if old.parent is not None:
            raise JobStateError(f"restart_job: {describe_job(old)} is a child job; restart its parent "
                                f"with restart_job({old.parent.id})")
        if not old.state.is_finished:
            raise JobNotFinishedError(f"restart_job: {describe_job(old)} is not finished; wait for it or "
                                      f"stop it with stop_job({old.id}) first")
        recipe: JobSpec | None = old._recipe
        if recipe is None:
            if any(leaf._kind is not None for leaf in old._leaves()):  # it ran here: forget_recipe
                raise JobStateError(f"restart_job: {describe_job(old)} ran a call for an Executor, which lets "
                                    f"go of a call once it is done (so it can be freed); submit the call to "
                                    f"an executor again")
            raise JobStateError(f"restart_job: {describe_job(old)} was restored from storage and its target "
                                f"was not kept; start it again with start_job")
        assert recipe.recipe is not None
        kind, job_type, parent, name, when = recipe.recipe
        # A call a connected client pickled (core/_shipped: no target here) is its payload, which
        # this session never unpickles: the restart runs those bytes again. Any other call is
        # pickled afresh by its backend (its arguments may have changed since).
        shipped = recipe.kind == CALL and recipe.target is None
        spec = dataclasses.replace(recipe, kwargs=dict(recipe.kwargs) if recipe.kwargs else recipe.kwargs,
                                   options=dict(recipe.options) if recipe.options else recipe.options,
                                   payload=recipe.payload if shipped else None)
        if when is not None:
            delay = when.delay
            when = dataclasses.replace(when, after=[], not_before=None if delay is None else
                                       not_before("restart_job", delay))
        top: Job = session._start_tree(kind, spec, job_type=job_type, name=name, parent=parent, when=when)
        return top


def _one(jobs: list[Job]) -> list[Job]:
    if len(jobs) != 1:
        raise ValueError(f"restart_job: name one job, not {len(jobs)} "
                         f"({', '.join(str(j.id) for j in jobs[:5]) or 'none'})")
    return jobs


def forget_recipe(job: Job) -> None:
    """Drop what ``restart_job`` keeps for ``job`` (its target and arguments), so that they can be
    freed while the job and its records stay: an Executor's jobs are never restarted, and a
    ``concurrent.futures`` executor keeps no reference to a call once it is done."""
    job._recipe = None
