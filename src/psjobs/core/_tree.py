"""How the Session makes a job tree, for every kind, and the checks its verbs share.

::

    backend.plan(spec) --> Plan(places, location, follow_where)
    make_tree: ids in one block (a parent before its children, as PowerShell numbers them)
               --> parent Job (Running) + one leaf Job per place (NotStarted), or one top-level leaf
               --> one JobPort per leaf, sharing a _Tree (the parent, where its leaves run)
               --> into the session's tables under its lock

The jobs exist in the table before their backend starts them, so a record or an end reported at
once always finds its job.
"""

from __future__ import annotations

import functools
import inspect
import math
import types
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from .._errors import JobStateError
from .._inside import current_job_id
from ._backend import Backend
from ._fork import parent_of
from ._future import ITEMS, LINES, VALUE
from ._job import Job, _next_id, _next_ids
from ._port import JobPort, _Tree
from ._pshost import describe_job
from ._spec import CALL
from ._state import Event, JobState

if TYPE_CHECKING:
    from ._backend import Plan
    from ._session import Session
    from ._spec import JobSpec


def make_tree(session: Session, plan: Plan, kind: str, spec: JobSpec, *, job_type: str, name: str | None,
              parent: bool, queued: bool = False) -> tuple[Job, list[JobPort]]:
    """The top-level job and the ports of its leaves, registered in ``session`` (not started yet).

    ``queued``: the scheduler holds it (a group, after=, delay=), so a parent is NotStarted too.
    """
    if not parent:  # one job, no tree: the thread jobs' path, kept short (start -> result ~70 us)
        (jid,) = _next_ids(1)
        top = Job(session, jid, job_type=job_type, name=name, command=spec.command,
                  location=plan.places[0].location)
        top._shape = shape_of(spec)
        port = JobPort(top, kind, None)
        with session._cond:
            register_locked(session, (top,))
        return top, [port]
    else:
        ids = _next_ids(1 + len(plan.places))
        top = Job(session, ids[0], job_type=job_type, name=name, command=spec.command, location=plan.location,
                  state=JobState.NOT_STARTED if queued else JobState.RUNNING)
        leaves = [Job(session, cid, job_type="", name=None, command=spec.command, parent=top,
                      location=place.location, computer_name=place.computer_name)
                  for cid, place in zip(ids[1:], plan.places)]
        shape = top._shape = shape_of(spec)  # a parent's result() is its children's: shown the same
        for leaf in leaves:
            leaf._shape = shape
        jobs = [top, *leaves]
        tree = _Tree(top, plan.follow_where)
    ports = [JobPort(leaf, kind, tree) for leaf in leaves]
    with session._cond:
        register_locked(session, jobs)
        if not leaves:
            top._apply(Event.COMPLETE)  # an empty fan-out: nothing to run, nothing failed
    return top, ports


def register_locked(session: Session, jobs: Iterable[Job]) -> None:
    """Put new jobs (parents first) in the session's table; the caller holds ``session._cond``.

    Refused once the session is closed: close() sets ``_closed`` before it takes that lock to
    collect the jobs it stops, so a job is either stopped by close() or never exists.
    """
    if session._closed:
        raise closed_error(session)
    for job in jobs:
        if session._journal_factory is not None and job._journal is None:
            job._journal = session._journal_factory(job)
        session._all[job.id] = job
        if job.parent is None:
            session._jobs[job.id] = job


def closed_error(session: Session) -> JobStateError:
    parent = parent_of(session)
    if parent is not None:
        return JobStateError(f"this session belongs to process {parent}, which this one was forked from; "
                             f"create a new psjobs.Session() here to start jobs (the module's verbs make one)")
    return JobStateError("this session is closed; create a new psjobs.Session() to start jobs")


def start_leaf(session: Session, backend: Backend, kind: str, spec: JobSpec, job_type: str, name: str | None) -> Job:
    """A top-level leaf without scheduling options (a thread job), made and started at once:
    make_tree's, keep_recipe's and Scheduler.submit's work for one leaf, without a plan (unless its
    backend makes one of its own), a port list or their calls."""
    kind_of = type(backend)
    if kind_of.prepare is not Backend.prepare:  # the default checks nothing: a call saved
        backend.prepare(spec)  # a bad argument raises before a job exists
    location = "localhost" if kind_of.plan is Backend.plan else backend.plan(spec).places[0].location
    jid = _next_id()
    top = Job(session, jid, job_type=job_type, name=name, command=spec.command, location=location)
    top._shape = shape_of(spec)
    recipe: tuple[str, str, bool, str | None, Any] | None = _PLAIN.get((kind, job_type)) if name is None else None
    if recipe is None:  # what _sched.keep_recipe writes; a start without a name shares one per kind
        recipe = (kind, job_type, False, name, None)
        if name is None:
            _PLAIN[kind, job_type] = recipe
    spec.recipe = recipe
    top._recipe = spec  # for restart_job; dropped by remove_job
    port = JobPort(top, kind, None)
    with session._cond:  # register_locked, for one top-level job
        if session._closed:
            raise closed_error(session)
        if session._journal_factory is not None:
            top._journal = session._journal_factory(top)
        session._all[jid] = session._jobs[jid] = top
    backend.start([port], spec)
    return top


