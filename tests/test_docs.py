"""The docs are examples a user can paste: every Python and shell block of every page runs, and what
it prints is what the page shows.

::

    page --doctools.blocks--> python and sh blocks, in order
        python --exec--> one fresh namespace per page
        sh --bash -c--> a shell per block, in one empty directory, with `psjobs` on PATH and a
                        session host of the page's own
    what each block printed --> matches the ``output`` block under it (a block that prints must
                                have one)

The namespace starts empty, as a new interpreter would (a page that needs ``time`` imports it). A
shell block's stderr goes where its stdout goes, as a terminal shows both; it runs with ``set -e``.
A block marked ``<!-- not run: reason -->`` is not run (tests/test_docs_coverage.py checks that
every other block is).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import psjobs

from .clitools import stop_host, subprocess_env
from .doctools import blocks, matches

REPO = Path(__file__).resolve().parent.parent  # remote.md imports tests.sshd, from the root
DOCS = REPO / "docs"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def pages() -> list[Path]:
    return [DOCS.parent / "README.md", *sorted(DOCS.glob("*.md"))]


# Runs one page's blocks in order in a new interpreter, as a user pasting them would: ids start at
# 1 there, as the pages show them. A marker line before each block splits what they printed.
# With "repl", each expression statement's value is shown, as the interactive interpreter does.
DRIVER = """
import ast, json, subprocess, sys, traceback
blocks = json.load(open(sys.argv[1]))
repl = sys.argv[2] == "repl"
namespace = {"__name__": "__main__"}
for n, (where, lang, code) in enumerate(blocks):
    print(f"\\x00block {n}\\x00", flush=True)
    try:
        if lang == "sh":
            shell = subprocess.run(["bash", "-c", "set -e\\n" + code], stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, timeout=60)
            sys.stdout.write(shell.stdout)
            if shell.returncode:
                raise SystemExit(f"{where} exited with status {shell.returncode}")
        elif repl:
            for node in ast.parse(code).body:
                if isinstance(node, ast.Expr):
                    value = eval(compile(ast.Expression(node.value), where, "eval"), namespace)
                    if value is not None:
                        print(repr(value))
                else:
                    exec(compile(ast.Module([node], []), where, "exec"), namespace)
        else:
            exec(compile(code, where, "exec"), namespace)
    except BaseException:
        sys.stdout.flush()
        print(f"\\x00failed {n}\\x00", flush=True)
        traceback.print_exc(file=sys.stdout)
        sys.exit(1)
    sys.stdout.flush()
"""


@pytest.mark.timeout(300)
@pytest.mark.parametrize("page", pages(), ids=lambda p: p.name)
def test_python_blocks_run_and_print_what_the_page_shows(page: Path, tmp_path: Path) -> None:
    found = [b for b in blocks(page, ("python", "sh")) if b.not_run is None]
    if not found:
        pytest.skip(f"{page.name} has no block to run")
    wheres = [f"{page.name}, the block at line {b.line}" for b in found]
    (tmp_path / "blocks.json").write_text(json.dumps([[w, b.lang, b.code] for w, b in zip(wheres, found)]))
    # `psjobs` in a shell block is this tree's command, whatever is installed.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "psjobs").write_text(f'#!/bin/sh\nexec {sys.executable} -m psjobs "$@"\n')
    (bindir / "psjobs").chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    # The command and psjobs.connect() (docs/connect.md) reach a host of the page's own, never the
    # user's: ids start at 1 there, as the pages show them.
    env = subprocess_env(PSJOBS_HOME=str(tmp_path / "psjobs-home"), PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}")
    env["PYTHONPATH"] += f"{os.pathsep}{REPO}"
    # A page that is a REPL session (docs/tour.md) says so in a comment: its blocks run as the
    # interactive interpreter would, showing each expression's value.
    mode = re.search(r"<!-- doctest: ([\w, ]+)", page.read_text())
    options = mode.group(1).replace(" ", "").split(",") if mode else []
    try:
        proc = subprocess.run([sys.executable, "-c", DRIVER, str(tmp_path / "blocks.json"),
                               "repl" if "repl" in options else "exec"], cwd=work,
                              env=env, capture_output=True, text=True, timeout=280)
    finally:
        stop_host(tmp_path / "psjobs-home")
    parts = re.split(r"\x00block \d+\x00\n", proc.stdout)[1:]
    for n, (block, where) in enumerate(zip(found, wheres)):
        assert n < len(parts), f"{where} did not run:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        out, failed, trace = parts[n].partition(f"\x00failed {n}\x00\n")
        assert not failed, f"{where} failed:\n{block.code}\n{trace}\n{proc.stderr[-2000:]}"
        if block.output is None:
            assert not out.strip(), (f"{where} prints, and the page shows no output block under it:"
                                     f"\n{block.code}\nprinted:\n{out}")
        else:
            assert matches(block.output, out), (f"{where} printed what the page does not show:\n"
                                                f"{block.code}\nthe page:\n{block.output}\nprinted:\n{out}")
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_tour_page_is_up_to_date() -> None:
    """docs/tour.md is made from psjobs.tour: every step's code is on the page, in order."""
    import textwrap

    from psjobs.tour import STEPS

    blocks = BLOCK.findall((DOCS / "tour.md").read_text())
    assert [b.strip() for b in blocks] == [textwrap.dedent(s.code).strip() for s in STEPS]


@pytest.mark.timeout(60)
def test_tour_page_is_what_the_tour_writes(tmp_path: Path) -> None:
    """`python -m psjobs.tour --markdown` writes docs/tour.md again, prose and outputs alike (the
    page's `...` standing for what differs from run to run): a step edited in psjobs.tour and not
    written to the page fails here."""
    # A new interpreter, as the page's command: job ids count from 1 in a process, not per session.
    written = subprocess.run([sys.executable, "-m", "psjobs.tour", "--markdown"], cwd=tmp_path,
                             env=subprocess_env(), capture_output=True, text=True, timeout=50, check=True).stdout
    assert matches((DOCS / "tour.md").read_text(), written), (
        "docs/tour.md is not what `python -m psjobs.tour --markdown > docs/tour.md` writes: run that")


def test_tour_runs(capsys: pytest.CaptureFixture[str], default_session: psjobs.Session) -> None:
    from psjobs.tour import main

    assert main([]) == 0
    out = capsys.readouterr().out
    assert "The tour is over" in out and "Failed" in out and "Stopped" in out
