"""``python -m bench soak`` at a small size: mixed jobs under random SIGKILLs of workers and of the
fork server, stops and removes from 8 threads; every record and process accounted (bench/soak.py).

It runs as the command a user runs, in a process of its own: its chaos kills only what that
process started, and its account of leftover processes sees only its own."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(300)
def test_a_small_soak_loses_nothing_duplicates_nothing_and_leaves_nothing() -> None:
    # 1,500 jobs: 400 ran in 0.8 s once the job path got faster, before the chaos thread (a kill every
    # 50 ms) hit any of them.
    run = subprocess.run([sys.executable, "-m", "bench", "soak", "-n", "1500", "--seed", "7"], cwd=ROOT,
                         capture_output=True, text=True, timeout=280)
    out = run.stdout
    assert run.returncode == 0, out + run.stderr
    assert re.search(r"soak: 1500 jobs in", out), out
    assert "duplicated: 0   lost: 0   bad reason: 0   hung: 0   left running: 0" in out, out
    kills = re.search(r"kills:\s+(.*)", out)
    assert kills and "job process" in kills.group(1), out  # the chaos really hit jobs
    jobs = re.search(r"jobs:\s+(.*)", out)
    assert jobs is not None
    counts = {k: int(v) for k, v in re.findall(r"(\w+ \w+): (\d+)", jobs.group(1))}
    assert sum(counts.values()) == 1500, counts  # every job accounted for, once
