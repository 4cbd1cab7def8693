"""``python -m bench.spawn_probe [--n N]``: the fork server's CPU to start one command, by method.

::

    this process (as the fork server does it: env a copy of ours, cwd ours, fd 0/1/2 /dev/null)
        --N x [join the job's new cgroup] start `true` [leave] waitpid [rmdir]--> its own CPU / N

Each method runs in a fresh interpreter under ``RUSAGE_SELF`` (the spawning process only, not the
command), minus a run that spawns nothing: CPU time, not wall time, since a timing benchmark
cannot run beside the test suites on this 2-core machine and CPU time moves far less with load.
The cgroup rows need a writable cgroup v2 (root, or a delegation); elsewhere they are skipped.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

_ONE = """
import os, resource, subprocess, sys
from psjobs.worker import _spawn
from psjobs.worker._tree import join_cgroup, leave_cgroup, make_session_cgroup, own_cgroup
method, n, cg = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
base = make_session_cgroup() if cg else None
if cg and base is None:
    print(-1); raise SystemExit
home = own_cgroup()
null = os.open(os.devnull, os.O_RDWR)
env, cwd = dict(os.environ), os.getcwd()
r = resource.getrusage(resource.RUSAGE_SELF)
for i in range(n):
    if base: join_cgroup(f"{base}/c{i}")
    pid = 0
    if method == "Popen":
        subprocess.Popen(["true"], stdin=null, stdout=null, stderr=null, cwd=cwd, env=env,
                         start_new_session=True).wait()
    elif method == "psjobs spawn":
        pid = _spawn.spawn(["true"], null, null, null, cwd, env)[0]
    if base: leave_cgroup(home)
    if pid: os.waitpid(pid, 0)
    if base: os.rmdir(f"{base}/c{i}")
s = resource.getrusage(resource.RUSAGE_SELF)
print(s.ru_utime + s.ru_stime - r.ru_utime - r.ru_stime)
if base: os.rmdir(base)
"""


def _cpu(method: str, n: int, cgroup: bool) -> float:
    out = subprocess.run([sys.executable, "-c", _ONE, method, str(n), "1" if cgroup else "0"],
                         capture_output=True, text=True, check=True).stdout
    return float(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="commands per method (default 2000)")
    n = parser.parse_args().n
    for cgroup in (False, True):
        nothing = _cpu("nothing", n, cgroup)
        if nothing < 0:
            print("cgroup v2 is not writable here: no cgroup rows")
            break
        moves = f" (the cgroup moves alone: {1e6 * nothing / n:.0f} us)" if cgroup else ""
        print(f"{'with' if cgroup else 'without'} a cgroup per command{moves}")
        for method in ("Popen", "psjobs spawn"):
            print(f"  {method:13s} {1e6 * (_cpu(method, n, cgroup) - nothing) / n:6.0f} us of CPU a command")


if __name__ == "__main__":
    main()
