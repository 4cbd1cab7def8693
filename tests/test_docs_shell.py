"""The docs' shell examples print what the pages show, and every block of every page is either run
by a test or says why not.

::

    README.md, docs/cli.md --doctools.blocks("sh")--> shell blocks, in order
        --bash -c, stderr into stdout (as a terminal shows both)--> what each block printed
        in one empty directory, `psjobs` on PATH, a new host in a private PSJOBS_HOME
        --> matches the ``output`` block under it (a block that prints must have one)

    every page --doctools.fences()--> every block --> the test that runs it, or its
                                                      <!-- not run: reason --> comment
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from .clitools import stop_host, subprocess_env
from .doctools import Block, blocks, fences, matches

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_PAGES = [ROOT / "README.md", ROOT / "docs" / "cli.md"]

# Which test runs which blocks; an ``output`` block is checked with the block above it.
RUN_BY: dict[tuple[str, str], str] = {
    ("*", "python"): "tests/test_docs.py (output compared, except on a page of recorded output)",
    ("README.md", "sh"): "tests/test_docs_shell.py (output compared)",
    ("cli.md", "sh"): "tests/test_docs_shell.py (output compared)",
    ("ipython.md", "ipython"): "tests/test_ipython.py::test_docs_sessions_run_as_shown (Out[n] compared)",
}


def run_by(page: Path, block: Block) -> str | None:
    return RUN_BY.get((page.name, block.lang)) or RUN_BY.get(("*", block.lang))


def recorded(page: Path) -> bool:
    """A page made from a recorded run (docs/tour.md): its outputs are ``text`` blocks, not compared."""
    return re.search(r"<!-- doctest: [\w, ]*recorded", page.read_text()) is not None


@pytest.mark.timeout(300)
@pytest.mark.parametrize("page", SHELL_PAGES, ids=lambda p: p.name)
def test_shell_blocks_run_and_print_what_the_page_shows(page: Path, tmp_path: Path) -> None:
    found = [b for b in blocks(page, ("sh",)) if b.not_run is None]
    assert found, f"{page.name} has no shell block to run"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    shim = bindir / "psjobs"  # `psjobs` is this tree's command, whatever is installed
    shim.write_text(f'#!/bin/sh\nexec {sys.executable} -m psjobs "$@"\n')
    shim.chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    home = tmp_path / "home"
    env = subprocess_env(PATH=f"{bindir}:{subprocess_env()['PATH']}", PSJOBS_HOME=str(home))
    try:
        for block in found:
            where = f"{page.name}, the block at line {block.line}"
            proc = subprocess.run(["bash", "-c", "set -e\n" + block.code], cwd=work, env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
            assert proc.returncode == 0, f"{where} failed (exit status {proc.returncode}):\n{block.code}\n{proc.stdout}"
            if block.output is None:
                assert not proc.stdout.strip(), (f"{where} prints, and the page shows no output block under it:"
                                                 f"\n{block.code}\nprinted:\n{proc.stdout}")
            else:
                assert matches(block.output, proc.stdout), (f"{where} printed what the page does not show:\n"
                                                            f"{block.code}\nthe page:\n{block.output}\n"
                                                            f"printed:\n{proc.stdout}")
    finally:
        stop_host(home)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_block_is_run_or_says_why_not(page: Path) -> None:
    found = fences(page)
    for i, block in enumerate(found):
        where = f"{page.name}, the block at line {block.line}"
        if block.not_run is not None:
            assert run_by(page, block) is None, f"{where} says it is not run, and {run_by(page, block)} runs it"
            continue
        if block.lang == "output":
            above = found[i - 1] if i else None
            assert above is not None and above.output == block.code and run_by(page, above), (
                f"{where} is an output block under no block a test runs")
            continue
        if block.lang == "text" and recorded(page):
            continue  # the page's own comment says its outputs are a recorded run
        assert run_by(page, block), (f"{where} ({block.lang or 'no language'}) is run by no test: run it, or "
                                     "say why not in a `<!-- not run: ... -->` comment right above it")


def census() -> dict[str, tuple[int, int, int]]:
    """Per page: (code blocks run with their output compared, run without, not run with a reason).

    ``python -m tests.test_docs_shell`` prints it."""
    out: dict[str, tuple[int, int, int]] = {}
    for page in PAGES:
        compared = unchecked = skipped = 0
        for block in fences(page):
            if block.lang == "output" or (block.lang == "text" and recorded(page)):
                continue
            if block.not_run is not None:
                skipped += 1
            elif block.output is not None or block.lang == "ipython" or not recorded(page):
                compared += 1  # a block with no output block is checked to print nothing
            else:
                unchecked += 1
        out[str(page.relative_to(ROOT))] = (compared, unchecked, skipped)
    return out


if __name__ == "__main__":
    for name, (compared, unchecked, skipped) in census().items():
        print(f"{name:20} {compared:3} checked  {unchecked:3} run, output not compared  {skipped:3} not run")
