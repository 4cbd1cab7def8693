"""The worker side of cluster jobs: what runs inside a Dask worker process.

::

    scheduler --compute-task run_task(key, item, spec)--> a worker thread
        run_task: refuses a re-run after a lost worker (the guard plugin's annotation) and a
                  stopped key or group (its mark: _stop_marks.py), then makes this thread's
                  psjobs emitter a _TaskEmitter and runs init + target (or the command, its
                  lines streamed) through worker._runner, with worker._thread_stop as its gate
    write_*() / print / warnings / logging --> _TaskEmitter --> _Shipper (one per worker process)
    _Shipper thread --every 2 ms, or 1,000 records--> worker.log_event("psjobs-<token>", chunk)
        --> scheduler --> the session's Client (subscribe_topic), in the order they were made
    run_task returns (outcome, last records, how many chunks it shipped) --> fetched by the session
    session --client.run(stop_tasks)--> every worker: stop_requested() turns True, JobStopped is
        raised in the task's thread, SIGTERM to the processes the task started, SIGKILL after grace;
        the answer: which of the keys ran here (running, or ended lately: _stop_marks.py)

A worker process serves many tasks at once, one per thread, so nothing here is process-wide
except what is shared on purpose: the shipper, the registry of running tasks, and the stop marks.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
import signal
import subprocess
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any, NoReturn

from ... import _inside
from ..._compat import worker_backlog
from ..._errors import JobStateError, JobStopped, WorkerError
from ..._records import Stream
from ...worker._outcome import dump_reason, status_error
from ...worker._process_worker import dumps_batch
from ...worker._procs import run_command, signal_procs
from ...worker._runner import call, run_guarded
from ...worker._thread_stop import ThreadStopper
from ._stop_marks import Marks

FLUSH_SECONDS = 0.002   # a trickle reaches the session within a few ms (plus the scheduler hop)...
FLUSH_ITEMS = 1000      # ...and a flood goes in batches: every chunk is one scheduler message
START_DELAY = 0.01      # a task still running after 10 ms says where it runs (short ones never need to)
MAX_PENDING = 20_000    # records a task may have waiting before write_* waits for the shipper
MAX_BACKLOG = 64        # messages the worker may hold for the scheduler before the shipper waits
LOST = "psjobs_lost"    # annotation the guard plugin sets: times the task's worker was lost

Columns = tuple[bytes, list[Any], list[float]]  # streams (a byte each), values, times
LastWords = tuple[str, "int | None"]  # what ended the process from the task ("os._exit(3)"), its status
#: One task's part of a chunk: key, attempt, seq, begin time (the first time), records, last words.
Chunk = tuple[str, int, int, "float | None", Columns, "LastWords | None"]
LAST_WORDS_SECONDS = 5.0  # an os._exit in a task waits at most this long for its records to reach the scheduler

#: The result of run_task, by position:
#: (outcome, attempt, chunks shipped, begin time, worker address, last records (pickled),
#:  reason (pickled), traceback text, exit code); outcome is "complete", "fail", "stopped" or
#:  "refused" (a re-run after a lost worker, which psjobs does not allow unless asked).
Outcome = tuple[str, int, int, float, str, "bytes | None", "bytes | None", "str | None", "int | None"]


class _Spec:
    """What a start call runs, unpickled once per worker process (shared by every item)."""

    __slots__ = ("args", "argv", "cwd", "env", "init", "input", "kind", "kwargs", "retries", "target")

    def __init__(self, data: dict[str, Any]) -> None:
        self.kind: str = data["kind"]
        self.target: Any = data.get("target")
        self.argv: list[str] = data.get("argv") or []
        self.args: tuple[Any, ...] = data.get("args", ())
        self.kwargs: dict[str, Any] = data.get("kwargs", {})
        self.init: Any = data.get("init")
        self.input: list[Any] | None = data.get("input")
        self.cwd: str | None = data.get("cwd")
        self.env: dict[str, str | None] | None = data.get("env")
        self.retries: int = data.get("retries", 0)


class _Task:
    """One running task: its records waiting to ship, its stop state, the processes it started."""

    __slots__ = ("attempt", "begin", "first", "grace", "group", "input", "key", "last_words", "procs", "seq",
                 "start_due", "start_sent", "stopper", "streams", "timer", "times", "topic", "values")

    def __init__(self, key: str, group: str, topic: str, attempt: int, items: list[Any] | None) -> None:
        self.key = key
        self.group = group
        self.topic = topic
        self.attempt = attempt
        self.input = items
        self.begin = time.time()
        # Records not shipped yet, in columns as the process worker keeps them (_wire.decode_records).
        self.streams = bytearray()
        self.values: list[Any] = []
        self.times: list[float] = []
        self.first = 0.0                 # monotonic time of the oldest of them
        self.seq = 0                     # chunks shipped so far
        self.start_due = time.monotonic() + START_DELAY
        self.start_sent = False
        self.grace = 5.0
        self.stopper = ThreadStopper()  # its lock also guards procs
        self.procs: list[subprocess.Popen[Any]] = []
        self.timer: threading.Timer | None = None
        self.last_words: LastWords | None = None

    @property
    def stop(self) -> bool:
        return self.stopper.stop

    def columns(self) -> Columns:
        """Hand over the records not shipped yet (the caller holds the shipper's lock)."""
        out = (bytes(self.streams), self.values, self.times)
        self.streams = bytearray()
        self.values = []
        self.times = []
        return out

    def request_stop(self, grace: float) -> None:
        """Cooperative flag, JobStopped in the thread, SIGTERM now and SIGKILL after ``grace``."""
        if self.stopper.stop:
            return
        self.grace = grace  # before the stop is raised: run_command's kill uses it
        if not self.stopper.request():
            return
        with self.stopper.lock:
            procs = list(self.procs)
        signal_procs(procs, signal.SIGTERM)
        timer = threading.Timer(grace, self.kill)
        timer.name = "psjobs-dask-kill"
        timer.daemon = True
        self.timer = timer
        timer.start()

    def kill(self) -> None:
        with self.stopper.lock:
            procs = list(self.procs)
        signal_procs(procs, signal.SIGKILL)


class _TaskEmitter:
    """psjobs' emitter for a task's thread: records go to the shipper, tagged with the task."""

    def __init__(self, task: _Task, runtime: _Runtime) -> None:
        self.task = task
        self.runtime = runtime
        self.shipper = runtime.shipper
        self.computer_name: str | None = runtime.address
        self.line_buffers: dict[int, str] = {}

    def emit(self, stream: int, payload: Any, t: float | None = None) -> None:
        stopper = self.task.stopper
        if stopper.lost and stopper.take_lost():  # Python dropped the stop raised: raise it here
            raise JobStopped()
        self.shipper.add(self.task, stream, payload, time.time() if t is None else t)

    def stop_requested(self) -> bool:
        return self.task.stop

    def input(self) -> Iterator[Any]:
        return iter(self.task.input or ())

    def read_host(self, prompt: str) -> str:
        raise JobStateError(f"read_host: the cluster task {self.task.key} cannot ask the session for input "
                            f"(it runs on {self.computer_name}); pass what it needs as arguments or input=")


class _Shipper:
    """Batches the records of every task of this worker process and sends them to the scheduler."""

    def __init__(self, runtime: _Runtime) -> None:
        self.runtime = runtime
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.dirty: dict[str, _Task] = {}   # tasks with records to ship or a start to announce
        self.urgent = False
        self.shipping = False  # chunks taken out of the tasks and not yet handed to the worker
        # When the thread wakes next: a task wakes it only to make that earlier, so a stream of
        # short tasks costs no thread switch each (inf: it waits for a poke; 0: it is shipping).
        self.wake_at = math.inf
        self.thread = threading.Thread(target=self._run, name="psjobs-dask-shipper", daemon=True)
        self.thread.start()

    def _poke(self, when: float) -> None:
        if when < self.wake_at:
            self.wake_at = when
            self.cond.notify()

    def started(self, task: _Task) -> None:
        with self.cond:
            self.dirty[task.key] = task
            self._poke(task.start_due)

    def add(self, task: _Task, stream: int, payload: Any, t: float) -> None:
        # The lock, not the Condition: a task's stop (an asynchronous JobStopped) that landed in
        # Condition.__enter__ after the lock was taken would leave it taken (see _thread._Emitter).
        with self.lock:
            task.streams.append(stream)
            task.values.append(payload)
            task.times.append(t)
            n = len(task.values)
            if n == 1:
                task.first = time.monotonic()
                self.dirty[task.key] = task
                self._poke(task.first + FLUSH_SECONDS)
            elif n >= FLUSH_ITEMS:
                self.urgent = True
                self._poke(0.0)
            # Backpressure: a task that produces faster than the scheduler forwards waits here
            # instead of filling the worker's memory (a stop wakes it: see _Runtime.stop).
            while len(task.values) >= MAX_PENDING and not task.stop:
                self.cond.wait(0.05)

    def take(self, task: _Task) -> tuple[Columns, int]:
        """The task ended: what it has not shipped goes with its result; how many chunks went."""
        with self.cond:
            self.dirty.pop(task.key, None)
            return task.columns(), task.seq

    def _due(self, now: float) -> float | None:
        due: float | None = None
        for task in self.dirty.values():
            when = task.first + FLUSH_SECONDS if task.values else task.start_due
            if due is None or when < due:
                due = when
        return due

    def _run(self) -> None:
        while True:
            with self.cond:
                while True:
                    now = time.monotonic()
                    due = self._due(now)
                    if self.urgent or (due is not None and due <= now):
                        break
                    if due is None and self._worker_gone():
                        _runtimes.pop(self.runtime.worker, None)
                        return  # an in-process worker closed: its shipper ends with it
                    self.wake_at = math.inf if due is None else due
                    self.cond.wait(1.0 if due is None else due - now)
                self.urgent = False
                self.wake_at = 0.0  # shipping: the loop looks at every task again before it waits
                chunks = self._collect(now, everything=False)
                self.shipping = bool(chunks)
                self.cond.notify_all()  # wake tasks that waited for room
            try:
                if chunks:
                    self._wait_for_room()
                    self._send(chunks)
            finally:
                if chunks:
                    with self.cond:
                        self.shipping = False
                        self.cond.notify_all()  # ship_last waits for chunks in flight

    def _collect(self, now: float, everything: bool) -> dict[str, list[Chunk]]:
        """Take the chunks due (``everything``: all there is) out of the tasks; the lock is held."""
        chunks: dict[str, list[Chunk]] = {}
        for key, task in list(self.dirty.items()):
            if not everything and not task.values and task.start_due > now:
                continue  # nothing to say yet: a short task never costs a message
            chunks.setdefault(task.topic, []).append(
                (key, task.attempt, task.seq, None if task.start_sent else task.begin, task.columns(),
                 task.last_words))
            task.seq += 1
            task.start_sent = True
            del self.dirty[key]
        return chunks

    def _send(self, chunks: dict[str, list[Chunk]]) -> dict[str, bytes]:
        """log_event each topic's chunk (through the worker's batched stream); what went, by topic."""
        sent: dict[str, bytes] = {}
        for topic, items in chunks.items():
            try:
                blob = pickle.dumps((self.runtime.address, [
                    (key, attempt, seq, begin, dumps_batch(*columns) if columns[1] else None, last)
                    for key, attempt, seq, begin, columns, last in items]), protocol=5)
                self.runtime.worker.log_event(topic, blob)
                sent[topic] = blob
            except Exception as exc:  # the worker is closing: the session fails the job then
                logging.getLogger("psjobs.dask").warning("psjobs: could not ship records to %s: %r", topic, exc,
                                                         exc_info=exc)
        return sent

    def ship_last(self, seconds: float) -> None:
        """Ship every record not shipped yet and return once the scheduler holds them (or after
        ``seconds``): the process is about to end (``os._exit``, ``os.abort`` in a task), and
        the worker's batched stream would go with it, its last messages unsent."""
        deadline = time.monotonic() + seconds
        with self.cond:
            while self.shipping and time.monotonic() < deadline:
                self.cond.wait(max(0.0, deadline - time.monotonic()))  # chunks in flight go first
            chunks = self._collect(time.monotonic(), everything=True)
        from distributed.utils import sync

        worker = self.runtime.worker
        for topic, blob in self._send(chunks).items():
            # The batched stream keeps order: once this chunk is in the scheduler's log, so is
            # every earlier one, and the worker's loss (logged when it is gone) comes after.
            while time.monotonic() < deadline:
                events = sync(worker.loop, worker.scheduler.events, topic=topic,
                              callback_timeout=max(0.1, deadline - time.monotonic()))
                if any(msg == blob for _, msg in reversed(events)):
                    break
                time.sleep(0.005)  # the scheduler has not read it yet: nothing to wait on across processes

    def _worker_gone(self) -> bool:
        status = getattr(self.runtime.worker, "status", None)
        return getattr(status, "name", "") in ("closing", "closed", "failed")

    def _wait_for_room(self) -> None:
        buffer = worker_backlog(self.runtime.worker)
        if buffer is None:
            return
        deadline = time.monotonic() + 5.0
        while len(buffer) > MAX_BACKLOG and time.monotonic() < deadline:
            time.sleep(0.001)  # the worker's event loop drains it; there is nothing to wait on


class _Runtime:
    """Per worker process: the shipper, the running tasks, the stop marks, the spec cache."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self.address: str = worker.address
        self.pid = os.getpid()  # a child the task forks has no worker to ship through
        self.lock = threading.Lock()
        self.tasks: dict[str, _Task] = {}
        self.marks = Marks()  # the keys and groups stopped (_stop_marks), guarded by self.lock
        self.specs: OrderedDict[str, _Spec] = OrderedDict()
        self.shipper = _Shipper(self)

    def spec(self, spec_id: str, blob: bytes) -> _Spec:
        with self.lock:
            spec = self.specs.get(spec_id)
            if spec is not None:
                self.specs.move_to_end(spec_id)
                return spec
        import cloudpickle

        try:
            spec = _Spec(cloudpickle.loads(blob))
        except Exception as exc:
            raise WorkerError(f"the worker {self.address} could not unpickle the job's callable or its "
                              f"arguments ({type(exc).__name__}: {exc}); the workers need the modules the "
                              f"callable uses") from exc
        with self.lock:
            self.specs[spec_id] = spec
            while len(self.specs) > 64:
                self.specs.popitem(last=False)
        return spec

    def stop(self, keys: list[str], groups: list[str], grace: float) -> list[str]:
        """Stop these keys and groups here, now and when they come; the keys of them that ran here."""
        with self.lock:  # one hold: a task is running, or ended (remembered), or refuses to start
            self.marks.mark(keys, groups)
            wanted_keys, wanted_groups = set(keys), set(groups)
            victims = [t for t in self.tasks.values() if t.key in wanted_keys or t.group in wanted_groups]
            ran = [t.key for t in victims] + self.marks.ran(wanted_keys, wanted_groups)
        for task in victims:
            task.request_stop(grace)
        if victims:
            with self.shipper.cond:
                self.shipper.cond.notify_all()  # a task waiting for room must see its stop
        return ran


_runtimes: weakref.WeakKeyDictionary[Any, _Runtime] = weakref.WeakKeyDictionary()
_runtime_lock = threading.Lock()
_installed = False


def _get_runtime(worker: Any) -> _Runtime:
    """The runtime of ``worker`` (one per worker: a LocalCluster of threads has several per process)."""
    rt = _runtimes.get(worker)
    if rt is not None:
        return rt
    global _installed
    with _runtime_lock:
        if not _installed:
            _inside.install_routers()
            _track_popen()
            _hook_exits()
            _installed = True
        rt = _runtimes.get(worker)
        if rt is None:
            rt = _runtimes[worker] = _Runtime(worker)
        return rt


# --- the task -----------------------------------------------------------------------------------

def run_task(key: str, item: bytes | str | None, *, spec_id: str, spec: bytes, topic: str,
             group: str) -> Outcome:
    """Run one child job's work in this worker thread (Dask calls this; see the module diagram)."""
    from distributed import get_worker

    worker = get_worker()
    rt = _get_runtime(worker)
    begin = time.time()
    state = worker.state.tasks.get(key)
    lost = int((getattr(state, "annotations", None) or {}).get(LOST, 0))
    try:
        s = rt.spec(spec_id, spec)
    except WorkerError as exc:
        return ("fail", lost, 0, begin, rt.address, None, dump_reason(exc), None, None)
    if lost > s.retries:
        return ("refused", lost, 0, begin, rt.address, None, None, None, None)
    task = _Task(key, group, topic, lost, s.input)
    with rt.lock:  # checked and registered at once: a stop_tasks meanwhile sees one or the other
        if rt.marks.stopped(key, group):
            return ("stopped", lost, 0, begin, rt.address, None, None, None, None)
        rt.tasks[key] = task
    rt.shipper.started(task)
    # Again for every task, as a thread job does: a worker of this very process (processes=False)
    # shares sys.stdout with code that may swap it after the first task (pytest's capture does),
    # and print then went there, not to the job.
    _inside.install_routers()
    emitter = _TaskEmitter(task, rt)
    token = _inside.bind(emitter)
    try:
        if s.kind != "call":
            ended = run_guarded(lambda: _command(s, item, task, emitter), task.stopper, status=True)
        else:
            args = s.args if item is None else (pickle.loads(item), *s.args)  # type: ignore[arg-type]
            ended = run_guarded(lambda: call(s.target, args, s.kwargs, s.init, emitter, keep_value=True),
                                task.stopper)
    finally:
        _inside.flush_lines(emitter)
        _inside.unbind(token)
        _end(rt, task)
    (streams, values, times), sent = rt.shipper.take(task)
    if ended.value is not None:  # a returned value comes straight back, with the result
        streams += bytes((Stream.OUTPUT,))
        values.append(ended.value)
        times.append(time.time())
    done = ended.done()
    tail = dumps_batch(streams, values, times) if values else None
    return (done.event, lost, sent, begin, rt.address, tail, done.reason, done.traceback, done.exit_code)


def _command(s: _Spec, item: bytes | str | None, task: _Task, emitter: _TaskEmitter) -> int:
    # The item (already text) comes first: $1 of a command line, the first extra argument of an argv.
    argv = [*s.argv, *(() if item is None else (str(item),)), *s.args]
    env = None
    if s.env:
        env = dict(os.environ)
        for name, value in s.env.items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
    feed = b"".join(f"{x}\n".encode() for x in task.input) if task.input is not None else None
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE if feed is not None else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=s.cwd, env=env,
                            start_new_session=True)
    status = run_command(proc, feed, emitter, task.grace)
    if status != 0:
        if task.stop:
            raise JobStopped()
        raise status_error("the command", status)
    return status


