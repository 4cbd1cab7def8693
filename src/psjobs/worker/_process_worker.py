"""The runtime inside a job's worker process (forked by the fork server, or a fresh interpreter).

::

    session ==JOB frame==> worker: cwd, env, sys.path, then the cloudpickled call
    worker: write_*() / print / warnings / logging --> Writer batch (_batching) --(1 ms or 1000 items)--> RECORDS
            fd 1 and fd 2 (C code, subprocesses) --> pipe --> pump thread --> information / error
    worker ==DONE==> session: how it ended, the exception and its traceback text; then it exits

The channel is a pair of file descriptors of its own (a socket locally, the SSH channel's
stdin/stdout remotely): fd 1 is never the channel. SIGTERM raises JobStopped in the job's code, so
``finally`` blocks run and every record written before the stop still arrives.
"""

from __future__ import annotations

import importlib
import logging
import os
import select
import signal
import sys
import warnings
from collections.abc import Callable
from typing import Any, NoReturn

from .. import _inside
from .._errors import ProtocolError, WorkerError
from .._records import Stream
from ._batching import Channel, Writer, _Ctx, _on_alarm, _Pump, _records_frame, dumps_batch
from ._runner import FAIL, Ended, call, run_guarded
from ._wire import CALLER_PYTHONPATH, JOB, VERSION, Hello, JobMsg, load_call

__all__ = ["dumps_batch", "main", "prepare", "prepare_ahead", "rehearse", "restore_pythonpath", "serve", "set_handler"]


# The C function under signal.signal, which converts handlers to and from enums: in a child
# just forked that touched ~40 more pages than the setting itself (measured: 53 -> 16 page faults
# for a worker's four handlers, 0.1 ms). It takes only its own SIG_IGN (and SIG_DFL) objects.
_c_signal: Any = importlib.import_module("_signal")
set_handler: Callable[[int, Any], Any] = _c_signal.signal
SIG_IGN: Any = _c_signal.SIG_IGN


def _on_term(signum: int, frame: Any) -> None:
    _Ctx.stop = True
    _Ctx.raise_stop()


class _Prepared:
    writer: Writer | None = None
    pump: _Pump | None = None
    # False in the fork server, which prepares ahead for its children but is no job itself: each
    # child then only switches the prepared runtime on (see prepare_ahead).
    active = False
    routers: tuple[Any, Any, Any] = (None, None, None)  # the job's sys.stdout, sys.stderr, sys.stdin
    job_warnings: warnings.catch_warnings | None = None  # in the fork server: see prepare_ahead


def prepare(*, computer_name: str | None = None, capture_fds: bool = False) -> None:
    """Everything a worker does before it knows its job (a warm spare does it ahead of time).

    Copy-on-write faults after a fork cost 3-8 us a page on the machines measured, so a spare that
    has already touched what the job path touches starts a job in a fraction of a millisecond.
    """
    if _Prepared.writer is not None:
        if not _Prepared.active:
            _switch_on(capture_fds)  # a child of a fork server that prepared ahead
        return
    writer = Writer(Channel(-1, -1), computer_name)
    _Ctx.writer = writer
    _Prepared.writer = writer
    _inside.set_process_emitter(writer)
    sys.stdout = _inside.StreamRouter(None, Stream.INFORMATION)
    sys.stderr = _inside.StreamRouter(None, Stream.ERROR)
    _inside.install_routers(whole_process=True)
    _Prepared.routers = (sys.stdout, sys.stderr, sys.stdin)
    _take_signals(writer, capture_fds)
    # Touch the pickling paths once, so their pages are ours before the job comes.
    _records_frame(b"\0", [None], [0.0])
    JobMsg.decode(JobMsg(b"", "", {}, []).encode())
    _Prepared.active = True


