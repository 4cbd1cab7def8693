"""``python -m bench.instructions BASE [--jobs N]``: instructions per thread job, this tree against BASE.

::

    git worktree of BASE (temporary) --+--> valgrind --tool=callgrind python -c LOOP(0)   } per tree:
    this checkout ---------------------+--> valgrind --tool=callgrind python -c LOOP(N)   } (N - 0) / N

Wall-clock A/B rows (``bench.ab``) move by 10-20% on this shared 2-core machine from one minute to
the next; callgrind counts instructions, which repeat to 0.1% whatever else runs, so a change of a
few percent on the thread path shows. The loop is the ``bench core`` row "thread job, trivial
callable: start -> result" plus its removal. Both runs of a tree start the interpreter, import
psjobs and run one unit (a round for batch); the difference between N units more and none more is
what the units cost. PYTHONHASHSEED is fixed so dictionary layouts repeat. Needs valgrind
(Debian's package).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

LOOP = """
import sys, psjobs
def trivial():
    return 1
s = psjobs.Session()
for _ in range({n}):
    job = s.start_thread_job(trivial)
    s.wait_job(job)
    assert job.receive() == [1]
    s.remove_job(job)
s.close()
"""

#: name -> (what one unit is, the program: {n} units, and the same program with 0 costs the rest)
LOOPS = {
    "job": ("thread job start -> result -> remove", LOOP),
    # the ``bench core`` row "jobs/s, 1,000 thread jobs": a thousand alive at once, in rounds
    "batch": ("thread job of 1,000 started at once, waited for, removed", """
import psjobs
def trivial():
    return 1
s = psjobs.Session()
for _ in range({n} // 1000):
    jobs = [s.start_thread_job(trivial) for _ in range(1000)]
    s.wait_job(jobs)
    s.remove_job(jobs)
s.close()
"""),
    # the ``bench core`` row "streaming from a thread job": items received while the job runs
    "stream": ("item streamed from a generator thread job, received as it runs", """
import psjobs
def gen(n):
    for i in range(n):
        yield i
s = psjobs.Session()
job = s.start_thread_job(gen, {n})
got = sum(1 for entry in s.read_entries(job, wait=True))  # as bench core reads it: batches as they come
assert got == {n} + 0, got
s.close()
"""),
    # the ``bench core`` row "streaming from a process job": the session process only (the worker
    # runs outside valgrind, ~50x faster than the session under it, so records arrive in full
    # batches of 1,000 and most of them go through the spill window, as when a reader falls behind)
    "pstream": ("item streamed from a generator process job, received as it runs (session side)", """
import psjobs
def gen(n):
    for i in range(n):
        yield i
s = psjobs.Session()
job = s.start_job(gen, {n})
got = sum(1 for entry in s.read_entries(job, wait=True))
assert got == {n} + 0, got
s.remove_job(job)
s.close()
"""),
    # the ``bench core`` row "process job, trivial callable: start -> result", the session's side
    # (the fork server and its workers run outside valgrind). The callable is __main__'s, pickled
    # by value, as the row's lambda is.
    "process": ("process job start -> result -> remove (session side)", """
import psjobs
def trivial():
    return 1
s = psjobs.Session()
for _ in range({n}):
    job = s.start_job(trivial)
    s.wait_job(job)
    assert job.receive() == [1]
    s.remove_job(job)
s.close()
"""),
    # the ``bench core`` row "get_job() over the finished jobs": 10,000 held, listed N times. They
    # are made one at a time: 10,000 started at once interleave differently from run to run, by
    # more instructions than a few hundred get_job() calls cost.
    "get_job": ("get_job() over 10,000 finished thread jobs", """
import psjobs
def trivial():
    return 1
s = psjobs.Session()
for _ in range(10000):
    s.wait_job(s.start_thread_job(trivial))
for _ in range({n}):
    s.get_job()
s.close()
"""),
}


def _count(tree: Path, n: int, loop: str = LOOP) -> int:
    python = os.path.realpath(sys.executable)  # a pyenv shim is a shell script: count python itself
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        env = dict(os.environ, PYTHONPATH=str(tree / "src"), PYTHONHASHSEED="0")
        proc = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                               python, "-c", loop.format(n=n)],
                              env=env, cwd=tmp, capture_output=True, text=True, check=True)
    for line in proc.stderr.splitlines():
        if "Collected :" in line:
            return int(line.rsplit(":", 1)[1].strip())
    raise RuntimeError(f"no callgrind total in: {proc.stderr[-500:]}")


def per_job(tree: Path, n: int, loop: str = LOOP) -> float:
    # Both runs do one unit at least (a round of 1,000 for batch): what the first unit imports is
    # not a unit's cost. Since `import psjobs` became lazy the thread backend, subprocess, pickle,
    # json... load on the first start; against a run of none they added ~45,000 instructions to
    # each of 1,000 jobs (2b2c61c imported them with psjobs, on both sides).
    warm = 1000 if "{n} // 1000" in loop else 1
    _count(tree, warm, loop)  # compile the tree's .pyc files once, outside the measured runs
    return (_count(tree, n + warm, loop) - _count(tree, warm, loop)) / n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__.splitlines()[0])
    parser.add_argument("base", help="the commit to compare against")
    parser.add_argument("--jobs", type=int, default=2000, help="units of the loop (a multiple of 1,000 for batch)")
    parser.add_argument("--loop", choices=sorted(LOOPS), default="job",
                        help="job: one thread job at a time (default); batch: 1,000 at once; stream: items "
                             "of a generator thread job; pstream: of a generator process job (the session's "
                             "side); process: a trivial process job (the session's side); get_job: get_job() "
                             "over 10,000 finished jobs")
    args = parser.parse_args(argv)
    unit, loop = LOOPS[args.loop]
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        base_tree = Path(tmp) / "base"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(base_tree), args.base],
                       check=True)
        try:
            base = per_job(base_tree, args.jobs, loop)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base_tree)], check=False)
    this = per_job(ROOT, args.jobs, loop)
    print(f"{unit}: {args.jobs} of them, instructions per one (callgrind)")
    print(f"  {args.base[:10]:>10}: {base:>10,.0f}")
    print(f"  {'this tree':>10}: {this:>10,.0f}   ratio {this / base:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
