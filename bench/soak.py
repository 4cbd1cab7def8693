"""``python -m bench soak [-n N] [--quick] [--threads 8] [--seed S]``: many mixed jobs under faults,
then an account of every record and every process (issue 13).

::

    8 starter threads --start_job / start_thread_job / a command--> one Session
        each keeps up to WINDOW jobs in flight; on each: maybe stop_job, maybe remove_job(force)
        a finished job --receive--> its items, checked against what it was to produce
    chaos thread --SIGKILL--> a running job's worker (or command), now and then the fork server
    the end: every job accounted (by state), the records tallied, the processes of the run
    checked (after the jobs: only the fork server and its spares; after close: nothing)

What counts as a problem (the exit status is 1 if any is found):

- duplicated: an item that came twice, or out of order (a job's items are 0, 1, 2...);
- lost: a Completed job whose items are not all there, or an item received once and gone;
- bad reason: a Failed job whose reason names none of the faults the soak injects (SIGKILL, the
  fork server) or says nothing; a Stopped job the soak never asked to stop;
- hung: a job not finished DEADLINE seconds after the soak's last start;
- left running: a process of the run that belongs to no job once every job is done, or any
  process left after the session closed.

A job killed or stopped midway may have fewer items than asked for: they must then be the first
ones, in order. The full size (100,000 jobs) takes tens of minutes on two cores; ``--quick`` is 300.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

WINDOW = 8          # jobs in flight per starter thread
DEADLINE = 120.0    # seconds a job may take to finish once its starter waits for it
P_STOP = 0.03       # chance that a starter stops a job it just started
P_REMOVE = 0.02     # chance that it removes it (force=True) instead
KILL_EVERY = 0.05   # seconds between the chaos thread's SIGKILLs of a running job's process
SERVER_EVERY = 40   # one kill in this many is the fork server's


def items(n: int, pause: float) -> Iterator[int]:
    """A soak job: its items are 0..n-1, in order; ``pause`` gives the chaos time to hit it."""
    for i in range(n):
        yield i
        if pause and i == n // 2:
            time.sleep(pause)


def command_line(n: int, pause: float) -> str:
    return f"i=0; while [ $i -lt {n} ]; do echo $i; i=$((i+1)); [ $i -eq {n // 2} ] && sleep {pause}; done; true"


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    jobs: Counter[str] = field(default_factory=Counter)      # "<kind> <state>"
    reasons: Counter[str] = field(default_factory=Counter)   # the faults Failed jobs name
    records: int = 0
    duplicated: int = 0
    lost: int = 0
    bad_reason: int = 0
    hung: int = 0
    left_running: int = 0
    kills: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)

    def problem(self, text: str) -> None:
        with self.lock:
            if len(self.problems) < 20:
                self.problems.append(text)


def _fault(reason: BaseException | None) -> str | None:
    text = str(reason or "")
    for word, name in (("SIGKILL", "SIGKILL"), ("signal KILL", "SIGKILL"), ("fork server", "fork server")):
        if word in text:
            return name
    return None


class Soak:
    def __init__(self, n: int, threads: int, seed: int, pause: float) -> None:
        import psjobs

        self.psjobs = psjobs
        self.n = n
        self.threads = threads
        self.pause = pause
        self.rng = random.Random(seed)
        self.tally = Tally()
        self.session = psjobs.Session(stop_grace=1.0, thread_throttle_limit=8)
        self.inflight: dict[int, Any] = {}   # job id -> job, for the chaos thread
        self.inflight_lock = threading.Lock()
        self.done = threading.Event()
        self.next = 0
        self.next_lock = threading.Lock()

    # --- starters ------------------------------------------------------------------------------
    def _take(self) -> int | None:
        with self.next_lock:
            if self.next >= self.n:
                return None
            self.next += 1
            return self.next - 1

    def starter(self, seed: int) -> None:
        rng = random.Random(seed)
        window: list[tuple[Any, str, int, str]] = []
        while True:
            index = self._take()
            if index is None:
                break
            kind = rng.choice(("process", "process", "thread", "command"))
            count = rng.randint(1, 40)
            pause = self.pause if rng.random() < 0.2 else 0.0
            s = self.session
            if kind == "process":
                job = s.start_job(items, count, pause)
            elif kind == "thread":
                job = s.start_thread_job(items, count, pause)
            else:
                job = s.start_job(command_line(count, pause))
            with self.inflight_lock:
                self.inflight[job.id] = job
            action = "none"
            roll = rng.random()
            if roll < P_STOP:
                action = "stop"
                s.stop_job(job)
            elif roll < P_STOP + P_REMOVE:
                action = "remove"
                s.remove_job(job, force=True)
            window.append((job, kind, count, action))
            if len(window) >= WINDOW:
                self.account(*window.pop(0))
        for entry in window:
            self.account(*entry)

    # --- accounting ------------------------------------------------------------------------------
    def account(self, job: Any, kind: str, count: int, action: str) -> None:
        t = self.tally
        JobState = self.psjobs.JobState
        with self.inflight_lock:
            self.inflight.pop(job.id, None)
        if action == "remove":
            with t.lock:
                t.jobs[f"{kind} removed"] += 1
            if job.state is not JobState.STOPPED and not job.state.is_finished:
                with t.lock:
                    t.hung += 1
                t.problem(f"{job!r}: removed with force but not finished")
            return
        if not job.wait(DEADLINE):
            with t.lock:
                t.hung += 1
            t.problem(f"{job!r} did not finish within {DEADLINE}s")
            self.session.remove_job(job, force=True)
            return
        # "ignore": the reasons are checked below, not printed on stderr as a user's receive would.
        got = self.session.receive_job(job, error_action="ignore")
        again = self.session.receive_job(job, error_action="ignore")  # received once: gone now
        expected: list[Any] = list(range(count)) if kind != "command" else [str(i) for i in range(count)]
        leaf = job if kind == "thread" else job.child_jobs[0]
        state = leaf.state
        with t.lock:
            t.jobs[f"{kind} {state}"] += 1
            t.records += len(got)
        if again:
            with t.lock:
                t.duplicated += len(again)
            t.problem(f"{job!r}: a second receive gave {again[:5]}")
        if got != expected[:len(got)]:
            with t.lock:
                t.duplicated += 1
            t.problem(f"{job!r} ({kind}, {state}): items out of order or repeated: {got[:10]}")
        if state is JobState.COMPLETED and got != expected:
            with t.lock:
                t.lost += len(expected) - len(got)
            t.problem(f"{job!r} ({kind}) Completed with {len(got)} of {count} items")
        elif state is JobState.FAILED:
            reason = leaf.job_state_info.reason
            fault = _fault(reason)
            with t.lock:
                t.reasons[fault or "other"] += 1
            if fault is None:
                with t.lock:
                    t.bad_reason += 1
                t.problem(f"{job!r} ({kind}) Failed naming no injected fault: {reason!r}")
        elif state is JobState.STOPPED and action != "stop":
            with t.lock:
                t.bad_reason += 1
            t.problem(f"{job!r} ({kind}) Stopped, but the soak never stopped it")
        self.session.remove_job(job)

    # --- chaos ---------------------------------------------------------------------------------
    def chaos(self) -> None:
        rng = self.rng
        kills = 0
        while not self.done.wait(KILL_EVERY):
            kills += 1
            if kills % SERVER_EVERY == 0:
                server = getattr(self.session._backends.get("process"), "_server", None)
                if server is not None and server.alive:
                    self._kill(server.proc.pid, "fork server")
                continue
            with self.inflight_lock:
                running = [j for j in self.inflight.values() if j.child_jobs and j.child_jobs[0].pid]
            if running:
                leaf = rng.choice(running).child_jobs[0]
                if leaf.pid is not None and not leaf.state.is_finished:
                    self._kill(leaf.pid, "job process")

    def _kill(self, pid: int, what: str) -> None:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            return
        with self.tally.lock:
            self.tally.kills[what] += 1

    # --- the run -------------------------------------------------------------------------------
    def run(self) -> Tally:
        import psutil

        me = psutil.Process()
        before = {p.pid for p in me.children(recursive=True)}
        chaos = threading.Thread(target=self.chaos, name="soak-chaos", daemon=True)
        chaos.start()
        starters = [threading.Thread(target=self.starter, args=(self.rng.random(),), name=f"soak-{i}")
                    for i in range(self.threads)]
        began = time.monotonic()
        for th in starters:
            th.start()
        for th in starters:
            th.join()
        self.done.set()
        chaos.join()
        self.seconds = time.monotonic() - began
        # Every job is done: what is left of the run is the fork server and the spares it keeps.
        backend: Any = self.session._backends.get("process")

        def strays() -> set[int]:
            server = getattr(backend, "_server", None)
            allowed = set()
            if server is not None and server.alive:
                allowed = {server.proc.pid, *(pid for pid, _ in list(server.spares))}
            out = set()
            for p in me.children(recursive=True):
                try:
                    if p.pid not in before and p.pid not in allowed and p.status() != psutil.STATUS_ZOMBIE:
                        out.add(p.pid)
                except psutil.NoSuchProcess:
                    pass
            return out

        left = _settle(strays, 15.0)
        self.session.close()
        gone = _settle(lambda: {p.pid for p in me.children(recursive=True) if p.pid not in before
                                and _alive(p)}, 15.0)
        t = self.tally
        t.left_running = len(left) + len(gone)
        for pid in sorted(left | gone)[:10]:
            t.problem(f"left running: {_describe(pid)}")
        return t


def _alive(p: Any) -> bool:
    import psutil

    try:
        return bool(p.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def _describe(pid: int) -> str:
    import psutil

    try:
        p = psutil.Process(pid)
        return f"{pid} {' '.join(p.cmdline())[:80]}"
    except psutil.NoSuchProcess:
        return f"{pid} (gone since)"


def _settle(probe: Any, seconds: float) -> set[int]:
    """What ``probe`` still finds after up to ``seconds`` (processes take a moment to be reaped)."""
    deadline = time.monotonic() + seconds
    found: set[int] = probe()
    while found and time.monotonic() < deadline:
        time.sleep(0.1)  # polling interval: processes being reaped give no event to wait on
        found = probe()
    return found


def report(t: Tally, n: int, seconds: float) -> str:
    lines = [f"soak: {n} jobs in {seconds:.1f}s ({n / max(seconds, 1e-9):.0f} jobs/s)"]
    lines.append("  jobs:     " + ", ".join(f"{k}: {v}" for k, v in sorted(t.jobs.items())))
    lines.append("  kills:    " + (", ".join(f"{k}: {v}" for k, v in sorted(t.kills.items())) or "none"))
    lines.append("  failed, naming: " + (", ".join(f"{k}: {v}" for k, v in sorted(t.reasons.items())) or "none"))
    lines.append(f"  records received: {t.records}")
    lines.append(f"  duplicated: {t.duplicated}   lost: {t.lost}   bad reason: {t.bad_reason}   "
                 f"hung: {t.hung}   left running: {t.left_running}")
    for p in t.problems:
        lines.append(f"  problem: {p}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench soak", description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--jobs", type=int, default=100_000, help="how many jobs (default 100,000)")
    parser.add_argument("--quick", action="store_true", help="300 jobs: checks that it runs, in a minute")
    parser.add_argument("--threads", type=int, default=8, help="starter threads (default 8)")
    parser.add_argument("--seed", type=int, default=13, help="random seed (default 13)")
    parser.add_argument("--pause", type=float, default=0.05,
                        help="seconds one job in five sleeps midway, for the chaos to hit (default 0.05)")
    args = parser.parse_args(argv)
    n = 300 if args.quick and args.jobs == 100_000 else args.jobs
    soak = Soak(n, args.threads, args.seed, args.pause)
    tally = soak.run()
    print(report(tally, n, soak.seconds), flush=True)
    bad = tally.duplicated + tally.lost + tally.bad_reason + tally.hung + tally.left_running
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
