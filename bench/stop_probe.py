"""``python -m bench.stop_probe [--n N] [--cgroups 0|1] [--verbose] [--plain]``: where a stop goes.

::

    stop_job --> backend.stop --> loop: Handle.stop (SIGTERM, SIGCONT to the tree)
        worker: JobStopped --> DONE frame --> loop: on_frame(DONE);  exit --> pidfd --> on_pidfd
        --> Handle.end --> _after_stop (kill, gone?) [2 ms retries] --> port.ended --> stop_job returns

Marks each step of N stops of ``bench._jobs.busy`` with ``perf_counter`` (the probe wraps the
methods; psjobs is not changed) and prints the median time from ``stop_job``'s call to each step,
and how many ``_after_stop`` rounds a stop took. A wall-clock probe: print the load beside it and
read it as indicative only (never beside a test suite's timing tests).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

_marks: list[tuple[str, float]] = []


def _wrap(cls: type, name: str, label: str | None = None) -> None:
    inner = getattr(cls, name)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        _marks.append((f"{label or name} (in)", time.perf_counter()))
        try:
            return inner(*args, **kwargs)
        finally:
            _marks.append((f"{label or name} (out)", time.perf_counter()))

    setattr(cls, name, wrapped)


def plain(n: int) -> None:
    """Stops timed with the public API only, so any psjobs tree can be put on PYTHONPATH and
    compared (``git archive BASE | tar -x -C /tmp/base``): a busy job stopped once its pid is
    known (as ``bench core`` does), and ``sleep 100 | cat`` once both are running."""
    import psutil

    import psjobs

    from . import _jobs

    res: dict[str, list[float]] = {"busy": [], "tree": []}
    with psjobs.Session(stop_grace=0.2) as s:
        warm = s.start_job(_jobs.trivial)
        s.wait_job(warm, timeout=60)
        s.remove_job(warm)
        for i in range(n + 2):
            for kind in res:
                job = s.start_job(_jobs.busy) if kind == "busy" else s.start_job("sleep 100 | cat")
                if kind == "busy":
                    for _leaf, stream, payload, _t in s.read_entries(job, keep=True, wait=True, timeout=30):
                        if stream == psjobs.Stream.OUTPUT and payload == "go":
                            break
                leaf = job.child_jobs[0] if job.child_jobs else job
                deadline = time.monotonic() + 30
                while (leaf.pid is None or (kind == "tree" and len(psutil.Process(leaf.pid).children()) < 2)) \
                        and time.monotonic() < deadline:
                    time.sleep(0.0005)  # polling the probe's own start, not psjobs' stop
                t = time.perf_counter()
                s.stop_job(job)
                dt = (time.perf_counter() - t) * 1e3
                assert job.state is psjobs.JobState.STOPPED
                s.remove_job(job, force=True)
                if i >= 2:
                    res[kind].append(dt)
    where = os.path.dirname(os.path.dirname(psjobs.__file__))
    print(f"{where}: " + ", ".join(
        f"{kind} median {statistics.median(v):.2f} ms (over 100 ms: {sum(x > 100 for x in v)}/{len(v)})"
        for kind, v in res.items()) + f"; load {os.getloadavg()[0]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=30, help="stops to mark (default 30)")
    parser.add_argument("--cgroups", default=None, help="PSJOBS_CGROUPS for the fork server (0: no cgroups)")
    parser.add_argument("--verbose", action="store_true", help="print every stop's steps")
    parser.add_argument("--plain", action="store_true", help="time stops with the public API only (any psjobs)")
    opts = parser.parse_args()
    if opts.plain:
        plain(opts.n)
        return
    if opts.cgroups is not None:
        os.environ["PSJOBS_CGROUPS"] = opts.cgroups

    import psjobs
    from psjobs.backends.process import _backend, _call, _handle
    from psjobs.core import _port
    from psjobs.worker import _tree

    from . import _jobs

    _wrap(_backend.ProcessBackend, "stop", "backend.stop")
    _wrap(_handle.Handle, "stop", "Handle.stop")
    _wrap(_call.CallHandle, "on_pidfd")
    _wrap(_handle.Handle, "_after_stop")
    _wrap(_tree.ProcessTree, "kill", "tree.kill")
    _wrap(_tree.ProcessTree, "gone", "tree.gone")
    _wrap(_port.JobPort, "ended", "port.ended")
    walk = _tree.proc_stats

    def counted_walk() -> Any:
        _marks.append(("walk of /proc", time.perf_counter()))
        return walk()

    _tree.proc_stats = counted_walk
    on_frame: Callable[..., Any] = _call.CallHandle.on_frame

    def frame(self: Any, kind: int, payload: Any) -> Any:
        if kind == _call.DONE:
            _marks.append(("DONE frame", time.perf_counter()))
        return on_frame(self, kind, payload)

    _call.CallHandle.on_frame = frame  # type: ignore[method-assign]

    steps: dict[str, list[float]] = {}
    rounds: list[int] = []
    walks: list[int] = []
    totals: list[float] = []
    with psjobs.Session(stop_grace=0.2) as s:
        warm = s.start_job(_jobs.trivial)
        s.wait_job(warm, timeout=60)
        s.remove_job(warm)
        for _ in range(opts.n + 2):
            job = s.start_job(_jobs.busy)
            for _leaf, stream, payload, _t in s.read_entries(job, keep=True, wait=True, timeout=30):
                if stream == psjobs.Stream.OUTPUT and payload == "go":
                    break
            _marks.clear()
            t0 = time.perf_counter()
            s.stop_job(job)
            t1 = time.perf_counter()
            assert job.state is psjobs.JobState.STOPPED
            marks = list(_marks)
            s.remove_job(job, force=True)
            totals.append((t1 - t0) * 1e3)
            if opts.verbose:
                print(f"{(t1 - t0) * 1e3:8.3f} ms: " + ", ".join(f"{m} {(t - t0) * 1e3:.3f}" for m, t in marks))
            rounds.append(sum(1 for m, _ in marks if m == "_after_stop (in)"))
            walks.append(sum(1 for m, _ in marks if m == "walk of /proc"))
            seen: set[str] = set()
            for label, t in marks:
                if label not in seen:  # the first time each step happens
                    seen.add(label)
                    steps.setdefault(label, []).append((t - t0) * 1e3)
    totals = totals[2:]
    print(f"load average {os.getloadavg()}; cgroups={os.environ.get('PSJOBS_CGROUPS', 'auto')}; n={opts.n}")
    for label, values in sorted(steps.items(), key=lambda kv: statistics.median(kv[1])):
        print(f"  {statistics.median(values[2:] or values):8.3f} ms  {label}")
    print(f"  {statistics.median(totals):8.3f} ms  stop_job returns (median; min {min(totals):.3f}, "
          f"max {max(totals):.3f})")
    print(f"  _after_stop rounds per stop: {sorted(rounds[2:])}")
    print(f"  walks of /proc per stop: {sorted(walks[2:])}")


if __name__ == "__main__":
    main()
