"""Every block of every page is run by a test, or says why not; ``python -m tests.test_docs_coverage``
counts them per page.

::

    every page --doctools.fences()--> every block --> the test that runs it (RUN_BY), an output
                                                      block under such a block, or a
                                                      <!-- not run: reason --> comment above it
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .doctools import Block, fences
from .test_docs_notebook import notebook_cells

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOTEBOOK = {b.line for b in notebook_cells()}  # docs/ipython.md's cells that run in a real kernel

# Which test runs which blocks; an ``output`` block is checked with the block above it.
RUN_BY: dict[tuple[str, str], str] = {
    ("*", "python"): "tests/test_docs.py (output compared)",
    ("*", "sh"): "tests/test_docs.py (output compared)",
    ("ipython.md", "ipython"): "tests/test_docs_ipython.py (`In [n]:` sessions, output compared), "
                               "tests/test_docs_notebook.py (notebook cells, output compared)",
}


def run_by(page: Path, block: Block) -> str | None:
    if block.lang == "ipython" and "In [" not in block.code and block.line not in NOTEBOOK:
        return None  # neither an `In [n]:` session nor a notebook cell: no test runs it
    return RUN_BY.get((page.name, block.lang)) or RUN_BY.get(("*", block.lang))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_block_is_run_or_says_why_not(page: Path) -> None:
    found = fences(page)
    for i, block in enumerate(found):
        where = f"{page.name}, the block at line {block.line}"
        if block.not_run is not None:
            continue
        if block.lang == "output":
            above = found[i - 1] if i else None
            assert above is not None and above.output == block.code and run_by(page, above), (
                f"{where} is an output block under no block a test runs")
            continue
        assert run_by(page, block), (f"{where} ({block.lang or 'no language'}) is run by no test: run it, or "
                                     "say why not in a `<!-- not run: ... -->` comment right above it")


def test_every_not_run_comment_is_right_above_a_block() -> None:
    """A comment that is not right above a block would leave its block unmarked, silently."""
    for page in PAGES:
        text = page.read_text()
        marked = sum(b.not_run is not None for b in fences(page))
        assert text.count("<!-- not run: ") == marked, f"{page.name}: a `<!-- not run: -->` comment is above no block"


def test_the_pages_that_teach_by_example_keep_their_checked_examples() -> None:
    """A page whose blocks all lost their check would pass the tests above unnoticed."""
    counts = census()
    for page, least in {"docs/cli.md": 12, "docs/guide.md": 8, "docs/ipython.md": 12, "docs/tour.md": 18,
                        "README.md": 2}.items():
        assert counts[page][0] >= least, f"{page} has {counts[page][0]} checked blocks, fewer than {least}"


def census() -> dict[str, tuple[int, int, int]]:
    """Per page: (code blocks run with their output compared, run without, not run with a reason).

    ``python -m tests.test_docs_coverage`` prints it."""
    out: dict[str, tuple[int, int, int]] = {}
    for page in PAGES:
        compared = unchecked = skipped = 0
        for block in fences(page):
            if block.lang == "output":
                continue
            if block.not_run is not None:
                skipped += 1
            elif block.lang in ("python", "sh") or (page.name == "ipython.md" and run_by(page, block)):
                compared += 1  # a block with no output block is checked to print nothing
            else:
                unchecked += 1  # none now: kept so a new kind of block shows up here
        out[str(page.relative_to(ROOT))] = (compared, unchecked, skipped)
    return out


if __name__ == "__main__":
    for name, (compared, unchecked, skipped) in census().items():
        print(f"{name:20} {compared:3} checked  {unchecked:3} run, output not compared  {skipped:3} not run")
