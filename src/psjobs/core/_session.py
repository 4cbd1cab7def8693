"""The Session: the job table, the verbs over it, and the host that shows what jobs report.

::

    start_*  --> make_spec (checks) --> backend.prepare(spec), backend.plan(spec)
             --> job tree + one JobPort per leaf in the table (_tree.make_tree) --> backend.start(ports, spec)
    backend  --> port.started / records / blocked / ended(outcome)  (the port holds self._lock)
             --> Job._apply / Job._extend --> notify_all; a state change also releases the
                 wait_job calls that wait for that job (self._targets)
    receive  --> claims leaves' journal ranges (under the lock) --> reads them (outside it) -->
                 output returned, other records to the Host
    wait     --> waits for the first job not done, then the next (_receive.wait_locked); any=True
                 and the progress display wait on self._cond
    stop     --> Event.STOP on the leaves, backend.stop(port, grace), wait (grace), warn if stuck
                 (_control.stop_jobs; suspend, resume and send_input are there too)
    remove   --> drop from the table, backend.forget(port), journal.drop() (outside the lock)

One lock (a Condition) guards every job of the session; nothing slow runs under it. Every thread
and lock of psjobs, and their order, are listed in the docstring of ``psjobs.core``.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime
from typing import Any

from .._errors import JobNotFinishedError, JobStateError, StopTimeoutWarning
from .._records import ErrorRecord, OutputRecord, Stream
from ._backend import Backend, load_backend
from ._control import pause_jobs, send_input, stop_jobs
from ._format import JobList
from ._job import Job, skip_ids
from ._journal import Entry, Journal, JournalFactory
from ._port import JobPort
from ._pshost import Host, describe_job
from ._receive import (
    Taken,
    after_receive,
    check_receive,
    claim,
    claim_one,
    followed,
    take_returned,
    wait_locked,
    wait_on,
)
from ._sched import Scheduler, SchedulingVerbs, When, keep_recipe, make_when
from ._select import descendants, leaves_of, resolve, select_jobs
from ._spec import CALL, JobSpec, check_directory, make_env, make_spec
from ._spill import Spill
from ._spin import spin
from ._state import JobState
from ._tree import (
    check_as_job,
    check_grace,
    check_limit,
    check_name,
    check_timeout,
    closed_error,
    make_tree,
    refuse_waiting_on_itself,
    register_locked,
    start_leaf,
)

JobSelector = Any  # Job | int | str | uuid.UUID | Iterable of these



class Session(SchedulingVerbs):
    """A table of jobs and the verbs over it. Thread-safe.

    ``thread_throttle_limit``: how many thread jobs run at once (default 5; the rest wait
    NotStarted). ``stop_grace``: seconds a stop waits before it kills (processes) or gives up with a
    warning (threads that cannot be interrupted); finite, since a stop ends in a kill (NaN and inf
    raise ValueError). Every ``timeout`` of the verbs is seconds >= 0, or None or ``math.inf`` for
    no limit (NaN raises ValueError). ``verbose``/``debug``: show those records when
    received. ``host``: what shows received records (see :class:`Host`). ``first_id``: no job of
    this process gets a lower id from now on (the session host resumes after its stored jobs).
    ``journal_factory``: makes each new job's journal (see ``_journal``; default: in memory).

    ``commands_outlive_process`` (default False): command jobs end when this session's process
    ends, however it ends; the session host sets it, because its jobs must outlive it.
    """

    commands_outlive_process = False

    def __init__(self, *, thread_throttle_limit: int = 5, stop_grace: float = 5.0,
                 verbose: bool = False, debug: bool = False, host: Host | None = None,
                 first_id: int = 1, journal_factory: JournalFactory | None = None) -> None:
        check_limit("Session", thread_throttle_limit)
        skip_ids(first_id)  # ids are never reused: a host resumes after the jobs it stored
        stop_grace = check_grace("Session", stop_grace)
        self._lock = threading.Lock()  # C-level: see _port.JobPort (a stop raised in a thread job)
        self._cond = threading.Condition(self._lock)
        self._jobs: dict[int, Job] = {}      # top-level jobs by id (ids only grow: insertion = id order)
        self._all: dict[int, Job] = {}       # every job, children too
        self._backends: dict[str, Backend] = {}
        self._backend_lock = threading.Lock()
        self.thread_throttle_limit = thread_throttle_limit
        self.stop_grace = float(stop_grace)
        self.host = host or Host(verbose=verbose, debug=debug)
        self._closed = False
        self._journal_factory = journal_factory
        self._spill = Spill(self._lock)  # the memory window of the jobs' records (core/_spill)
        self._returned: dict[int, list[tuple[int, int]]] = {}  # given back by receives (_receive)
        self._followed: dict[int, int] = {}  # leaves a waiting reader follows (_receive.followed)
        # wait_job's waiters, by the id of the job each waits for (_receive.wait_on_job): released
        # by that job's state changes only, where _cond's are released by every change and record.
        self._targets: dict[int, list[Any]] = {}
        self._blocks = 0  # how many times a job of the session asked for input (wait_job looks then)
        self._handed_at = 0.0                # the last time a thread job handed it the GIL (_port)
        self._sched = Scheduler(self)  # groups, after=, delay=, retries=, restart_job (_sched)

    # --- backends ------------------------------------------------------------------------
    def _backend(self, kind: str) -> Backend:
        backend = self._backends.get(kind)
        if backend is not None and not self._closed:
            return backend
        with self._backend_lock:
            if self._closed:
                raise closed_error(self)
            backend = self._backends.get(kind)
            if backend is None:
                backend = load_backend(kind, self)
                self._backends[kind] = backend
            return backend

    def _start_tree(self, kind: str, spec: JobSpec, *, job_type: str, name: str | None,
                    parent: bool = True, when: When | None = None) -> Job:
        """Every job of every kind starts here: the backend checks and plans, the Session makes the
        jobs (ids in one block, a parent before its children), their ports, then starts them."""
        backend = self._backend(kind)
        if not parent and when is None:  # one leaf started at once: the thread jobs' path
            return start_leaf(self, backend, kind, spec, job_type, name)
        backend.prepare(spec)  # pickles a callable now: a bad argument raises before a job exists
        top, ports = make_tree(self, backend.plan(spec), kind, spec, job_type=job_type, name=name, parent=parent,
                               queued=when is not None and when.holds)
        self._sched.submit(top, ports, backend, keep_recipe(kind, spec, job_type, name, parent, when))
        return top

    def _register_locked(self, jobs: Iterable[Job]) -> None:
        register_locked(self, jobs)  # refused once the session is closed

    def restore_jobs(self, jobs: list[Job]) -> None:
        """Put finished jobs made with ``Job.restored`` (parents first) into the table."""
        with self._cond:
            self._register_locked(jobs)

    # --- starting --------------------------------------------------------------------------
    def start_job(self, target: Any, *args: Any, name: str | None = None, input: Iterable[Any] | None = None,
                  init: Callable[[], Any] | None = None,
                  working_directory: str | os.PathLike[str] | None = None,
                  env: Mapping[str, str | None] | None = None, cluster: Any = None, group: str | None = None,
                  after: Any = None, delay: Any = None, retries: int = 0, **kwargs: Any) -> Job:
        """Run ``target`` in another process; return its BackgroundJob at once (see the docs).

        With ``cluster=`` (a dask ``Client``, a cluster object or a scheduler address) the job runs
        on that Dask cluster instead: a ClusterJob, see :meth:`start_cluster_job`.
        """
        if cluster is not None:
            return self.start_cluster_job(target, *args, cluster=cluster, name=name, input=input, init=init,
                                          working_directory=working_directory, env=env, retries=retries,
                                          group=group, after=after, delay=delay, **kwargs)
        check_name("start_job", name)
        when = make_when(self, "start_job", group, after, delay, retries)
        spec = make_spec(target, args, kwargs, init=init, input=input, verb="start_job")
        spec.cwd = check_directory("start_job", working_directory)
        spec.env = make_env("start_job", env)
        if spec.input is not None:
            spec.input = list(spec.input)
        return self._start_tree("process", spec, job_type="BackgroundJob", name=name, when=when)

    def start_cluster_job(self, target: Any, *args: Any, cluster: Any, for_each: Iterable[Any] | None = None,
                          name: str | None = None, input: Iterable[Any] | None = None,
                          init: Callable[[], Any] | None = None,
                          working_directory: str | os.PathLike[str] | None = None,
                          env: Mapping[str, str | None] | None = None, retries: int = 0,
                          resources: Mapping[str, float] | None = None, group: str | None = None,
                          after: Any = None, delay: Any = None, **kwargs: Any) -> Job:
        """Run ``target`` as Dask tasks on ``cluster``; return its ClusterJob at once (docs/dask.md).

        One child job runs the call; with ``for_each=items``, one child per item runs
        ``target(item, *args, **kwargs)``. ``group``, ``after``, ``delay`` as for every kind;
        ``retries``: Dask runs a task again after a lost worker (a failure is not retried).
        """
        verb = "start_cluster_job"
        check_name(verb, name)
        when = make_when(self, verb, group, after, delay, 0)  # retries are Dask's: after a lost worker
        # The arguments travel beside the target (a command's are checked by the backend, against
        # the workers' conventions), so the job's command text is the target's alone.
        spec = make_spec(target, (), kwargs, init=init, input=input, verb=verb)
        spec.options = {"verb": verb, "args": args, "cluster": cluster, "for_each": for_each, "input": input,
                        "working_directory": working_directory, "env": env, "retries": retries,
                        "resources": resources}
        return self._start_tree("dask", spec, job_type="ClusterJob", name=name, when=when)

    def start_thread_job(self, target: Any, *args: Any, name: str | None = None,
                         input: Iterable[Any] | None = None, init: Callable[[], Any] | None = None,
                         throttle_limit: int | None = None, working_directory: str | os.PathLike[str] | None = None,
                         group: str | None = None, after: Any = None, delay: Any = None, retries: int = 0,
                         **kwargs: Any) -> Job:
        """Run ``target`` in a thread of this process; return its ThreadJob at once.

        ``working_directory`` is where a command runs (default: the current directory), as for
        start_job: the session host runs clients' commands in their directories without a chdir.
        A callable shares this process's directory, so for it the keyword is the target's own.
        """
        if working_directory is not None and callable(target):
            kwargs["working_directory"], working_directory = working_directory, None
        if name is not None:  # a call saved on the thread path
            check_name("start_thread_job", name)
        if throttle_limit is not None:
            check_limit("start_thread_job", throttle_limit)
        when = make_when(self, "start_thread_job", group, after, delay, retries)
        spec = make_spec(target, args, kwargs, init=init, input=input, verb="start_thread_job")
        if when is not None and when.retries and spec.input is not None:  # a retry runs on all of it too,
            spec.input = list(spec.input)  # not on what the failed run left of a one-pass iterator
        if working_directory is not None or spec.kind != CALL:  # a callable runs in this process's directory:
            spec.cwd = check_directory("start_thread_job", working_directory)  # getcwd lets go of the GIL
        if throttle_limit is not None:
            self._backend("thread")  # a closed session refuses before the limit changes
            self.thread_throttle_limit = throttle_limit
        return self._start_tree("thread", spec, job_type="ThreadJob", name=name, parent=False, when=when)

    def invoke_command(self, target: Any, *args: Any, computer_name: str | Iterable[str] | None = None,
                       as_job: bool = True, throttle_limit: int = 32, job_name: str | None = None,
                       group: str | None = None, after: Any = None, delay: Any = None, retries: int = 0,
                       **kwargs: Any) -> Any:
        """Run ``target`` on each computer over SSH: one RemoteJob, one child per computer.

        With ``as_job=False``, wait for it and return its output (the job is removed).
        """
        check_as_job(as_job, job_name)
        when = make_when(self, "invoke_command", group, after, delay, retries)
        spec = make_spec(target, args, kwargs, verb="invoke_command")
        spec.options = {"computer_name": computer_name, "throttle_limit": throttle_limit}
        parent = self._start_tree("ssh", spec, job_type="RemoteJob", name=job_name, when=when)
        if as_job:
            return parent
        try:
            self.wait_job(parent)
        except BaseException:
            self.remove_job(parent, force=True)
            raise
        output = self.receive_job(parent)
        self.remove_job(parent)
        return output

    # --- finding ---------------------------------------------------------------------------
    def get_job(self, id: Any = None, *, name: str | Iterable[str] | None = None,
                instance_id: uuid.UUID | str | Iterable[uuid.UUID | str] | None = None,
                state: JobState | str | None = None, command: str | Iterable[str] | None = None,
                has_more_data: bool | None = None, before: datetime | None = None,
                after: datetime | None = None, newest: int | None = None,
                include_child_jobs: bool = False,
                child_job_state: JobState | str | None = None) -> list[Job]:
        """The session's jobs, by ascending id (see the docs for the filters)."""
        with self._cond:
            return select_jobs(self._jobs, self._all, self, id=id, name=name, instance_id=instance_id,
                               state=state, command=command, has_more_data=has_more_data, before=before,
                               after=after, newest=newest, include_child_jobs=include_child_jobs,
                               child_job_state=child_job_state)

    def _resolve(self, jobs: JobSelector, verb: str) -> list[Job]:
        with self._cond:
            return resolve(self._all, self, jobs, verb)  # not via _resolve_locked: a call less, 3 a job

    def _resolve_locked(self, jobs: JobSelector, verb: str) -> list[Job]:
        return resolve(self._all, self, jobs, verb)

    # --- receiving -------------------------------------------------------------------------
    def receive_job(self, jobs: JobSelector, *, keep: bool = False, wait: bool = False,
                    timeout: float | None = None, auto_remove: bool = False, no_recurse: bool = False,
                    error_action: str = "continue", records: bool = False) -> list[Any]:
        """The output not yet received, in production order; other records go to the host."""
        action, timeout = check_receive(error_action, auto_remove, wait, timeout)
        selected = self._resolve(jobs, "receive_job")
        leaves = leaves_of(selected, no_recurse)
        if wait:
            refuse_waiting_on_itself("receive_job(wait=True)", leaves, every=True)
        output: list[Any] = []
        errors: list[ErrorRecord] = []
        reasons: list[BaseException] = []
        host = self.host

        def answer(leaf: Job, prompt: str) -> bool:
            reply = host.read_input(leaf, prompt)
            if reply is None:
                host.write_blocked(leaf, prompt)
                return False
            self.send_input(leaf, reply)
            return True

        # Progress is drawn live while waiting, then the bars go away (PowerShell #24575: a replay of
        # old progress records left bars behind); a receive that does not wait shows none.
        shown = host.progress_display() if wait and hasattr(host, "progress_display") else None
        ended: set[int] = set()
        taken, done = Taken(self, keep), 0  # what to give back if this call cannot return it
        try:
            one = None if wait or len(leaves) != 1 else claim_one(self, leaves[0], keep, taken.claims)
            for leaf, entries in (self._read_batches(leaves, keep, wait, timeout, answer, taken.claims)
                                  if one is None else ((lf, j.read(a, b)) for lf, j, a, b in one)):
                taken.batches.append(entries)
                for done, (n, payload, t) in enumerate(entries):  # noqa: B007 (read on an exception)
                    stream = _STREAMS[n]
                    if shown is not None and leaf._state.is_finished and leaf.id not in ended:
                        ended.add(leaf.id)
                        shown.job_done(leaf)
                    if stream is _PROGRESS:
                        if shown is not None:
                            shown.update(leaf, payload)
                        continue
                    self._receive_one(leaf, stream, payload, t, records, action, output, errors)
                done = len(entries)
            for leaf in leaves:
                if leaf._state is JobState.FAILED and leaf._reason is not None:
                    reasons.append(leaf._reason)
                    if action == "continue":
                        host.write_failure(leaf, leaf._reason)
        except BaseException:
            taken.give_back(done)
            raise
        finally:
            if shown is not None:
                shown.close()
        return after_receive(self, selected, auto_remove, action, output, errors, reasons)

    def _receive_one(self, leaf: Job, stream: Stream, payload: Any, t: float, records: bool, action: str,
                     output: list[Any], errors: list[ErrorRecord]) -> None:
        if stream is _OUTPUT:
            output.append(OutputRecord(payload, t, leaf.computer_name, leaf) if records else payload)
            return
        if stream is _ERROR:
            errors.append(payload)
            if action == "silent":
                return
        self.host.write_record(leaf, payload)

    def read_entries(self, jobs: JobSelector, *, keep: bool = False, wait: bool = False,
                     timeout: float | None = None) -> Iterator[tuple[Job, Stream, Any, float]]:
        """Every record not yet received, of all seven streams, in production order per job.

        Yields ``(leaf job, stream, value or record, time.time())``; this is what receive_job is
        made of, for readers that keep records themselves (the session host stores them). With
        ``wait=True`` it follows the jobs until they finish (or ``timeout``), yielding as records
        arrive. Moves the jobs' read cursors unless ``keep``.
        """
        timeout = check_timeout("read_entries", timeout)
        return self._read(leaves_of(self._resolve(jobs, "read_entries")), keep, wait, timeout)

    def read_batches(self, jobs: JobSelector, *, keep: bool = False, wait: bool = False,
                     timeout: float | None = None) -> Iterator[tuple[Job, list[Entry]]]:
        """``read_entries`` a batch at a time: ``(leaf job, [(stream, value, time), ...])``, for
        readers that forward records in bulk (the session host sends a batch before waiting)."""
        timeout = check_timeout("read_batches", timeout)
        return self._read_batches(leaves_of(self._resolve(jobs, "read_entries")), keep, wait, timeout)

    def _read(self, leaves: list[Job], keep: bool, wait: bool, timeout: float | None,
              on_prompt: Callable[[Job, str], bool] | None = None) -> Iterator[tuple[Job, Stream, Any, float]]:
        for leaf, entries in self._read_batches(leaves, keep, wait, timeout, on_prompt):
            for stream, payload, t in entries:
                yield leaf, _STREAMS[stream], payload, t  # a tuple index: Stream(n) cost 0.35 us

    def _read_batches(self, leaves: list[Job], keep: bool, wait: bool, timeout: float | None,
                      on_prompt: Callable[[Job, str], bool] | None = None,
                      claims: list[tuple[Job, int, int]] | None = None) -> Iterator[tuple[Job, list[Entry]]]:
        return followed(self, leaves if wait else [], self._follow(leaves, keep, wait, timeout, on_prompt, claims))

    def _follow(self, leaves: list[Job], keep: bool, wait: bool, timeout: float | None,
                on_prompt: Callable[[Job, str], bool] | None,
                claims: list[tuple[Job, int, int]] | None) -> Iterator[tuple[Job, list[Entry]]]:
        # A consuming read starts at the journals' cursors (no record read twice), a keeping one at its own.
        positions = {leaf.id: leaf._journal.cursor if leaf._journal is not None else 0 for leaf in leaves}
        deadline = None if timeout is None else time.monotonic() + timeout
        asked: set[tuple[int, str]] = set()  # prompts offered in this call: each is asked once
        while True:
            prompts: list[tuple[Job, str]] = []
            with self._cond:
                if wait:
                    while not self._has_news(leaves, positions, keep, asked if on_prompt else None) \
                            and not (self._returned and any(leaf.id in self._returned for leaf in leaves)):
                        remaining = None if deadline is None else deadline - time.monotonic()
                        if remaining is not None and remaining <= 0:
                            break
                        wait_on(self, remaining)  # Ctrl+C here leaves the lock held
                # Like PowerShell's Receive-Job -Wait: done when every job is finished, suspended
                # or disconnected (the states that change only if the user acts).
                done = all(leaf._state.is_persistent for leaf in leaves)
                batch: list[tuple[Job, Journal, int, int]] = []
                for leaf in leaves:
                    journal = leaf._journal
                    if journal is not None:
                        start = positions[leaf.id] if keep else journal.cursor
                        end = len(journal)
                        if self._returned and not keep:
                            take_returned(self, leaf, journal, batch, claims)
                        if start < end:
                            claim(batch, claims if not keep else None, leaf, journal, start, end)  # read below
                            positions[leaf.id] = end
                            if not keep:
                                journal.cursor = end
                    if on_prompt is not None and leaf._state is JobState.BLOCKED and leaf.prompt is not None \
                            and (leaf.id, leaf.prompt) not in asked:
                        prompts.append((leaf, leaf.prompt))
            # Outside the lock: a consumer may be slow, and a job must never wait for a printer (nor
            # for a journal that reads from storage).
            for leaf, journal, start, end in batch:
                yield leaf, journal.read(start, end)
            stop_waiting = False
            for leaf, prompt in prompts:
                asked.add((leaf.id, prompt))
                if on_prompt is not None and not on_prompt(leaf, prompt):
                    stop_waiting = True  # nobody can answer here: waiting would never end
            if not wait or done or stop_waiting or (deadline is not None and time.monotonic() >= deadline):
                return

    @staticmethod
    def _has_news(leaves: list[Job], positions: dict[int, int], keep: bool,
                  asked: set[tuple[int, str]] | None) -> bool:
        for leaf in leaves:
            journal = leaf._journal
            if journal is not None and (positions[leaf.id] if keep else journal.cursor) < len(journal):
                return True
            if asked is not None and leaf._state is JobState.BLOCKED and leaf.prompt is not None \
                    and (leaf.id, leaf.prompt) not in asked:
                return True
        return all(leaf._state.is_persistent for leaf in leaves)

    # --- input, suspend, resume ------------------------------------------------------------
    def send_input(self, jobs: JobSelector, text: str) -> None:
        """Answer the prompt of a Blocked job (a parent's Blocked child is found for you)."""
        if not isinstance(text, str):
            raise TypeError(f"send_input: the answer must be a str, not {type(text).__name__}")
        for job in self._resolve(jobs, "send_input"):
            with self._cond:
                blocked = [leaf for leaf in job._leaves() if leaf._state is JobState.BLOCKED]
            if not blocked:
                raise JobStateError(f"send_input: {describe_job(job)} does not wait for input; only a "
                                    f"Blocked job can be answered")
            send_input(self, blocked[0], text)

    def suspend_job(self, jobs: JobSelector) -> list[Job]:
        """Pause running process jobs (SIGSTOP to their whole process group): Suspended."""
        return self._pause(jobs, "suspend")

    def resume_job(self, jobs: JobSelector) -> list[Job]:
        """Let suspended jobs run again (SIGCONT): Running."""
        return self._pause(jobs, "resume")

    def _pause(self, jobs: JobSelector, verb: str) -> list[Job]:
        return JobList(pause_jobs(self, self._resolve(jobs, f"{verb}_job"), verb))

    # --- waiting ---------------------------------------------------------------------------
    def wait_job(self, jobs: JobSelector, *, any: bool = False, timeout: float | None = None,
                 state: JobState | str | None = None, show_progress: bool = False) -> list[Job]:
        """Wait until the jobs are done (or one, with any=True); [] on timeout.

        ``show_progress=True`` draws how many jobs are done and each job's latest progress record
        while it waits (PowerShell #12069); nothing is consumed.
        """
        timeout = check_timeout("wait_job", timeout)
        want = JobState.parse(state) if state is not None else None
        selected = self._resolve(jobs, "wait_job")
        if want is not None:
            selected = [j for j in selected if j.state is want]
        if not selected:
            return JobList()
        refuse_waiting_on_itself("wait_job", selected, every=not any)
        deadline = None if timeout is None else time.monotonic() + timeout
        if show_progress:
            shown = self.host.progress_display(total=len(selected), force=True)
            try:
                return self._wait_showing(selected, any, deadline, shown)
            finally:
                shown.close()
        if len(selected) == 1:
            spin(selected[0], limit=timeout)
        with self._cond:
            result = wait_locked(self, selected, any, deadline)
        assert result is not None
        return JobList(result)

    def _wait_showing(self, selected: list[Job], any: bool, deadline: float | None, shown: Any) -> list[Job]:
        seen: dict[int, int] = {}
        counted: set[int] = set()
        while True:
            ranges: list[tuple[Job, Journal, int, int]] = []
            with self._cond:
                for job in selected:
                    for leaf in job._leaves():
                        journal = leaf._journal
                        if journal is not None and seen.get(leaf.id, 0) < len(journal):
                            ranges.append((job, journal, seen.get(leaf.id, 0), len(journal)))
                            seen[leaf.id] = len(journal)
                finished = [j for j in selected if j._state.is_persistent and j.id not in counted]
                result = wait_locked(self, selected, any, deadline, once=True)
            updates = [(job, payload) for job, journal, start, end in ranges  # one bar per job waited for
                       for stream, payload, _ in journal.read(start, end) if stream == Stream.PROGRESS]
            for leaf, record in updates:
                shown.update(leaf, record)
            for job in finished:
                counted.add(job.id)
                shown.job_done(job)
            if result is not None:
                return JobList(result)
            with self._cond:
                remaining = None if deadline is None else deadline - time.monotonic()
                self._cond.wait(0.1 if remaining is None else max(0.0, min(0.1, remaining)))

    # --- stopping --------------------------------------------------------------------------
    def stop_job(self, jobs: JobSelector, *, pass_thru: bool = False) -> list[Job]:
        """Stop running work for real and return when it is over (see the docs for threads)."""
        selected = self._resolve(jobs, "stop_job")
        self._stop(selected)
        return JobList(selected if pass_thru else [])

    def _stop(self, selected: list[Job], grace: float | None = None, removing: bool = False) -> None:
        stop_jobs(self, selected, self.stop_grace if grace is None else grace, removing)

    # --- removing --------------------------------------------------------------------------
    def remove_job(self, jobs: JobSelector, *, force: bool = False) -> None:
        """Drop finished jobs and all their data (force=True stops running ones first)."""
        selected = self._resolve(jobs, "remove_job")
        for job in selected:
            if job._parent is not None:
                raise JobStateError(f"remove_job: {describe_job(job)} is a child job; child jobs are removed "
                                    f"with their parent: remove_job({job._parent.id})")
            if not job._state.is_finished and not force:
                raise JobNotFinishedError(f"remove_job: {describe_job(job)} is not finished; stop it first "
                                          f"with stop_job({job.id}), or pass force=True")
        running = [j for j in selected if not j._state.is_finished]
        if running:
            self._stop(running, removing=True)
        gone: list[JobPort] = []
        journals: list[Journal] = []
        with self._cond:
            for job in selected:
                for node in [job, *descendants(job)]:
                    self._all.pop(node.id, None)
                    if node._journal is not None:
                        journals.append(node._journal)
                        node._journal = None
                    if node._kind is not None:  # a leaf with a backend (JobPort.of, inlined)
                        gone.append(JobPort(node))
                self._jobs.pop(job.id, None)
                job._recipe = None  # restart_job's recipe (core/_sched): the target and arguments
        for journal in journals:  # outside the lock: a journal may delete from storage
            journal.drop()
        for port in gone:
            backend = self._backends.get(port._job._kind or "")
            if backend is not None:
                backend.forget(port)
            port._job.backend_data = None

    # --- lifetime --------------------------------------------------------------------------
    def close(self, grace: float = 1.0) -> None:
        """Stop every running job (processes are killed after ``grace``, finite seconds) and free
        the workers."""
        grace = check_grace("Session.close", grace)
        with self._backend_lock:
            if self._closed:
                return
            self._closed = True
        with self._cond:
            running = [j for j in self._jobs.values() if not j._state.is_finished]
        if running:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", StopTimeoutWarning)
                self._stop(running, grace)
        for backend in list(self._backends.values()):
            backend.close()
        self._spill.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        with self._cond:
            n = len(self._jobs)
            running = sum(1 for j in self._jobs.values() if not j._state.is_finished)
        return f"<psjobs.Session jobs={n} running={running}>"


# --- helpers --------------------------------------------------------------------------------

_STREAMS = tuple(Stream)
_PROGRESS, _OUTPUT, _ERROR = Stream.PROGRESS, Stream.OUTPUT, Stream.ERROR  # per item: ~80 ns a lookup on 3.11
