"""What a Dask worker process remembers of stops: the keys and groups stopped, the tasks that ran.

::

    session --client.run(stop_tasks, keys, groups)--> every worker: _Runtime.stop
        Marks.mark(keys, groups): remembered for STOP_MEMORY seconds
        answer: the keys of them that ran here: running now, or Marks.ran (ended within ENDED_MEMORY)
    run_task, before the job's code runs: Marks.stopped(key, group) --> it refuses to run
    run_task, once the job's code returned: Marks.ended(key, group)

A stop reaches every worker, and may come before its task does (the scheduler dispatches it
late, or to another worker): the mark is what keeps a stopped task from ever starting. A stop may
also come just after its task ended here, before the session had its result: the answer names it,
so the session keeps the task's result (its last records) instead of cancelling a task that, to
its eyes, never started. The runtime's lock guards a Marks (run_task checks a mark and registers
its task in one hold, and _end drops it and remembers it in one hold).
"""

from __future__ import annotations

import time
from collections import OrderedDict

STOP_MEMORY = 3600.0    # seconds a worker remembers a stopped key, in case it is dispatched late
MARKS_PRUNED = 50_000   # marks kept before the expired ones are swept
# Seconds a worker remembers a task that ran here: a stop that comes after its end must still say it
# ran until the session has its result, which takes a scheduler hop (ms; a minute is ample).
ENDED_MEMORY = 60.0
ENDED_MAX = 100_000     # at most this many of them (a worker ending more a minute forgets sooner)


class Marks:
    """The stop marks of one worker process and the tasks it ran (the caller holds the runtime's lock)."""

    __slots__ = ("groups", "keys", "recent")

    def __init__(self) -> None:
        self.keys: dict[str, float] = {}    # key -> until when (time.time())
        self.groups: dict[str, float] = {}  # a fan-out's group -> until when
        # key -> (group, time.monotonic() it ended), oldest first: forgotten from the front
        self.recent: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def stopped(self, key: str, group: str) -> bool:
        return key in self.keys or group in self.groups

    def mark(self, keys: list[str], groups: list[str]) -> None:
        until = time.time() + STOP_MEMORY
        for key in keys:
            self.keys[key] = until
        for group in groups:
            self.groups[group] = until
        for marks in (self.keys, self.groups):
            if len(marks) > MARKS_PRUNED:
                now = time.time()
                for name in [n for n, t in marks.items() if t < now]:
                    del marks[name]

    def ended(self, key: str, group: str) -> None:
        """The job's code of ``key`` ran here and returned (every task's end: kept cheap)."""
        now = time.monotonic()
        recent = self.recent
        recent.pop(key, None)  # a retry's run: at the end, in time order
        recent[key] = (group, now)
        while len(recent) > ENDED_MAX or recent[next(iter(recent))][1] < now - ENDED_MEMORY:
            recent.popitem(last=False)

    def ran(self, keys: set[str], groups: set[str]) -> list[str]:
        """Those of ``keys`` and ``groups`` that ended here lately."""
        return [key for key, (group, _) in self.recent.items() if key in keys or group in groups]
