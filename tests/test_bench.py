"""`python -m bench` runs (tiny sizes), prints its tables and writes the JSON the lead reads.

No timing is checked here: figures belong to bench/, not to pass/fail tests."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import _harness
from bench.__main__ import areas

ROOT = Path(__file__).resolve().parent.parent  # tests/ is a package: pytest puts ROOT on sys.path

CORE_CASES = {
    "process job, trivial callable: start -> result",
    "process job, first of a program (starts the fork server)",
    "thread job, trivial callable: start -> result",
    "command job `true` (argv): start -> end",
    "jobs/s, 20 thread jobs: start all, wait all",
    "jobs/s, 20 process jobs (callable): start all, wait all",
    "jobs/s, 20 command jobs (`true`): start all, wait all",
    "streaming from a process job: items/s",
    "streaming from a process job: first item latency",
    "streaming from a thread job: items/s",
    "streaming from a thread job: first item latency",
    "large result: bytes from a process job",
    "large result: list of small dicts from a process job",
    "stop: busy process job (pure-Python loop)",
    "stop: process tree job `sleep 100 | cat`",
    "stop: busy thread job (pure-Python loop)",
    "processes left after stopping `sleep 100 | cat`",
    "memory per running process job: USS",
    "memory per running process job: RSS",
    "memory per finished job held by the session",
    "get_job() over the finished jobs",
}


def _bench(*args: str, timeout: float = 55) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_lists_its_areas() -> None:
    out = _bench("--list")
    assert out.returncode == 0, out.stderr
    assert "core" in out.stdout.split()


def test_refuses_an_unknown_area() -> None:
    out = _bench("--quick", "no_such_area")
    assert out.returncode == 2
    assert "unknown area" in out.stderr and "core" in out.stderr


@pytest.mark.parametrize("area", areas())
def test_quick_run_prints_tables_and_writes_json(area: str, tmp_path: Path) -> None:
    target = tmp_path / "results.json"
    out = _bench("--quick", "--json", str(target), area)
    assert out.returncode == 0, f"stdout:\n{out.stdout[-3000:]}\nstderr:\n{out.stderr[-3000:]}"
    assert f"=== {area} ===" in out.stdout
    assert "psjobs/peer" in out.stdout  # a table header
    data = json.loads(target.read_text())  # strict JSON: NaN would not parse back as a number
    assert data["meta"]["quick"] is True
    assert data["errors"] == []
    rows = data["rows"]
    assert rows, "the area measured nothing"
    for r in rows:
        assert _harness.check_rows(area, [r]) == [] or r["value"] is None, r
        assert r["better"] in ("lower", "higher")
        assert r["case"] in out.stdout
    if area == "core":
        cases = {r["case"] for r in rows}
        assert CORE_CASES <= cases, CORE_CASES - cases
        impls = {r["impl"] for r in rows}
        assert {"psjobs", "mp forkserver Process + Pipe", "mp spawn Process + Pipe", "mp fork Process + Pipe",
                "ProcessPoolExecutor (warm)", "ThreadPoolExecutor", "Popen + wait"} <= impls
        # IPython's BackgroundJobManager is a peer where it runs (IPython 9 broke it)
        assert "IPython BackgroundJobManager" in impls or "BackgroundJobManager cannot run here" in out.stderr
        targeted = [r for r in rows if "target" in r]
        assert len(targeted) >= 10 and all(isinstance(r["meets"], bool) for r in targeted)
        assert "Targets (issues 3, 12 and 18" in out.stdout


# --- the runner's pure parts ----------------------------------------------------------------

def test_rows_that_break_the_contract_are_named() -> None:
    good = _harness.row("c", "psjobs", [3.0, 1.0, 2.0], "ms", "lower")
    assert good["value"] == 2.0 and good["n"] == 3
    assert _harness.check_rows("x", [good]) == []
    problems = _harness.check_rows("x", [{"case": "c", "impl": "psjobs", "value": "fast", "unit": "ms",
                                          "better": "sideways"}, 7])
    assert any("numeric value" in p for p in problems)
    assert any("better" in p for p in problems)
    assert any("row 1 is a int" in p for p in problems)
    assert _harness.check_rows("x", {"not": "a list"})


def test_table_shows_ratio_and_which_way_is_better() -> None:
    rows = [_harness.row("start", "psjobs", 2.0, "ms", "lower", target="<= 3 ms", meets=True),
            _harness.row("start", "peer", 4.0, "ms", "lower"),
            _harness.row("rate", "psjobs", 50.0, "jobs/s", "higher"),
            _harness.row("rate", "peer", 100.0, "jobs/s", "higher")]
    text = _harness.format_tables(rows)
    assert "start  [ms, lower is better]" in text
    assert "0.50  psjobs 2.0x better" in text
    assert "0.50  psjobs 2.0x worse" in text
    assert "target <= 3 ms: PASS" in text
    assert "PASS  start" in _harness.format_targets(rows)


def test_interleave_alternates_and_keeps_every_sample() -> None:
    calls: list[str] = []

    def make(name: str) -> object:
        def one() -> float:
            calls.append(name)
            return float(len(calls))
        return one

    got = _harness.interleave({"a": make("a"), "b": make("b")}, 4, warmup=1)  # type: ignore[dict-item]
    assert [len(v) for v in got.values()] == [4, 4]
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]


def test_json_has_no_nan() -> None:
    cleaned = _harness.sanitise({"rows": [{"value": math.nan, "q": [math.inf, 1.0]}]})
    assert json.loads(json.dumps(cleaned, allow_nan=False)) == {"rows": [{"value": None, "q": [None, 1.0]}]}
