"""Measuring side by side on a noisy machine, and showing the result.

::

    bench_<area>.run(quick) --rows [{case, impl, value, unit, better, ...}]--> runner
    runner --validate--> table per case (median, ratio psjobs/peer, target) --> stdout
           --sanitise (NaN -> null)--------------------------------------------> results.json

The machine has 2 shared cores, so one implementation measured after another picks up whatever
else ran at that moment. :func:`interleave` runs every implementation once per round, in a
rotating order, and keeps every sample; the row's value is the median.
"""

from __future__ import annotations

import math
import os
import statistics
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from typing import Any

Row = dict[str, Any]
Sample = float | Mapping[str, float]

UNITS = {"ms", "us", "s", "items/s", "jobs/s", "MB/s", "KiB", "MiB", "bytes", "processes", "x"}
REQUIRED = {"case": str, "impl": str, "unit": str, "better": str}


def now() -> float:
    return time.perf_counter()


def favour(pid: int) -> None:
    """With ``python -m bench --renice``: give the scheduling group of ``pid`` the top priority.

    Linux schedules each session (autogroup) as one entity, so ``nice`` alone does nothing against
    busy processes of other sessions on a shared machine; the autogroup's own nice does. psjobs
    puts its fork server in a session of its own, so the runner favours that group too, and
    psjobs and its peers meet the same scheduler. (Needs root; silently skipped otherwise.)
    """
    level = os.environ.get("BENCH_RENICE")
    if not level:
        return
    try:
        with open(f"/proc/{pid}/autogroup", "w") as f:
            f.write(level)
    except OSError:
        pass


def interleave(impls: Mapping[str, Callable[[], Sample]], rounds: int, *, warmup: int = 1,
               budget: float | None = None) -> dict[str, list[Sample]]:
    """Call every implementation once per round (order rotating each round); keep the samples.

    Each callable does one measurement and returns what it measured (a number, or a mapping of
    metric -> number when one run yields several figures). ``warmup`` rounds are thrown away.
    ``budget`` (seconds) stops adding rounds once spent, keeping at least 3 when possible.
    """
    names = list(impls)
    samples: dict[str, list[Sample]] = {name: [] for name in names}
    for _ in range(warmup):
        for name in names:
            impls[name]()
    start = now()
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            samples[name].append(impls[name]())
        if budget is not None and r >= 2 and now() - start > budget:
            break
    return samples


def metric(samples: Iterable[Sample], key: str | None = None) -> list[float]:
    out = []
    for s in samples:
        if isinstance(s, Mapping):
            if key is None:
                raise ValueError("samples are mappings: name the metric")
            out.append(float(s[key]))
        else:
            out.append(float(s))
    return out


def summary(values: list[float]) -> dict[str, float]:
    """Median and quartiles of the samples (the spread tells how much to trust the median)."""
    if not values:
        return {"value": math.nan, "n": 0}
    ordered = sorted(values)
    if len(ordered) >= 4:
        q1, _, q3 = statistics.quantiles(ordered, n=4)
    else:
        q1, q3 = ordered[0], ordered[-1]
    return {"value": statistics.median(ordered), "n": len(ordered), "q1": q1, "q3": q3}


def row(case: str, impl: str, values: list[float] | float, unit: str, better: str, *,
        note: str | None = None, **extra: Any) -> Row:
    """A result row; a list of samples becomes its median (with n, q1, q3)."""
    if better not in ("lower", "higher"):
        raise ValueError(f"better must be 'lower' or 'higher', not {better!r}")
    stats = summary(values) if isinstance(values, list) else {"value": float(values), "n": 1}
    out: Row = {"case": case, "impl": impl, **stats, "unit": unit, "better": better}
    if note:
        out["note"] = note
    out.update(extra)
    return out


def failed_row(case: str, impl: str, unit: str, better: str, exc: BaseException) -> Row:
    """A case that could not be measured: the row says why instead of taking the suite down."""
    text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    return {"case": case, "impl": impl, "value": math.nan, "n": 0, "unit": unit, "better": better,
            "error": text}


def set_target(rows: list[Row], case: str, text: str, meets: bool | None, impl: str = "psjobs") -> None:
    """Mark the psjobs row of ``case`` with the issue's target and whether it is met."""
    for r in rows:
        if r["case"] == case and r["impl"] == impl:
            r["target"] = text
            r["meets"] = meets
            return


