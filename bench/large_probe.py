"""``python -m bench.large_probe [--n N] [--mb MB]``: where the time of a large bytes result goes.

::

    start_job(make_bytes, n) --> worker: b"x" * n, emit --> RECORDS_OOB frame --> socket
        --> session I/O thread: first read of the frame ... last read --> decode (bytes(part))
        --> the job ends --> wait_job returns --> receive returns the value

Marks each step with ``time.time()`` (the worker's emit time is the record's own timestamp; the
session's steps are marked by wrapping FrameReader.read and decode_entries, psjobs unchanged) and
prints every round, with the session's CPU time and minor page faults (getrusage) and the load.
Wall-clock: indicative only, never beside a test suite's timing tests.
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from typing import Any

from . import _jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=12, help="rounds (default 12)")
    parser.add_argument("--mb", type=int, default=100, help="size of the value in MiB (default 100)")
    opts = parser.parse_args()
    nb = opts.mb << 20

    import psjobs
    from psjobs.backends.process import _call
    from psjobs.worker import _wire

    marks: dict[str, float] = {}
    read = _wire.FrameReader.read

    def timed_read(self: Any, sock: Any, frames: list[Any], budget: int = 16) -> bool:
        marks.setdefault("first read", time.time())
        alive = read(self, sock, frames, budget)
        if any(kind == _wire.RECORDS_OOB for kind, _ in frames):
            marks["last read"] = time.time()
        return alive

    decode = _call.decode_entries

    def timed_decode(kind: int, payload: Any) -> Any:
        out = decode(kind, payload)
        if kind == _wire.RECORDS_OOB:
            marks["decoded"] = time.time()
        return out

    _wire.FrameReader.read = timed_read  # type: ignore[method-assign]
    _call.decode_entries = timed_decode

    print(f"{'total':>8} {'emit':>8} {'1st read':>8} {'last rd':>8} {'decoded':>8} {'waited':>8} "
          f"{'recv':>8}  (ms from start_job)  session CPU ms, minor faults, switches vol/invol; load")
    with psjobs.Session() as s:
        warm = s.start_job(_jobs.trivial)
        s.wait_job(warm, timeout=60)
        s.remove_job(warm)
        for _ in range(opts.n):
            ru0 = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.time()
            marks.clear()
            job = s.start_job(_jobs.make_bytes, nb)
            s.wait_job(job, timeout=120)
            t_wait = time.time()
            entries = list(s.read_entries(job, keep=True))
            got = job.receive()
            t_recv = time.time()
            ru1 = resource.getrusage(resource.RUSAGE_SELF)
            assert len(got) == 1 and len(got[0]) == nb
            emit = entries[-1][3]
            s.remove_job(job, force=True)
            del got, entries
            cpu = (ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime) * 1e3
            row = [t_recv, emit, marks.get("first read", 0), marks.get("last read", 0), marks.get("decoded", 0),
                   t_wait, t_recv]
            print(" ".join(f"{(t - t0) * 1e3:8.1f}" for t in row)
                  + f"  {cpu:6.1f} {ru1.ru_minflt - ru0.ru_minflt:7d} {ru1.ru_nvcsw - ru0.ru_nvcsw:5d}/"
                  f"{ru1.ru_nivcsw - ru0.ru_nivcsw:<5d}; {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