_PLAIN: dict[tuple[str, str], tuple[str, str, bool, str | None, Any]] = {}  # (kind, job type) -> its shared recipe


def shape_of(spec: JobSpec) -> str:
    """What ``result()`` makes of a job's output (core/_future): a command's lines, a generator's
    items, or a callable's return value (its last output item). A call that came pickled (the
    session host's, from a connected session) is never opened here: its sender said which."""
    if spec.kind != CALL:
        return LINES
    target = spec.target
    if target is None:  # a call pickled elsewhere (core/_shipped): the shape its sender saw
        shape = spec.options.get("shape", VALUE)
        return shape if shape in (VALUE, ITEMS, LINES) else VALUE
    if type(target) is types.FunctionType:  # the common case, as inspect decides it, in one test
        return ITEMS if target.__code__.co_flags & _GENERATORS else VALUE
    while isinstance(target, functools.partial):
        target = target.func
    if inspect.isgeneratorfunction(target) or inspect.isasyncgenfunction(target):
        return ITEMS
    return VALUE


_GENERATORS = inspect.CO_GENERATOR | inspect.CO_ASYNC_GENERATOR


def check_timeout(verb: str, timeout: float | None) -> float | None:
    """A timeout as the waits use it: seconds >= 0, or None for no limit.

    The one rule for every timeout of psjobs (issue 13, case 8): ``math.inf`` means no limit, the
    same as None (a deadline of inf overflowed the lock's wait); NaN is refused, since it compares
    false with everything and a wait on it spun at 100% CPU.
    """
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or math.isnan(timeout) or timeout < 0:
        raise ValueError(f"{verb}: timeout must be a number of seconds >= 0, math.inf or None (no limit), "
                         f"not {timeout!r}")
    return None if math.isinf(timeout) else float(timeout)


def check_grace(verb: str, grace: Any) -> float:
    """A stop's grace period: finite seconds >= 0.

    Not inf: a stop ends in a kill when the grace is over ("stop means stop"), and a grace that
    never ends would be a stop that never kills. NaN made stop_job wait forever and the I/O
    thread spin (issue 13, case 8).
    """
    if isinstance(grace, bool) or not isinstance(grace, (int, float)) or not math.isfinite(grace) or grace < 0:
        raise ValueError(f"{verb}: the stop grace must be a finite number of seconds >= 0 (a stop kills "
                         f"when it is over), not {grace!r}")
    return float(grace)


def check_limit(verb: str, limit: Any) -> None:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1_000_000:
        raise ValueError(f"{verb}: throttle limit must be a whole number from 1 to 1000000, not {limit!r}")


def check_name(verb: str, name: Any) -> None:
    if name is not None and not isinstance(name, str):
        raise TypeError(f"{verb}: name must be a str, not {type(name).__name__}")


def check_as_job(as_job: Any, job_name: Any) -> None:
    """invoke_command's as_job and job_name (the computers are the SSH backend's to check)."""
    if not isinstance(as_job, bool):
        raise TypeError(f"invoke_command: as_job must be True or False, not {type(as_job).__name__}")
    if job_name is not None:
        if not isinstance(job_name, str):
            raise TypeError(f"invoke_command: job_name must be a str, not {type(job_name).__name__}")
        if not as_job:
            raise ValueError("invoke_command: job_name names a job, so it needs as_job=True (PowerShell's "
                             "-JobName implies -AsJob); leave one of them out")


def refuse_waiting_on_itself(verb: str, jobs: list[Job], every: bool) -> None:
    """A thread job that waits for itself (all of ``jobs``, or any with every=False) would wait
    forever: it ends only when this very call returns. Refused at once (issue 13, case 10)."""
    me = current_job_id()
    if me is None:
        return
    mine = [job for job in jobs if job.id == me or any(leaf.id == me for leaf in job._leaves())]
    if mine and (every or len(mine) == len(jobs)):
        job = mine[0]
        raise JobStateError(f"{verb}: {describe_job(job)} is the job this code runs in, so waiting for it "
                            f"would never end; return from the job instead, or receive without wait=True")
