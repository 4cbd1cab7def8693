"""The psjobs command and its session host, against a bare shell.

::

    run(quick) --> a host in a temporary PSJOBS_HOME (stopped at the end)
       round trip   `psjobs start -q -- true` then `psjobs wait ID`, from a shell   vs  `sh -c true`
                    the same two requests from a client already running (no interpreter start)
       ingest       a job printing N lines, start to "every line stored"           vs  `seq N > /dev/null`
                    with and without a reader (`psjobs receive ID --wait`) attached
       whole        `psjobs get`, `psjobs start -q -- true` as whole processes     vs  `python -c pass`
       processes    a program's first process job (import, fork server, job, exit) vs  a program's first
                    multiprocessing forkserver Process, both counted over `python -c pass` (issue 18)
    --> rows: the median of rounds in which psjobs and the peer take turns

pueue, the model peer, is in neither PyPI nor Debian's archive here (checked with pip and
apt-cache), so the round trip is set against the floor any command pays: a bare `sh -c true`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

SRC = Path(__file__).resolve().parent.parent / "src"


@contextlib.contextmanager
def _host() -> Iterator[dict[str, str]]:
    home = tempfile.mkdtemp(prefix="psjb-")  # short: a unix socket path is at most 107 bytes
    path = [str(SRC), *(os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p)]
    env = {**os.environ, "PSJOBS_HOME": home, "PYTHONPATH": os.pathsep.join(path)}
    old = os.environ.get("PSJOBS_HOME")
    os.environ["PSJOBS_HOME"] = home
    try:
        subprocess.run([sys.executable, "-m", "psjobs", "host", "start"], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        yield env
    finally:
        subprocess.run([sys.executable, "-m", "psjobs", "host", "stop"], env=env, stdout=subprocess.DEVNULL)
        if old is None:
            os.environ.pop("PSJOBS_HOME", None)
        else:
            os.environ["PSJOBS_HOME"] = old
        shutil.rmtree(home, ignore_errors=True)


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _rounds(impls: dict[str, Callable[[], float]], rounds: int, warmup: bool) -> dict[str, float]:
    """Median of each, measured in turns (order rotating) so both meet the same machine."""
    names = list(impls)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for n in names if warmup else ():
        impls[n]()
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            samples[n].append(impls[n]())
    return {n: statistics.median(v) for n, v in samples.items()}


def run(quick: bool) -> list[dict[str, Any]]:
    from psjobs.host._client import Client

    rows: list[dict[str, Any]] = []
    rounds = 1 if quick else 15
    lines = 5_000 if quick else 1_000_000
    with _host() as env:
        py = f"{sys.executable} -m psjobs"
        shell_trip = f'id=$({py} start -q -- true) && {py} wait "$id" >/dev/null'
        client = Client()

        def in_process() -> float:
            def trip() -> None:
                row = client.call("start", command=["true"], cwd="/", env=dict(os.environ))
                client.call("wait", ids=[str(row["id"])])
            return _timed(trip)

        got = _rounds({
            "psjobs": lambda: _timed(lambda: subprocess.run(["sh", "-c", shell_trip], env=env, check=True)),
            "sh -c true": lambda: _timed(lambda: subprocess.run(["sh", "-c", "true"], check=True)),
            "client": in_process,
        }, rounds, warmup=not quick)
        note = "two commands: start, then wait; each starts a Python interpreter"
        rows.append({"case": "psjobs start -- true; psjobs wait (from a shell)", "impl": "psjobs",
                     "value": got["psjobs"] * 1e3, "unit": "ms", "better": "lower", "note": note})
        rows.append({"case": "psjobs start -- true; psjobs wait (from a shell)", "impl": "sh -c true",
                     "value": got["sh -c true"] * 1e3, "unit": "ms", "better": "lower",
                     "note": "pueue is not installable from PyPI or Debian here; a bare shell is the floor"})
        rows.append({"case": "start + wait over the socket (client already running)", "impl": "psjobs",
                     "value": got["client"] * 1e3, "unit": "ms", "better": "lower",
                     "note": "the host's own cost, without interpreter start-up"})

        def ingest(reader: bool) -> float:
            row = client.call("start", command=[f"seq 1 {lines}"], cwd="/", env=dict(os.environ))
            t0 = time.perf_counter()
            follower = None
            if reader:
                argv = [sys.executable, "-m", "psjobs", "receive", str(row["id"]), "--wait"]
                follower = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL)
            client.call("wait", ids=[str(row["id"])])  # returns once every line is stored
            elapsed = time.perf_counter() - t0
            if follower is not None:
                follower.wait(timeout=600)
            client.call("remove", ids=[str(row["id"])])
            return lines / elapsed

        def bare() -> float:
            argv = ["sh", "-c", f"seq 1 {lines} > /dev/null"]
            return lines / _timed(lambda: subprocess.run(argv, check=True))

        got = _rounds({"alone": lambda: ingest(False), "reader": lambda: ingest(True), "bare": bare},
                      1 if quick else 3, warmup=False)
        case = f"ingest: a job printing {lines:,} lines, start to all stored"
        rows.append({"case": case, "impl": "psjobs", "value": got["alone"], "unit": "items/s",
                     "better": "higher", "note": "no reader attached"})
        rows.append({"case": case + " (reader attached)", "impl": "psjobs", "value": got["reader"],
                     "unit": "items/s", "better": "higher", "note": "`psjobs receive ID --wait` follows it"})
        rows.append({"case": case, "impl": "seq > /dev/null", "value": got["bare"], "unit": "items/s",
                     "better": "higher", "note": "the program alone, nothing kept"})
        rows.extend(_whole_processes(env, rounds))
    return rows


# A program whose only work is its first job, and multiprocessing's counterpart: each started as a
# whole process, so the figure is what a user's script pays (interpreter, imports, server, exit).
_PSJOBS_FIRST = """
import psjobs
from bench import _jobs
job = psjobs.start_job(_jobs.trivial)
job.wait(60)
assert job.receive() == [1], job.reason
"""
_MP_FIRST = """
import multiprocessing as mp
from bench import _jobs
if __name__ == "__main__":
    ctx = mp.get_context("forkserver")
    r, w = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_jobs.send_one, args=(w,))
    p.start()
    w.close()
    assert r.recv() == 1
    p.join()
