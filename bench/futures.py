"""``python -m bench.futures [--quick]``: psjobs.Executor against the standard executors.

::

    for each pair (psjobs.Executor, its standard peer), interleaved rounds (bench/_harness):
        latency: submit(trivial).result(), one call at a time          -> ms per call
        rate:    submit N trivial calls, then wait for all (max_workers=2) -> calls/s
    --> one table per case on stdout (median, quartiles, ratio psjobs/peer)

What is compared: psjobs runs each call in a fresh process forked from its warm fork server;
ProcessPoolExecutor reuses its workers, so it is measured both ways: reused (its default), and a
fresh process per call (``max_tasks_per_child=1``, which needs the forkserver or spawn context).
The thread executors are compared as they are. Never run it beside a test suite: the machine's
two cores make every figure depend on what else runs.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing
import sys
from collections.abc import Callable

import psjobs

from ._harness import Row, format_tables, interleave, metric, now, row


def trivial(x: int) -> int:
    return x + 1


def _latency(executor: cf.Executor) -> Callable[[], float]:
    def once() -> float:
        t = now()
        executor.submit(trivial, 1).result()
        return (now() - t) * 1000
    return once


def _rate(executor: cf.Executor, n: int) -> Callable[[], float]:
    def once() -> float:
        t = now()
        futures = [executor.submit(trivial, i) for i in range(n)]
        for f in futures:
            f.result()
        return n / (now() - t)
    return once


def _forget(session: psjobs.Session, inner: Callable[[], float]) -> Callable[[], float]:
    """Remove the finished jobs after each measurement: the table must not grow round after round."""
    def once() -> float:
        value = inner()
        session.remove_job(session.get_job())
        return value
    return once


def run(quick: bool) -> list[Row]:
    rounds = 3 if quick else 30
    n = 10 if quick else 200
    rows: list[Row] = []
    session = psjobs.Session()
    ps_process = psjobs.Executor("process", max_workers=2, session=session)
    ps_thread = psjobs.Executor("thread", max_workers=2, session=session)
    reused = cf.ProcessPoolExecutor(max_workers=2)
    fresh = cf.ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("forkserver"),
                                   max_tasks_per_child=1)
    threads = cf.ThreadPoolExecutor(max_workers=2)
    try:
        cases: list[tuple[str, dict[str, Callable[[], float]], str, str]] = [
            ("process executor: submit(trivial).result() latency", {
                "psjobs (fresh process per call)": _forget(session, _latency(ps_process)),
                "ProcessPoolExecutor (reused worker)": _latency(reused),
                "ProcessPoolExecutor (fresh process per call)": _latency(fresh),
            }, "ms", "lower"),
            (f"process executor: {n} calls, submit all then wait all (2 workers)", {
                "psjobs (fresh process per call)": _forget(session, _rate(ps_process, n)),
                "ProcessPoolExecutor (reused worker)": _rate(reused, n),
                "ProcessPoolExecutor (fresh process per call)": _rate(fresh, n),
            }, "jobs/s", "higher"),
            ("thread executor: submit(trivial).result() latency", {
                "psjobs": _forget(session, _latency(ps_thread)),
                "ThreadPoolExecutor": _latency(threads),
            }, "ms", "lower"),
            (f"thread executor: {n} calls, submit all then wait all (2 workers)", {
                "psjobs": _forget(session, _rate(ps_thread, n)),
                "ThreadPoolExecutor": _rate(threads, n),
            }, "jobs/s", "higher"),
        ]
        for case, impls, unit, better in cases:
            samples = interleave(impls, rounds, warmup=1)
            for impl, values in samples.items():
                rows.append(row(case, impl, metric(values), unit, better))
    finally:
        for ex in (ps_process, ps_thread, reused, fresh, threads):
            ex.shutdown(wait=True)
        session.close()
    return rows


def _as_psjobs_first(rows: list[Row]) -> list[Row]:
    # format_tables compares each impl with the "psjobs" row of its case: name the psjobs rows so.
    out = []
    for r in rows:
        r = dict(r)
        if r["impl"].startswith("psjobs ("):
            r["note"] = r["impl"][len("psjobs ("):-1]
            r["impl"] = "psjobs"
        out.append(r)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.futures", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the bench runs, measures nothing")
    args = parser.parse_args(argv)
    rows = run(args.quick)
    print(format_tables(_as_psjobs_first(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

