"""The session host: one daemon per user that owns a Session and the store, behind a unix socket.

::

    psjobs (client) --request frame--> host.sock (0600, in a 0700 directory)
          ^                                 | a thread per connection, one handler per verb
          |                                 v
          +--- response frames ------- HostServer --request--> handler --verbs--> Session (the job table)
               (the last has more=false)                                            | its journals
                                                                                    v
                                                      Store (SQLite) <-- Writer thread

    frames, requests and responses: see _protocol; one handler per verb: see _handlers

JSON only: the host never unpickles or runs what a client sends; it calls the named verb with
checked plain arguments. (A connected session's callable, ``start_call``, is pickled bytes the host
hands unopened to the job's own worker process, which runs as the same user: the peer uid check.)
Requests are capped at MAX_REQUEST bytes, MAX_DEPTH levels of nesting and
MAX_SELECTOR characters a selector. A malformed or oversized request, or a peer of another uid,
gets an error reply (when the framing itself is broken, what follows is read and dropped within
bounds, then the connection is closed, so the reply is not lost to a reset); the host stays up.
The host is started isolated (``python -I`` from ``/``, see _client), so nothing in the user's
current directory is imported into it.

One host per user and state directory: an flock on ``host.lock`` is held for
the host's whole life, so a second host refuses to start, and a socket left by a dead host
(whose lock the kernel released) is removed by the next one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import selectors
import signal
import socket
import sqlite3
import struct
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

from .._errors import HostError, ProtocolError, PsJobsError, RequestError
from ..core._session import Session
from ._client import Paths, answers, open_private, read_frame
from ._handlers import HANDLERS, Context, Reply
from ._journal import Writer
from ._protocol import MAX_REQUEST, decode_request, error_reply, final, pack
from ._restore import restore
from ._store import Store, kill_orphans, unusable

_IDLE = 60.0                 # seconds a connection may take to send its request
# After a refusal, what the client still sends is dropped for at most this long and this much: enough
# for a request a little over the limit to be read whole, while a peer cannot hold a thread for long.
_DRAIN_SECONDS = 2.0
_DRAIN_BYTES = 4 * MAX_REQUEST


class _AlreadyRunning(Exception):
    """Another host holds the lock. Control flow inside host_main only (it never reaches a user),
    so it stays here rather than in the _errors tree."""


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

class HostServer:
    """Owns the Session, the Store and its Writer; hands each request to its verb's handler."""

    def __init__(self, paths: Paths) -> None:
        self.paths = paths
        self.started = time.time()
        self._lock_fd = _take_lock(paths)
        try:
            try:  # a damaged page may show only when it is read: the whole load is covered
                self.store = Store(str(paths.database))
                kill_orphans(self.store.recover(os.getpid()))
                self.writer = Writer(self.store)
                # One job table: the stored jobs come back as finished jobs of the host's Session, and
                # every new job's records go to the store through its journal.
                self.session = Session(first_id=self.store.next_id(), journal_factory=self.writer.journal)
                # Its command jobs outlive it (`psjobs start -- make`): a later host ends them if it dies.
                self.session.commands_outlive_process = True
                cwds = restore(self.session, self.writer)
            except sqlite3.DatabaseError as exc:
                raise unusable(str(paths.database), exc) from None
            with contextlib.suppress(FileNotFoundError):
                paths.socket.unlink()  # left by a dead host: we hold the lock, so no host uses it
            self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._listener.bind(str(paths.socket))
            os.chmod(paths.socket, 0o600)
            self._listener.listen(64)
        except BaseException:
            os.close(self._lock_fd)
            raise
        self.context = Context(session=self.session, writer=self.writer, paths=paths, started=self.started,
                               shutdown=self._request_stop, cwds=cwds,
                               callback=os.environ.get("PSJOBS_CALLBACK") or None)
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._asked = False                 # the shutdown verb stopped the host (not a signal)
        self._answered = threading.Event()  # and its reply went out
        self._stopped_jobs: list[int] = []
        self._wake_r, self._wake_w = os.pipe()

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
        self._stopped_jobs = [j.id for j in self.session.get_job() if not j.state.is_finished]
        self.session.close(grace=2.0)
        self.writer.close(timeout=10.0)
        self._stopped.set()  # the shutdown handler replies now, before the process ends
        if self._asked:
            self._answered.wait(5.0)  # its client hears "stopped", not a connection that closed

    def _request_stop(self) -> list[int]:
        """Stop serving (the shutdown verb); wait for the jobs to be stopped and stored."""
        self._asked = True
        self._stop.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        self._stopped.wait(60.0)
        return self._stopped_jobs

    def close(self) -> None:
        self.store.close()
        os.close(self._lock_fd)

    def _connection(self, conn: socket.socket) -> None:
        with conn:
            try:
                uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
                if uid != os.getuid():
                    _refuse(conn, HostError(f"this psjobs host serves uid {os.getuid()} only"))
                    return
                while True:
                    conn.settimeout(_IDLE)
                    try:
                        body = read_frame(conn, MAX_REQUEST, "the client")
                    except RequestError as exc:
                        _refuse(conn, exc)
                        return  # the framing is lost: the connection cannot go on
                    if body is None:
                        return
                    conn.settimeout(None)
                    conn.sendall(pack(self._dispatch(body, Reply(conn))))
                    if self._stopped.is_set():
                        self._answered.set()
            except OSError:
                return  # the client went away

    def _dispatch(self, body: bytes, reply: Reply) -> dict[str, Any]:
        sink: list[str] = []
        _collect.sink = sink
        try:
            try:
                request = decode_request(body)
            except ProtocolError as exc:
                raise RequestError(str(exc)) from None
            result = HANDLERS[type(request)](self.context, request, reply)
            return final(result, sink + self.writer.notes())  # a storage problem: every client is told
        except Exception as exc:
            if not isinstance(exc, (PsJobsError, TypeError, ValueError, OSError)):
                with contextlib.suppress(Exception):  # a full disk under host.log is no reason to stop
                    traceback.print_exc()
            return _error(exc, sink + self.writer.notes())
        finally:
            _collect.sink = None


