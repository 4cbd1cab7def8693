"""The docs are examples a user can paste: run every Python code block of every page in docs/."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

import psjobs

from .clitools import stop_host

DOCS = Path(__file__).resolve().parent.parent / "docs"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def pages() -> list[Path]:
    return [DOCS.parent / "README.md", *sorted(DOCS.glob("*.md"))]


@pytest.mark.parametrize("page", pages(), ids=lambda p: p.name)
def test_python_blocks_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                           default_session: psjobs.Session) -> None:
    blocks = BLOCK.findall(page.read_text())
    if not blocks:
        pytest.skip(f"{page.name} has no Python block")
    monkeypatch.chdir(tmp_path)
    # psjobs.connect() examples (docs/connect.md) reach a host of their own, never the user's.
    monkeypatch.setenv("PSJOBS_HOME", str(tmp_path / "psjobs-home"))
    namespace: dict[str, object] = {"os": os, "time": time, "__name__": "__docs__"}
    try:
        for n, block in enumerate(blocks, 1):
            try:
                exec(compile(block, f"{page.name} block {n}", "exec"), namespace)
            except Exception as exc:
                raise AssertionError(f"{page.name}, code block {n} failed: {exc!r}\n{block}") from exc
    finally:
        psjobs.remove_job(psjobs.get_job(), force=True)
        stop_host(tmp_path / "psjobs-home")


def test_tour_page_is_up_to_date() -> None:
    """docs/tour.md is made from psjobs.tour: every step's code is on the page, in order."""
    import textwrap

    from psjobs.tour import STEPS

    blocks = BLOCK.findall((DOCS / "tour.md").read_text())
    assert [b.strip() for b in blocks] == [textwrap.dedent(s.code).strip() for s in STEPS]


def test_tour_runs(capsys: pytest.CaptureFixture[str], default_session: psjobs.Session) -> None:
    from psjobs.tour import main

    assert main([]) == 0
    out = capsys.readouterr().out
    assert "The tour is over" in out and "Failed" in out and "Stopped" in out
