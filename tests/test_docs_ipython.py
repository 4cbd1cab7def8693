"""docs/ipython.md's ``In [n]:`` sessions run in a real IPython shell, in order, and print what the
page shows: ``Out[n]`` values, the notices said before the next prompt, usage errors.

::

    page --doctools.blocks--> ipython blocks --cells()--> [Cell(n, code, shown)] --json-->
    a new interpreter (DRIVER): one InteractiveShell, each cell run as In [n] --json-->
    what IPython printed for each cell --doctools.matches--> shown

The shell runs in a new interpreter, as a reader's does: job ids count from 1 in a process, and
the page shows them. A notice the page shows (``[5] Failed ...``) is said once its job has
finished: a reader typing the cells is seconds behind the jobs, the driver is not, so it waits for
the job before it runs the cell that shows the notice.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("IPython")

from .clitools import subprocess_env
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


DRIVER = """
import contextlib, io, json, sys
from IPython.core.interactiveshell import InteractiveShell
from traitlets.config import Config
import psjobs
config = Config()
config.HistoryManager.hist_file = ":memory:"
shell = InteractiveShell(config=config, ipython_dir=sys.argv[2])
shell.run_line_magic("load_ext", "psjobs")
printed = []
for number, code, notices in json.load(open(sys.argv[1])):
    for job_id in notices:  # waited for from code: the notice is still said (the magics' waits silence it)
        psjobs.wait_job(job_id, timeout=20)
    shell.execution_count = number
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        shell.run_cell(code, store_history=True)
    printed.append(out.getvalue())
shell.history_manager.end_session()
psjobs.remove_job(psjobs.get_job(), force=True)
json.dump(printed, sys.stdout)
"""


@pytest.mark.timeout(90)
def test_sessions_print_what_the_page_shows(tmp_path: Path) -> None:
    found = cells()
    assert len(found) > 20
    (tmp_path / "cells.json").write_text(json.dumps(
        [[c.number, c.code, [int(i) for i in NOTICE.findall(c.shown)]] for c in found]))
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(tmp_path / "cells.json"), str(tmp_path / "ipython")],
                          cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=80)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for cell, printed in zip(found, json.loads(proc.stdout), strict=True):
        where = f"docs/ipython.md, In [{cell.number}] at line {cell.line}"
        if cell.shown.strip():
            assert matches(cell.shown, printed), (f"{where} printed what the page does not show:\n{cell.code}"
                                                  f"\nthe page:\n{cell.shown}\nprinted:\n{printed}")
        else:
            assert not printed.strip(), (f"{where} prints, and the page shows nothing under it:\n{cell.code}"
                                         f"\nprinted:\n{printed}")