def _refuse(conn: socket.socket, exc: BaseException) -> None:
    """Send the error reply, then read and drop what the client still sends (within bounds) before
    the connection closes: a unix socket closed with unread data is reset, and a client still
    writing its request would get a broken pipe or a reset instead of the reply."""
    conn.sendall(pack(_error(exc)))
    conn.shutdown(socket.SHUT_WR)  # the reply is whole: the client reads it, then the end
    deadline = time.monotonic() + _DRAIN_SECONDS
    left = _DRAIN_BYTES
    with contextlib.suppress(OSError):
        while left > 0 and (wait := deadline - time.monotonic()) > 0:
            conn.settimeout(wait)
            chunk = conn.recv(min(left, 1 << 16))
            if not chunk:
                return
            left -= len(chunk)


def _error(exc: BaseException, sink: list[str] | None = None) -> dict[str, Any]:
    if isinstance(exc, PsJobsError):
        code = exc.exit_code
    elif isinstance(exc, (TypeError, ValueError, FileNotFoundError, NotADirectoryError)):
        code = 2  # bad input, found before any job was made
    else:
        code = 1
    message = str(exc) if isinstance(exc, (PsJobsError, TypeError, ValueError, OSError)) else \
        f"the host failed: {type(exc).__name__}: {exc} (see the host's log: `psjobs host status`)"
    return error_reply(type(exc).__name__, message, code, sink or [])


def _take_lock(paths: Paths, wait: float = 15.0) -> int:
    """Hold host.lock for the host's life. If a host answers on the socket, refuse; if the lock is
    held but nobody answers (a host starting or stopping), wait for it."""
    fd = open_private(paths.lock, os.O_RDWR)  # it is truncated below: never a link's target
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
        # The command that started the host shows the answer after its own "psjobs: " prefix.
        return _ready(ready_w, f"the psjobs host cannot start: {exc}\n", f"cannot start: {exc}", 1)
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
    log = open_private(paths.log, os.O_WRONLY | os.O_APPEND)
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



