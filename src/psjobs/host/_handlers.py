"""One short handler per verb: a checked, typed request in, a typed response out.

::

    HostServer._dispatch --XRequest--> handler(ctx, request, reply) --verbs--> Session
                                             |                    --rows---> JobTable (store)
                                             +-- reply.part(...) for receive's pages
                                             v
                                        XResponse (to_json by the server)

A handler raises PsJobsError (with its exit_code), ValueError/TypeError (bad input: 2) or
OSError; the server turns any of them into the error reply.
"""

from __future__ import annotations

import functools
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .._errors import JobNotFinishedError, JobStateError, MissingDependencyError, missing_dependency
from ..core._spec import check_directory
from ..core._state import JobState
from ._client import Paths
from ._protocol import (
    VERSION,
    Failure,
    GetRequest,
    InvokeRequest,
    JobView,
    ReceiveRequest,
    ReceiveResult,
    RemoveRequest,
    RemoveResult,
    Request,
    ShutdownRequest,
    ShutdownResult,
    StartRequest,
    StatusRequest,
    StatusResult,
    StopRequest,
    WaitRequest,
    WaitResult,
    pack,
    records_part,
)
from ._store import Row, is_finished, subtree
from ._table import JobTable, describe, iso, view

PAGE_BYTES = 4 << 20         # a receive sends records in parts of about this size


class Reply:
    """What a handler uses to send parts of a streamed result before its end."""

    def __init__(self, conn: socket.socket) -> None:
        self._conn = conn

    def part(self, frame_json: str) -> None:
        self._conn.sendall(pack(frame_json))


@dataclass
class Context:
    """What every handler may use: the job table, where things are, and the host's own life."""

    table: JobTable
    paths: Paths
    started: float
    shutdown: Callable[[], list[int]]   # stops the host; returns the running jobs it stopped


def start(ctx: Context, req: StartRequest, reply: Reply) -> JobView:
    if not req.command:
        raise ValueError("start: give the command to run after `--`, e.g. psjobs start -- make test")
    cwd = check_directory("start", req.cwd)
    target: Any = req.command[0] if len(req.command) == 1 else req.command
    session = ctx.table.session
    if req.thread:
        job = session.start_thread_job(target, name=req.name, working_directory=cwd)
    else:
        job = session.start_job(target, name=req.name, working_directory=cwd,
                                env=None if req.env is None else _env_delta(req.env))
    return ctx.table.register(job, cwd)


def invoke(ctx: Context, req: InvokeRequest, reply: Reply) -> JobView:
    if not req.command or not req.computers:
        raise ValueError("invoke: give the computers with -c and the command after `--`")
    try:
        job = ctx.table.session.invoke_command(req.command[0] if len(req.command) == 1 else req.command,
                                               computer_name=req.computers, throttle_limit=req.throttle,
                                               job_name=req.name)
    except (MissingDependencyError, ModuleNotFoundError) as exc:  # asyncssh, or the backend itself
        # The host is a long-lived process: installing the extra is not enough, it must restart.
        why = exc.__cause__ if isinstance(exc.__cause__, ImportError) else exc  # the import itself
        raise missing_dependency("invoke (in the psjobs host)", "ssh", why,
                                 then="restart the host with `psjobs host stop`") from exc
    return ctx.table.register(job, None)


def get(ctx: Context, req: GetRequest, reply: Reply) -> list[JobView]:
    rows = ctx.table.rows()
    selected = ctx.table.select(req.ids, "get")[1] if req.ids else [r for r in rows if r["parent"] is None]
    if req.state is not None:
        want = str(JobState.parse(req.state))
        selected = [r for r in selected if r["state"] == want]
    if req.children:
        ids_in = {r["id"] for r in selected}
        selected = selected + [r for r in rows if r["parent"] in ids_in and r["id"] not in ids_in]
    if req.newest is not None:
        if req.newest < 0:
            raise ValueError(f"get: --newest must be >= 0, not {req.newest}")
        # Unfinished jobs count as the newest: their end is still to come.
        selected = sorted(selected, key=lambda r: r["end_time"] if is_finished(r) else float("inf"),
                          reverse=True)[:req.newest]
    return [view(r) for r in sorted(selected, key=lambda r: r["id"])]


