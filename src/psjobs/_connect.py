"""``psjobs.connect()``: a Session whose jobs live in the per-user session host, the one the
``psjobs`` command uses, so Python, notebooks and the shell share one job table.

::

    HostSession verb --typed request (host/_protocol)--> Client --host.sock--> the session host
        |  (a callable: cloudpickle here,                                     its Session + SQLite
        |   base64 in a start_call request)                                           |
        |  <-- job views / record rows ------------------------------------------------+
        v
    HostJob (a Job): a mirror of one host job, updated from every view that comes back; its live
                     attributes (state, reason, has_more_data, times, repr) ask the host first,
                     its streams (output, error...) are read from the host's store, and
                     result() makes of its output what the host says (the view's shape)

The host owns the jobs: this side keeps no records and no cursor, and a job's state as read here
is at most _FRESH_FOR old (or what the verb that just ran was told), so what the shell does
(``psjobs receive``, ``psjobs stop``) is what this session sees next, and the jobs outlive this
process. A verb runs in the caller's thread, one connection per request, and the mirrors change
under the Session's lock. While something waits on an unfinished job (result(), a future, ``await``,
as_completed, a callback), one thread asks the host about it: psjobs/_connect_watch.

The read-only parts of the verbs are the core Session's own code run over the mirrors (selection,
wildcards, not-found messages, error_action, auto_remove); everything that changes a job is a
request to the host.

Thread jobs are refused (a thread of this interpreter cannot live in the host); so are cluster
jobs and remote callables: see docs/connect.md.
"""

from __future__ import annotations

import base64
import contextlib
import math
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime
from typing import Any

from . import _errors
from ._connect_watch import Watcher
from ._errors import HostReplyError, JobNotFinishedError, JobStateError
from ._records import ErrorRecord, InformationRecord, ProgressRecord, Record, Stream
from .core._fork import parent_of, track
from .core._format import JobList
from .core._future import VALUE
from .core._job import Job, JobStateInfo
from .core._pshost import Host, describe_job
from .core._receive import after_receive, check_receive
from .core._select import leaves_of
from .core._session import JobSelector, Session
from .core._spec import CALL, check_directory, make_env, make_spec
from .core._state import JobState
from .core._tree import check_as_job, check_name, check_timeout, shape_of
from .host._client import Client, Paths, current_umask, expand_home
from .host._protocol import (
    SHAPES,
    GetRequest,
    InputRequest,
    InvokeRequest,
    ReceiveRequest,
    RecordsRequest,
    RemoveRequest,
    Request,
    StartCallRequest,
    StartRequest,
    StatusRequest,
    StopRequest,
    SuspendRequest,
    WaitRequest,
)
from .host._restore import reason_from_text
from .host._text import json_safe
from .worker._wire import pickle_call

View = dict[str, Any]        # a host/_protocol.JobView as JSON
_STREAMS = tuple(Stream)
_FRESH_FOR = 0.02            # seconds a job's view from the host stands for its live attributes
_local = threading.local()   # .fresh > 0: the mirrors were synced by the verb running in this thread


@contextlib.contextmanager
def _fresh() -> Iterator[None]:
    """While the core's code reads the mirrors a verb has just synced, their properties ask nobody."""
    _local.fresh = getattr(_local, "fresh", 0) + 1
    try:
        yield
    finally:
        _local.fresh -= 1


def _ts(text: str | None) -> float | None:
    return None if text is None else datetime.fromisoformat(text).timestamp()