def prepare_ahead() -> None:
    """In the fork server: prepare() once for every child, then stand by as no job at all.

    A child forked on request that ran prepare() itself paid ~190 copy-on-write and fresh-page
    faults for it, 0.6 ms of CPU (measured: 1.6 -> 1.0 ms a child, fork to exit, and spares pay
    it too); made here, before ``gc.freeze``, the runtime is in the pages every child shares, and
    a child only switches it on (the emitter, sys.stdout and friends, the warnings filter, the
    root logger's level, signal handlers). The server keeps its own signal handlers and warnings
    filters (a ResourceWarning of its own reaches nobody); what stays installed here
    (``warnings.showwarning``, the root logger's handler) falls through while no emitter is set.
    """
    streams = (sys.stdout, sys.stderr, sys.stdin)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGALRM, signal.SIGTERM, signal.SIGINT)}
    level = logging.getLogger().level
    server_warnings = warnings.catch_warnings()
    server_warnings.__enter__()
    prepare()
    # The job's warnings state (filters, showwarning), which a child puts back by leaving this
    # context: re-installing it cost ~70 more faults a child than this (install_routers walks
    # the logging and warnings modules).
    _Prepared.job_warnings = warnings.catch_warnings()
    _Prepared.job_warnings.__enter__()
    # The server's own warnings stay as they were (a ResourceWarning of its own is no job's).
    server_warnings.__exit__(None, None, None)
    _inside.set_process_emitter(None)
    signal.setitimer(signal.ITIMER_REAL, 0)  # no batch timer of the server's (its SIGALRM is fatal)
    sys.stdout, sys.stderr, sys.stdin = streams
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    logging.getLogger().setLevel(level)
    _Prepared.active = False


def _switch_on(capture_fds: bool) -> None:
    writer = _Prepared.writer
    assert writer is not None
    _inside.set_process_emitter(writer)
    sys.stdout, sys.stderr, sys.stdin = _Prepared.routers
    if _Prepared.job_warnings is not None:
        _Prepared.job_warnings.__exit__(None, None, None)  # the job's filters and showwarning
        _Prepared.job_warnings = None
    logging.getLogger().setLevel(logging.DEBUG)  # as install_routers(whole_process=True)
    _take_signals(writer, capture_fds)
    _Prepared.active = True


def _take_signals(writer: Writer, capture_fds: bool) -> None:
    """Signal handlers of a worker, and where fd 1 and 2 go (the pump, or the session's pipes)."""
    if capture_fds:
        # fd 1 and 2 of C code and child processes: read here (a remote worker has nobody else).
        r1, w1 = os.pipe()
        r2, w2 = os.pipe()
        os.dup2(w1, 1)
        os.dup2(w2, 2)
        os.close(w1)
        os.close(w2)
        _Prepared.pump = _Pump(writer, {r1: Stream.INFORMATION, r2: Stream.ERROR})
        _Prepared.pump.start()
    else:
        # Locally the session reads fd 1 and 2 through pipes of its own; batches leave on a timer.
        # Without SA_RESTART, as any handler Python installs: a blocking call the timer interrupts
        # returns to Python, which runs the handler (the batch goes) and makes the call again
        # (PEP 475). With SA_RESTART, the kernel went back into the call without telling Python: a
        # record written right before subprocess.run(), os.read() or a socket's recv() of a
        # minute reached the session a minute later.
        set_handler(signal.SIGALRM, _on_alarm)
    set_handler(signal.SIGTERM, _on_term)
    set_handler(signal.SIGINT, SIG_IGN)


def rehearse() -> None:
    """Serve one made-up job over a socket pair, so a warm spare's real job runs on its own pages.

    After prepare(), a trivial job still took ~130 copy-on-write and fresh-page faults in the spare
    (about 1 ms here): reference counts of code and modules on the job path, pickle's and
    cloudpickle's loaders, the heap's pools. Going through that path once, while the fork server is
    idle, takes them ahead of time. Nothing leaves the process: the frames go to a pair it closes.
    """
    import socket

    import cloudpickle

    writer = _Prepared.writer
    if writer is None:
        return
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        call = cloudpickle.dumps((lambda: 1, (), {}, None, None), protocol=5)
        ours.sendall(JobMsg(call, os.getcwd(), dict(os.environ), list(sys.path)).frame())
        _serve_one(writer, None, theirs.fileno(), theirs.fileno(), hello_first=False)
    except Exception:
        pass  # a rehearsal only saves time; the real job reports its own problems
    finally:
        ours.close()
        theirs.close()
        writer.channel.rfd = writer.channel.wfd = -1
        writer.channel.hello = None
        writer.input_items = writer.too_big = None
        writer.finished = False
        _Ctx.in_user = _Ctx.stop = _Ctx.raised = False
        _Ctx.job_pid = 0


