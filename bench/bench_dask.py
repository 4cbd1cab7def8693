"""Cluster jobs on a 2-worker LocalCluster (worker processes, one thread each, all on 127.0.0.1).

* fan-out: N trivial calls (``operator.add(i, 1)``) as one psjobs fan-out job
  (``start_cluster_job(..., for_each=range(N))`` then wait and receive) against ``client.map`` +
  ``client.gather`` doing the same on the same cluster; N = 10,000 (200 in quick mode). Target:
  psjobs within 1.5x of Dask alone.
* streaming: items per second from one cluster job whose generator yields small ints, counted
  from start_job until the last item is received, and the latency of the first item.

Both sides use a builtin, so neither pays for pickling a function by value per task.
"""

from __future__ import annotations

import operator
import sys
import time
from collections.abc import Iterator
from typing import Any

from bench._harness import Row, failed_row, interleave, metric, row, set_target, value_of


def _stream(n: int) -> Iterator[int]:
    yield from range(n)


def _fan_out_psjobs(client: Any, n: int) -> float:
    import psjobs

    with psjobs.Session() as session:
        t0 = time.perf_counter()
        job = session.start_cluster_job(operator.add, 1, for_each=range(n), cluster=client)
        assert job.wait(600), "the fan-out did not finish"
        out = session.receive_job(job)
        elapsed = time.perf_counter() - t0
    assert len(out) == n and out[-1] == n, (len(out), out[-1:])
    return elapsed


def _fan_out_dask(client: Any, n: int) -> float:
    t0 = time.perf_counter()
    futures = client.map(operator.add, range(n), [1] * n, pure=False)
    out = client.gather(futures)
    elapsed = time.perf_counter() - t0
    del futures
    assert len(out) == n and out[-1] == n
    return elapsed


def _streaming(client: Any, n: int) -> tuple[float, float]:
    import psjobs

    with psjobs.Session() as session:
        t0 = time.perf_counter()
        job = session.start_job(_stream, n, cluster=client)
        first = None
        got = 0
        for _, stream, _, _ in session.read_entries(job, wait=True, timeout=600):
            if stream == psjobs.Stream.OUTPUT:
                if first is None:
                    first = time.perf_counter() - t0
                got += 1
        elapsed = time.perf_counter() - t0
    assert got == n, got
    return n / elapsed, first or 0.0


def run(quick: bool) -> list[Row]:
    import cloudpickle
    from distributed import Client, LocalCluster

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # _stream travels by value
    n = 200 if quick else 10_000
    items = 20_000 if quick else 1_000_000
    rounds = 1 if quick else 5
    fan_case = f"{n:,} trivial calls as one fan-out job, 2-worker LocalCluster"
    stream_case = f"streaming {items:,} items from one cluster job"
    first_case = "first streamed item from a cluster job (start to receive)"
    rows: list[Row] = []
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                           dashboard_address="127.0.0.1:0")
    client = Client(cluster, set_as_default=False)
    try:
        try:
            # psjobs and Dask alone take turns, so a noisy moment of the shared machine hits both.
            samples = interleave({"psjobs": lambda: _fan_out_psjobs(client, n) * 1000,
                                  "dask client.map+gather": lambda: _fan_out_dask(client, n) * 1000},
                                 rounds, warmup=1, budget=None if quick else 240)
            rows.append(row(fan_case, "psjobs", metric(samples["psjobs"]), "ms", "lower",
                            note="start_cluster_job(for_each=) + wait + receive"))
            rows.append(row(fan_case, "dask client.map+gather", metric(samples["dask client.map+gather"]), "ms",
                            "lower"))
            ratio = value_of(rows, fan_case, "psjobs") / value_of(rows, fan_case, "dask client.map+gather")
            set_target(rows, fan_case, f"<= 1.5x Dask alone (now {ratio:.2f}x)", ratio <= 1.5)
        except Exception as exc:
            rows.append(failed_row(fan_case, "psjobs", "ms", "lower", exc))
        try:
            streamed = [_streaming(client, items) for _ in range(rounds)]
            rows.append(row(stream_case, "psjobs", [rate for rate, _ in streamed], "items/s", "higher",
                            note="generator on a worker -> log_event chunks via the scheduler -> session"))
            rows.append(row(first_case, "psjobs", [first * 1000 for _, first in streamed], "ms", "lower"))
        except Exception as exc:
            rows.append(failed_row(stream_case, "psjobs", "items/s", "higher", exc))
    finally:
        client.close()
        cluster.close()
    return rows


if __name__ == "__main__":
    for r in run("--quick" in sys.argv):
        print(r)
