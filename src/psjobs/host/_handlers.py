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

import functools
import json
import os
import re
import socket
import subprocess
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
from ..core._job import Job
from ..core._pshost import reason_text
from ..core._session import Session
from ..core._spec import check_directory
from ..core._state import JobState
from ._client import Paths
from ._journal import Writer, pid_of
from ._protocol import (
    VERSION,
    Failure,
    GetRequest,
    GroupRequest,
    InvokeRequest,
    JobView,
    ReceiveRequest,
    ReceiveResult,
    RecordRow,
    RemoveRequest,
    RemoveResult,
    Request,
    RestartRequest,
    ResumeRequest,
    ShutdownRequest,
    ShutdownResult,
    StartRequest,
    StatusRequest,
    StatusResult,
    StopRequest,
    SuspendRequest,
    WaitRequest,
    WaitResult,
    pack,
    records_part,
)

PAGE_BYTES = 4 << 20         # a receive sends records in parts of about this size


class Reply:
    """What a handler uses to send parts of a streamed result before its end."""

    def __init__(self, conn: socket.socket) -> None:
        self._conn = conn

    def part(self, frame_json: str) -> None:
        self._conn.sendall(pack(frame_json))


@dataclass
class Context:
    """What every handler may use: the Session, its store's writer, where things are, the host's life."""

    session: Session
    writer: Writer
    paths: Paths
    started: float
    shutdown: Callable[[], list[int]]   # stops the host; returns the running jobs it stopped
    cwds: dict[int, str | None] = field(default_factory=dict)  # where each job's command runs
    callback: str | None = None  # PSJOBS_CALLBACK: a shell command run as each job finishes


# --- the command's words and the Session's ---------------------------------------------------------

def find(ctx: Context, texts: list[str], verb: str) -> list[Job]:
    """The jobs that ids, instance ids or names (wildcards allowed) select, in the order given,
    each once: the core's selection, with the command's words in its messages."""
    out: dict[int, Job] = {}
    for text in texts:
        for job in worded(verb, ctx.session.get_job, id=_selector(text)):
            out.setdefault(job.id, job)
    return list(out.values())


def _selector(text: str) -> int | uuid.UUID | str:
    text = text.strip()
    if text.isdigit():
        return int(text)
    try:
        return uuid.UUID(text)
    except ValueError:
        return text  # a name, wildcards allowed


_HINTS = [(re.compile(r"list the session's jobs with get_job\(\)"), "list the jobs with `psjobs get`"),
          (re.compile(r"\bstop_job\((\d+)\)"), r"`psjobs stop \1`"),
          (re.compile(r"\bremove_job\((\d+)\)"), r"`psjobs remove \1`"),
          (re.compile(r"pass force=True"), "pass --force"),
          (re.compile(r"\brestart_job\((\d+)\)"), r"`psjobs restart \1`")]


def worded(verb: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``call(...)``, its refusals said in the command's words (``psjobs stop 3``, not stop_job(3))."""
    try:
        return call(*args, **kwargs)
    except (JobNotFoundError, JobNotFinishedError, JobStateError) as exc:
        if type(exc) not in (JobNotFoundError, JobNotFinishedError, JobStateError):
            raise
        message = re.sub(r"^\w+: ", f"{verb}: ", str(exc))
        for pattern, words in _HINTS:
            message = pattern.sub(words, message)
        raise type(exc)(message) from None


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
                   cwd=ctx.cwds.get(job.id), status_message=job.status_message, attempts=job.attempts)


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
    session = ctx.session
    when = {"group": req.group, "after": find(ctx, req.after, "start") if req.after else None,
            "delay": req.delay, "retries": req.retries}
    if req.thread:
        job = worded("start", session.start_thread_job, target, name=req.name, working_directory=cwd, **when)
    else:
        job = worded("start", session.start_job, target, name=req.name, working_directory=cwd,
                     env=None if req.env is None else _env_delta(req.env), **when)
    return _started(ctx, job, cwd)


