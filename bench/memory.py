"""``python -m bench.memory [--quick] [--mb N]``: a job prints far more than a session keeps in memory.

::

    a process job writes N MB of numbered 100-byte lines --> the session (nobody receives)
        sampled every 20 ms: the session's RSS minus its RSS before the job --> peak growth
    then read_entries (consuming) checks every line, in order, a piece at a time --> seconds
    the same from a Python callable that print()s (information records)
    one line of 64 MiB without a newline --> seconds, peak growth, records of at most 1 MiB

Issue 12's target: a process job printing 1 GB grows the session by under 64 MiB, and receiving
it afterwards returns every byte in order. The default size is that 1 GB (minutes, and ~1-2 GB of
disk in the temporary directory); ``--quick`` is 16 MB, to check that the script runs. Never run
the full size beside test suites or other benchmarks.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import psjobs

TARGET_MIB = 64
_LINE = 100  # bytes a line, its newline included
_WRITE = ("import sys\nw = sys.stdout.write\n"
          "for i in range(int(sys.argv[1])): w(f'{i:010d}' + 'x' * 89 + '\\n')")


def _line(i: int) -> str:
    return f"{i:010d}" + "x" * 89


def print_lines(n: int) -> None:
    """The callable job: ``n`` numbered lines through print(), as information records."""
    for i in range(n):
        print(f"{i:010d}" + "x" * 89)


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def _peak_while(job: psjobs.Job, before: int) -> tuple[float, int]:
    """Seconds until ``job`` ends, and the session's largest growth meanwhile (20 ms samples)."""
    started = time.monotonic()
    peak = rss()
    while not job.wait(timeout=0.02):
        peak = max(peak, rss())
    return time.monotonic() - started, max(peak, rss()) - before


def _check(entries: Iterator[tuple[psjobs.Job, Any, Any, float]], n: int,
           text: Callable[[Any], str]) -> tuple[float, int, int]:
    """Read every record back (consuming); seconds, lines in order, and peak growth while reading."""
    started = time.monotonic()
    before = rss()
    peak = before
    i = 0
    for _, _, payload, _ in entries:
        if text(payload) != _line(i):
            raise AssertionError(f"line {i} came back as {text(payload)[:40]!r}")
        i += 1
        if i % 100_000 == 0:
            peak = max(peak, rss())
    return time.monotonic() - started, i, max(peak, rss()) - before


def _row(case: str, seconds: float, growth: int, extra: str = "") -> str:
    mark = "meets" if growth < TARGET_MIB << 20 else "MISSES"
    return f"{case:<58} {seconds:7.1f} s  session +{growth / 2**20:7.1f} MiB ({mark} < {TARGET_MIB} MiB) {extra}"


def run(mb: int, long_mib: int) -> bool:
    n = (mb << 20) // _LINE
    ok = True
    with psjobs.Session() as session:
        warm = session.start_job(print_lines, 1)  # the fork server and the I/O thread, before measuring
        warm.wait()
        session.remove_job(warm)

        for case, start, text in (
            (f"command job writes {mb} MB ({n:,} lines), unread", lambda: session.start_job(
                [sys.executable, "-c", _WRITE, str(n)]), str),
            (f"callable job print()s {mb} MB ({n:,} lines), unread", lambda: session.start_job(
                print_lines, n), lambda record: record.message),
        ):
            before = rss()
            job = start()
            seconds, growth = _peak_while(job, before)
            ok &= job.state is psjobs.JobState.COMPLETED and growth < TARGET_MIB << 20
            print(_row(case, seconds, growth), flush=True)
            took, lines, reading = _check(session.read_entries(job), n, text)
            ok &= lines == n
            print(f"{'  then read back, in order':<58} {took:7.1f} s  {lines:,} of {n:,} lines; "
                  f"+{reading / 2**20:.1f} MiB while reading", flush=True)
            session.remove_job(job)

        before = rss()
        job = session.start_job(f"head -c {long_mib << 20} /dev/zero | tr '\\0' x")
        seconds, growth = _peak_while(job, before)
        pieces = session.receive_job(job)
        right = sum(map(len, pieces)) == long_mib << 20 and max(map(len, pieces)) <= 1 << 20
        ok &= right and growth < TARGET_MIB << 20
        print(_row(f"one line of {long_mib} MiB, no newline", seconds, growth,
                   f"{len(pieces)} records{'' if right else ' (WRONG)'}"), flush=True)
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 MB and an 8 MiB line: checks the script runs")
    parser.add_argument("--mb", type=int, default=None, help="megabytes each job prints (default 1024)")
    args = parser.parse_args(argv)
    mb = args.mb or (16 if args.quick else 1024)
    print(f"# bench.memory: {mb} MB a job, load {os.getloadavg()[0]:.1f}, psjobs {psjobs.__file__}", flush=True)
    return 0 if run(mb, 8 if args.quick else 64) else 1


if __name__ == "__main__":
    sys.exit(main())
