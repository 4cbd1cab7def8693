"""The fork server: a small warm Python that forks one worker per process job.

::

    session --ctl (SOCK_SEQPACKET): ("fork", token, meta) + the job's socket (SCM_RIGHTS)--> server
    server  --fork--> worker (own process group) --serves the job on that socket--> session
    server  --ctl: ("forked", token, pid) / ("exited", token, pid, wait status)--> session
    session closes ctl (or dies) --> server kills every worker group it still has, then exits

It is started as a fresh interpreter (never forked from the session, whose size and threads would
make every fork slow and unsafe), preloads the worker runtime, and freezes the GC so children share
its pages. It is a child subreaper, so the orphans a job leaves are reaped here, not left as zombies.
"""

from __future__ import annotations

import ctypes
import gc
import os
import pickle
import select
import signal
import socket
import sys
from typing import Any

PR_SET_CHILD_SUBREAPER = 36
# Warm spares: children forked ahead of need that wait for a job. A spare pays the copy-on-write
# faults of a new process (3-8 us a page here, several ms in all) before its job arrives.
SPARES = max(0, int(os.environ.get("PSJOBS_SPARES", "2")))
# Modules of callables pickled by reference are imported here once (when idle), so the next spares
# have them: a worker importing the caller's module itself cost 2.8 ms a job (measured).
PRELOAD = os.environ.get("PSJOBS_PRELOAD", "1") != "0"


def _subreaper() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: orphans go to init, as they would anyway


def main() -> None:
    ctl = socket.socket(fileno=int(sys.argv[1]))
    ctl.setblocking(True)
    _subreaper()
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl+C is for the session, which stops jobs itself
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)

    # Preload what every job needs, so a forked child starts with it in shared pages.
    import cloudpickle  # noqa: F401

    from . import _inside, _worker  # noqa: F401

    _worker.restore_pythonpath()  # jobs see the caller's environment, not the one we needed

    gc.collect()
    gc.freeze()
    ctl.send(pickle.dumps(("ready", os.getpid())))

    workers: dict[int, Any] = {}  # pid -> token
    spares: list[tuple[int, socket.socket]] = []
    own = (wake_r, wake_w, ctl.fileno())
    _top_up(spares, own)
    try:
        _serve(ctl, workers, spares, own, wake_r)
    except SessionGone:
        _shutdown(workers, spares)


class SessionGone(Exception):
    """The session closed its end: the server must end, and take every worker with it."""


def _tell(ctl: socket.socket, message: tuple[Any, ...]) -> None:
    try:
        ctl.send(pickle.dumps(message))
    except OSError as exc:
        raise SessionGone() from exc