def _end(rt: _Runtime, task: _Task) -> None:
    """The task's code returned: after a stop, nothing it started may outlive it."""
    if task.timer is not None:
        task.timer.cancel()
    if task.stop:
        task.kill()
        for proc in task.procs:
            with contextlib.suppress(Exception):
                proc.wait(timeout=2)  # reap it: a worker must not collect zombies
    task.procs.clear()
    with rt.lock:  # last, in one hold: a stop_tasks finds it running or remembered as ended here
        rt.tasks.pop(task.key, None)
        rt.marks.ended(task.key, task.group)


def stop_tasks(keys: list[str], groups: list[str], grace: float, dask_worker: Any = None) -> list[str]:
    """Run by ``client.run`` on every worker: stop these keys and groups, now and when they come.

    Answers the keys of them that ran here (running now, or ended within ENDED_MEMORY): the
    session keeps those tasks until their results bring their last records, and cancels the
    others, which never ran and, marked, never will. Quick: it runs on the worker's event loop.
    """
    if dask_worker is None:
        from distributed import get_worker

        dask_worker = get_worker()
    return _get_runtime(dask_worker).stop(keys, groups, grace)


# --- a task that ends its worker process -----------------------------------------------------------

def _hook_exits() -> None:
    """``os._exit`` and ``os.abort`` in a task first ship its records and say why the worker goes.

    The records wait in the shipper and in the worker's batched stream (both flushed on a timer),
    so the process ended before they left (issue 13's fault matrix, dask os_exit and crash). The
    job still fails as a lost worker, the reason naming the call (and ``os._exit``'s status as its
    exit code). Elsewhere (not in a task's thread, or in a child the task forked) the plain call.
    """
    real_exit, real_abort = os._exit, os.abort

    def _exit(status: int) -> NoReturn:
        _last_words(f"os._exit({status})", status)
        real_exit(status)

    def _abort() -> NoReturn:
        _last_words("os.abort()", None)
        real_abort()

    os._exit = _exit
    os.abort = _abort


