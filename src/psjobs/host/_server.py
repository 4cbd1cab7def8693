"""The session host: one daemon per user that owns a Session and the store, behind a unix socket.

::

    psjobs (client) --request frame--> host.sock (0600, in a 0700 directory)
          ^                                 | a thread per connection, one handler per verb
          |                                 v
          +--- response frames ------- HostServer --verbs--> Session (the jobs run here)
               (the last has more=false)    |                   | journals
                                            |                   v
                                            +--rows, records-- Store (SQLite) <-- Persister

    frame:    | magic b"PSJH" | version: u8 | length: u32 | a JSON object, UTF-8 |
    request:  {"verb": "start", "args": {...}}
    response: {"ok": true, "more": false, "result": ..., "warnings": [...]}
              {"ok": false, "more": false, "error": {"type": ..., "message": ..., "exit_code": N}}

JSON only: the host never unpickles or runs what a client sends; it calls the named verb with
checked plain arguments. Requests are capped at MAX_REQUEST bytes. A malformed or oversized
request gets an error reply (and, when the framing itself is broken, the connection is closed);
the host stays up. One host per user and state directory: an flock on ``host.lock`` is held for
the host's whole life, so a second host refuses to start, and a socket left by a dead host
(whose lock the kernel released) is removed by the next one.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import selectors
import signal
import socket
import struct
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .._errors import JobNotFinishedError, JobStateError, PsJobsError
from ..core._job import Job
from ..core._session import Session
from ..core._spec import check_directory
from ._client import HostError, Paths, RequestError, answers, read_frame
from ._protocol import MAX_REQUEST, VERSION, pack
from ._store import (
    Persister,
    Row,
    Store,
    fill_more_data,
    is_finished,
    job_row,
    kill_orphans,
    select,
    set_next_id,
    subtree,
    tree,
)

PAGE_BYTES = 4 << 20         # a receive sends records in parts of about this size
_IDLE = 60.0                 # seconds a connection may take to send its request


class _AlreadyRunning(Exception):
    pass


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, timezone.utc).astimezone().isoformat()


def public(row: Row) -> dict[str, Any]:
    """A job as clients see it (``--json``)."""
    return {"id": row["id"], "name": row["name"], "job_type": row["job_type"], "state": row["state"],
            "has_more_data": row["has_more_data"], "location": row["location"], "command": row["command"],
            "parent_id": row["parent"], "child_ids": row["child_ids"], "computer_name": row["computer_name"],
            "exit_code": row["exit_code"], "reason": row["reason"], "begin_time": _iso(row["begin_time"]),
            "end_time": _iso(row["end_time"]), "instance_id": row["instance_id"], "pid": row["pid"],
            "cwd": row["cwd"]}


def describe(row: Row) -> str:
    return f"Job {row['id']} {row['name']!r} ({row['state']})"


# --- arguments of a request ----------------------------------------------------------------------

_MISSING: Any = object()


def _arg(args: dict[str, Any], verb: str, name: str, kind: type | tuple[type, ...],
         default: Any = _MISSING) -> Any:
    if name not in args or args[name] is None:
        if default is _MISSING:
            raise RequestError(f"{verb}: the request lacks the argument {name!r}")
        return default
    value = args[name]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, (int, float))):
        raise RequestError(f"{verb}: the argument {name!r} has the wrong type ({type(value).__name__})")
    return value


def _strs(args: dict[str, Any], verb: str, name: str, default: Any = _MISSING) -> list[str]:
    value = _arg(args, verb, name, list, default)
    if not all(isinstance(v, str) for v in value):
        raise RequestError(f"{verb}: the argument {name!r} must be a list of strings")
    return list(value)


def _timeout(args: dict[str, Any], verb: str) -> float | None:
    value = _arg(args, verb, "timeout", (int, float), None)
    if value is not None and value < 0:
        raise RequestError(f"{verb}: the timeout must be >= 0 seconds, not {value}")
    return None if value is None else float(value)


# --- warnings raised while a request runs go back to its client --------------------------------

_collect = threading.local()


def _showwarning(message: Any, category: Any, filename: str, lineno: int, file: Any = None,
                 line: str | None = None) -> None:
    sink = getattr(_collect, "sink", None)
    if sink is not None:
        sink.append(str(message))
    else:
        print(f"{category.__name__}: {message}", file=sys.stderr)


# --- the server ------------------------------------------------------------------------------------

class Reply:
    """What a handler uses to send parts of a streamed result before its end."""

    def __init__(self, conn: socket.socket) -> None:
        self._conn = conn

    def part(self, result_json: str) -> None:
        self._conn.sendall(pack(f'{{"ok":true,"more":true,"result":{result_json}}}'))


class HostServer:
    """Owns the Session, the Store and the Persister; serves one request per handler call."""

    def __init__(self, paths: Paths) -> None:
        self.paths = paths
        self.started = time.time()
        self._lock_fd = _take_lock(paths)
        try:
            self.store = Store(str(paths.database))
            kill_orphans(self.store.recover(os.getpid()))
            set_next_id(self.store.next_id())
            self.session = Session()
            self.persister = Persister(self.session, self.store)
            with contextlib.suppress(FileNotFoundError):
                paths.socket.unlink()  # left by a dead host: we hold the lock, so no host uses it
            self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._listener.bind(str(paths.socket))
            os.chmod(paths.socket, 0o600)
            self._listener.listen(64)
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._chdir_lock = threading.Lock()
        self._read_locks: dict[int, threading.Lock] = {}
        self._read_locks_guard = threading.Lock()
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._stopped_jobs: list[int] = []
        self._wake_r, self._wake_w = os.pipe()
        self.handlers: dict[str, Callable[[dict[str, Any], Reply], Any]] = {
            "start": self.h_start, "invoke": self.h_invoke, "get": self.h_get, "receive": self.h_receive,
            "wait": self.h_wait, "stop": self.h_stop, "remove": self.h_remove, "status": self.h_status,
            "shutdown": self.h_shutdown,
        }

    # --- the loop --------------------------------------------------------------------------------
    def serve(self) -> None:
        """Accept connections until a shutdown request or SIGTERM/SIGINT, then shut down."""
        os.set_blocking(self._wake_w, False)
        if threading.current_thread() is threading.main_thread():
            signal.set_wakeup_fd(self._wake_w)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, lambda *_: self._stop.set())
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        try:
            while not self._stop.is_set():
                for key, _ in sel.select():
                    if key.fileobj is self._listener:
                        with contextlib.suppress(OSError):
                            conn, _ = self._listener.accept()
                            threading.Thread(target=self._connection, args=(conn,), daemon=True,
                                             name="psjobs-host-conn").start()
                    else:
                        with contextlib.suppress(OSError):
                            os.read(self._wake_r, 512)
        finally:
            sel.close()
            self._shutdown()

    def _shutdown(self) -> None:
        # Refuse new clients first; the lock stays held until the very end, so a new host started
        # meanwhile waits for this one instead of sharing its database.
        self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            self.paths.socket.unlink()
        with self.session._cond:
            self._stopped_jobs = sorted(j.id for j in self.persister.live.values()
                                        if j._parent is None and not j._state.is_finished)
        self.session.close(grace=2.0)
        self.persister.close(timeout=10.0)
        self._stopped.set()  # the shutdown handler replies now, before the process ends

    def close(self) -> None:
        self.store.close()
        os.close(self._lock_fd)

    def _connection(self, conn: socket.socket) -> None:
        with conn:
            try:
                uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
                if uid != os.getuid():
                    conn.sendall(pack(_error(HostError(f"this psjobs host serves uid {os.getuid()} only"))))
                    return
                while True:
                    conn.settimeout(_IDLE)
                    try:
                        body = read_frame(conn, MAX_REQUEST, "the client")
                    except RequestError as exc:
                        conn.sendall(pack(_error(exc)))
                        return  # the framing is lost: the connection cannot go on
                    if body is None:
                        return
                    conn.settimeout(None)
                    conn.sendall(pack(self._handle(body, Reply(conn))))
            except OSError:
                return  # the client went away

    def _handle(self, body: bytes, reply: Reply) -> dict[str, Any]:
        sink: list[str] = []
        _collect.sink = sink
        try:
            try:
                request = json.loads(body)
            except (ValueError, UnicodeDecodeError) as exc:
                raise RequestError(f"the request is not valid JSON ({exc})") from None
            if not isinstance(request, dict) or not isinstance(request.get("verb"), str):
                raise RequestError('a request is a JSON object {"verb": ..., "args": {...}}')
            verb = request["verb"]
            args = request.get("args", {})
            handler = self.handlers.get(verb)
            if handler is None:
                known = ", ".join(sorted(self.handlers))
                raise RequestError(f"unknown verb {verb!r}; the host knows: {known}")
            if not isinstance(args, dict):
                raise RequestError(f"{verb}: the request's args must be a JSON object")
            return {"ok": True, "more": False, "result": handler(args, reply), "warnings": sink}
        except Exception as exc:
            if not isinstance(exc, (PsJobsError, TypeError, ValueError, OSError)):
                traceback.print_exc()
            return _error(exc, sink)
        finally:
            _collect.sink = None

    # --- helpers --------------------------------------------------------------------------------
    def rows(self) -> list[Row]:
        """Every job: stored rows, with the live state of jobs the host still runs."""
        rows = self.store.rows()
        with self.session._cond:
            live = self.persister.live
            for row in rows:
                job = live.get(row["id"])
                if job is None:
                    continue
                state = job._state
                if not state.is_finished:
                    row["state"] = str(state)
                elif row["state"] == "NotStarted":
                    row["state"] = "Running"  # finished, its last records on their way to the store
                row["begin_time"] = job._begin
                row["pid"] = row["pid"] or job.pid
        fill_more_data(rows)
        return rows

    def _select(self, args: dict[str, Any], verb: str) -> tuple[list[Row], list[Row]]:
        ids = _strs(args, verb, "ids")
        if not ids:
            raise RequestError(f"{verb}: name at least one job (an id or a name)")
        rows = self.rows()
        return rows, select(rows, ids, verb)

    def _live(self, rows: list[Row]) -> list[Job]:
        with self.session._cond:
            return [self.persister.live[r["id"]] for r in rows if r["id"] in self.persister.live]

    def _wait_stored(self, ids: list[int], timeout: float | None, any: bool = False) -> list[int]:
        """Wait until the jobs are finished in the store (all, or one with ``any``); the done ids."""
        done: list[int] = []

        def check() -> bool:
            nonlocal done
            finished = {r["id"] for r in self.store.rows(ids) if is_finished(r)}
            done = [i for i in ids if i in finished]
            return bool(done) if any else len(done) == len(ids)

        self.store.wait_for(check, timeout)
        return done

    def _register(self, job: Job, cwd: str | None) -> Row:
        self.store.add_jobs([job_row(n, cwd=cwd, host_pid=os.getpid()) for n in tree(job)])
        self.persister.add(job)
        return next(public(r) for r in self.rows() if r["id"] == job.id)

    def _moved_on(self, generation: int) -> bool:
        return self.store.generation != generation

    @contextlib.contextmanager
    def _reading(self, leaves: list[int]) -> Iterator[None]:
        """One reader at a time per job, so concurrent receives never get a record twice."""
        with self._read_locks_guard:
            locks = [self._read_locks.setdefault(i, threading.Lock()) for i in sorted(leaves)]
        for lock in locks:
            lock.acquire()
        try:
            yield
        finally:
            for lock in reversed(locks):
                lock.release()

    # --- one handler per verb -------------------------------------------------------------------
    def h_start(self, args: dict[str, Any], reply: Reply) -> Any:
        command = _strs(args, "start", "command")
        if not command:
            raise ValueError("start: give the command to run after `--`, e.g. psjobs start -- make test")
        name = _arg(args, "start", "name", str, None)
        cwd = check_directory("start", _arg(args, "start", "cwd", str))
        target: Any = command[0] if len(command) == 1 else command
        if _arg(args, "start", "thread", bool, False):
            # A thread job runs in the host's process, which has one working directory: the job's
            # command line takes it when the job is made, so hold it only for that moment.
            with self._chdir_lock:
                os.chdir(cwd)
                try:
                    job = self.session.start_thread_job(target, name=name)
                finally:
                    os.chdir("/")
        else:
            env = _arg(args, "start", "env", dict, None)
            job = self.session.start_job(target, name=name, working_directory=cwd,
                                         env=None if env is None else _env_delta(env))
        return self._register(job, cwd)

    def h_invoke(self, args: dict[str, Any], reply: Reply) -> Any:
        command = _strs(args, "invoke", "command")
        computers = _strs(args, "invoke", "computers")
        if not command or not computers:
            raise ValueError("invoke: give the computers with -c and the command after `--`")
        try:
            job = self.session.invoke_command(command[0] if len(command) == 1 else command,
                                              computer_name=computers,
                                              throttle_limit=_arg(args, "invoke", "throttle", int, 32),
                                              job_name=_arg(args, "invoke", "name", str, None))
        except ModuleNotFoundError as exc:
            raise HostError(f"invoke: the SSH backend of psjobs is not available here ({exc}); install it "
                            f"with `pip install 'psjobs[ssh]'`, then restart the host with "
                            f"`psjobs host stop`") from exc
        return self._register(job, None)

    def h_get(self, args: dict[str, Any], reply: Reply) -> Any:
        from ..core._state import JobState

        rows = self.rows()
        ids = _strs(args, "get", "ids", [])
        selected = select(rows, ids, "get") if ids else [r for r in rows if r["parent"] is None]
        state = _arg(args, "get", "state", str, None)
        if state is not None:
            want = str(JobState.parse(state))
            selected = [r for r in selected if r["state"] == want]
        if _arg(args, "get", "children", bool, False):
            ids_in = {r["id"] for r in selected}
            selected = selected + [r for r in rows if r["parent"] in ids_in and r["id"] not in ids_in]
        newest = _arg(args, "get", "newest", int, None)
        if newest is not None:
            if newest < 0:
                raise ValueError(f"get: --newest must be >= 0, not {newest}")
            # Unfinished jobs count as the newest: their end is still to come.
            selected = sorted(selected, key=lambda r: r["end_time"] if is_finished(r) else float("inf"),
                              reverse=True)[:newest]
        return [public(r) for r in sorted(selected, key=lambda r: r["id"])]

    def h_receive(self, args: dict[str, Any], reply: Reply) -> Any:
        rows, selected = self._select(args, "receive")
        keep = _arg(args, "receive", "keep", bool, False)
        wait = _arg(args, "receive", "wait", bool, False)
        auto_remove = _arg(args, "receive", "auto_remove", bool, False)
        if auto_remove and not wait:
            raise ValueError("receive: --auto-remove needs --wait (a job is removed once it is finished)")
        timeout = _timeout(args, "receive")
        deadline = None if timeout is None else time.monotonic() + timeout
        leaves = subtree(rows, selected, leaves_only=True)
        positions: dict[int, int] | None = None
        while True:
            generation = self.store.generation
            finished = all(is_finished(r) for r in self.store.rows(leaves))
            with self._reading(leaves):
                start = positions if keep and positions is not None else self.store.cursors(leaves)
                page, moved = self.store.receive_page(leaves, start, PAGE_BYTES)
                if page:
                    reply.part('{"records":[' + ",".join(_record_json(r) for r in page) + "]}")
                    if keep:
                        positions = moved
                    else:
                        self.store.move_cursors(moved, start)
                    continue
            if not wait or finished:
                break
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            self.store.wait_for(functools.partial(self._moved_on, generation), remaining)
        after = self.store.rows(leaves)
        by_id = {r["id"]: r for r in rows}

        def top(r: Row) -> Row:
            while r["parent"] is not None and r["parent"] in by_id:
                r = by_id[r["parent"]]
            return r

        # Named after the job the user knows (the top-level one), with the child that failed.
        failures = [{"id": top(r)["id"], "name": top(r)["name"], "child_id": r["id"],
                     "computer_name": r["computer_name"], "reason": r["reason"]}
                    for r in after if r["state"] == "Failed" and r["reason"]]
        done = all(is_finished(r) for r in after)
        removed: list[int] = []
        if auto_remove and done:
            removed = self._delete([r for r in selected if r["parent"] is None])
        return {"failures": failures, "timed_out": wait and not done, "removed": removed}

    def h_wait(self, args: dict[str, Any], reply: Reply) -> Any:
        _, selected = self._select(args, "wait")
        any_ = _arg(args, "wait", "any", bool, False)
        ids = [r["id"] for r in selected]
        done = self._wait_stored(ids, _timeout(args, "wait"), any_) if ids else []
        if any_:
            done = done[:1]
        ok = bool(done) if any_ else len(done) == len(ids)
        now = {r["id"]: r for r in self.rows()}
        return {"done": [public(now[i]) for i in done if i in now] if ok else [],
                "pending": [public(now[i]) for i in ids if i in now and i not in done]}

    def h_stop(self, args: dict[str, Any], reply: Reply) -> Any:
        _, selected = self._select(args, "stop")
        live = [j for j in self._live(selected) if not j._state.is_finished]
        if live:
            self.session.stop_job(live)
            self._wait_stored([j.id for j in live], self.session.stop_grace + 10.0)
        now = {r["id"]: r for r in self.rows()}
        return [public(now[r["id"]]) for r in selected if r["id"] in now]

    def h_remove(self, args: dict[str, Any], reply: Reply) -> Any:
        _, selected = self._select(args, "remove")
        force = _arg(args, "remove", "force", bool, False)
        for row in selected:
            if row["parent"] is not None:
                raise JobStateError(f"remove: {describe(row)} is a child job; child jobs are removed with "
                                    f"their parent: `psjobs remove {row['parent']}`")
            if not is_finished(row) and not force:
                raise JobNotFinishedError(f"remove: {describe(row)} is not finished; stop it first with "
                                          f"`psjobs stop {row['id']}`, or pass --force")
        running = [j for j in self._live(selected) if not j._state.is_finished]
        if running:
            self.session.stop_job(running)
        self._wait_stored([r["id"] for r in selected], self.session.stop_grace + 10.0)
        return {"removed": self._delete(selected)}

    def _delete(self, tops: list[Row]) -> list[int]:
        ids = subtree(self.store.rows(), tops, leaves_only=False)
        self.store.delete(ids)
        with self._read_locks_guard:
            for i in ids:
                self._read_locks.pop(i, None)
        return sorted(r["id"] for r in tops)

    def h_status(self, args: dict[str, Any], reply: Reply) -> Any:
        from .. import __version__

        rows = self.rows()
        return {"pid": os.getpid(), "version": __version__, "protocol": VERSION,
                "started": _iso(self.started),
                "home": str(self.paths.home), "socket": str(self.paths.socket),
                "database": str(self.paths.database), "log": str(self.paths.log),
                "jobs": sum(1 for r in rows if r["parent"] is None),
                "running_jobs": sum(1 for r in rows if r["parent"] is None and not is_finished(r)),
                "records": self.store.count_records()}

    def h_shutdown(self, args: dict[str, Any], reply: Reply) -> Any:
        self._stop.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        self._stopped.wait(60.0)
        return {"stopped": self._stopped_jobs}


def _record_json(r: tuple[int, int, int, float, int, str]) -> str:
    seq, job, stream, t, flag, data = r
    # Stored JSON goes out as it is, never decoded and encoded again; text goes out as a string.
    return f"[{seq},{job},{stream},{t!r},{flag},{data if flag else json.dumps(data)}]"


def _error(exc: BaseException, sink: list[str] | None = None) -> dict[str, Any]:
    if isinstance(exc, PsJobsError):
        code = exc.exit_code
    elif isinstance(exc, (TypeError, ValueError, FileNotFoundError, NotADirectoryError)):
        code = 2  # bad input, found before any job was made
    else:
        code = 1
    message = str(exc) if isinstance(exc, (PsJobsError, TypeError, ValueError, OSError)) else \
        f"the host failed: {type(exc).__name__}: {exc} (see the host's log: `psjobs host status`)"
    return {"ok": False, "more": False,
            "error": {"type": type(exc).__name__, "message": message, "exit_code": code},
            "warnings": sink or []}


def _env_delta(env: dict[str, Any]) -> dict[str, str | None]:
    """The client's environment as changes to the host's, so a job sees the client's exactly."""
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise RequestError("start: env must map names to strings")
    delta: dict[str, str | None] = {k: v for k, v in env.items() if os.environ.get(k) != v}
    delta.update({k: None for k in os.environ if k not in env})
    return delta


