"""Run docs/ipython.md's notebook cells in a real kernel (nbclient) and print them as markdown.

``python scripts/notebook_outputs.py > /tmp/nb.md`` gives the "In a notebook" section of
docs/ipython.md: each cell, then what the notebook shows under it once the cell and its jobs are
done (display updates applied, as the front end applies them).
"""

from __future__ import annotations

import os
import sys
import tempfile

import nbformat
from nbclient import NotebookClient

CELLS = [
    "%load_ext psjobs\nimport time, psjobs",
    "def slow_square(x):\n    time.sleep(1)\n    return x * x\n\nresult = slow_square(12) &",
    "def copy_files(n):\n    for i in range(n):\n        psjobs.write_progress('copying', status=f'file {i}', percent_complete=100 * i // n)\n"
    "        time.sleep(0.1)\n    return n\n\ncopy = copy_files(5) &\n%receive copy --wait",
    "def parse(text):\n    value = int(text)\n    return value\n\nbad = parse('x') &\n%wait bad",
    "%%bg --name cellwork\ntotal = 0\nfor i in range(5):\n    total += i\ntotal",
    "%receive cellwork --wait",
    "%jobs",
]


def main() -> int:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in CELLS])
    with tempfile.TemporaryDirectory() as tmp:
        client = NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": tmp}})
        client.execute()
    for cell in nb.cells:
        print(f"```ipython\n{cell.source}\n```\n")
        shown: list[str] = []
        for out in cell.outputs:
            if out.output_type == "stream":
                shown.append(out.text.rstrip("\n"))
            elif out.output_type in ("display_data", "execute_result"):
                shown.append(out.data.get("text/plain", "").rstrip("\n"))
            elif out.output_type == "error":
                shown.append(f"{out.ename}: {out.evalue}")
        if shown:
            print("```text\n" + "\n".join(shown) + "\n```\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    sys.exit(main())
