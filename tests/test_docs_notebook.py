"""docs/ipython.md's notebook section runs in a real kernel and shows what the page shows.

::

    docs/ipython.md, "A notebook run with nbclient" --doctools.fences--> ipython cells, in order
        --nbclient, a new python3 kernel (this interpreter)--> each cell's outputs, display
        updates applied as a front end applies them --> text/plain joined --> matches the
        ``output`` block under the cell (a cell that shows something must have one)
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .clitools import subprocess_env
from .doctools import Block, fences, matches

PAGE = Path(__file__).resolve().parent.parent / "docs" / "ipython.md"
SECTION = "A notebook run with nbclient"


def notebook_cells() -> list[Block]:
    """The page's ipython blocks from the notebook section to the next heading."""
    text = PAGE.read_text()
    start = text.index(SECTION)
    end = re.compile(r"^#", re.M).search(text, start)
    first = text.count("\n", 0, start) + 1
    last = text.count("\n", 0, end.start()) + 1 if end else len(text.splitlines()) + 1
    return [b for b in fences(PAGE) if b.lang == "ipython" and first < b.line < last and b.not_run is None]


def shown(cell: object) -> str:
    """What a notebook shows under a cell, as plain text (as scripts/notebook_outputs.py prints it)."""
    parts: list[str] = []
    for out in cell.outputs:  # type: ignore[attr-defined]
        if out.output_type == "stream":
            parts.append(out.text.rstrip("\n"))
        elif out.output_type in ("display_data", "execute_result"):
            parts.append(out.data.get("text/plain", "").rstrip("\n"))
        elif out.output_type == "error":
            parts.append(f"{out.ename}: {out.evalue}")
    return "\n".join(parts) + "\n" if parts else ""


@pytest.mark.timeout(240)
def test_notebook_cells_show_what_the_page_shows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    cells = notebook_cells()
    assert len(cells) >= 5, "the notebook section of docs/ipython.md has moved: see SECTION"
    for key, value in subprocess_env(PYDEVD_DISABLE_FILE_VALIDATION="1", PSJOBS_HOME=str(tmp_path / "home")).items():
        monkeypatch.setenv(key, value)  # the kernel inherits this environment
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c.code.rstrip("\n")) for c in cells])
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    for block, cell in zip(cells, nb.cells):
        where = f"ipython.md, the cell at line {block.line}"
        got = shown(cell)
        if block.output is None:
            assert not got.strip(), f"{where} shows something, and the page shows no output block under it:\n{got}"
        else:
            assert matches(block.output, got), (f"{where} shows what the page does not:\n{block.code}\n"
                                                f"the page:\n{block.output}\nshown:\n{got}")
