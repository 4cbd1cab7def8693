"""docs/ipython.md's ``In [n]:`` sessions run in a real IPython shell, in order, and print what the
page shows: ``Out[n]`` values, the notices said before the next prompt, usage errors.

::

    page --doctools.blocks--> ipython blocks --cells()--> [Cell(n, code, shown)]
    Cell --InteractiveShell.run_cell (as In [n])--> what IPython printed --doctools.matches--> shown

A notice the page shows (``[5] Failed ...``) is said once its job has finished: a reader typing
the cells is seconds behind the jobs, this test is not, so it waits for the job before it runs
the cell that shows the notice.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("IPython")

from IPython.core.interactiveshell import InteractiveShell
from traitlets.config import Config

import psjobs
from psjobs import _api

from .conftest import wait_until
from .doctools import blocks, matches

PAGE = Path(__file__).resolve().parent.parent / "docs" / "ipython.md"
NOTICE = re.compile(r"^\[(\d+)\] (?:Completed|Failed|Stopped) ", re.M)


@dataclass
class Cell:
    number: int  # n of ``In [n]:``
    code: str
    shown: str  # what the page shows under it, before the next prompt
    line: int  # of the page


def cells(page: Path = PAGE) -> list[Cell]:
    """The page's ``In [n]:`` cells, in order (blocks marked ``<!-- not run: -->`` left out)."""
    found: list[Cell] = []
    for block in blocks(page, ("ipython",)):
        if block.not_run is not None or "In [" not in block.code:
            continue
        for i, line in enumerate(block.code.splitlines()):
            if m := re.match(r"In \[(\d+)\]: ?(.*)$", line):
                found.append(Cell(int(m.group(1)), m.group(2), "", block.line + 1 + i))
            elif (m := re.match(r"\s+\.\.\.: ?(.*)$", line)) and found and not found[-1].shown:
                found[-1].code += "\n" + m.group(1)
            elif found:
                found[-1].shown += line + "\n"
    return found


@pytest.fixture
def shell(session: psjobs.Session, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Any]:
    """A fresh IPython shell with the extension loaded, as `%load_ext psjobs` gives a reader."""
    monkeypatch.setattr(_api, "_default", session)  # `&` and the magics use this test's session
    monkeypatch.chdir(tmp_path)
    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    ip = InteractiveShell(config=config, ipython_dir=str(tmp_path / "ipython"))
    ip.run_line_magic("load_ext", "psjobs")
    try:
        yield ip
    finally:
        ip.run_line_magic("unload_ext", "psjobs")
        ip.history_manager.end_session()


@pytest.mark.timeout(60)
def test_sessions_print_what_the_page_shows(shell: Any, session: psjobs.Session) -> None:
    found = cells()
    assert len(found) > 20
    for cell in found:
        for job_id in NOTICE.findall(cell.shown):
            job = session.get_job(int(job_id))[0]
            wait_until(job.done, timeout=20, what=f"job {job.id}, whose notice the page shows at In [{cell.number}], "
                                                  "to finish")
        shell.execution_count = cell.number  # a block the tests do not run leaves a gap in the numbers
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            shell.run_cell(cell.code, store_history=True)
        where = f"docs/ipython.md, In [{cell.number}] at line {cell.line}"
        if cell.shown.strip():
            assert matches(cell.shown, printed.getvalue()), (
                f"{where} printed what the page does not show:\n{cell.code}\nthe page:\n{cell.shown}"
                f"\nprinted:\n{printed.getvalue()}")
        else:
            assert not printed.getvalue().strip(), (f"{where} prints, and the page shows nothing under it:"
                                                    f"\n{cell.code}\nprinted:\n{printed.getvalue()}")