class HostJob(Job):
    """A job of the session host, seen from a connected session (see the module docstring)."""

    __slots__ = ("_more", "_reason_text", "_seen")

    def __init__(self, session: HostSession, v: View, parent: Job | None) -> None:
        super().__init__(session, v["id"], job_type=v["job_type"], name=v["name"], command=v["command"],
                         location=v["location"], state=JobState.parse(v["state"]), parent=parent,
                         computer_name=v["computer_name"])
        self._more = True
        self._reason_text: str | None = None
        self.update_from(v)

    def update_from(self, v: View) -> bool:
        """Take the host's view of this job (the session calls it with its lock held). A new state
        fires the job's callbacks (they only queue), as Job._set_state does; True if it changed."""
        old = self._state
        new = JobState.parse(v["state"])
        if old.is_finished and not new.is_finished and str(self._iid) == v["instance_id"]:
            return False  # an older answer adopted after a newer one: a finished job stays finished
        self._state = new
        text = v["reason"]
        if text != self._reason_text:  # the same exception object while the text is the same
            self._reason_text = text
            self._reason = reason_from_text(text)
        self._begin, self._end = _ts(v["begin_time"]), _ts(v["end_time"])
        self.exit_code, self.pid, self._more = v["exit_code"], v["pid"], bool(v["has_more_data"])
        self.prompt, self.status_message = v.get("prompt"), v.get("status_message") or ""
        shape = v.get("shape")  # what result() makes of the output; an older host sends none
        self._shape = shape if shape in SHAPES else VALUE
        self._iid = uuid.UUID(v["instance_id"])
        self._seen = time.monotonic()
        if old is self._state:
            return False
        if self._watch is not None:
            self._watch.changed(self, old, self._state)
        return True

    @property
    def seen_at(self) -> float:
        """When (time.monotonic()) the host last said how this job is."""
        return self._seen

    def stale(self) -> None:
        """The next read of a live attribute asks the host (a verb changed what it would say)."""
        self._seen = -math.inf

    def _watched(self, waiters: int = 0) -> None:
        if waiters >= 0 and self._state.is_finished:
            return
        self._host().watch(self, waiters)  # the host is asked until it ends or nobody waits

    def followed(self, waiting: bool) -> bool:
        """Whether the session's watcher asks the host about this job (session lock held): it is
        unfinished, still the session's, and a thread waits on it or it has a callback."""
        if self._state.is_finished or not self._host().holds(self):
            return False
        w = self._watch
        return waiting or (w is not None and bool(w.states or w.done or w.own_states or w.own_done or w.news_fns))

    def _host(self) -> HostSession:
        session = self._session
        assert isinstance(session, HostSession)
        return session

    def _now(self) -> None:
        # An answer younger than _FRESH_FOR stands: a table of N jobs just listed (format_table reads
        # each one's state and has_more_data) costs no request per job, yet a loop polling
        # job.state still sees each change within that time.
        if not getattr(_local, "fresh", 0) and time.monotonic() - self._seen > _FRESH_FOR:
            self._host().refresh(self)

    @property
    def state(self) -> JobState:
        self._now()
        return self._state

    @property
    def job_state_info(self) -> JobStateInfo:
        self._now()
        return JobStateInfo(self._state, self._reason)

    @property
    def reason(self) -> BaseException | None:
        self._now()
        with _fresh():  # a parent's reason is its first failed child's: refreshed with it above
            return super().reason

    @property
    def has_more_data(self) -> bool:
        self._now()
        return self._more

    @property
    def begin_time(self) -> datetime | None:
        self._now()
        return super().begin_time

    @property
    def end_time(self) -> datetime | None:
        self._now()
        return super().end_time

    def _stream(self, stream: Stream) -> list[Any]:
        return self._host().records_of(self, stream)

    def __repr__(self) -> str:
        self._now()
        return super().__repr__()