def serve(rfd: int, wfd: int, *, computer_name: str | None = None, capture_fds: bool = True,
          hello_first: bool = True) -> int:
    """Run the one job that arrives on the channel; return the process exit status to use.

    ``hello_first=False`` (a local worker, whose pid the session knows) sends HELLO with the job's
    first frames instead: a trivial job then wakes the session once, not twice. Such a worker
    also honours a withdrawal (see ``_withdrawn``) right before the job's code begins.
    """
    prepare(computer_name=computer_name, capture_fds=capture_fds)
    writer = _Prepared.writer
    assert writer is not None
    return _serve_one(writer, _Prepared.pump, rfd, wfd, hello_first=hello_first)


class _SignalGate:
    """The runner's gate in a process worker: SIGTERM raises JobStopped only while in the job's code."""

    def enter(self) -> None:
        _Ctx.in_user = True
        _Ctx.raise_stop()

    def leave(self) -> None:
        _Ctx.in_user = False

    def stopping(self) -> bool:
        return _Ctx.stop


def _serve_one(writer: Writer, pump: _Pump | None, rfd: int, wfd: int, *, hello_first: bool) -> int:
    channel = writer.channel
    channel.rfd, channel.wfd = rfd, wfd
    channel.hello = Hello(VERSION, os.getpid(), tuple(sys.version_info[:2])).encode()
    if hello_first:
        channel.send_frames([])
    got = channel.recv()
    if got is None:
        return 0  # the session went away before sending the job
    kind, body = got
    if kind != JOB:
        raise ProtocolError(f"expected the job, got frame kind {kind}")
    job = JobMsg.decode(body)
    if not hello_first and _withdrawn(rfd):
        return 0  # stopped or removed before it began: it never runs, and the session expects nothing
    _Ctx.job_pid = os.getpid()
    os._exit = _exit_hook
    os.abort = _abort_hook
    ended = run_guarded(lambda: _run(job, writer), _SignalGate())
    try:
        _finish(writer, pump, ended)
    except Exception as exc:
        if writer.finished:
            raise
        # Never only "exited with status 70": the session hears why, if the channel still works.
        writer.finish(Ended(FAIL, WorkerError(f"the worker could not send the end of its job: "
                                              f"{type(exc).__name__}: {exc}")))
    return 0


def _withdrawn(fd: int) -> bool:
    """True if a local session shut its sending side of the job socket: it withdrew the job (a
    stop or a remove before the worker was known, backends/process/_call CallHandle.withdraw).

    Only a local worker's channel is a socket the session shuts to say so; a remote worker's is a
    pipe, on which a closed end means something else. One poll: ~1 us on the start path.
    """
    poller = select.poll()
    poller.register(fd, select.POLLRDHUP)
    return any(events & (select.POLLRDHUP | select.POLLHUP) for _, events in poller.poll(0))


_real_exit = os._exit


def _exit_hook(status: int) -> NoReturn:
    """``os._exit`` while the job's code runs: what it wrote reaches the session before the process
    goes (issue 13, case 9: the last batch, up to a millisecond of records, was lost). The job then
    fails as any worker that exits before its end does, with the status as its exit code (the
    session sees it). Elsewhere (a child the job forked, psjobs' own exit) the plain ``os._exit``."""
    _flush_last()
    _real_exit(status)


_real_abort = os.abort


def _abort_hook() -> NoReturn:
    """``os.abort`` while the job's code runs: as ``os._exit`` (the fault matrix's crash cell lost
    the records yielded just before); the job then fails naming SIGABRT. A crash inside C code
    cannot be caught so: what the worker had not sent yet is lost with it."""
    _flush_last()
    _real_abort()