def receive(ctx: Context, req: ReceiveRequest, reply: Reply) -> ReceiveResult:
    if req.auto_remove and not req.wait:
        raise ValueError("receive: --auto-remove needs --wait (a job is removed once it is finished)")
    table, store = ctx.table, ctx.table.store
    rows, selected = table.select(req.ids, "receive")
    deadline = None if req.timeout is None else time.monotonic() + req.timeout
    leaves = subtree(rows, selected, leaves_only=True)
    positions: dict[int, int] | None = None
    while True:
        generation = store.generation
        finished = all(is_finished(r) for r in store.rows(leaves))
        with table.reading(leaves):
            first = positions if req.keep and positions is not None else store.cursors(leaves)
            page, moved = store.receive_page(leaves, first, PAGE_BYTES)
            if page:
                reply.part(records_part(page))
                if req.keep:
                    positions = moved
                else:
                    store.move_cursors(moved, first)
                continue
        if not req.wait or finished:
            break
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            break
        store.wait_for(functools.partial(_moved_on, store, generation), remaining)
    after = store.rows(leaves)
    failures = _failures(rows, after)
    done = all(is_finished(r) for r in after)
    removed: list[int] = []
    if req.auto_remove and done:
        removed = table.delete([r for r in selected if r["parent"] is None])
    return ReceiveResult(failures=failures, timed_out=req.wait and not done, removed=removed)


def _moved_on(store: Any, generation: int) -> bool:
    return bool(store.generation != generation)


def _failures(rows: list[Row], leaves: list[Row]) -> list[Failure]:
    by_id = {r["id"]: r for r in rows}

    def top(r: Row) -> Row:
        while r["parent"] is not None and r["parent"] in by_id:
            r = by_id[r["parent"]]
        return r

    # Named after the job the user knows (the top-level one), with the child that failed.
    return [Failure(id=top(r)["id"], name=top(r)["name"], child_id=r["id"], computer_name=r["computer_name"],
                    reason=r["reason"]) for r in leaves if r["state"] == "Failed" and r["reason"]]


def wait(ctx: Context, req: WaitRequest, reply: Reply) -> WaitResult:
    _, selected = ctx.table.select(req.ids, "wait")
    ids = [r["id"] for r in selected]
    done = ctx.table.wait_stored(ids, req.timeout, req.any) if ids else []
    if req.any:
        done = done[:1]
    ok = bool(done) if req.any else len(done) == len(ids)
    return WaitResult(done=ctx.table.views(done) if ok else [],
                      pending=ctx.table.views([i for i in ids if i not in done]))


def stop(ctx: Context, req: StopRequest, reply: Reply) -> list[JobView]:
    table = ctx.table
    _, selected = table.select(req.ids, "stop")
    live = table.running(selected)
    if live:
        table.session.stop_job(live)
        table.wait_stored([j.id for j in live], table.session.stop_grace + 10.0)
    return table.views([r["id"] for r in selected])


def remove(ctx: Context, req: RemoveRequest, reply: Reply) -> RemoveResult:
    table = ctx.table
    _, selected = table.select(req.ids, "remove")
    for row in selected:
        if row["parent"] is not None:
            raise JobStateError(f"remove: {describe(row)} is a child job; child jobs are removed with "
                                f"their parent: `psjobs remove {row['parent']}`")
        if not is_finished(row) and not req.force:
            raise JobNotFinishedError(f"remove: {describe(row)} is not finished; stop it first with "
                                      f"`psjobs stop {row['id']}`, or pass --force")
    running = table.running(selected)
    if running:
        table.session.stop_job(running)
    table.wait_stored([r["id"] for r in selected], table.session.stop_grace + 10.0)
    return RemoveResult(removed=table.delete(selected))


def status(ctx: Context, req: StatusRequest, reply: Reply) -> StatusResult:
    from .._version import __version__

    rows = ctx.table.rows()
    paths = ctx.paths
    return StatusResult(pid=os.getpid(), version=__version__, protocol=VERSION, started=iso(ctx.started),
                        home=str(paths.home), socket=str(paths.socket), database=str(paths.database),
                        log=str(paths.log), jobs=sum(1 for r in rows if r["parent"] is None),
                        running_jobs=sum(1 for r in rows if r["parent"] is None and not is_finished(r)),
                        records=ctx.table.store.count_records())


def shutdown(ctx: Context, req: ShutdownRequest, reply: Reply) -> ShutdownResult:
    return ShutdownResult(stopped=ctx.shutdown())


def _env_delta(env: dict[str, str]) -> dict[str, str | None]:
    """The client's environment as changes to the host's, so a job sees the client's exactly."""
    delta: dict[str, str | None] = {k: v for k, v in env.items() if os.environ.get(k) != v}
    delta.update({k: None for k in os.environ if k not in env})
    return delta


Handler = Callable[[Context, Any, Reply], Any]

HANDLERS: dict[type[Request], Handler] = {
    StartRequest: start, InvokeRequest: invoke, GetRequest: get, ReceiveRequest: receive,
    WaitRequest: wait, StopRequest: stop, RemoveRequest: remove, StatusRequest: status,
    ShutdownRequest: shutdown,
}