def invoke(ctx: Context, req: InvokeRequest, reply: Reply) -> JobView:
    if not req.command or not req.computers:
        raise ValueError("invoke: give the computers with -c and the command after `--`")
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
    ids = find(ctx, req.ids, "get") if req.ids else None
    jobs = ctx.session.get_job(id=ids, name=req.names or None, state=req.state, newest=req.newest,
                               include_child_jobs=req.children, command=req.commands or None,
                               has_more_data=req.has_more_data, child_job_state=req.child_state)
    return [view(ctx, j) for j in jobs]


def receive(ctx: Context, req: ReceiveRequest, reply: Reply) -> ReceiveResult:
    if req.auto_remove and not req.wait:
        raise ValueError("receive: --auto-remove needs --wait (a job is removed once it is finished)")
    selected = find(ctx, req.ids, "receive")
    # First, which top-level job and computer each leaf's records belong to (the --json lines'
    # ids and the [web1] prefixes); a client that does not know "jobs" reads no records from it.
    tops = {leaf.id: [job.id, leaf.computer_name] for job in selected for leaf in _tree(job) if not leaf.child_jobs}
    reply.part(json.dumps({"ok": True, "more": True, "result": {"records": [], "jobs": tops}}))
    rows: list[RecordRow] = []
    size = 0
    # A part per batch (at most about PAGE_BYTES): what arrived goes out before the read waits again.
    for leaf, entries in ctx.session.read_batches(selected, keep=req.keep, wait=req.wait, timeout=req.timeout):
        for stream, stored, t in entries:
            rows.append((stored.seq, leaf.id, stream, t, stored.flag, stored.data))
            size += len(stored.data) + 40
            if size >= PAGE_BYTES:
                reply.part(records_part(rows))
                rows, size = [], 0
        if rows:
            reply.part(records_part(rows))
            rows, size = [], 0
    ctx.writer.sync()  # the moved cursors are stored before the answer
    leaves = [leaf for job in selected for leaf in _tree(job) if not leaf.child_jobs]
    done = all(leaf.state.is_finished for leaf in leaves)
    removed: list[int] = []
    if req.auto_remove and done:
        removed = _remove(ctx, [j for j in selected if j.parent is None], force=False)
    return ReceiveResult(failures=_failures(leaves), timed_out=req.wait and not done, removed=removed)


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
    selected = find(ctx, req.ids, "wait")
    done = ctx.session.wait_job(selected, any=req.any, timeout=req.timeout) if selected else []
    ctx.writer.sync()  # their final states are stored before the answer
    if done:
        pending = [j for j in selected if j not in done]
    else:
        pending = [j for j in selected if not j.state.is_persistent]
    return WaitResult(done=[view(ctx, j) for j in done], pending=[view(ctx, j) for j in pending])


def stop(ctx: Context, req: StopRequest, reply: Reply) -> list[JobView]:
    selected = find(ctx, req.ids, "stop")
    ctx.session.stop_job(selected)
    ctx.writer.sync()
    return [view(ctx, j) for j in selected]


def remove(ctx: Context, req: RemoveRequest, reply: Reply) -> RemoveResult:
    jobs = find(ctx, req.ids, "remove") if req.ids else ctx.session.get_job()
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
                        records=ctx.writer.store.count_records())


def shutdown(ctx: Context, req: ShutdownRequest, reply: Reply) -> ShutdownResult:
    return ShutdownResult(stopped=ctx.shutdown())


# --- issue 15: suspend, resume, restart, groups, the completion hook ------------------------------

def suspend(ctx: Context, req: SuspendRequest, reply: Reply) -> list[JobView]:
    jobs = worded("suspend", ctx.session.suspend_job, find(ctx, req.ids, "suspend"))
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
        session.configure_group(req.name, req.parallel if req.parallel is not None else 1)
    elif req.action == "pause":
        session.pause_group(str(req.name))
    elif req.action == "resume":
        session.resume_group(str(req.name))
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
    ShutdownRequest: shutdown, SuspendRequest: suspend, ResumeRequest: resume, RestartRequest: restart,
    GroupRequest: group,
}