def _flush_last() -> None:
    """Send what the job wrote, if this is the job's worker in the job's code and it can."""
    writer = _Prepared.writer
    if _Ctx.in_user and _Ctx.job_pid == os.getpid() and writer is not None and not writer.finished:
        _Ctx.in_user = False  # no stop raised in the middle of the last frames
        try:
            if _Prepared.pump is None:
                signal.setitimer(signal.ITIMER_REAL, 0)
            _inside.flush_lines(writer)
            writer.flush()  # does nothing when this thread is mid-batch (an os._exit in a __del__)
        except BaseException:
            pass  # the session still learns the exit status from the worker's end


def _settle(job: JobMsg) -> None:
    """Put the worker where the caller was: directory, environment, import path, umask."""
    if job.umask is not None:
        os.umask(job.umask)
    if job.cwd:
        os.chdir(job.cwd)
    env = job.env
    if env is not None:
        # Only what differs: rewriting every variable costs about a millisecond.
        for key in [k for k in os.environ if k not in env]:
            del os.environ[key]
        for key, value in env.items():
            if os.environ.get(key) != value:
                os.environ[key] = value
    if job.sys_path is not None:
        sys.path[:] = job.sys_path


def _run(job: JobMsg, writer: Writer) -> None:
    try:
        _settle(job)
    except (OSError, ValueError) as exc:
        bad = [k for k, v in (job.env or {}).items() if "\0" in k or "\0" in v or "=" in k or not k]
        what = (f"the job's environment variable {bad[0]!r} has a NUL byte, an '=' in its name or an "
                f"empty name, which no process environment can hold; fix or drop it in env=" if bad else
                f"the worker could not enter the job's directory {job.cwd!r} or set its environment")
        raise WorkerError(f"{what} ({type(exc).__name__}: {exc})") from exc
    try:
        target, args, kwargs, init, items = load_call(job.call)
    except Exception as exc:
        raise WorkerError(f"the worker could not unpickle the job's callable or its arguments: "
                          f"{type(exc).__name__}: {exc}") from exc
    writer.input_items = items
    call(target, args, kwargs, init, writer)


def _finish(writer: Writer, pump: _Pump | None, ended: Ended) -> None:
    if pump is None:
        signal.setitimer(signal.ITIMER_REAL, 0)
    _inside.flush_lines(writer)
    try:
        sys.stdout.flush()
    except Exception:
        pass
    if pump is not None:
        # Close our ends of fd 1 and 2 so the pump sees the end of what C code and children
        # printed; a grandchild that keeps them open does not hold the job (bounded wait).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.close(devnull)
        pump.done = True
        pump.wake()
        pump.join(0.2)
    writer.finish(ended)
    # That write woke the session's reader, and the kernel often queues it on this CPU (a socket's
    # wake-up is "sync": the writer is expected to sleep). This process exits instead, and the
    # tear-down of its memory ran before that reader did, the other CPU idle meanwhile (perf
    # sched: bench/FINDINGS.md, thirteenth session). The reader goes first: a lambda job's start
    # -> result 926 -> 886 us, a module function's 1,112 -> 1,023 (load 1.0-1.7).
    if _sched_yield is not None:  # not every Unix a remote worker runs on has it
        _sched_yield()


_sched_yield = getattr(os, "sched_yield", None)


def restore_pythonpath() -> None:
    """Give the environment the caller's PYTHONPATH back (sys.path is already made from ours)."""
    caller = os.environ.pop(CALLER_PYTHONPATH, None)
    if caller is None:
        return
    if caller.startswith("="):
        os.environ["PYTHONPATH"] = caller[1:]
    else:
        os.environ.pop("PYTHONPATH", None)


def main() -> None:
    """``python -m psjobs.worker._process_worker FD``: serve one job on a socket inherited as FD."""
    restore_pythonpath()
    fd = int(sys.argv[1])
    os.setpgid(0, 0) if os.getpgid(0) != os.getpid() else None
    try:
        status = serve(fd, fd, capture_fds=False, hello_first=False)  # the session reads our fd 1 and 2
    except BaseException:
        status = 70
    os._exit(status)


if __name__ == "__main__":
    main()
