"""Reading the docs' examples: code blocks, the output block under each, and a loose comparison.

::

    page.md --blocks()--> [Block(lang, code, expected output or None, line)] --> the doc tests run
                                                                                 each code block and
    what the block printed --matches(expected)--> True / a readable difference    compare its output

A code block's output is the fenced block right under it whose info string is ``output`` (only
blank lines between). In the expected text, ``...`` stands for any text within a line, and a line
that is only ``...`` for any number of lines (doctest's ELLIPSIS); trailing spaces are ignored.

A block no test runs says why in an HTML comment right above it (invisible on the site)::

    <!-- not run: it installs packages -->
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
NOT_RUN = re.compile(r"<!-- not run: ((?:(?!-->).)+?) -->\s*$", re.S)


@dataclass
class Block:
    lang: str
    code: str
    output: str | None
    line: int
    not_run: str | None = None  # why no test runs it, from the comment above it


def fences(page: Path) -> list[Block]:
    """Every fenced block of the page in order, ``output`` blocks included, each code block with
    the output block under it (if any) and the reason no test runs it (if it says one)."""
    text = page.read_text()
    found = list(FENCE.finditer(text))
    out: list[Block] = []
    for i, m in enumerate(found):
        expected = None
        if m.group(1) != "output" and i + 1 < len(found):
            nxt = found[i + 1]
            if nxt.group(1) == "output" and not text[m.end():nxt.start()].strip():
                expected = nxt.group(2)
        reason = NOT_RUN.search(text, 0, m.start())
        out.append(Block(m.group(1), m.group(2), expected, text.count("\n", 0, m.start()) + 1,
                         " ".join(reason.group(1).split()) if reason else None))
    return out


def blocks(page: Path, langs: tuple[str, ...]) -> list[Block]:
    """The page's code blocks in ``langs``, each with the output block under it (if any)."""
    return [b for b in fences(page) if b.lang in langs]


def _pattern(expected: str) -> re.Pattern[str]:
    parts: list[str] = []
    for line in expected.rstrip("\n").split("\n"):
        line = line.rstrip()
        if line == "...":
            parts.append(r"(?:[^\n]*\n)*?")
            continue
        parts.append("[^\\n]*?".join(re.escape(p) for p in line.split("...")) + r"[ \t]*\n")
    return re.compile("".join(parts), re.S)


def matches(expected: str, actual: str) -> bool:
    """Whether ``actual`` (what a block printed) fits ``expected`` (its output block)."""
    lines = [line.rstrip() for line in actual.rstrip("\n").split("\n")]
    text = "\n".join(lines) + "\n"
    return _pattern(expected).fullmatch(text) is not None
