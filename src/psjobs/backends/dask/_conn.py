"""Cluster jobs, the session side: one connection to a scheduler and its dispatcher thread.

::

    _Conn.submit --client.submit / client.map(run_task), key psjobs-<token>-<child id>--> scheduler
    worker: records --log_event("psjobs-<token>", chunk)--> scheduler --subscribe_topic--> inbox
    guard plugin (scheduler): a task given back by a lost worker --> {"psjobs": "lost"} --> inbox
    Future done --a watcher on the Client's event loop--> inbox
    dispatcher thread takes the inbox in order:
        chunk -> port.started(where=the worker) the first time, port.kept_records(records)
                 (records, kept too by a job Stopped before it was seen to start: see answer)
        done  -> client.gather in batches -> port.ended(outcome, last records), once every chunk
                 the task shipped has arrived (chunks go through the scheduler, results come direct);
                 cancelled as the caller closed the Client they passed: Failed, saying so, and
                 a short-lived Client of psjobs' own stops the task on the workers (_stop_orphans)
        lost  -> port.ended(failed: WorkerError naming the worker), cancel the task (the reasons'
                 words, for this and for a Future that ended without a result: _reasons.py)
        stop  -> client.run(stop_tasks) on every worker (a helper thread): it stops them, marks
                 them so they never start later, and answers which of them ran there
        answer -> for the tasks the session has not seen start (their jobs Stopped at once):
                 client.cancel those that no worker ran; the others stay until their results,
                 and what they wrote goes to their Stopped jobs (port.kept_records). stop_job
                 waits for that (stop_unseen, bounded): nothing lost, and nothing of it runs on
        forget -> the key dropped, after the stops of the same batch (a removal right after a
                 stop must not make the stop find nothing)

Only the dispatcher thread reports for jobs (through their ports); the other threads only put
things in the inbox.
"""

from __future__ import annotations

import itertools
import pickle
import queue
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..._errors import WorkerError
from ..._records import Record, Stream
from ...core import Entry, JobPort, Outcome
from ...worker import _salvage as salvage
from ...worker._outcome import load_reason as _load_reason
from ...worker._wire import RECORDS, decode_records
from ._reasons import broken_reason, lost_error

if TYPE_CHECKING:
    from ._backend import DaskBackend

PARK_SECONDS = 10.0   # a result waits this long for chunks still on their way through the scheduler
GATHER_BATCH = 1000   # results fetched in one client.gather
STOP_SLACK = 5.0      # seconds past the grace a stop of an unseen task waits for the workers and results
CONNECT_SECONDS = 10  # to reach the scheduler again when the caller's Client was closed under its jobs


class _StopWait:
    """What stop_unseen waits for: the workers' answer about its leaves, then the results (and
    last records) of those that ran. Touched by the dispatcher thread only; ``done`` is the signal."""

    __slots__ = ("done", "pending")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.pending = 0  # leaves that ran, their results still to come (after the answer)


class _Group:
    """The children of one start call: they share a spec, and a stop may name them all at once."""

    __slots__ = ("id", "leaves")

    def __init__(self, group_id: str) -> None:
        self.id = group_id
        self.leaves: list[_Leaf] = []


class _Leaf:
    """What the dask backend keeps per child job (its ``backend_data``)."""

    __slots__ = ("attempt", "awaited", "conn", "future", "group", "key", "last_words", "losses", "parked", "port",
                 "recv", "retries", "started", "wait")

    def __init__(self, conn: _Conn, group: _Group, port: JobPort, retries: int) -> None:
        self.conn = conn
        self.group = group
        self.port = port
        self.key = f"{conn.topic}-{port.job_id}"
        self.retries = retries
        self.future: Any = None
        self.started = False
        self.attempt = 0      # which run of the task the chunks came from (> 0 after a retry)
        self.recv = 0         # chunks received from that run
        self.losses = 0
        self.parked: tuple[Any, float] | None = None  # (outcome, deadline) waiting for chunks
        self.wait: _StopWait | None = None  # its stop came while the session saw it NotStarted (stop_unseen)
        self.awaited = False  # it ran all the same: its wait counts it until its result is in
        self.last_words: tuple[str, int | None] | None = None  # ("os._exit(3)", 3): why its worker went


