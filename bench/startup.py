"""``python -m bench.startup BASE``: what starting costs, this tree against BASE, in instructions.

::

    git worktree of BASE (temporary) --+--> valgrind --tool=callgrind python -c CODE   } per tree and
    this checkout ---------------------+--> python -c CODE + print(len(sys.modules))  } per row

Rows: ``python -c pass`` (the floor), ``import psjobs``, the ``psjobs get`` and ``start``
commands as whole processes (against their own session host, in a temporary PSJOBS_HOME, started
before the counted runs), what a fork server imports before it serves, and a program's first
process job beside multiprocessing's first forkserver Process (``--quick``: the first two rows).
Wall time moves by 10-20% on this shared machine; callgrind's instruction counts repeat to 0.1%
under any load, so they are what an A/B reads on a busy day (targets still need a quiet machine).
Needs valgrind.
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

ROWS = {
    "python -c pass": "pass",
    "import psjobs": "import psjobs",
    "psjobs get (whole process)": "import sys; from psjobs._cli import main; main(['get'])",
    "psjobs start (whole process)": "import sys; from psjobs._cli import main; main(['start', '-q', '--', 'true'])",
    "fork server's imports": ("import psjobs.worker._forkserver, cloudpickle; from psjobs import _inside; "
                              "from psjobs.worker import _process_worker"),  # what its main() loads
    # Whole programs, every process counted (callgrind follows forks and execs); no warm spares
    # (PSJOBS_SPARES=0), as their number depends on idle time, which valgrind stretches.
    "program's first process job *": "import psjobs\ndef f():\n    return 1\n"
                                     "assert psjobs.receive_job(psjobs.wait_job(psjobs.start_job(f))) == [1]",
    "peer: first forkserver Process *": "import multiprocessing as mp, os\n"  # a target by reference
                                        "p = mp.get_context('forkserver').Process(target=os.getpid)\n"
                                        "p.start()\np.join()\nassert p.exitcode == 0",
}


def _env(tree: Path, home: str) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(tree / "src"), PYTHONHASHSEED="0", PSJOBS_HOME=home)


def count(tree: Path, code: str, home: str) -> tuple[int, int]:
    """(instructions, modules loaded) of ``python -c code`` run from ``tree``."""
    python = os.path.realpath(sys.executable)  # a pyenv shim is a shell script: count python itself
    env = _env(tree, home)
    listed = subprocess.run([python, "-c", code + "\nimport sys; print(len(sys.modules), file=sys.stderr)"],
                            env=env, cwd=home, capture_output=True, text=True, check=True)
    modules = int(listed.stderr.split()[-1])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out.%p"
        proc = subprocess.run(["valgrind", "--tool=callgrind", "--trace-children=yes", f"--callgrind-out-file={out}",
                               python, "-c", code], env=dict(env, PSJOBS_SPARES="0"), cwd=home, capture_output=True,
                              text=True, check=True)
    totals = [int(line.rsplit(":", 1)[1].strip()) for line in proc.stderr.splitlines() if "Collected :" in line]
    if not totals:
        raise RuntimeError(f"no callgrind total in: {proc.stderr[-500:]}")
    return sum(totals), modules  # one total per process


def measure(tree: Path, rows: dict[str, str]) -> dict[str, tuple[int, int]]:
    with tempfile.TemporaryDirectory(prefix="psj-") as home:
        env = _env(tree, home)
        python = os.path.realpath(sys.executable)
        # Write the .pyc files as an installed package has them (PYTHONDONTWRITEBYTECODE may be set).
        subprocess.run([python, "-m", "compileall", "-q", str(tree / "src")], check=True, capture_output=True)
        subprocess.run([python, "-c", "import psjobs._cli as c; c.main(['get'])"], env=env, cwd=home,
                       check=True, capture_output=True)  # start the host
        try:
            return {name: count(tree, code, home) for name, code in rows.items()}
        finally:
            subprocess.run([python, "-c", "import psjobs._cli as c; c.main(['host', 'stop'])"], env=env,
                           cwd=home, check=False, capture_output=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.startup", description=__doc__.splitlines()[0])
    parser.add_argument("base", help="the commit to compare against")
    parser.add_argument("--quick", action="store_true", help="count only python -c pass and import psjobs")
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    rows = dict(list(ROWS.items())[:2]) if args.quick else ROWS
    with tempfile.TemporaryDirectory() as tmp:
        base_tree = Path(tmp) / "base"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(base_tree), args.base],
                       check=True)
        try:
            base = measure(base_tree, rows)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base_tree)], check=False)
    this = measure(ROOT, rows)
    floor = this["python -c pass"][0]
    print("instructions (callgrind) and modules loaded (by the first process), whole process (* every process "
          "of the program); 'x floor' is over python -c pass")
    print(f"  {'':28} {args.base[:10]:>16} {'this tree':>16} {'ratio':>6} {'x floor':>8} {'modules':>11}")
    for name in rows:
        (b, bm), (t, tm) = base[name], this[name]
        print(f"  {name:28} {b:>16,} {t:>16,} {t / b:>6.3f} {t / floor:>8.2f} {bm:>5}->{tm:<5}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
