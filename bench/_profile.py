"""``python -m bench._profile [N]``: where the CPU of a process job goes, process by process.

::

    session --N trivial process jobs--> fork server --fork--> workers (and warm spares)
    /proc/<pid>/stat before and after:  session (utime, stime)
                                        fork server (utime, stime)
                                        reaped workers (cutime, cstime, cminflt of the server)

Workers and spares are children of the fork server, so their CPU and minor page faults land in
the server's "children" counters once reaped. Uses psjobs internals (the server's pid) on purpose:
it is a profiling aid for the core, not part of the suite. With ``--renice`` it favours its own
and the server's scheduling group (see bench/README.md).
"""

from __future__ import annotations

import os
import sys
import time

import psjobs
from bench import _jobs
from bench._harness import favour


def _stat(pid: int) -> dict[str, float]:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    # fields after the command: state=0 ... minflt=7 cminflt=8 majflt=9 cmajflt=10 utime=11 stime=12
    # cutime=13 cstime=14
    return {"minflt": float(fields[7]), "cminflt": float(fields[8]),
            "cpu": (int(fields[11]) + int(fields[12])) * 1000 / tick,
            "ccpu": (int(fields[13]) + int(fields[14])) * 1000 / tick}


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    n = int(args[0]) if args else 500
    if "--renice" in sys.argv:
        os.environ["BENCH_RENICE"] = "-20"
        favour(os.getpid())
    with psjobs.Session() as s:
        s.start_job(_jobs.trivial).wait()
        server = s._backends["process"]._server.proc.pid  # type: ignore[attr-defined]
        favour(server)
        time.sleep(0.3)
        for mode in ("one at a time", "all at once"):
            me0, sv0 = _stat(os.getpid()), _stat(server)
            t = time.perf_counter()
            if mode == "all at once":
                jobs = [s.start_job(_jobs.trivial) for _ in range(n)]
                s.wait_job(jobs)
            else:
                jobs = []
                for _ in range(n):
                    jobs.append(s.start_job(_jobs.trivial))
                    jobs[-1].wait()
            wall = time.perf_counter() - t
            s.remove_job(jobs)
            time.sleep(0.3)  # let the server reap the last workers (and top up its spares)
            me1, sv1 = _stat(os.getpid()), _stat(server)
            print(f"{n} trivial process jobs, {mode}: {wall * 1000 / n:.2f} ms wall a job; CPU a job: "
                  f"session {(me1['cpu'] - me0['cpu']) / n:.2f} ms, fork server "
                  f"{(sv1['cpu'] - sv0['cpu']) / n:.2f} ms, workers and spares "
                  f"{(sv1['ccpu'] - sv0['ccpu']) / n:.2f} ms with "
                  f"{(sv1['cminflt'] - sv0['cminflt']) / n:.0f} minor page faults")


if __name__ == "__main__":
    main()