class _Conn:
    """One connection to a scheduler: the Client, the topic, the dispatcher thread."""

    _seq = itertools.count(1)

    def __init__(self, backend: DaskBackend, client: Any, owned: bool) -> None:
        from ._on_scheduler import Guard

        self.backend = backend
        self.client = client
        self.owned = owned
        self.address: str = client.scheduler.address
        self.topic = f"psjobs-{backend.token}"
        self.keys: dict[str, _Leaf] = {}
        self.inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.stops: list[tuple[_Leaf, float]] = []
        self.parked: set[_Leaf] = set()
        self.helpers: set[threading.Thread] = set()
        self.orphans: list[str] = []  # keys whose Client (the caller's) was closed under them
        self.watchers: set[Any] = set()  # asyncio tasks on the Client's loop, one per pending future
        self.closed = False
        try:
            client.register_plugin(Guard(), name=Guard.name)
        except Exception as exc:
            raise WorkerError(f"the Dask scheduler at {self.address} could not load psjobs' scheduler plugin "
                              f"({type(exc).__name__}: {exc}); install psjobs[dask] where the scheduler runs "
                              f"(it stops Dask from running a task twice after a worker is lost)") from exc
        client.subscribe_topic(self.topic, self._on_event)
        self.thread = threading.Thread(target=self._run, name=f"psjobs-dask-{next(self._seq)}", daemon=True)
        self.thread.start()

    # --- called from other threads: only put things in the inbox ---------------------------
    def _on_event(self, event: tuple[float, Any]) -> None:
        self.inbox.put(("event", event[1]))  # on the Client's event loop: never block it

    def _on_done(self, future: Any) -> None:
        self.inbox.put(("done", future))

    def request_stop(self, leaf: _Leaf, grace: float) -> None:
        with self.lock:
            self.stops.append((leaf, grace))
        self.inbox.put(("stop", None))

    def stop_unseen(self, leaf: _Leaf, grace: float) -> None:
        """Stop a task the session has not seen start; return once nothing of it runs, and what it
        wrote, if it ran, is in its job.

        The session shows such a job Stopped at once, yet its task may already run on a worker
        (it says so only after START_DELAY), have ended there, or reach one before an asynchronous
        stop mark does: it then ran after stop_job returned (issue 13, case 2), or its records
        were dropped with its cancelled task. So the workers answer which of them ran (stop_tasks
        stops them first); those stay until their results bring their last records, and only the
        others are cancelled (see _answered). Every unseen leaf of the group whose stop is
        requested goes in one broadcast: a fan-out's stop costs one round trip, not one each.
        """
        wait = leaf.wait
        if wait is None:
            wait = _StopWait()
            with self.lock:
                todo = [other for other in leaf.group.leaves if other is leaf or (
                    other.wait is None and other.port.stop_requested and other.port.finished)]
                for other in todo:
                    other.wait = wait
                self.stops.extend((other, grace) for other in todo)
            self.inbox.put(("stop", None))
        # Bounded: a scheduler that does not answer, or a task stuck where a stop cannot reach it,
        # leaves the job Stopped, its records still kept whenever its result comes.
        wait.done.wait(grace + STOP_SLACK)

    # --- submitting ----------------------------------------------------------------------------
    def submit(self, group: _Group, spec_id: str, spec: bytes, items: list[Any] | None,
               resources: Mapping[str, float] | None) -> None:
        from ._on_worker import run_task

        leaves = group.leaves
        for leaf in leaves:
            self.keys[leaf.key] = leaf  # before submitting: a chunk may come back at once
        options: dict[str, Any] = {"pure": False, "retries": 0, "resources": dict(resources) if resources else None}
        task_kwargs = {"spec_id": spec_id, "spec": spec, "topic": self.topic, "group": group.id}
        keys = [leaf.key for leaf in leaves]
        if items is None:
            futures = [self.client.submit(run_task, keys[0], None, key=keys[0], **options, **task_kwargs)]
        else:
            # One message to the scheduler for every item: map, not a submit per item.
            futures = self.client.map(run_task, keys, items, key=keys, **options, **task_kwargs)
        for leaf, future in zip(leaves, futures):
            leaf.future = future
        # One hop to the Client's event loop for all of them (add_done_callback makes a
        # cross-thread call, and a thread hop, per future: about 1 ms each on a busy machine).
        self.client.loop.add_callback(self._watch_all, futures)

    def _watch_all(self, futures: list[Any]) -> None:
        """On the Client's event loop: a small watcher per future puts it in the inbox when done."""
        import asyncio

        loop = asyncio.get_running_loop()
        for future in futures:
            state = getattr(future, "_state", None)
            if callable(getattr(state, "wait", None)):
                task = loop.create_task(self._watch(future, state))
                self.watchers.add(task)  # asyncio keeps only weak references to tasks
                task.add_done_callback(self.watchers.discard)
            else:  # a distributed without FutureState.wait: the public, slower way
                future.add_done_callback(self._on_done)

    async def _watch(self, future: Any, state: Any) -> None:
        while future.status == "pending":  # as distributed's own done_callback waits
            await state.wait()
        self.inbox.put(("done", future))

    # --- the dispatcher thread -----------------------------------------------------------------
    def _run(self) -> None:
        while True:
            try:
                batch = [self.inbox.get(timeout=0.2 if self.parked else None)]
            except queue.Empty:
                batch = []
            while len(batch) < 5000:
                try:
                    batch.append(self.inbox.get_nowait())
                except queue.Empty:
                    break
            if not self._handle(batch):
                return
            # Hold no Future while idle: a held Future keeps its task's result on a worker.
            del batch

    def _handle(self, batch: list[tuple[str, Any]]) -> bool:
        """Take one batch from the inbox; False once the connection closes."""
        done: list[Any] = []
        forgotten: list[_Leaf] = []
        answers: list[tuple[list[_Leaf], set[str] | None]] = []
        closing = False
        for kind, payload in batch:
            try:
                if kind == "event":
                    self._on_message(payload)
                elif kind == "done":
                    done.append(payload)
                elif kind == "forget":
                    forgotten.append(payload)
                elif kind == "answer":
                    answers.append(payload)
                elif kind == "close":
                    closing = True
            except BaseException as exc:  # a bug here (or a value's SystemExit) must not stop every job of the session
                _internal_error(exc)
        try:
            with self.lock:
                stops, self.stops = self.stops, []
            if stops:
                self._stop(stops)
            for leaf in forgotten:  # after the stops: a removal never loses the stop before it
                self._drop(leaf)
            for unseen, ran in answers:  # before the results: one of this batch is kept, not cancelled
                self._answered(unseen, ran)
            if done:
                self._finished(done)
            if self.orphans:
                self._helper(self._stop_orphans, self.orphans, self.backend.session.stop_grace)
                self.orphans = []
            if self.parked:
                self._expire_parked()
        except BaseException as exc:
            _internal_error(exc)
        return not closing

    def _on_message(self, msg: Any) -> None:
        if isinstance(msg, dict):
            if msg.get("psjobs") == "lost":
                self._lost(str(msg.get("key")), str(msg.get("worker") or ""), str(msg.get("stimulus") or ""))
            return
        where, items = pickle.loads(msg)
        for key, attempt, _seq, _begin, blob, *rest in items:
            leaf = self.keys.get(key)
            if leaf is None:
                continue  # removed, or already finished
            if rest and rest[0] is not None:
                leaf.last_words = rest[0]  # the task ends its worker (os._exit): the loss's cause
            if attempt != leaf.attempt:
                leaf.attempt, leaf.recv = attempt, 0
                self._start(leaf, where)
            elif not leaf.started:
                self._start(leaf, where)
            if blob is not None:  # kept_records: its job may be Stopped unseen (stop_unseen)
                leaf.port.kept_records(_load_entries(blob, where, leaf.port))
            leaf.recv += 1
            parked = leaf.parked
            if parked is not None and parked[0][1] == leaf.attempt and leaf.recv >= parked[0][2]:
                self.parked.discard(leaf)
                leaf.parked = None
                self._final(leaf, parked[0])

    def _start(self, leaf: _Leaf, where: str) -> None:
        leaf.started = True
        leaf.port.started(where=where)  # the parent's location follows: the workers of its children

    def _finished(self, futures: list[Any]) -> None:
        ready: list[tuple[_Leaf, Any]] = []
        for future in futures:
            leaf = self.keys.get(future.key)
            if leaf is None or leaf.future is not future:
                continue
            if future.status == "finished":
                ready.append((leaf, future))
            else:
                self._broken(leaf, future)
        for i in range(0, len(ready), GATHER_BATCH):
            part = ready[i:i + GATHER_BATCH]
            try:
                results = self.client.gather([f for _, f in part])
            except Exception:
                results = None
            for n, (leaf, future) in enumerate(part):
                if results is not None:
                    self._settle(leaf, results[n])
                    continue
                try:
                    outcome = future.result()
                except Exception as exc:
                    self.fail(leaf, WorkerError(f"psjobs could not "
                                                 f"fetch its result from the cluster ({type(exc).__name__}: "
                                                 f"{exc}); start it again"), exc)
                    continue
                self._settle(leaf, outcome)

    def _settle(self, leaf: _Leaf, outcome: Any) -> None:
        _status, attempt, sent = outcome[0], outcome[1], outcome[2]
        received = leaf.recv if attempt == leaf.attempt else 0
        if received < sent:
            # Its chunks travel through the scheduler, its result came straight from the worker.
            leaf.attempt, leaf.recv = attempt, received
            leaf.parked = (outcome, time.monotonic() + PARK_SECONDS)
            self.parked.add(leaf)
            return
        self._final(leaf, outcome)

    def _final(self, leaf: _Leaf, outcome: Any, missing: int = 0) -> None:
        status, _attempt, _sent, _begin, where, tail, blob, tb, code = outcome
        port = leaf.port
        if not leaf.started:
            self._start(leaf, where)
        entries: list[Entry] = _load_entries(tail, where, port) if tail is not None else []
        if missing:
            now = time.time()
            entries.insert(0, (Stream.WARNING, Record(
                Stream.WARNING, f"{missing} batch(es) of this job's records did not arrive from {where} within "
                f"{PARK_SECONDS:g}s; they are lost", now, where), now))
        if port.finished:  # Stopped before it was seen to start, yet it ran: what it wrote is kept
            port.kept_records(entries)
            self._drop(leaf)  # after: its stop_unseen returns once the records are in
            return
        reason = _load_reason(blob, tb) if blob is not None else None
        if status == "refused":
            reason = lost_error(port, where, "", leaf.retries)
        self._drop(leaf)  # first: a retry (core/_sched) submits the same key again
        if not port.ended(Outcome.named(status, reason, code), entries):
            port.kept_records(entries)  # a stop_job made it Stopped since the check above

    def _expire_parked(self) -> None:
        now = time.monotonic()
        for leaf in [leaf for leaf in self.parked if leaf.parked is not None and leaf.parked[1] <= now]:
            outcome = leaf.parked[0]  # type: ignore[index]
            self.parked.discard(leaf)
            leaf.parked = None
            self._final(leaf, outcome, missing=max(1, outcome[2] - leaf.recv))

    def _broken(self, leaf: _Leaf, future: Any) -> None:
        port = leaf.port
        if future.status == "cancelled" and port.stop_requested:
            self._drop(leaf)
            port.ended(Outcome.stopped())
            return
        # The caller's own Client, closed by them (a lost scheduler leaves it "connecting" first).
        closed = not self.owned and self.client.status in ("closing", "closed")
        if closed and future.status == "cancelled":
            self.orphans.append(leaf.key)  # its task may still run on a worker: stopped in _stop_orphans
        reason, cause = broken_reason(port, future, self.address, self.connected(), closed)
        self.fail(leaf, reason, cause)

    def fail(self, leaf: _Leaf, reason: WorkerError, cause: BaseException | None) -> None:
        """End ``leaf``'s job Failed for ``reason`` (caused by ``cause``) and forget its task."""
        if cause is not None:
            reason.__cause__ = cause
        self._drop(leaf)
        leaf.port.ended(Outcome.failed(reason))

    def _lost(self, key: str, worker: str, stimulus: str) -> None:
        leaf = self.keys.get(key)
        if leaf is None:
            return
        leaf.losses += 1
        port = leaf.port
        where = worker or (port.location if leaf.started else "")
        if leaf.losses <= leaf.retries:
            now = time.time()
            port.records([(Stream.WARNING, Record(
                Stream.WARNING, f"the Dask worker {where or '?'} was lost while this task ran or was about to "
                f"run there; Dask runs it again (retry {leaf.losses} of {leaf.retries})", now, where or None),
                now)])
            return
        future = leaf.future
        self._drop(leaf)
        last = leaf.last_words
        if last is not None:  # the task ended its own worker: say so, not only "lost"
            port.ended(Outcome.failed(WorkerError(
                f"{port.describe()} failed: its code called {last[0]}, which ended the Dask worker {where or '?'} "
                f"(the worker was lost; psjobs does not run it again). Start it again once the code no "
                f"longer ends its process"), last[1]))
        else:
            port.ended(Outcome.failed(lost_error(port, where, stimulus, leaf.retries)))
        if future is not None:
            try:
                self.client.cancel([future], reason="psjobs: its worker was lost")
            except Exception:
                pass  # the re-run refuses to start anyway (the guard plugin marked it)

    def _drop(self, leaf: _Leaf) -> None:
        if self.keys.get(leaf.key) is leaf:
            self.keys.pop(leaf.key, None)  # forget() may race the dispatcher here
        leaf.future = None  # the scheduler forgets the key: a lost result is never recomputed
        if leaf.parked is not None:
            leaf.parked = None
            self.parked.discard(leaf)
        if leaf.awaited and leaf.wait is not None:  # it ran unseen: its result is in, or never comes
            leaf.awaited = False
            leaf.wait.pending -= 1
            if not leaf.wait.pending:
                leaf.wait.done.set()

    # --- stopping ------------------------------------------------------------------------------
    def _stop(self, stops: list[tuple[_Leaf, float]]) -> None:
        grace = max(g for _, g in stops)
        leaves = [leaf for leaf, _ in stops if self.keys.get(leaf.key) is leaf]
        # Unseen: their jobs were Stopped while NotStarted. Not cancelled yet: the answer says
        # which of them ran (a cancelled task's result, and its last records, never come).
        unseen = [leaf for leaf in leaves if leaf.wait is not None and not leaf.awaited]
        for wait in {id(leaf.wait): leaf.wait for leaf, _ in stops if leaf.wait is not None}.values():
            if not any(leaf.wait is wait for leaf in unseen):
                wait.done.set()  # all ended or removed already: nothing of them runs, nothing to keep
        if not leaves:
            return
        keys, groups = _stop_targets(leaves)
        self._helper(self._broadcast, keys, groups, grace, unseen)

    def _helper(self, target: Any, *args: Any) -> None:
        """Run ``target`` on a helper thread: a round trip to the cluster never holds the dispatcher."""
        helper = threading.Thread(target=target, args=args, name="psjobs-dask-stop", daemon=True)
        with self.lock:
            self.helpers.add(helper)
        helper.start()

    def _broadcast(self, keys: list[str], groups: list[str], grace: float, unseen: list[_Leaf]) -> None:
        """Tell every worker: stop these tasks now, and never start them later; for the ``unseen``
        leaves, put the workers' answer (the keys that ran, None if there is none) in the inbox."""
        from ._on_worker import stop_tasks

        ran: set[str] | None = None
        try:
            if self.connected() and not self.closed:
                answers = self.client.run(stop_tasks, keys, groups, grace, on_error="return", callback_timeout=30)
                ran = {key for answer in answers.values() if isinstance(answer, list) for key in answer}
        except Exception:
            pass  # a stopping job then stays Stopping, and stop_job says so after the grace period
        finally:
            if unseen:
                self.inbox.put(("answer", (unseen, ran)))
            with self.lock:
                self.helpers.discard(threading.current_thread())

    def _answered(self, unseen: list[_Leaf], ran: set[str] | None) -> None:
        """Keep the unseen leaves whose task ran (its result brings its last records); cancel the
        others, which never ran: the stop marks keep them from starting later. No answer (None):
        only what surely ran is kept, the rest cancelled, as a stop must never let them run."""
        cancel: list[Any] = []
        for leaf in unseen:
            if self.keys.get(leaf.key) is not leaf or leaf.wait is None or leaf.awaited:
                continue  # ended (its records kept) or removed meanwhile
            future = leaf.future
            if leaf.started or (ran is not None and leaf.key in ran) or getattr(future, "status", "") == "finished":
                leaf.awaited = True
                leaf.wait.pending += 1
            else:
                if future is not None:
                    cancel.append(future)
                self._drop(leaf)
        if cancel:
            try:
                self.client.cancel(cancel, reason="psjobs: stop_job")
            except Exception:
                pass  # the stop marks still keep them from running
        for wait in {id(leaf.wait): leaf.wait for leaf in unseen if leaf.wait is not None}.values():
            if not wait.pending:
                wait.done.set()

    def _stop_orphans(self, keys: list[str], grace: float) -> None:
        """Stop tasks whose Client, the caller's, was closed while they ran: Dask forgets them, but
        a running one would run to its end. A closed Client reaches no worker, so a short-lived
        Client of psjobs' own does it (a fraction of a second, on this helper thread)."""
        from distributed import Client

        from ._on_worker import stop_tasks

        try:
            if not self.closed:
                with Client(self.address, set_as_default=False,  # type: ignore[no-untyped-call]
                            timeout=CONNECT_SECONDS) as client:
                    client.run(stop_tasks, keys, [], grace, on_error="return", callback_timeout=30)
        except Exception:
            pass  # the scheduler is gone as well: its workers dropped their tasks (or go with it)
        finally:
            with self.lock:
                self.helpers.discard(threading.current_thread())

    def forget(self, leaf: _Leaf) -> None:
        # Through the dispatcher, as a stop is: dropped here at once, the key was gone before the
        # dispatcher came to the stop asked for just before, and the queued task ran later.
        self.inbox.put(("forget", leaf))

    def connected(self) -> bool:
        return bool(self.client.status == "running")

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.inbox.put(("close", None))
        if threading.current_thread() is not self.thread:
            self.thread.join(5)
        with self.lock:
            helpers = list(self.helpers)
        for helper in helpers:
            helper.join(5)
        for leaf in list(self.keys.values()):
            leaf.future = None
        self.keys.clear()
        try:  # the watchers hold their futures: let them go, so the scheduler forgets the tasks
            self.client.loop.add_callback(lambda: [task.cancel() for task in list(self.watchers)])
        except Exception:
            pass
        if self.connected():  # else every call would wait for a scheduler that is gone
            try:
                from ._on_scheduler import forget_topic

                self.client.unsubscribe_topic(self.topic)
                self.client.run_on_scheduler(forget_topic, self.topic, callback_timeout=10)
            except Exception:
                pass  # the client was closed by its owner meanwhile
        if self.owned:
            try:
                self.client.close(timeout=5)
            except Exception:
                pass


def _stop_targets(leaves: list[_Leaf]) -> tuple[list[str], list[str]]:
    """Name whole groups when every unfinished child of a group is stopped (a fan-out's stop)."""
    keys: list[str] = []
    groups: list[str] = []
    by_group: dict[str, list[_Leaf]] = {}
    for leaf in leaves:
        by_group.setdefault(leaf.group.id, []).append(leaf)
    for members in by_group.values():
        group = members[0].group
        chosen = {id(leaf) for leaf in members}
        if len(members) > 8 and all(id(leaf) in chosen or leaf.port.finished for leaf in group.leaves):
            groups.append(group.id)
        else:
            keys.extend(leaf.key for leaf in members)
    return keys, groups


def _load_entries(blob: bytes, where: str, port: JobPort) -> list[Entry]:
    try:
        return decode_records(blob)
    except BaseException as exc:  # a value's own code raised, even SystemExit: not out of the dispatcher
        return salvage.entries(RECORDS, blob, exc, port.describe(), where)


def _internal_error(exc: BaseException) -> None:  # pragma: no cover - a bug in psjobs itself
    import logging

    logging.getLogger("psjobs.dask").error("psjobs: internal error in the dask dispatcher: %r", exc, exc_info=exc)