"""


def _whole_processes(env: dict[str, str], rounds: int) -> list[dict[str, Any]]:
    """Issue 18: the command as a whole process against `python -c pass` (target <= 2.0x), and a
    program's first job, over `python -c pass`, against multiprocessing's (target <= 0.5x)."""
    root = str(SRC.parent)
    env = {**env, "PYTHONPATH": os.pathsep.join([root, env.get("PYTHONPATH", "")])}

    def proc(*argv: str) -> Callable[[], float]:
        return lambda: _timed(lambda: subprocess.run([sys.executable, *argv], env=env, cwd=root, check=True,
                                                     stdout=subprocess.DEVNULL)) * 1e3

    got = _rounds({"get": proc("-m", "psjobs", "get"), "start": proc("-m", "psjobs", "start", "-q", "--", "true"),
                   "pass": proc("-c", "pass"), "psjobs first": proc("-c", _PSJOBS_FIRST),
                   "mp first": proc("-c", _MP_FIRST)}, max(rounds, 3), warmup=True)
    rows: list[dict[str, Any]] = []
    base = got["pass"]
    for verb in ("get", "start"):
        case = f"`psjobs {verb}{' -q -- true' if verb == 'start' else ''}` as a whole process"
        rows.append({"case": case, "impl": "psjobs", "value": got[verb], "unit": "ms", "better": "lower",
                     "note": f"{got[verb] / base:.2f}x `python -c pass`", "target": "<= 2.0x `python -c pass`",
                     "meets": got[verb] / base <= 2.0})
        rows.append({"case": case, "impl": "python -c pass", "value": base, "unit": "ms", "better": "lower"})
    case = "a program's first process job, whole process"
    ours, theirs = got["psjobs first"] - base, got["mp first"] - base
    rows.append({"case": case, "impl": "psjobs", "value": got["psjobs first"], "unit": "ms", "better": "lower",
                 "note": f"{ours:.1f} ms over `python -c pass`: {ours / theirs:.2f}x multiprocessing's",
                 "target": "its cost over `python -c pass` <= 0.5x multiprocessing's", "meets": ours <= 0.5 * theirs})
    rows.append({"case": case, "impl": "mp forkserver Process", "value": got["mp first"], "unit": "ms",
                 "better": "lower", "note": f"{theirs:.1f} ms over `python -c pass`"})
    rows.append({"case": case, "impl": "python -c pass", "value": base, "unit": "ms", "better": "lower"})
    return rows


if __name__ == "__main__":
    for row in run(quick="--quick" in sys.argv):
        print(f"{row['case']:<60} {row['impl']:<16} {row['value']:>14,.1f} {row['unit']}")