def _take_lock(paths: Paths, wait: float = 15.0) -> int:
    """Hold host.lock for the host's life. If a host answers on the socket, refuse; if the lock is
    held but nobody answers (a host starting or stopping), wait for it."""
    fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if answers(paths) or time.monotonic() > deadline:
                pid = _lock_pid(paths)
                os.close(fd)
                raise _AlreadyRunning(f"a psjobs host already runs for {paths.home} (pid {pid}); see "
                                      f"`psjobs host status`, or stop it with `psjobs host stop`") from None
            time.sleep(0.05)  # another host is starting or stopping; it holds the lock for moments
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _lock_pid(paths: Paths) -> str:
    try:
        return paths.lock.read_text().strip() or "?"
    except OSError:
        return "?"


# --- the daemon's entry point ----------------------------------------------------------------------

def host_main(argv: list[str]) -> int:
    """``python -c ... --home DIR [--daemon]``: run a host (in the background with --daemon)."""
    import argparse

    parser = argparse.ArgumentParser(prog="psjobs-host")
    parser.add_argument("--home", required=True)
    parser.add_argument("--daemon", action="store_true")
    opts = parser.parse_args(argv)
    paths = Paths(Path(opts.home))
    ready_w = None
    if opts.daemon:
        ready_r, ready_w = os.pipe()
        if os.fork():
            os.close(ready_w)
            with os.fdopen(ready_r, "rb") as f:
                answer = f.read().decode(errors="replace")
            if answer.startswith("ok"):
                return 0
            sys.stderr.write(answer or "the psjobs host ended before it was ready; see its log\n")
            return 1
        os.close(ready_r)
        os.setsid()  # no controlling terminal: a closed shell does not end the host
    try:
        paths.prepare()
        if opts.daemon:
            _detach(paths)
        server = HostServer(paths)
    except _AlreadyRunning as exc:
        return _ready(ready_w, "ok already running\n", str(exc), 0 if opts.daemon else 1)
    except Exception as exc:
        return _ready(ready_w, f"psjobs host: cannot start: {exc}\n", f"cannot start: {exc}", 1)
    print(f"psjobs host {os.getpid()} serving {paths.socket}", file=sys.stderr, flush=True)
    warnings.showwarning = _showwarning  # a warning raised for a request goes back to its client
    warnings.simplefilter("always")      # each client is told, not only the first one
    _ready(ready_w, "ok\n", "", 0)
    try:
        server.serve()
    finally:
        server.close()
        print(f"psjobs host {os.getpid()} stopped", file=sys.stderr, flush=True)
    return 0


def _detach(paths: Paths) -> None:
    # Modules imported later (backends load lazily) must still be found after the chdir below.
    sys.path[:] = [os.path.abspath(p) for p in sys.path if p]
    os.chdir("/")  # hold no directory of the user's
    null = os.open(os.devnull, os.O_RDONLY)
    log = os.open(paths.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(null)
    os.close(log)


def _ready(fd: int | None, answer: str, message: str, code: int) -> int:
    if fd is None:
        if message:
            print(f"psjobs host: {message}", file=sys.stderr)
        return code
    with contextlib.suppress(OSError):
        os.write(fd, answer.encode())
    os.close(fd)
    return code



