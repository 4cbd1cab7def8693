"""A scheduler plugin that keeps Dask from silently running a psjobs task twice.

::

    worker running psjobs-<token>-<id> dies --> scheduler: processing -> released (to run it again)
        plugin.transition: annotation psjobs_lost += 1 on the task, before it is sent anywhere
        plugin: log_event("psjobs-<token>", {"psjobs": "lost", "key", "worker", "stimulus"})
            --> the session that owns the task fails its job at once, naming the worker
    the task is sent to another worker --> run_task reads the annotation and refuses to run the
        user's code again (unless the job was started with retries=N)

Dask re-runs a task whose worker died up to ``distributed.scheduler.allowed-failures`` times, so
user code with side effects would run twice without anyone being told. The plugin only touches
keys that start with ``psjobs-``; it needs psjobs importable where the scheduler runs.
"""

from __future__ import annotations

from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin

from ..._compat import scheduler_forget_topic

LOST = "psjobs_lost"  # same name as in _dask_worker (kept apart: this module runs in the scheduler)


class Guard(SchedulerPlugin):
    """Marks psjobs tasks given back by a lost worker, and tells their session."""

    name = "psjobs-guard"
    idempotent = True  # every session registers it; the first registration stays

    def __init__(self) -> None:
        self.scheduler: Any = None
        self.where: dict[str, str] = {}  # psjobs keys being processed -> the worker's address

    async def start(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    def transition(self, key: Any, start: str, finish: str, *args: Any, stimulus_id: str = "",
                   **kwargs: Any) -> None:
        if not isinstance(key, str) or not key.startswith("psjobs-") or self.scheduler is None:
            return
        if finish == "processing":
            ts = self.scheduler.tasks.get(key)
            ws = getattr(ts, "processing_on", None)
            if ws is not None:
                self.where[key] = ws.address
            return
        if start == "processing":
            worker = self.where.pop(key, None)
            if finish == "released":
                self._taint(key)
                self._tell(key, worker, stimulus_id)
        elif start == "memory" and finish == "released":
            self._taint(key)  # its result was lost before it was fetched: a re-run would run it twice

    def _taint(self, key: str) -> None:
        ts = self.scheduler.tasks.get(key)
        if ts is None:
            return
        # A new dict: annotations may be shared by every task of one submission.
        annotations = dict(ts.annotations or {})
        annotations[LOST] = int(annotations.get(LOST, 0)) + 1
        ts.annotations = annotations

    def _tell(self, key: str, worker: str | None, stimulus_id: str) -> None:
        topic = "-".join(key.split("-", 2)[:2])  # psjobs-<token>: the owning session's topic
        self.scheduler.log_event(topic, {"psjobs": "lost", "key": key, "worker": worker or "",
                                         "stimulus": stimulus_id or ""})


def forget_topic(topic: str, dask_scheduler: Any = None) -> None:
    """Run on the scheduler when a session closes: drop the record chunks it kept for that topic.

    The scheduler keeps the last events of every topic (``distributed.admin.low-level-log-length``);
    a session's chunks are of no use to anyone once it is gone.
    """
    scheduler_forget_topic(dask_scheduler, topic)
