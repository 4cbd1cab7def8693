"""One short handler per verb: a checked, typed request in, a typed response out.

::

    HostServer._dispatch --XRequest--> handler(ctx, request, reply) --verbs--> Session (the job table)
                                             |                                   | its jobs' journals
                                             +-- reply.part(...) for receive's    v
                                             |   batches                  Writer --> SQLite
                                             v
                                        XResponse (to_json by the server)

Every answer comes from the Session: selection, newest, has_more_data and the remove rules are the
core's; a handler only turns the command's words into the Session's (and its messages back).
A handler raises PsJobsError (with its exit_code), ValueError/TypeError (bad input: 2) or
OSError; the server turns any of them into the error reply.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import os
import re
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from .._errors import (
    JobNotFinishedError,
    JobNotFoundError,
    JobStateError,
    MissingDependencyError,
    missing_dependency,
)
from ..core import result_shape
from ..core._job import Job
from ..core._pshost import reason_text
from ..core._session import Session
from ..core._shipped import start_for_client, start_shipped
from ..core._spec import check_directory
from ..core._state import JobState
from ._client import Paths
from ._journal import Writer, pid_of
from ._protocol import (
    VERSION,
    Failure,
    GetRequest,
    GroupRequest,
    InputRequest,
    InvokeRequest,
    JobView,
    ReceiveRequest,
    ReceiveResult,
    RecordsRequest,
    RecordsResult,
    RemoveRequest,
    RemoveResult,
    Request,
    RestartRequest,
    ResumeRequest,
    ShutdownRequest,
    ShutdownResult,
    StartCallRequest,
    StartRequest,
    StatusRequest,
    StatusResult,
    StopRequest,
    SuspendRequest,
    WaitRequest,
    WaitResult,
)
from ._receive import Claims, Sender, consume
from ._receive import Reply as Reply  # the server's, from here
from ._words import in_words


@dataclass
class Context:
    """What every handler may use: the Session, its store's writer, where things are, the host's life."""

    session: Session
    writer: Writer
    paths: Paths
    started: float
    shutdown: Callable[[], list[int]]   # stops the host; returns the running jobs it stopped
    cwds: dict[int, str | None] = field(default_factory=dict)  # where each job's command runs
    claims: Claims = field(default_factory=Claims)  # the leaves a consuming receive reads now
    callback: str | None = None  # PSJOBS_CALLBACK: a shell command run as each job finishes


# --- the command's words and the Session's ---------------------------------------------------------

def find(ctx: Context, texts: list[str], verb: str, names: list[str] | None = None) -> list[Job]:
    """The jobs that ids, instance ids or names (wildcards allowed) select, then the jobs named
    ``names`` exactly (--name), in the order given, each once: the core's selection, with the
    command's words in its messages. A selector with wildcard characters also selects the job
    of that very name (`build[1]`), which the wildcard alone would miss."""
    out: dict[int, Job] = {}
    for text in texts:
        selector = _selector(text)
        jobs = worded(verb, ctx.session.get_job, id=selector)
        if isinstance(selector, str) and any(c in selector for c in "*?["):
            jobs = [*jobs, *ctx.session.get_job(id=_literal(selector))]
        for job in jobs:
            out.setdefault(job.id, job)
    for name in names or ():
        jobs = worded(verb, ctx.session.get_job, id=_literal(name))
        if not jobs:
            raise JobNotFoundError(f"{verb}: cannot find a job named {name!r}; list the jobs with `psjobs get`")
        for job in jobs:
            out.setdefault(job.id, job)
    return list(out.values())


def _literal(name: str) -> str:
    """A wildcard pattern that matches ``name`` itself: each wildcard character in brackets. Never
    taken for an id: the core's selection reads every string as a name."""
    return re.sub(r"[*?\[]", lambda m: f"[{m.group()}]", name)


