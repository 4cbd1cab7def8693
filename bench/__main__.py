"""``python -m bench [--quick] [--json PATH] [area ...]``: run the benchmark areas, print tables.
(``python -m bench soak [--quick]`` is the soak of bench/soak.py instead: faults, then an account.)

::

    bench/bench_<area>.py  --run(quick)-->  rows  --> one table per case on stdout
                                                  --> bench/results.json (results-quick.json)

An area is a module ``bench/bench_<area>.py`` with ``run(quick: bool) -> list[dict]``. An area
that raises, or returns rows that break the contract, is reported and makes the exit status 1;
the other areas still run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def areas() -> list[str]:
    return sorted(p.stem[len("bench_"):] for p in HERE.glob("bench_*.py"))


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _commands_start() -> str:
    """How this psjobs starts a command (an older one, or one built without a C compiler: through
    its fork server), so a figure says which path it measured."""
    try:
        from psjobs.backends.process import _direct
    except ImportError:
        return "by the fork server"
    if not _direct.available():
        return "by the fork server (no _cspawn)"
    return "from the session where cgroup v2 is writable (_cspawn)"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["soak"]:  # not an area: a run under faults that accounts for every record (bench/soak.py)
        from bench.soak import main as soak

        return soak(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("areas", nargs="*", help=f"areas to run (default: all of {', '.join(areas())})")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that it runs, in seconds")
    parser.add_argument("--json", metavar="PATH", help="where to write the rows (default "
                        "bench/results.json, or bench/results-quick.json with --quick)")
    parser.add_argument("--list", action="store_true", help="list the areas and exit")
    parser.add_argument("--renice", action="store_true", help="on a busy shared machine: run the benchmark's "
                        "scheduling groups (its own session, psjobs' fork servers) at autogroup nice -20 "
                        "(root only)")
    args = parser.parse_args(argv)
    known = areas()
    if args.list:
        print("\n".join(known))
        return 0
    unknown = [a for a in args.areas if a not in known]
    if unknown:
        parser.error(f"unknown area(s) {', '.join(unknown)}; known: {', '.join(known)}")
    chosen = args.areas or known

    # Measure psjobs as an installed package has it: with .pyc files. Where PYTHONDONTWRITEBYTECODE is
    # set (it is on these machines), a module changed since its last .pyc is compiled again by every
    # process that imports it (the command, the fork server, each worker): ~2-3 ms a module.
    import psjobs

    subprocess.run([sys.executable, "-m", "compileall", "-q", str(Path(psjobs.__file__).parent), str(HERE)],
                   check=False, capture_output=True)
    from bench._harness import check_rows, favour, format_tables, format_targets, sanitise

    if args.renice:
        os.environ["BENCH_RENICE"] = "-20"
        favour(os.getpid())

    meta: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
        "psjobs": getattr(psjobs, "__version__", "?"), "commit": _commit(), "quick": args.quick,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "areas": {},
        "loadavg_start": list(os.getloadavg()), "renice": args.renice, "commands": _commands_start(),
    }
    print(f"psjobs bench: Python {meta['python']}, {meta['cpus']} CPUs, commit {meta['commit']}, "
          f"{'quick' if args.quick else 'full'} sizes; medians over interleaved runs; "
          f"load average {meta['loadavg_start'][0]:.1f}{'; reniced' if args.renice else ''}; "
          f"commands started {meta['commands']}")
    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    for area in chosen:
        t0 = time.perf_counter()
        print(f"\n=== {area} ===", flush=True)
        try:
            module = importlib.import_module(f"bench.bench_{area}")
            got = module.run(args.quick)
        except Exception as exc:
            errors.append(f"{area}: {type(exc).__name__}: {exc}")
            traceback.print_exc()
            continue
        finally:
            meta["areas"][area] = round(time.perf_counter() - t0, 2)
        problems = check_rows(area, got)
        if problems:
            errors.extend(problems)
            print("\n".join(problems), file=sys.stderr)
            got = [r for r in got if isinstance(r, dict)] if isinstance(got, list) else []
        for r in got:
            r.setdefault("area", area)
            if "error" in r:
                errors.append(f"{area}: {r['case']} / {r['impl']}: {r['error']}")
        rows.extend(got)
        print(format_tables(got), flush=True)
    meta["loadavg_end"] = list(os.getloadavg())
    print(format_targets(rows))
    out = Path(args.json) if args.json else HERE / ("results-quick.json" if args.quick else "results.json")
    out.write_text(json.dumps(sanitise({"meta": meta, "rows": rows, "errors": errors}), indent=1) + "\n")
    print(f"\nwrote {out}")
    if errors:
        print(f"\n{len(errors)} problem(s):\n  " + "\n  ".join(errors), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