def _serve(ctl: socket.socket, workers: dict[int, Any], spares: list[tuple[int, socket.socket]],
           own: tuple[int, ...], wake_r: int) -> None:
    preload: list[str] = []
    poller = select.poll()
    poller.register(ctl.fileno(), select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    while True:
        # Spares are made when the server is idle: forking one while a job runs competes with
        # that job for the CPU (measured: DONE at 1.8 ms, the job's end seen at 5.1 ms).
        idle_ms = -1 if len(spares) >= SPARES and not preload else 2
        try:
            events = poller.poll(idle_ms)
        except InterruptedError:
            events = []
        if not events:
            if preload and _preload(preload):
                for _, sock in spares:  # spares made before the import lack it: make new ones
                    sock.close()
                spares.clear()
            _top_up(spares, own)
            continue
        for fd, _mask in events:
            if fd == wake_r:
                try:
                    os.read(wake_r, 4096)
                except BlockingIOError:
                    pass
                continue
            try:
                msg, fds, _, _ = socket.recv_fds(ctl, 1 << 20, 4)
            except InterruptedError:
                continue
            except OSError:
                msg, fds = b"", []
            if not msg:
                raise SessionGone()
            request = pickle.loads(msg)
            if request[0] == "fork":
                if not _hand_to_spare(ctl, request[1], fds, workers, spares):
                    _fork(ctl, request[1], fds, workers, own, spares)
            elif request[0] == "preload" and PRELOAD:
                preload.append(request[1])
                for extra in fds:
                    os.close(extra)
            else:
                for extra in fds:
                    os.close(extra)
        _reap(ctl, workers, spares)


def _preload(names: list[str]) -> bool:
    """Import the modules asked for; True if any was imported. A module that fails is skipped."""
    import importlib
    import threading

    imported = False
    while names:
        name = names.pop(0)
        if name in sys.modules:
            continue
        try:
            importlib.import_module(name)
            imported = True
        except BaseException:
            continue  # the worker will import it (and report the error) itself
        if threading.active_count() > 1:
            # The module started a thread: forking a threaded process is unsafe, so stop here.
            global PRELOAD
            PRELOAD = False
            names.clear()
    if imported:
        gc.freeze()
    return imported


def _become_worker(own: tuple[int, ...], spares: list[tuple[int, socket.socket]]) -> None:
    """In a child just forked: a process group of its own, default signals, and none of the
    server's descriptors (nor its spares' sockets, whose end must be seen by those spares)."""
    os.setpgid(0, 0)
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    for fd in own:
        os.close(fd)
    for _, sibling in spares:
        sibling.close()


def _take_outputs(outputs: list[int]) -> None:
    """The job's fd 1 and 2 become the pipes the session reads."""
    for target, source in zip((1, 2), outputs):
        os.dup2(source, target)
        os.close(source)


def _top_up(spares: list[tuple[int, socket.socket]], own: tuple[int, ...]) -> None:
    while len(spares) < SPARES:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            status = 70
            try:
                _become_worker(own, spares)
                ours.close()
                from ._worker import prepare, rehearse, serve

                prepare()
                rehearse()
                msg, fds, _, _ = socket.recv_fds(theirs, 4096, 4)
                theirs.close()
                if not msg or len(fds) < 3:
                    os._exit(0)  # the server went away: this spare was never needed
                _take_outputs(fds[1:3])
                status = serve(fds[0], fds[0], capture_fds=False)
            except BaseException:
                status = 70
            finally:
                os._exit(status)
        theirs.close()
        try:
            os.setpgid(pid, pid)
        except OSError:
            pass
        spares.append((pid, ours))


def _hand_to_spare(ctl: socket.socket, token: Any, fds: list[int], workers: dict[int, Any],
                   spares: list[tuple[int, socket.socket]]) -> bool:
    while spares:
        pid, sock = spares.pop(0)
        try:
            socket.send_fds(sock, [pickle.dumps(token)], fds)
        except OSError:
            sock.close()
            continue  # that spare died: try the next one, or fork
        sock.close()
        for fd in fds:
            os.close(fd)
        workers[pid] = token
        _tell(ctl, ("forked", token, pid))
        return True
    return False


def _fork(ctl: socket.socket, token: Any, fds: list[int], workers: dict[int, Any],
          own: tuple[int, ...], spares: list[tuple[int, socket.socket]]) -> None:
    fd = fds[0]
    outputs = fds[1:3]  # the job's fd 1 and 2: pipes the session reads
    for extra in fds[3:]:
        os.close(extra)
    pid = os.fork()
    if pid == 0:
        status = 70
        try:
            _become_worker(own, spares)
            _take_outputs(outputs)
            from ._worker import serve

            status = serve(fd, fd, capture_fds=len(outputs) < 2)
        except BaseException:
            status = 70
        finally:
            os._exit(status)
    try:
        os.setpgid(pid, pid)  # also here, so the session may signal the group at once
    except OSError:
        pass
    os.close(fd)
    for source in outputs:
        os.close(source)
    workers[pid] = token
    _tell(ctl, ("forked", token, pid))


def _reap(ctl: socket.socket, workers: dict[int, Any], spares: list[tuple[int, socket.socket]]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        for i, (spare, sock) in enumerate(spares):
            if spare == pid:  # a spare died before it had a job
                sock.close()
                del spares[i]
                break
        token = workers.pop(pid, None)
        if token is not None:
            _tell(ctl, ("exited", token, pid, status))


def _shutdown(workers: dict[int, Any], spares: list[tuple[int, socket.socket]]) -> None:
    """The session is gone: leave nothing of its jobs behind."""
    for pid, sock in spares:
        sock.close()
        workers[pid] = None
    for pid in list(workers):
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
    for pid in list(workers):
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    while True:  # orphans we adopted as subreaper
        try:
            os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        else:
            break


if __name__ == "__main__":
    main()
