"""The background operator: a logical line ending in `` &`` becomes a call of the ``%bg`` magic.

::

    cell text --IPython token transforms--> BackgroundOperator.find (the last token of a line)
        "total = slow_sum(data) &"  -->  "total = get_ipython().run_line_magic('bg', 'slow_sum(data)')"
        "!make all &"               -->  "get_ipython().run_line_magic('bg', '!make all')"
        anything else               -->  left alone (Python reports its own syntax error)
"""

from __future__ import annotations

import ast
import tokenize

from IPython.core.inputtransformer2 import (
    TokenTransformBase,
    assemble_continued_line,
    find_end_of_continued_line,
)

_SKIP = frozenset({tokenize.NEWLINE, tokenize.NL, tokenize.COMMENT, tokenize.ENDMARKER,
                   tokenize.INDENT, tokenize.DEDENT})


def _char_offset(text: str, row: int, byte_col: int) -> int:
    """Offset in ``text`` of (1-based row, UTF-8 byte column), as ast reports positions."""
    lines = text.splitlines(keepends=True)
    before = sum(len(line) for line in lines[: row - 1])
    return before + len(lines[row - 1].encode("utf-8")[:byte_col].decode("utf-8", "replace"))


def _text_between(lines: list[str], start: tuple[int, int], end: tuple[int, int]) -> str:
    """The source from ``start`` to ``end`` (tokenize positions: 1-based rows, character columns)."""
    (r0, c0), (r1, c1) = start, end
    if r0 == r1:
        return lines[r0 - 1][c0:c1]
    return lines[r0 - 1][c0:] + "".join(lines[r0:r1 - 1]) + lines[r1 - 1][:c1]


def _background_call(payload: str) -> str:
    if payload.startswith("--"):
        payload = "-- " + payload  # "--x &" is an expression (minus minus x), not an option of %bg
    return f"get_ipython().run_line_magic('bg', {payload!r})"


def _python_rewrite(stmt: str) -> str | None:
    """``x = EXPR`` or ``EXPR`` (the text before the ``&``) as a call of %bg; None if it is not one."""
    try:
        tree = ast.parse(stmt)
    except SyntaxError:
        return None
    if len(tree.body) != 1:
        return None
    node = tree.body[0]
    if isinstance(node, ast.Expr):
        value: ast.expr | None = node.value
    elif isinstance(node, (ast.Assign, ast.AnnAssign)):
        value = node.value
    else:
        return None  # import, del, x += ..., compound statements: no job, normal meaning
    if value is None:
        return None
    # The value runs to the end of the statement; its node leaves out parentheses around it
    # ("x = (1 / 0)": the node is "1 / 0"), so take the text from the first of them.
    start = _char_offset(stmt, value.lineno, value.col_offset)
    left = start
    while left > 0 and stmt[left - 1] in "( \t":
        left -= 1
    opening = stmt.find("(", left, start)
    if opening >= 0:
        start = opening
    text = stmt[start:].strip()
    if not text:
        return None
    return stmt[:start] + _background_call(text)