def value_of(rows: list[Row], case: str, impl: str) -> float:
    for r in rows:
        if r["case"] == case and r["impl"] == impl:
            return float(r["value"])
    return math.nan


# --- checking and showing -------------------------------------------------------------------

def check_rows(area: str, rows: Any) -> list[str]:
    """What is wrong with an area's rows (empty when they follow the contract)."""
    problems: list[str] = []
    if not isinstance(rows, list):
        return [f"{area}: run() returned {type(rows).__name__}, not a list of dicts"]
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            problems.append(f"{area}: row {i} is a {type(r).__name__}, not a dict")
            continue
        for key, typ in REQUIRED.items():
            if not isinstance(r.get(key), typ):
                problems.append(f"{area}: row {i} ({r.get('case')!r}) has no {key} of type {typ.__name__}")
        if not isinstance(r.get("value"), (int, float)) or isinstance(r.get("value"), bool):
            problems.append(f"{area}: row {i} ({r.get('case')!r}) has no numeric value")
        if r.get("better") not in ("lower", "higher"):
            problems.append(f"{area}: row {i} ({r.get('case')!r}) better must be 'lower' or 'higher'")
    return problems


def _fmt(v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    a = abs(v)
    if a >= 100_000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def verdict(ratio: float, better: str) -> str:
    """Words for psjobs/peer: 'psjobs 2.1x better' (or worse, or even within 5 %)."""
    if math.isnan(ratio) or ratio <= 0:
        return ""
    gain = 1 / ratio if better == "lower" else ratio
    if 0.95 <= gain <= 1.05:
        return "even"
    return f"psjobs {gain:.1f}x better" if gain > 1 else f"psjobs {1 / gain:.1f}x worse"


def format_tables(rows: list[Row]) -> str:
    """One table per case: each impl's median, and psjobs against each peer."""
    cases: dict[str, list[Row]] = {}
    for r in rows:
        cases.setdefault(r["case"], []).append(r)
    out: list[str] = []
    for case, group in cases.items():
        first = group[0]
        unit, better = first["unit"], first["better"]
        size = f" ({first['size']})" if first.get("size") else ""
        out.append(f"\n{case}{size}  [{unit}, {better} is better]")
        mine = next((r for r in group if r["impl"] == "psjobs"), None)
        base = float(mine["value"]) if mine is not None else math.nan
        width = max(24, *(len(r["impl"]) for r in group))
        out.append(f"  {'impl':<{width}} {'median':>10} {'q1..q3':>19}  {'psjobs/peer':>11}  verdict")
        for r in group:
            v = float(r["value"])
            spread = f"{_fmt(r['q1'])}..{_fmt(r['q3'])}" if "q1" in r and r.get("n", 0) > 1 else ""
            ratio_txt, words = "", ""
            if mine is not None and r is not mine and v and not math.isnan(v) and not math.isnan(base):
                ratio = base / v
                ratio_txt = f"{ratio:.2f}"
                words = verdict(ratio, better)
            line = f"  {r['impl']:<{width}} {_fmt(v):>10} {spread:>19}  {ratio_txt:>11}  {words}"
            if "error" in r:
                line += f"  FAILED: {r['error']}"
            out.append(line.rstrip())
            if r.get("target") is not None:
                met = {True: "PASS", False: "FAIL", None: "n/a"}[r.get("meets")]
                out.append(f"  {'':<{width}} target {r['target']}: {met}")
            if r.get("note"):
                out.append(f"  {'':<{width}} ({r['note']})")
    return "\n".join(out)


def format_targets(rows: list[Row]) -> str:
    marked = [r for r in rows if r.get("target") is not None]
    if not marked:
        return ""
    lines = ["\nTargets (issues 3, 12 and 18: the row names each)"]
    for r in marked:
        met = {True: "PASS", False: "FAIL", None: "n/a "}[r.get("meets")]
        lines.append(f"  {met}  {r['case']}: {_fmt(float(r['value']))} {r['unit']}  (target {r['target']})")
    return "\n".join(lines)


def sanitise(obj: Any) -> Any:
    """JSON has no NaN or infinity: they become null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: sanitise(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [sanitise(v) for v in obj]
    return obj