class HostSession(Session):
    """The Session ``psjobs.connect()`` returns: its jobs are the session host's (``home``: its state
    directory, default the one the ``psjobs`` command uses). Closing it leaves the jobs running."""

    def __init__(self, *, home: str | os.PathLike[str] | None = None, verbose: bool = False,
                 debug: bool = False, host: Host | None = None) -> None:
        super().__init__(verbose=verbose, debug=debug, host=host)
        self._watcher = Watcher(self._cond, self.watch_round)
        self._client = Client(None if home is None else Paths(expand_home(
            os.fspath(home), "connect(home) is", "pass connect() the directory as an absolute path")))
        self.home = self._client.paths.home
        self._call(StatusRequest())  # starts the host now if none runs, as the command does
        track(self)  # a forked child's copy is closed in place (core/_fork)

    # --- talking to the host -----------------------------------------------------------------------
    def _call(self, request: Request) -> Any:
        return self._result(self._replies(request))

    def _replies(self, request: Request) -> Iterator[dict[str, Any]]:
        """The host's responses, its refusals raised as the library's own error classes."""
        try:
            yield from self._client.stream(request)
        except HostReplyError as exc:
            raise _local_error(exc) from None

    @staticmethod
    def _result(replies: Iterable[dict[str, Any]]) -> Any:
        result = None
        for response in replies:
            result = response.get("result")
        return result

    def _adopt(self, views: list[View], *, complete_since: float | None = None) -> bool:
        """Mirror the host's jobs in these views (parents come before their children). With
        ``complete_since`` (when the listing was asked for), they are all the host had: drop the
        mirrors of jobs removed meanwhile, but not those another thread heard of since. A mirror
        whose state changed fires its callbacks and wakes the waiters, as Job._set_state does;
        True if one did."""
        changed = False
        with self._cond:
            for v in sorted(views, key=lambda v: int(v["id"])):
                job = self._all.get(v["id"])
                if isinstance(job, HostJob):
                    changed = job.update_from(v) or changed
                    continue
                parent = self._all.get(v["parent_id"]) if v["parent_id"] is not None else None
                self._register_locked([HostJob(self, v, parent)])
            if complete_since is not None:
                seen = {v["id"] for v in views}
                for jid, job in list(self._all.items()):
                    if jid not in seen and isinstance(job, HostJob) and job.seen_at < complete_since:
                        self._all.pop(jid)
                        self._jobs.pop(jid, None)
            if changed:
                self._cond.notify_all()
        return changed

    def _sync(self) -> None:
        asked = time.monotonic()
        self._adopt(self._call(GetRequest(children=True)), complete_since=asked)

    def refresh(self, job: Job) -> bool:
        """Ask the host for ``job``'s tree as it is now (a removed job keeps its last known state);
        True if a state changed."""
        top = job
        while top.parent is not None:
            top = top.parent
        try:
            views = self._call(GetRequest(ids=[str(top.id)], children=True))
        except _errors.JobNotFoundError:
            return False
        return self._adopt(views)

    def holds(self, job: Job) -> bool:
        """Whether ``job`` is still this session's (not removed)."""
        return self._all.get(job.id) is job

    def watch(self, job: HostJob, waiters: int = 0) -> None:
        """Something waits on ``job`` (HostJob._watched): the watcher asks the host about it."""
        self._watcher.watch(job, waiters)

    def watch_round(self, jobs: list[HostJob], timeout: float) -> bool:
        """One round of the watcher (psjobs/_connect_watch): the host waits up to ``timeout`` s for
        one of ``jobs`` to end, and the mirrors take what it says; True if a state changed."""
        try:
            result = self._call(WaitRequest(ids=self._ids(list(jobs)), any=True, timeout=timeout))
            return self._adopt(result["done"] + result["pending"])
        except (_errors.PsJobsError, OSError):  # a job removed in the host, the host gone...
            changed = False
            for job in jobs:  # each on its own: a removed job keeps nobody from the others' news
                with contextlib.suppress(_errors.PsJobsError, OSError):
                    changed = self.refresh(job) or changed
            return changed

    def records_of(self, job: Job, stream: Stream) -> list[Any]:
        """Every record of one stream of ``job``, received or not (``job.output`` and the others)."""
        rows = self._call(RecordsRequest(id=job.id, stream=int(stream)))["records"]
        return [_value(int(stream), t, flag, data) for _, t, flag, data in rows]

    def _new(self, view: View) -> Job:
        """The mirror of a job the host has just made, with its children."""
        self._adopt(self._call(GetRequest(ids=[str(view["id"])], children=True)))
        return self._all[view["id"]]

    def _refuse_closed(self, verb: str) -> None:
        if self._closed:
            raise JobStateError(f"{verb}: this connected session is closed; its jobs go on in the psjobs host. "
                                f"Call psjobs.connect() again to reach them")

    # --- starting ------------------------------------------------------------------------------------
    def start_job(self, target: Any, *args: Any, name: str | None = None, input: Iterable[Any] | None = None,
                  init: Callable[[], Any] | None = None,
                  working_directory: str | os.PathLike[str] | None = None,
                  env: Mapping[str, str | None] | None = None, cluster: Any = None, **kwargs: Any) -> Job:
        """Start a BackgroundJob in the session host: a callable is pickled here (cloudpickle, by
        value where it is defined in ``__main__``) and runs in a worker process of the host."""
        verb = "start_job"
        self._refuse_closed(verb)
        if cluster is not None:
            raise JobStateError(f"{verb}: a connected session runs its jobs in the psjobs host, not on a "
                                f"cluster; start cluster jobs from an in-process session "
                                f"(psjobs.start_job(..., cluster=...))")
        check_name(verb, name)
        items = None if input is None else list(input)
        spec = make_spec(target, args, kwargs, init=init, input=items, verb=verb)
        cwd = check_directory(verb, working_directory)
        environ = make_env(verb, env) or dict(os.environ)  # the job gets this process's environment
        if spec.kind == CALL:
            try:
                payload = pickle_call(spec.target, spec.args, spec.kwargs, spec.init, items)
            except Exception as exc:
                raise TypeError(f"{verb}: the callable {spec.command!r} or its arguments cannot be sent to "
                                f"another process ({type(exc).__name__}: {exc}); pass picklable values") from exc
            view = self._call(StartCallRequest(payload=base64.b64encode(payload).decode("ascii"),
                                               command=spec.command, cwd=cwd, env=environ,
                                               sys_path=[os.path.abspath(p) for p in sys.path], name=name,
                                               python="{}.{}".format(*sys.version_info[:2]),
                                               umask=current_umask(), shape=shape_of(spec)))
        else:
            command = [target] if isinstance(target, str) and not args else spec.argv
            view = self._call(StartRequest(command=command, cwd=cwd, name=name, env=environ,
                                           input=None if items is None else [str(i) for i in items],
                                           umask=current_umask()))
        return self._new(view)

    def start_thread_job(self, target: Any, *args: Any, **kwargs: Any) -> Job:
        """Refused: a thread of this interpreter cannot live in the host (use start_job)."""
        raise JobStateError("start_thread_job: a connected session's jobs run in the psjobs host, and a thread "
                            "of this interpreter cannot; use start_job (a process job, the callable sent by "
                            "value), or psjobs.start_thread_job for a thread job of this process")

    def start_cluster_job(self, target: Any, *args: Any, **kwargs: Any) -> Job:
        """Refused: cluster jobs belong to an in-process session."""
        raise JobStateError("start_cluster_job: a connected session runs its jobs in the psjobs host, not on "
                            "a cluster; use psjobs.start_cluster_job (an in-process session)")

    def invoke_command(self, target: Any, *args: Any, computer_name: str | Iterable[str] | None = None,
                       as_job: bool = True, throttle_limit: int = 32, job_name: str | None = None,
                       **kwargs: Any) -> Any:
        """A command on each computer, from the host (``psjobs invoke``); callables are refused."""
        self._refuse_closed("invoke_command")
        check_as_job(as_job, job_name)
        spec = make_spec(target, args, kwargs, verb="invoke_command")
        if spec.kind == CALL:
            raise JobStateError("invoke_command: a connected session runs remote work through the psjobs host, "
                                "which takes command lines and argv lists, not callables; use "
                                "psjobs.invoke_command (an in-process session) for a callable")
        computers = [computer_name] if isinstance(computer_name, str) else list(computer_name or [])
        command = [target] if isinstance(target, str) and not args else spec.argv
        parent = self._new(self._call(InvokeRequest(command=command, computers=computers,
                                                    throttle=throttle_limit, name=job_name)))
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

    # --- finding -----------------------------------------------------------------------------------
    def get_job(self, id: Any = None, **filters: Any) -> list[Job]:
        """The host's jobs (started here, from the shell or from another connected session)."""
        self._sync()
        with _fresh():
            return super().get_job(id, **filters)

    def _resolve(self, jobs: JobSelector, verb: str) -> list[Job]:
        # Jobs, ids and instance ids: only their trees are asked for, so a verb on one job costs the
        # same with 10,000 jobs in the host. Names and wildcards (and a job the host no longer has,
        # or a child whose parent is new here) list every job, then the core resolves as always.
        jobs = self._ours(jobs)
        keys = _keys(jobs)
        synced = False
        if keys is not None:
            try:
                views = self._call(GetRequest(ids=keys, children=True))
                synced = all(v["parent_id"] is None or v["parent_id"] in self._all
                             or any(p["id"] == v["parent_id"] for p in views) for v in views)
                if synced:
                    self._adopt(views)
            except _errors.JobNotFoundError:
                pass
        if not synced:
            self._sync()
        with _fresh():
            return super()._resolve(jobs, verb)

    def _ours(self, jobs: JobSelector) -> JobSelector:
        """``jobs`` as a list (read once), a job of another connected session of the same host as its id."""
        if isinstance(jobs, (Job, int, uuid.UUID, str, bytes)) or not isinstance(jobs, Iterable):
            jobs = [jobs]
        return [j.id if isinstance(j, HostJob) and j.session is not self and isinstance(j.session, HostSession)
                and j.session.home == self.home else j for j in jobs]

    def _ids(self, jobs: list[Job]) -> list[str]:
        return [str(j.id) for j in jobs]

    # --- the verbs -----------------------------------------------------------------------------------
    def receive_job(self, jobs: JobSelector, *, keep: bool = False, wait: bool = False,
                    timeout: float | None = None, auto_remove: bool = False, no_recurse: bool = False,
                    error_action: str = "continue", records: bool = False) -> list[Any]:
        """What the host has not handed out yet (to this session or to ``psjobs receive``)."""
        action, timeout = check_receive(error_action, auto_remove, wait, timeout)
        selected = self._resolve(jobs, "receive_job")
        leaves = leaves_of(selected, no_recurse)
        output: list[Any] = []
        errors: list[ErrorRecord] = []
        reasons: list[BaseException] = []
        if leaves:
            by_id = {leaf.id: leaf for leaf in leaves}
            result: dict[str, Any] = {}
            for response in self._replies(ReceiveRequest(ids=self._ids(leaves), keep=keep, wait=wait,
                                                         timeout=timeout)):
                if not response.get("more"):
                    result = response["result"]
                    continue
                for _, jid, stream, t, flag, data in response["result"]["records"]:
                    if stream == Stream.PROGRESS:
                        continue  # kept on job.progress; a receive shows no bars (as the core's)
                    leaf = by_id[jid]
                    self._receive_one(leaf, _STREAMS[stream], _value(stream, t, flag, data), t, records,
                                      action, output, errors)
            for job in selected:  # their has_more_data changed in the host: ask again on the next read
                for node in [job, *job.child_jobs]:
                    if isinstance(node, HostJob):
                        node.stale()
            for failure in result.get("failures", ()):
                leaf = by_id[failure["child_id"]]
                reason = leaf.reason or reason_from_text(failure["reason"])
                assert reason is not None
                reasons.append(reason)
                if action == "continue":
                    self.host.write_failure(leaf, reason)
        return after_receive(self, selected, auto_remove, action, output, errors, reasons)

    def wait_job(self, jobs: JobSelector, *, any: bool = False, timeout: float | None = None,
                 state: JobState | str | None = None, show_progress: bool = False) -> list[Job]:
        """Wait in the host until the jobs are done (or one, with any=True); [] on timeout.
        ``show_progress`` draws nothing here: the records stay in the host until received."""
        timeout = check_timeout("wait_job", timeout)
        want = JobState.parse(state) if state is not None else None
        selected = self._resolve(jobs, "wait_job")
        if want is not None:
            with _fresh():
                selected = [j for j in selected if j.state is want]
        if not selected:
            return JobList()
        result = self._call(WaitRequest(ids=self._ids(selected), any=any, timeout=timeout))
        self._adopt(result["done"] + result["pending"])
        return JobList([self._all[v["id"]] for v in result["done"]])

    def stop_job(self, jobs: JobSelector, *, pass_thru: bool = False) -> list[Job]:
        """Stop the jobs' work in the host (as stop_job does) and return when it is over."""
        selected = self._resolve(jobs, "stop_job")
        if selected:
            self._adopt(self._call(StopRequest(ids=self._ids(selected))))
        return JobList(selected if pass_thru else [])

    def remove_job(self, jobs: JobSelector, *, force: bool = False) -> None:
        """Remove finished jobs and their records from the host (force=True stops them first)."""
        selected = self._resolve(jobs, "remove_job")
        with _fresh():
            for job in selected:
                if job.parent is not None:
                    raise JobStateError(f"remove_job: {describe_job(job)} is a child job; child jobs are "
                                        f"removed with their parent: remove_job({job.parent.id})")
                if not job.state.is_finished and not force:
                    raise JobNotFinishedError(f"remove_job: {describe_job(job)} is not finished; stop it "
                                              f"first with stop_job({job.id}), or pass force=True")
        if not selected:
            return
        self._call(RemoveRequest(ids=self._ids(selected), force=force))
        with self._cond:
            for job in selected:
                for node in [job, *job.child_jobs]:
                    self._all.pop(node.id, None)
                self._jobs.pop(job.id, None)

    def _pause(self, jobs: JobSelector, verb: str) -> list[Job]:
        selected = self._resolve(jobs, f"{verb}_job")
        if selected:
            self._adopt(self._call(SuspendRequest(ids=self._ids(selected), resume=verb == "resume")))
        return JobList(selected)

    def send_input(self, jobs: JobSelector, text: str) -> None:
        """Answer the prompt of a Blocked job of the host."""
        if not isinstance(text, str):
            raise TypeError(f"send_input: the answer must be a str, not {type(text).__name__}")
        self._adopt(self._call(InputRequest(ids=self._ids(self._resolve(jobs, "send_input")), text=text)))

    # --- lifetime ----------------------------------------------------------------------------------
    def close(self, grace: float = 1.0) -> None:
        """Stop talking to the host; its jobs go on (they outlive this process by design)."""
        if parent_of(self) is not None:
            return  # a forked child's copy: the parent's watcher and connection are not its own
        with self._backend_lock:
            self._closed = True
        self._watcher.close(max(grace, 0.0))  # psjobs-connect-watch ends within a round

    def __repr__(self) -> str:
        return f"<psjobs.Session connected to the psjobs host of {self.home}>"


