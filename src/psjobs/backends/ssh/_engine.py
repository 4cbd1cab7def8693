"""The SSH engine: asyncssh on one event-loop thread per session.

::

    session thread: Engine.start(children, spec, N) / stop / forget / close --call_soon_threadsafe-->
    loop thread "psjobs-ssh":
        _run_child (one task per child, at most N of a call hold the throttle semaphore)
            Pool(computer).connection()  one connection per computer, shared by every job of the
                                         session; another when sshd refuses more channels (_ssh_conn)
            conn.create_session(...)     one channel per child job (_ssh_channel)
        command: the login shell runs WATCHDOG  stdout lines -> output, stderr lines -> errors,
                                                exit status -> exit_code; stop: "k TICKS" on stdin
        callable: "exec python3 -c BOOT0"       stdin: boot source, R_MODULES, JOB (ANSWER, R_STOP)
                                                stdout: MARK, R_INFO, HELLO, RECORDS..., DONE, R_EXIT
        the channel closes --> finish(child, event): Completed, Failed (with the computer and why)
                               or Stopped (the remote process group is gone by then)

Backends never set state: everything reaches the job through its port (started, records, ended). The remote
side (watchdog and bootstrap) is in _remote_boot.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import math
import os
import shlex
import sys
import sysconfig
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncssh

from ..._errors import RemoteConnectionError, WorkerError
from ..._records import Record, Stream
from ...core import CALL, SHELL, JobPort, Outcome
from ...worker import _remote_boot as boot
from ...worker._wire import VERSION, pickle_call
from ._backend import ssh_options
from ._channel import STOP_MARGIN, CallChannel, Channel, Child, CommandChannel, local_python
from ._conn import Pool

if TYPE_CHECKING:
    from ...core import JobSpec, Session

# Test hooks (handshake only): the Python version this session announces to the remote, and a
# version the remote first stage pretends to run. Never set outside tests.
_ANNOUNCE_PYTHON: tuple[int, int] | None = None
_FAKE_REMOTE_PYTHON: tuple[int, int] | None = None
_PICKLE_LOCK = threading.Lock()
_MODULES: dict[tuple[bool, bool, bool], bytes] = {}  # R_MODULES payloads by what the remote lacks


# --- the engine ------------------------------------------------------------------------------------

class Engine:
    """asyncssh on a loop thread of its own; the session calls it from any thread."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.loop = asyncio.new_event_loop()
        self.pools: dict[str, Pool] = {}
        self.children: dict[int, Child] = {}
        self._boot_source: bytes | None = None
        self._closed = False
        self.thread = threading.Thread(target=self._run, name="psjobs-ssh", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            with contextlib.suppress(Exception):
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())

    def _call(self, fn: Callable[..., Any], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing left to do
            self.loop.call_soon_threadsafe(fn, *args)

    # --- preparing (caller's thread) ---------------------------------------------------------------
    def pickle_call(self, spec: JobSpec) -> None:
        """Pickle the call now, the caller's own modules by value (the remote cannot import them)."""
        import cloudpickle

        with _PICKLE_LOCK:
            registered = []
            already = cloudpickle.list_registry_pickle_by_value()
            for module in _by_value_modules(spec.target, spec.init):
                if module.__name__ in already:
                    continue  # the user registered it: leave it registered
                with contextlib.suppress(ValueError):
                    cloudpickle.register_pickle_by_value(module)
                    registered.append(module)
            try:
                spec.payload = pickle_call(spec.target, spec.args, spec.kwargs, spec.init, spec.input)
            except Exception as exc:
                raise TypeError(f"invoke_command: the callable {spec.command!r} or its arguments cannot be "
                                f"sent to another computer ({type(exc).__name__}: {exc}); pass picklable "
                                f"values") from exc
            finally:
                for module in registered:
                    with contextlib.suppress(ValueError):
                        cloudpickle.unregister_pickle_by_value(module)

    def boot_source(self) -> bytes:
        if self._boot_source is None:
            self._boot_source = boot.boot_sources()
        return self._boot_source

    def modules_for(self, info: dict[str, Any]) -> tuple[bytes, str]:
        """The R_MODULES payload for a remote that has what ``info`` says, and a note on it.

        Code objects compiled here travel marshalled when the remote has this interpreter's
        bytecode magic number (compiling psjobs and cloudpickle there took ~200 ms a job);
        otherwise the sources do.
        """
        import importlib.util

        import cloudpickle

        from ..._version import __version__

        need_psjobs = info.get("psjobs") != __version__ or info.get("wire") != VERSION
        need_cp = info.get("cloudpickle") != cloudpickle.__version__
        marshalled = info.get("magic") == importlib.util.MAGIC_NUMBER.hex()
        key = (need_psjobs, need_cp, marshalled)
        with _PICKLE_LOCK:  # made once a process: every session sends the same bytes
            payload = _MODULES.get(key)
            if payload is None:
                sources: dict[str, list[Any]] = {}
                if need_psjobs:  # worker/ and the bottom layer only (see _remote_boot.remote_package)
                    sources.update(boot.remote_package(__version__))
                if need_cp:
                    sources.update(_package_sources(cloudpickle))
                payload = _MODULES[key] = boot.dump_modules(sources, marshalled)
        sent = [name for name, needed in (("psjobs", need_psjobs), ("cloudpickle", need_cp)) if needed]
        where = info.get("executable")
        note = (f"sent {' and '.join(sent)} to {where} (missing or another version there; served from memory)"
                if sent else f"using psjobs and cloudpickle installed for {where}")
        return payload, note

    # --- starting --------------------------------------------------------------------------------
    def start(self, ports: list[JobPort], spec: JobSpec, limit: int) -> None:
        children = []
        for port in ports:
            child = Child(self, port, spec)
            port.data = child
            children.append(child)
        self._call(self._start, children, limit)

    def _start(self, children: list[Child], limit: int) -> None:
        gate = asyncio.Semaphore(limit)
        for child in children:
            self.children[child.port.job_id] = child
            child.over = asyncio.Event()
            child.task = self.loop.create_task(self._run_child(child, gate))

    async def _run_child(self, child: Child, gate: asyncio.Semaphore) -> None:
        try:
            async with gate:
                if child.finished or not child.port.started():
                    return  # stopped while it waited for a slot (the session made it Stopped)
                if child.stop_grace is not None or child.port.stop_requested:
                    child.end([], Outcome.stopped())
                    return
                await self._launch(child)
                assert child.over is not None
                await child.over.wait()
        except asyncio.CancelledError:
            if not child.finished:
                child.end([], Outcome.stopped())
        except RemoteConnectionError as exc:
            child.end([], Outcome.failed(exc))
        except Exception as exc:
            err = WorkerError(child.fail_text(f"{type(exc).__name__}: {exc}"))
            err.__cause__ = exc
            child.end([], Outcome.failed(err))

    async def _launch(self, child: Child) -> None:
        pool = self.pools.get(child.computer)
        if pool is None:
            pool = self.pools[child.computer] = Pool(self, child.computer)
        child.phase = "connecting"
        notes: list[str] = []
        await pool.connection(notes)
        if notes:  # the login's warnings (a key file skipped), as ssh prints them
            now = time.time()
            child.port.records([(Stream.WARNING, Record(Stream.WARNING, n, now, child.computer), now)
                                for n in notes])
        child.phase = "opening"
        options = ssh_options(self.session)
        grace = self.session.stop_grace
        factory: Callable[[], Channel]
        if child.spec.kind == CALL:
            announce = _ANNOUNCE_PYTHON or _FAKE_REMOTE_PYTHON or local_python()
            source = boot.boot0(announce, {"computer": child.computer, "grace": grace}, _FAKE_REMOTE_PYTHON)
            python = " ".join(shlex.quote(word) for word in shlex.split(options.python))
            command = f"exec {python} -c {shlex.quote(source)}"
            boot_source = self.boot_source()
            factory = functools.partial(CallChannel, child, boot_source)
        else:
            argv = child.spec.argv
            ticks = max(1, math.ceil(grace / boot.TICK))
            if child.spec.kind == SHELL:  # ["/bin/sh", "-c", line, "sh", args...]: the login shell runs it
                command = boot.command_line(ticks, [argv[2], *argv[4:]], shell=True)
            else:
                command = boot.command_line(ticks, argv, shell=False)
            factory = functools.partial(CommandChannel, child)
        try:
            conn, _chan, channel = await pool.open(factory, command)
        except (asyncssh.Error, OSError) as exc:
            raise RemoteConnectionError(child.fail_text(
                f"could not open a channel to {child.computer}: {getattr(exc, 'reason', None) or exc}"),
                child.computer) from exc
        child.channel = channel
        child.release = functools.partial(pool.release, conn)
        child.phase = "running"
        if child.stop_grace is not None:  # a stop came while the channel opened
            channel.send_stop(child.stop_grace)
            self.loop.call_later(child.stop_grace + STOP_MARGIN, child.stop_overdue)

    # --- the session's other calls (any thread) ------------------------------------------------------
    def stop(self, port: JobPort, grace: float) -> None:
        child = port.data
        if isinstance(child, Child):
            self._call(child.stop, grace)

    def suspend(self, port: JobPort) -> None:
        """SIGSTOP to the remote command's (or worker's) process group, through its watchdog."""
        self._pause(port, True)

    def resume(self, port: JobPort) -> None:
        self._pause(port, False)

    def _pause(self, port: JobPort, pause: bool) -> None:
        child = port.data
        if not isinstance(child, Child):
            return

        def send() -> None:
            if child.channel is not None:
                child.channel.send_pause(pause)

        self._call(send)
        # Counted as done once sent: the watchdog does not confirm it.
        if pause:
            port.suspended()
        else:
            port.resumed()

    def forget(self, port: JobPort) -> None:
        self._call(self._forget, port.job_id)

    def _forget(self, job_id: int) -> None:
        child = self.children.pop(job_id, None)
        if child is not None and not child.finished and child.channel is not None and child.channel.chan:
            child.channel.chan.close()

    def send_input(self, port: JobPort, text: str) -> None:
        child = port.data
        if isinstance(child, Child):
            def answer() -> None:
                if isinstance(child.channel, CallChannel):
                    child.channel.send_answer(text)

            # Answered as far as the session knows: a wait right after must not see it Blocked.
            child.prompt = None
            port.unblocked()
            self._call(answer)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if threading.current_thread() is self.thread:  # pragma: no cover - never from the loop itself
            self.loop.call_soon(self.loop.stop)
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._aclose(), self.loop).result(15)
        self._call(self.loop.stop)
        self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()

    async def _aclose(self) -> None:
        for child in list(self.children.values()):
            if child.task is not None and not child.task.done():
                child.task.cancel()
        pools, self.pools = list(self.pools.values()), {}
        await asyncio.gather(*(p.close() for p in pools), return_exceptions=True)
        tasks = [c.task for c in self.children.values() if c.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        for child in self.children.values():
            child.end([], Outcome.stopped())
        self.children.clear()


# --- helpers -----------------------------------------------------------------------------------------

def _site_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    dirs = {paths.get("stdlib"), paths.get("platstdlib"), paths.get("purelib"), paths.get("platlib")}
    return tuple(os.path.realpath(d) + os.sep for d in dirs if d)


def _by_value_modules(*functions: Any) -> list[Any]:
    """Modules of the caller's own code, which the remote computer cannot import by name."""
    out = []
    stdlib: frozenset[str] = getattr(sys, "stdlib_module_names", frozenset())
    installed = _site_dirs()
    for fn in functions:
        while isinstance(fn, functools.partial):
            fn = fn.func
        fn = getattr(fn, "__func__", fn)
        name = getattr(fn, "__module__", None)
        if not name or name == "__main__" or name.split(".")[0] in stdlib or name.split(".")[0] == "psjobs":
            continue
        module = sys.modules.get(name)
        path = getattr(module, "__file__", None)
        if module is None or not path:
            continue
        real = os.path.realpath(path)
        if any(real.startswith(d) for d in installed) or "site-packages" in real or "dist-packages" in real:
            continue
        out.append(module)
    return out


def _package_sources(package: Any) -> dict[str, list[Any]]:
    root = Path(inspect.getfile(package)).parent
    name = package.__name__
    sources: dict[str, list[Any]] = {}
    for path in sorted(root.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        rel = path.relative_to(root).with_suffix("")
        parts = [name, *rel.parts]
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        sources[".".join(parts)] = [path.read_text(encoding="utf-8"), is_pkg]
    return sources
