"""``psjobs.connect()``: what a verb costs when the jobs live in the session host.

::

    run(quick) --> a host in a temporary PSJOBS_HOME (bench_cli._host, stopped at the end)
       start + result   start_job(callable) then receive_job(wait=True)   connected vs in-process Session
       job.state        one read of a live attribute that asks the host   connected vs in-process
       get_job()        with N jobs in the table                          connected vs in-process
    --> rows: medians of rounds in which the two sessions take turns

The peer is psjobs' own in-process Session: the figure says what the one job table costs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from . import _harness
from .bench_cli import _host


def _one() -> int:
    return 1


def _samples(fn: Callable[[], Any], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def run(quick: bool) -> list[dict[str, Any]]:
    import psjobs
    from psjobs._connect import HostJob

    rounds = 3 if quick else 50
    listed = 10 if quick else 1_000
    rows: list[dict[str, Any]] = []
    with _host(), psjobs.Session() as local:
        connected = psjobs.connect()
        for name, session in (("psjobs.connect()", connected), ("in-process Session", local)):
            def trip(s: psjobs.Session = session) -> None:
                s.receive_job(s.start_job(_one), wait=True)

            rows.append(_harness.row("start_job(callable) + receive_job(wait=True)", name,
                                     _samples(trip, rounds), "ms", "lower"))
            job = session.start_job("true")
            job.wait()
            def read(j: psjobs.Job = job) -> object:
                if isinstance(j, HostJob):
                    j.stale()  # past the 20 ms a view stands: this read asks the host
                return j.state
            rows.append(_harness.row("job.state (a read that asks the host)", name,
                                     _samples(read, rounds * 10), "ms", "lower"))
            for _ in range(listed):
                session.start_job("true")
            session.wait_job(session.get_job())
            rows.append(_harness.row(f"get_job() over ~{listed:,} jobs", name,
                                     _samples(session.get_job, rounds), "ms", "lower"))
        for r in rows:
            if r["impl"] == "psjobs.connect()":
                r["impl"] = "psjobs"  # the row the table compares with its peer
                r["note"] = "psjobs.connect(): the jobs live in the session host"
        connected.close()
    return rows


if __name__ == "__main__":
    import sys

    for row in run(quick="--quick" in sys.argv):
        print(f"{row['case']:<50} {row['impl']:<20} {row['value']:>10,.2f} {row['unit']}")
