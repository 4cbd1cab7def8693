"""``python -m bench.ab BASE [area ...] [--rounds N]``: this checkout against an older commit, A/B.

::

    git worktree of BASE (temporary) --+
                                       +--> rounds: BASE's bench, then this tree's (the order flips
    this checkout ---------------------+    each round) --> bench/results-ab-*.json --> one table:
                                            per psjobs case, each side's median over the rounds,
                                            the ratio this/BASE, a mark where this is > 10% worse,
                                            and each side's range over its rounds

Each side runs its own ``python -m bench AREA`` in a fresh interpreter with its own ``src`` first on
PYTHONPATH, so each measures its own psjobs with its own benchmark code, and the rounds alternate
so a noisy moment of the shared machine hits both. Peer rows are left out: they measure the same
thing on both sides. The load average is printed with the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORSE = 1.10  # issue 11: no case more than 10% slower than before


def _run(tree: Path, areas: list[str], out: Path, quick: bool) -> list[dict[str, Any]]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree / "src"), str(tree)]))
    # Both sides with .pyc files, as installed (an older bench/__main__ does not write them itself).
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(tree / "src"), str(tree / "bench")],
                   check=False, capture_output=True)
    command = [sys.executable, "-m", "bench", *areas, "--json", str(out), *(["--quick"] if quick else [])]
    subprocess.run(command, cwd=tree, env=env, check=False, stdout=subprocess.DEVNULL)
    data = json.loads(out.read_text())
    rows: list[dict[str, Any]] = data["rows"] if isinstance(data, dict) else data
    return rows


def _psjobs_rows(rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["case"], r["impl"]): r for r in rows
            if str(r.get("impl", "")).startswith("psjobs") and isinstance(r.get("value"), (int, float))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.splitlines()[0])
    parser.add_argument("base", help="the commit to compare against (e.g. the last one before a change)")
    parser.add_argument("areas", nargs="*", default=["core"], help="bench areas (default: core)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per side (default 3)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that it runs; figures mean nothing")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="psjobs-ab-") as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(base), args.base], cwd=ROOT, check=True)
        try:
            sides: dict[str, list[dict[tuple[str, str], dict[str, Any]]]] = {"base": [], "this": []}
            loads = [os.getloadavg()[0]]
            for n in range(args.rounds):
                order = [("base", base), ("this", ROOT)]
                for side, tree in order if n % 2 == 0 else order[::-1]:
                    out = HERE / f"results-ab-{side}-{n}.json"
                    sides[side].append(_psjobs_rows(_run(tree, args.areas, out, args.quick)))
                    print(f"round {n + 1}/{args.rounds}: {side} done (load {os.getloadavg()[0]:.1f})",
                          file=sys.stderr)
                loads.append(os.getloadavg()[0])
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=False)
    keys = [k for k in sides["this"][0] if all(k in r for r in sides["base"] + sides["this"])]
    print(f"A/B {args.base} -> this checkout, areas {' '.join(args.areas)}, {args.rounds} rounds each, "
          f"medians of the rounds' medians; load average {min(loads):.1f}-{max(loads):.1f}")
    print(f"{'case':<58} {'impl':<26} {'base':>11} {'this':>11} {'this/base':>9}   rounds: base | this")
    worse = 0
    for key in keys:
        bs = [r[key]["value"] for r in sides["base"]]
        ts = [r[key]["value"] for r in sides["this"]]
        b, t = statistics.median(bs), statistics.median(ts)
        row = sides["this"][0][key]
        lower = row.get("better", "lower") == "lower"
        ratio = t / b if b else float("nan")
        bad = ratio > WORSE if lower else ratio < 1 / WORSE
        worse += bad
        unit = row.get("unit", "")
        # Each round's figure too: a row whose rounds overlap from side to side moved with the
        # machine (the modes of a process, see bench/FINDINGS.md) more than with the change.
        spread = f"{min(bs):.4g}-{max(bs):.4g} | {min(ts):.4g}-{max(ts):.4g}"
        print(f"{key[0][:58]:<58} {key[1][:26]:<26} {b:>8.4g} {unit[:2]:<2} {t:>8.4g} {unit[:2]:<2} "
              f"{ratio:>8.2f}{'  WORSE' if bad else '       '}  {spread}")
    print(f"{worse} case(s) more than {WORSE - 1:.0%} worse than {args.base}")
    return 1 if worse else 0


if __name__ == "__main__":
    sys.exit(main())