def _last_words(what: str, status: int | None) -> None:
    emitter = _inside.bound()
    if not isinstance(emitter, _TaskEmitter) or emitter.runtime.pid != os.getpid():
        return
    task = emitter.task
    task.stopper.shield()  # no stop raised while the last records go: they would be lost with it
    try:
        _inside.flush_lines(emitter)
        with emitter.shipper.cond:
            task.last_words = (what, status)
            emitter.shipper.dirty[task.key] = task
        emitter.shipper.ship_last(LAST_WORDS_SECONDS)
    except BaseException:
        pass  # the job still fails as a lost worker


# --- the processes a task starts ------------------------------------------------------------------

_popen_init = subprocess.Popen.__init__


def _track_popen() -> None:
    """Note every process a task's thread starts, so a stop can end it (and what it started).

    Only calls made in a thread that runs a psjobs task are noted; such a process gets a session
    of its own unless the caller chose otherwise, so that its whole process group can be ended.
    """
    if getattr(subprocess.Popen.__init__, "psjobs_patched", False):
        return

    def __init__(self: subprocess.Popen[Any], *args: Any, **kwargs: Any) -> None:
        emitter = _inside.bound()
        task = emitter.task if isinstance(emitter, _TaskEmitter) else None
        if task is None:
            _popen_init(self, *args, **kwargs)
            return
        if len(args) <= 1 and "process_group" not in kwargs and "preexec_fn" not in kwargs:
            kwargs.setdefault("start_new_session", True)
        # No JobStopped while the process starts: raised between the fork and the note below, it
        # would leave a process nobody knows of. A stop meanwhile is acted on right after.
        shielded = task.stopper.shield()
        try:
            _popen_init(self, *args, **kwargs)
            with task.stopper.lock:
                task.procs.append(self)
        finally:
            stopping = task.stopper.unshield(shielded)
        if stopping:
            signal_procs([self], signal.SIGTERM)  # and SIGKILL after the grace, like the others
            if shielded:
                raise JobStopped()

    __init__.psjobs_patched = True  # type: ignore[attr-defined]
    subprocess.Popen.__init__ = __init__  # type: ignore[method-assign]