class BackgroundOperator(TokenTransformBase):
    """IPython token transform: a logical line ending in `` &`` starts a job (see the module doc).

    Only the last token of a logical line counts, so ``&`` in strings and comments, ``a & b``,
    ``&&`` and ``&=`` keep their meaning; cell magics are turned into one string before token
    transforms run. A line that is not ``[target =] expression &`` or ``[target =] !command &`` is
    left alone (and Python reports its syntax error as usual).
    """

    # Before EscapedCommand and SystemAssign (10), which would claim "!cmd &" and "x = !cmd &".
    priority = 1

    def __init__(self, start: tuple[int, int], end_row: int, new_line: str) -> None:
        super().__init__(start)  # type: ignore[no-untyped-call]
        self.end_row = end_row          # 1-based row of the last line the statement covers
        self.new_line = new_line        # what replaces text from start to the end of that row

    @classmethod
    def find(cls, tokens_by_line: list[list[tokenize.TokenInfo]]) -> BackgroundOperator | None:
        for line in tokens_by_line:
            found = cls._match(line)
            if found is not None:
                return found
        return None

    @classmethod
    def _match(cls, line: list[tokenize.TokenInfo]) -> BackgroundOperator | None:
        # (tokenize reports the blank before a '!' as an error token of its own)
        toks = [t for t in line
                if t.type not in _SKIP and not (t.type == tokenize.ERRORTOKEN and t.string.isspace())]
        if len(toks) < 2:
            return None
        first = toks[0]
        if first.string == "!":  # !command &  (textual: shell text need not be Python tokens)
            return cls._command(_source_lines(line), first.start, "")
        amp, before = toks[-1], toks[-2]
        if amp.string != "&" or amp.type != tokenize.OP:
            return None  # the common case: every cell passes here, so it stays cheap
        lines = _source_lines(line)
        if before.end == amp.start:  # "x&", "a &&": only a spaced, single & at the end counts
            return None
        # A statement after the last top-level ';' is the job; what comes before stays.
        depth, start_ix, assign_ix = 0, 0, None
        for i, tok in enumerate(toks[:-1]):
            if tok.string in "([{" and tok.type == tokenize.OP:
                depth += 1
            elif tok.string in ")]}" and tok.type == tokenize.OP:
                depth = max(0, depth - 1)
            elif depth == 0 and tok.string == ";":
                start_ix, assign_ix = i + 1, None
            elif depth == 0 and tok.string == "=" and assign_ix is None:
                assign_ix = i
        if start_ix >= len(toks) - 1:
            return None
        start = toks[start_ix].start
        if assign_ix is not None and toks[assign_ix + 1].string == "!":  # x = !command &
            lhs = _text_between(lines, start, toks[assign_ix].end)
            return cls._command(lines, toks[assign_ix + 1].start, lhs + " ", start)
        stmt = _text_between(lines, start, amp.start).rstrip()
        rewritten = _python_rewrite(stmt)
        if rewritten is None:
            return None
        return cls(start, amp.start[0], rewritten)

    @classmethod
    def _command(cls, lines: list[str], bang: tuple[int, int], prefix: str,
                 start: tuple[int, int] | None = None) -> BackgroundOperator | None:
        row = bang[0] - 1
        if row >= len(lines):
            return None
        end_row = find_end_of_continued_line(lines, row)
        text = assemble_continued_line(lines, (row, bang[1]), min(end_row, len(lines) - 1))
        if text.startswith("!!") or not text.endswith(" &"):
            return None  # "!!cmd" lists output; "!a && b" and "!cmd&" keep the shell's meaning
        command = text[1:-1].strip()
        if not command or command.endswith("&"):
            return None  # "! &" and "!a & &": nothing sensible to run
        return cls(start or bang, min(end_row, len(lines) - 1) + 1, prefix + _background_call("!" + command))

    def transform(self, lines: list[str]) -> list[str]:
        row, col = self.start_line, self.start_col
        head = lines[row][:col]
        # A blank line in place of each other row of the statement: the lines after it keep their
        # numbers, so an error further down the cell names the line the user sees.
        padding = ["\n"] * (self.end_row - row - 1)
        return [*lines[:row], head + self.new_line + "\n", *padding, *lines[self.end_row:]]


def _source_lines(line: list[tokenize.TokenInfo]) -> list[str]:
    """The cell's physical lines up to the end of this logical line, indexed from row 1.

    Tokens carry their physical line text; rows before the logical line are padded with empty
    strings so that token rows index the list directly.
    """
    rows: dict[int, str] = {}
    for tok in line:
        if tok.type == tokenize.ENDMARKER:
            continue
        text_rows = tok.line.splitlines(keepends=True) or [tok.line]
        first_row = tok.start[0]
        # A token spanning rows (a triple-quoted string) carries every row it spans.
        for k, text in enumerate(text_rows):
            rows.setdefault(first_row + k, text)
    last = max(rows) if rows else 0
    return [rows.get(r, "") for r in range(1, last + 1)]