def _selector(text: str) -> int | uuid.UUID | str:
    text = text.strip()
    if text.isdigit():
        return int(text)
    try:
        return uuid.UUID(text)
    except ValueError:
        return text  # a name, wildcards allowed


_WORDED = (JobNotFoundError, JobNotFinishedError, JobStateError, ValueError, TypeError)  # said in CLI words


def worded(verb: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``call(...)``, its refusals said in the command's words (``psjobs stop 3``, not stop_job(3))."""
    try:
        return call(*args, **kwargs)
    except _WORDED as exc:
        if type(exc) not in _WORDED:
            raise
        raise type(exc)(in_words(verb, str(exc))) from None


def view(ctx: Context, job: Job) -> JobView:
    """A job as clients see it (``--json``)."""
    parent = job.parent
    reason = job.reason
    return JobView(id=job.id, name=job.name, job_type=job.job_type, state=str(job.state),
                   has_more_data=job.has_more_data, location=job.location, command=job.command,
                   parent_id=None if parent is None else parent.id, child_ids=[c.id for c in job.child_jobs],
                   computer_name=job.computer_name, exit_code=job.exit_code,
                   reason=None if reason is None else reason_text(reason), begin_time=_iso(job.begin_time),
                   end_time=_iso(job.end_time), instance_id=str(job.instance_id), pid=pid_of(job),
                   cwd=ctx.cwds.get(job.id), prompt=job.prompt, status_message=job.status_message,
                   attempts=job.attempts, shape=result_shape(job))


def _iso(t: datetime | None) -> str | None:
    return None if t is None else t.isoformat()


def _tree(job: Job) -> list[Job]:
    out = [job]
    for child in job.child_jobs:
        out.extend(_tree(child))
    return out


def _started(ctx: Context, job: Job, cwd: str | None) -> JobView:
    nodes = _tree(job)
    for node in nodes:
        ctx.cwds[node.id] = cwd
    ctx.writer.started(nodes, cwd)
    if ctx.callback:
        ctx.session.on_finished(job, functools.partial(run_callback, ctx.callback))
    return view(ctx, job)


# --- the verbs -------------------------------------------------------------------------------------

def start(ctx: Context, req: StartRequest, reply: Reply) -> JobView:
    if not req.command:
        raise ValueError("start: give the command to run after `--`, e.g. psjobs start -- make test")
    cwd = check_directory("start", req.cwd)
    target: Any = req.command[0] if len(req.command) == 1 else req.command
    ctx.writer.check("start")  # record first, then start: a job the store cannot take never runs
    session = ctx.session
    when = {"group": req.group, "after": find(ctx, req.after, "start") if req.after else None,
            "delay": req.delay, "retries": req.retries}
    # With the client's umask: a file the job makes gets the mode it would get in the client's shell.
    job = worded("start", start_for_client, session, target, thread=req.thread, umask=req.umask, name=req.name,
                 working_directory=cwd, input=req.input, env=None if req.env is None else _env_delta(req.env),
                 **when)
    return _started(ctx, job, cwd)


def start_call(ctx: Context, req: StartCallRequest, reply: Reply) -> JobView:
    """A connected session's callable: its pickled bytes go unopened to the job's worker."""
    here = "{}.{}".format(*sys.version_info[:2])
    if req.python != here:  # pickled bytecode of another minor version crashed workers (3.11 -> 3.12)
        raise JobStateError(f"start_job: this Python is {req.python or 'unknown'} and the psjobs host runs "
                            f"Python {here} ({sys.executable}), where a callable pickled there cannot run; "
                            f"stop the host with `psjobs host stop` (jobs and records are kept) and start "
                            f"it from this Python: `python -m psjobs host start`")
    cwd = check_directory("start_job", req.cwd)
    try:
        payload = base64.b64decode(req.payload, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"start_call: the payload is not base64 ({exc})") from None
    job = start_shipped(ctx.session, payload, command=req.command, name=req.name, cwd=cwd, env=req.env,
                        sys_path=req.sys_path or None, umask=req.umask, shape=req.shape)
    return _started(ctx, job, cwd)


def invoke(ctx: Context, req: InvokeRequest, reply: Reply) -> JobView:
    if not req.command or not req.computers:
        raise ValueError("invoke: give the computers with -c and the command after `--`")
    ctx.writer.check("invoke")
    try:
        job = worded("invoke", ctx.session.invoke_command,
                     req.command[0] if len(req.command) == 1 else req.command, computer_name=req.computers,
                     throttle_limit=req.throttle, job_name=req.name, group=req.group, delay=req.delay,
                     after=find(ctx, req.after, "invoke") if req.after else None, retries=req.retries)
    except (MissingDependencyError, ModuleNotFoundError) as exc:  # asyncssh, or the backend itself
        # The host is a long-lived process: installing the extra is not enough, it must restart.
        why = exc.__cause__ if isinstance(exc.__cause__, ImportError) else exc  # the import itself
        raise missing_dependency("invoke (in the psjobs host)", "ssh", why,
                                 then="restart the host with `psjobs host stop`") from exc
    return _started(ctx, job, None)


def get(ctx: Context, req: GetRequest, reply: Reply) -> list[JobView]:
    if req.newest is not None and req.newest < 0:
        raise ValueError(f"get: --newest must be >= 0, not {req.newest}")
    ids = find(ctx, req.ids, "get", req.names) if req.ids or req.names else None
    jobs = ctx.session.get_job(id=ids, state=req.state, newest=req.newest, include_child_jobs=req.children,
                               command=req.commands or None, has_more_data=req.has_more_data,
                               child_job_state=req.child_state)
    return [view(ctx, j) for j in jobs]


def receive(ctx: Context, req: ReceiveRequest, reply: Reply) -> ReceiveResult:
    if req.auto_remove and not req.wait:
        raise ValueError("receive: --auto-remove needs --wait (a job is removed once it is finished)")
    selected = find(ctx, req.ids, "receive", req.names)
    # Each once (`receive 1 2` of a job and its child): a leaf is claimed, and its failure told, once.
    leaves = list({leaf.id: leaf for job in selected for leaf in _tree(job) if not leaf.child_jobs}.values())
    # Which top-level job and computer each leaf's records belong to (the --json ids and the
    # [web1] prefixes); a client that does not know "jobs" reads no records from it.
    sender = Sender(ctx.session, ctx.writer, reply, {leaf.id: [job.id, leaf.computer_name]
                                                     for job in selected for leaf in _tree(job) if not leaf.child_jobs})
    acked = req.ack and not req.keep  # psjobs receive: only what its reader took is consumed
    if not acked:
        sender.opening()
    if req.keep:  # consumes nothing: no need to keep out of another receive's way
        complete = whole = sender.plain(leaves, keep=True, wait=req.wait, timeout=req.timeout)
    else:  # each leaf read by one consuming receive at a time, whichever kind (_receive)
        def send(mine: list[Job], timeout: float | None) -> bool:
            if acked:
                return sender.acked(mine, wait=req.wait, timeout=timeout)
            return sender.plain(mine, keep=False, wait=req.wait, timeout=timeout)

        complete, whole = consume(ctx.claims, leaves, wait=req.wait, timeout=req.timeout, reply=reply, send=send)
    ctx.writer.sync()  # the moved cursors are stored before the answer
    done = all(leaf.state.is_finished for leaf in leaves)
    removed: list[int] = []
    if req.auto_remove and done and complete and whole:
        removed = _remove(ctx, [j for j in selected if j.parent is None], force=False)
    # A --wait ends when every job is finished or Suspended (as Receive-Job -Wait): it timed out
    # only if one still runs, and the command names those.
    going = [j for j in selected if not j.state.is_persistent] if req.wait else []
    return ReceiveResult(failures=_failures(leaves), timed_out=bool(going), removed=removed,
                         pending=[view(ctx, j) for j in going])


def _failures(leaves: list[Job]) -> list[Failure]:
    def top(job: Job) -> Job:
        while job.parent is not None:
            job = job.parent
        return job

    # Named after the job the user knows (the top-level one), with the child that failed.
    return [Failure(id=top(j).id, name=top(j).name, child_id=j.id, computer_name=j.computer_name,
                    reason=reason_text(reason)) for j in leaves
            if str(j.state) == "Failed" and (reason := j.reason) is not None]


def wait(ctx: Context, req: WaitRequest, reply: Reply) -> WaitResult:
    selected = find(ctx, req.ids, "wait", req.names)
    done = ctx.session.wait_job(selected, any=req.any, timeout=req.timeout) if selected else []
    ctx.writer.sync()  # their final states are stored before the answer
    if done:
        pending = [j for j in selected if j not in done]
    else:
        pending = [j for j in selected if not j.state.is_persistent]
    return WaitResult(done=[view(ctx, j) for j in done], pending=[view(ctx, j) for j in pending])


def stop(ctx: Context, req: StopRequest, reply: Reply) -> list[JobView]:
    selected = find(ctx, req.ids, "stop", req.names)
    ctx.session.stop_job(selected)
    ctx.writer.sync()
    return [view(ctx, j) for j in selected]


def remove(ctx: Context, req: RemoveRequest, reply: Reply) -> RemoveResult:
    jobs = find(ctx, req.ids, "remove", req.names) if req.ids or req.names else ctx.session.get_job()
    if req.state is not None:  # remove --state Completed: the top-level jobs in that state
        want = JobState.parse(req.state)
        jobs = [j for j in jobs if j.parent is None and j.state is want]
    return RemoveResult(removed=_remove(ctx, jobs, force=req.force))


def _remove(ctx: Context, jobs: list[Job], force: bool) -> list[int]:
    worded("remove", ctx.session.remove_job, jobs, force=force)
    ctx.writer.sync()  # deleted from the store before the answer
    for job in jobs:
        for node in _tree(job):
            ctx.cwds.pop(node.id, None)
    return sorted(j.id for j in jobs)


def send_input(ctx: Context, req: InputRequest, reply: Reply) -> list[JobView]:
    selected = find(ctx, req.ids, "input")
    ctx.session.send_input(selected, req.text)
    return [view(ctx, j) for j in selected]


def records(ctx: Context, req: RecordsRequest, reply: Reply) -> RecordsResult:
    """One stream of a job, from its first record: what ``job.output`` (and the others) show."""
    (job,) = find(ctx, [str(req.id)], "records")
    ctx.writer.sync()  # what the job's journals counted is in the store
    rows: list[list[Any]] = []
    for leaf in _tree(job):
        if not leaf.child_jobs:
            for window in ctx.writer.store.windows(leaf.id, 0, _ALL, 1024):
                rows.extend([leaf.id, t, stored.flag, json.loads(stored.data) if stored.flag else stored.data]
                            for stream, stored, t in window if stream == req.stream)
    return RecordsResult(records=rows)


_ALL = 1 << 62               # "to the end" for Store.read (an SQLite LIMIT)


def status(ctx: Context, req: StatusRequest, reply: Reply) -> StatusResult:
    from .._version import __version__

    jobs = ctx.session.get_job()
    ctx.writer.sync()
    paths = ctx.paths
    started = _iso(datetime.fromtimestamp(ctx.started, timezone.utc).astimezone())
    return StatusResult(pid=os.getpid(), version=__version__, protocol=VERSION, started=started,
                        home=str(paths.home), socket=str(paths.socket), database=str(paths.database),
                        log=str(paths.log),
                        jobs=len(jobs), running_jobs=sum(1 for j in jobs if not j.state.is_finished),
                        records=ctx.writer.store.count_records(), storage_problem=ctx.writer.problem,
                        records_dropped=ctx.writer.dropped)


def shutdown(ctx: Context, req: ShutdownRequest, reply: Reply) -> ShutdownResult:
    return ShutdownResult(stopped=ctx.shutdown())


# --- issue 15: suspend, resume, restart, groups, the completion hook ------------------------------

def suspend(ctx: Context, req: SuspendRequest, reply: Reply) -> list[JobView]:
    """``psjobs suspend``, and a connected session's suspend and resume (``resume=True``)."""
    verb, act = ("resume", ctx.session.resume_job) if req.resume else ("suspend", ctx.session.suspend_job)
    jobs = worded(verb, act, find(ctx, req.ids, verb))
    ctx.writer.sync()
    return [view(ctx, j) for j in jobs]


def resume(ctx: Context, req: ResumeRequest, reply: Reply) -> list[JobView]:
    jobs = worded("resume", ctx.session.resume_job, find(ctx, req.ids, "resume"))
    ctx.writer.sync()
    return [view(ctx, j) for j in jobs]


def restart(ctx: Context, req: RestartRequest, reply: Reply) -> list[JobView]:
    out = []
    for old in find(ctx, req.ids, "restart"):
        job = worded("restart", ctx.session.restart_job, old)
        out.append(_started(ctx, job, ctx.cwds.get(old.id)))
    return out


def group(ctx: Context, req: GroupRequest, reply: Reply) -> dict[str, Any]:
    session = ctx.session
    if req.action != "list" and not req.name:
        raise ValueError(f"group {req.action}: name the group, e.g. psjobs group {req.action} build")
    if req.action == "add" or req.action == "set":
        if req.action == "add" and session.get_group(req.name):
            raise ValueError(f"group add: there is a group {req.name!r} already; change it with "
                             f"`psjobs group set {req.name} --parallel N`")
        if req.action == "set" and not session.get_group(req.name):
            raise ValueError(f"group set: there is no group {req.name!r}; make it with `psjobs group add {req.name}`")
        assert req.name is not None
        parallel = req.parallel if req.parallel is not None else 1
        worded(f"group {req.action}", session.configure_group, req.name, parallel)
    elif req.action == "pause":
        worded("group pause", session.pause_group, str(req.name))
    elif req.action == "resume":
        worded("group resume", session.resume_group, str(req.name))
    return {"groups": session.get_group(None if req.action == "list" else req.name)}


def run_callback(command: str, job: Job) -> None:
    """The completion hook (pueue's callback): ``command`` run by /bin/sh with the job's id, name,
    state and exit code in its environment. Its output is dropped; a thread reaps it."""
    env = dict(os.environ, PSJOBS_JOB_ID=str(job.id), PSJOBS_JOB_NAME=job.name, PSJOBS_JOB_STATE=str(job.state),
               PSJOBS_JOB_EXIT_CODE="" if job.exit_code is None else str(job.exit_code),
               PSJOBS_JOB_COMMAND=job.command)
    proc = subprocess.Popen(["/bin/sh", "-c", command], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    threading.Thread(target=proc.wait, name="psjobs-host-callback", daemon=True).start()


def _env_delta(env: dict[str, str]) -> dict[str, str | None]:
    """The client's environment as changes to the host's, so a job sees the client's exactly."""
    delta: dict[str, str | None] = {k: v for k, v in env.items() if os.environ.get(k) != v}
    delta.update({k: None for k in os.environ if k not in env})
    return delta


Handler = Callable[[Context, Any, Reply], Any]

HANDLERS: dict[type[Request], Handler] = {
    StartRequest: start, InvokeRequest: invoke, GetRequest: get, ReceiveRequest: receive,
    WaitRequest: wait, StopRequest: stop, RemoveRequest: remove, StatusRequest: status,
    ShutdownRequest: shutdown, StartCallRequest: start_call, SuspendRequest: suspend, InputRequest: send_input,
    RecordsRequest: records, ResumeRequest: resume, RestartRequest: restart, GroupRequest: group,
}