def _keys(jobs: list[Any]) -> list[str] | None:
    """The host's words for jobs given as Jobs, ids or instance ids; None for names (or anything else)."""
    out: list[str] = []
    for item in jobs:
        if isinstance(item, Job):
            out.append(str(item.id))
        elif isinstance(item, (int, uuid.UUID)) and not isinstance(item, bool):
            out.append(str(item))
        else:
            return None
    return out or None


# --- values and errors as they come back -----------------------------------------------------------

def _value(stream: int, t: float, flag: int, data: Any) -> Any:
    """An output value, or a record of another stream, from a stored row (see host/_store.encode):
    JSON values come back as themselves, anything else as the readable text the host stored.
    Bytes a command printed that are not UTF-8 come as U+FFFD, as in a session's own jobs (the
    host keeps them for `psjobs receive`, which writes them as they were)."""
    if stream == Stream.OUTPUT:
        return json_safe(data)
    fields: dict[str, Any] = json_safe(data) if flag and isinstance(data, dict) else {"message": json_safe(str(data))}
    message = str(fields.get("message", ""))
    where = fields.get("computer_name")
    if stream == Stream.ERROR:
        exc = fields.get("exception")
        return ErrorRecord(message, t, where, reason_from_text(exc) if exc else None, fields.get("traceback"))
    if stream == Stream.INFORMATION:
        return InformationRecord(message, t, where, fields.get("data"))
    if stream == Stream.PROGRESS:
        return ProgressRecord(str(fields.get("activity", message)), fields.get("status"),
                              fields.get("percent_complete"), bool(fields.get("completed")), t, where)
    return Record(_STREAMS[stream], message, t, where)


_BUILTIN: dict[str, type[Exception]] = {c.__name__: c for c in (
    ValueError, TypeError, FileNotFoundError, NotADirectoryError, PermissionError, OSError)}


def _local_error(exc: HostReplyError) -> Exception:
    """The host's refusal as the error class the in-process verb raises (JobNotFoundError...)."""
    cls = getattr(_errors, exc.type_name, None)
    if not (isinstance(cls, type) and issubclass(cls, _errors.PsJobsError)):
        cls = _BUILTIN.get(exc.type_name)
    if cls is None:
        return exc
    try:
        return cls(str(exc))
    except TypeError:  # a class that takes more than a message
        return exc

