"""What a Dask worker process remembers of stops: the keys and groups the session stopped.

::

    session --client.run(stop_tasks, keys, groups)--> every worker: _Runtime.stop
        Marks.mark(keys, groups): remembered for STOP_MEMORY seconds
    run_task, before the job's code runs: Marks.stopped(key, group) --> it refuses to run

A stop reaches every worker, and may come before its task does (the scheduler dispatches it
late, or to another worker): the mark is what keeps a stopped task from ever starting. The
runtime's lock guards a Marks (run_task checks a mark and registers its task in one hold).
"""

from __future__ import annotations

import time

STOP_MEMORY = 3600.0    # seconds a worker remembers a stopped key, in case it is dispatched late
MARKS_PRUNED = 50_000   # marks kept before the expired ones are swept


class Marks:
    """The stop marks of one worker process (the caller holds the runtime's lock)."""

    __slots__ = ("groups", "keys")

    def __init__(self) -> None:
        self.keys: dict[str, float] = {}    # key -> until when (time.time())
        self.groups: dict[str, float] = {}  # a fan-out's group -> until when

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
