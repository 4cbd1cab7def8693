"""psjobs in IPython and Jupyter: the background operator ``&``, job magics, rich display.

Load it with ``%load_ext psjobs`` (or ``%load_ext psjobs.ipython``), or open a shell that has it
with ``psjobs shell``. Then::

    total = slow_sum(data) &        # a process job; `total` is the Job
    !make all &                     # a shell command job
    %jobs                           # the Get-Job table
    %receive total                  # its output: [...]

How a line becomes a job::

    cell text --IPython token transforms--> BackgroundOperator.find/transform
        "total = slow_sum(data) &"  -->  "total = get_ipython().run_line_magic('bg', 'slow_sum(data)')"
        "!make all &"               -->  "get_ipython().run_line_magic('bg', '!make all')"
    %bg magic (the cell's frame as local scope)
        --> lambda compiled over the namespace --> psjobs.start_job   (process: names copied)
                                               --> psjobs.start_thread_job (thread: shared)
        --> the Job is the value of the line; the announcer watches it
    post_run_cell --> "[3] Completed  slow_sum(data)" once, before the next prompt

``%config PsJobs.kind = 'thread'`` makes ``&`` start thread jobs (they share the namespace);
``%bg --thread EXPR`` does it for one job. See docs/ipython.md.
"""

from __future__ import annotations

import ast
import fnmatch
import html
import io
import shlex
import shutil
import sys
import tokenize
import types
from collections.abc import Iterable
from typing import Any

from IPython.core.error import UsageError
from IPython.core.inputtransformer2 import (
    TokenTransformBase,
    assemble_continued_line,
    find_end_of_continued_line,
)
from IPython.core.magic import Magics, line_magic, magics_class, needs_local_scope, no_var_expand
from traitlets import Bool, Enum
from traitlets.config import Configurable

import psjobs
from psjobs._errors import PsJobsError
from psjobs.core._format import COLUMNS, JobList, format_table, job_row
from psjobs.core._job import Job

__all__ = [
    "BackgroundOperator",
    "JobMagics",
    "PsJobs",
    "load_ipython_extension",
    "start_shell",
    "unload_ipython_extension",
]


class PsJobs(Configurable):
    """Settings of the psjobs extension (``%config PsJobs`` lists them)."""

    kind = Enum(["process", "thread"], default_value="process",
                help="What a line ending in ' &' starts: 'process' (a BackgroundJob, as PowerShell's & "
                     "does; the names the line uses are copied into it) or 'thread' (a ThreadJob that "
                     "shares the namespace).").tag(config=True)
    announce = Bool(True, help="Say once, before the next prompt, that a job started from the shell "
                               "has finished.").tag(config=True)
    rich = Bool(True, help="Draw job tables with rich in a terminal, when rich is installed."
                ).tag(config=True)


# --- the background operator -------------------------------------------------------------

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
    text = ast.get_source_segment(stmt, value)
    if not text:
        return None
    prefix = stmt[: _char_offset(stmt, value.lineno, value.col_offset)]
    return prefix + _background_call(text)


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
        return [*lines[:row], head + self.new_line + "\n", *lines[self.end_row:]]


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


# --- capture by value ------------------------------------------------------------------------

def _code_names(code: types.CodeType) -> list[str]:
    names: list[str] = list(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names.extend(_code_names(const))
    return list(dict.fromkeys(names))


def _unpicklable(fn: types.FunctionType) -> list[tuple[str, Any, BaseException]]:
    """The names the expression uses whose values cannot be sent to another process."""
    import cloudpickle

    bad: list[tuple[str, Any, BaseException]] = []
    for name in _code_names(fn.__code__):
        if name not in fn.__globals__:
            continue  # a builtin, an attribute name, or a name the job will look up itself
        value = fn.__globals__[name]
        try:
            cloudpickle.dumps(value)
        except Exception as exc:
            bad.append((name, value, exc))
    return bad


def _compile_expression(text: str, namespace: dict[str, Any]) -> types.FunctionType:
    """A function of no arguments that evaluates ``text`` over ``namespace`` (its globals)."""
    code = compile(f"lambda: ({text}\n)", "<psjobs &>", "eval")
    fn = eval(code, namespace)
    fn.__qualname__ = text.strip()  # the job's command is the expression's text
    return fn  # type: ignore[no-any-return]


def _expand(shell: Any, command: str, namespace: dict[str, Any]) -> str:
    """Expand $name and {expr} in a command as IPython's !command does."""
    from IPython.utils.text import DollarFormatter

    try:
        return str(DollarFormatter().vformat(command, args=[], kwargs=namespace))
    except Exception:
        return command  # as IPython: a command that does not expand runs as typed


# --- the magics ----------------------------------------------------------------------------

_OPTIONS_HELP = "options: --thread, --process, --name NAME"


def _parse_bg(line: str) -> tuple[str | None, str | None, str]:
    """``[--thread|--process] [--name NAME] rest``: (kind, name, rest)."""
    kind: str | None = None
    name: str | None = None
    rest = line.strip()
    while rest.startswith("--"):
        word, _, after = rest.partition(" ")
        if word in ("--thread", "--process"):
            kind = word[2:]
        elif word == "--name":
            name, _, after = after.strip().partition(" ")
            if not name:
                raise UsageError(f"%bg: --name needs a job name ({_OPTIONS_HELP})")
        else:
            break
        rest = after.strip()
    return kind, name, rest


@magics_class
class JobMagics(Magics):
    """%bg, %jobs, %receive, %wait, %stop, %remove: the job verbs as magics."""

    def __init__(self, shell: Any, extension: _Extension) -> None:
        super().__init__(shell)  # type: ignore[no-untyped-call]
        self.ext = extension

    # %bg is what a line ending in " &" becomes; it is also usable as is.
    @line_magic  # type: ignore[untyped-decorator]
    @needs_local_scope  # type: ignore[untyped-decorator]
    @no_var_expand  # type: ignore[untyped-decorator]
    def bg(self, line: str, local_ns: dict[str, Any] | None = None) -> Job:
        """Start EXPR (or !COMMAND) as a job and return the job.

        Usage: ``%bg [--thread | --process] [--name NAME] EXPR`` or ``%bg [--name NAME] !COMMAND``.
        A line ending in `` &`` runs ``%bg`` with the kind set by ``%config PsJobs.kind``.
        A process job gets copies of the names EXPR uses (each must be picklable); a thread job
        shares the namespace. Example: ``%bg --thread sum(range(10**7))``
        """
        __tracebackhide__ = True
        kind, name, text = _parse_bg(line)
        if not text:
            raise UsageError(f"%bg: give an expression or a !command to run as a job ({_OPTIONS_HELP})")
        kind = kind or self.ext.config.kind
        namespace = self._namespace(local_ns)
        start = psjobs.start_thread_job if kind == "thread" else psjobs.start_job
        if text.startswith("!"):
            command = _expand(self.shell, text[1:].strip(), namespace)
            if not command:
                raise UsageError("%bg: the !command is empty; give a command line such as !make all")
            job = start(command, name=name)
        else:
            fn = _compile_expression(text, namespace)
            if kind == "thread":
                job = start(fn, name=name)
            else:
                job = self._start_process(fn, text, name)
        self.ext.watch(job)
        return job

    def _namespace(self, local_ns: dict[str, Any] | None) -> dict[str, Any]:
        assert self.shell is not None  # magics run only in a shell
        user = self.shell.user_global_ns
        if local_ns is None or local_ns is user:
            return user  # type: ignore[no-any-return]
        merged = dict(user)
        merged.update(local_ns)  # a line inside a function sees its locals, as Python would
        return merged

    @staticmethod
    def _start_process(fn: types.FunctionType, text: str, name: str | None) -> Job:
        __tracebackhide__ = True
        try:
            return psjobs.start_job(fn, name=name)
        except TypeError as exc:
            bad = _unpicklable(fn)
            if not bad:
                raise
            what = ", ".join(f"{n!r} (a {type(v).__module__}.{type(v).__qualname__}: {e})" for n, v, e in bad)
            names = " and ".join(repr(n) for n, _, _ in bad)
            raise TypeError(
                f"{text} &: cannot copy {what} into the job's process, so no job was started. A process "
                f"job gets a copy of every name it uses; make {names} picklable, or run it as a thread "
                f"job, which shares the namespace: %bg --thread {text}  (or %config PsJobs.kind = 'thread')"
            ) from (exc.__cause__ or exc)  # the pickling error itself, not start_job's wording of it

    @line_magic  # type: ignore[untyped-decorator]
    @needs_local_scope  # type: ignore[untyped-decorator]
    def jobs(self, line: str, local_ns: dict[str, Any] | None = None) -> JobList:
        """The Get-Job table of the session's jobs, or of the jobs named.

        Usage: ``%jobs [--state STATE] [--children] [ID | NAME | VARIABLE ...]``.
        Example: ``%jobs --state Running``
        """
        words = _split(line)
        state = _take_option(words, "--state", "%jobs")
        children = _take_flag(words, "--children")
        self._no_other_options(words, "%jobs", "--state STATE, --children")
        with _as_usage("%jobs"):
            if words:
                jobs = psjobs.get_job(self._select(words, local_ns), state=state,
                                      include_child_jobs=children)
            else:
                jobs = psjobs.get_job(state=state, include_child_jobs=children)
        self.ext.seen(jobs)  # as a shell's `jobs`: a Done shown here is not announced again
        return JobList(jobs)

    @line_magic  # type: ignore[untyped-decorator]
    @needs_local_scope  # type: ignore[untyped-decorator]
    def receive(self, line: str, local_ns: dict[str, Any] | None = None) -> list[Any]:
        """The output of jobs not yet received (Receive-Job).

        Usage: ``%receive ID... [--keep] [--wait] [--timeout S]``; ID is a job id, a job name
        (wildcards allowed) or a variable holding a job. Example: ``%receive total --wait``
        """
        words = _split(line)
        keep = _take_flag(words, "--keep")
        wait = _take_flag(words, "--wait")
        timeout = _take_seconds(words, "%receive")
        self._no_other_options(words, "%receive", "--keep, --wait, --timeout S")
        jobs = self._select(self._need(words, "%receive"), local_ns)
        with _as_usage("%receive"):
            out = psjobs.receive_job(jobs, keep=keep, wait=wait or timeout is not None, timeout=timeout)
        self.ext.seen(jobs)
        return out

    @line_magic  # type: ignore[untyped-decorator]
    @needs_local_scope  # type: ignore[untyped-decorator]
    def wait(self, line: str, local_ns: dict[str, Any] | None = None) -> JobList | None:
        """Wait until the jobs are done and show them (Wait-Job); Ctrl+C stops waiting, not the jobs.

        Usage: ``%wait ID... [--any] [--timeout S]``. Example: ``%wait 3 4 --timeout 10``
        """
        words = _split(line)
        any_ = _take_flag(words, "--any")
        timeout = _take_seconds(words, "%wait")
        self._no_other_options(words, "%wait", "--any, --timeout S")
        jobs = self._select(self._need(words, "%wait"), local_ns)
        with _as_usage("%wait"):
            done = psjobs.wait_job(jobs, any=any_, timeout=timeout)
        if not done:
            print(f"%wait: timed out after {timeout:g}s; the jobs go on (see %jobs)", file=sys.stderr)
            return None
        self.ext.seen(done)
        return JobList(done)

    @line_magic  # type: ignore[untyped-decorator]
    @needs_local_scope  # type: ignore[untyped-decorator]
    def stop(self, line: str, local_ns: dict[str, Any] | None = None) -> None:
        """Stop jobs for real (Stop-Job). Usage: ``%stop ID...``. Example: ``%stop 3``"""
        words = _split(line)
        self._no_other_options(words, "%stop", "none")
        jobs = self._select(self._need(words, "%stop"), local_ns)
        with _as_usage("%stop"):
            stopped = psjobs.stop_job(jobs, pass_thru=True)
        self.ext.seen(stopped)  # the user stopped them: no notice that they stopped

    @line_magic  # type: ignore[untyped-decorator]
    @needs_local_scope  # type: ignore[untyped-decorator]
    def suspend(self, line: str, local_ns: dict[str, Any] | None = None) -> Any:
        """Pause process jobs (SIGSTOP to their process group). Usage: ``%suspend ID...``.

        Example: ``%suspend 3``
        """
        words = _split(line)
        self._no_other_options(words, "%suspend", "none")
        jobs = self._select(self._need(words, "%suspend"), local_ns)
        with _as_usage("%suspend"):
            return psjobs.suspend_job(jobs)

    @line_magic  # type: ignore[untyped-decorator]
    @needs_local_scope  # type: ignore[untyped-decorator]
    def resume(self, line: str, local_ns: dict[str, Any] | None = None) -> Any:
        """Let suspended jobs run on (SIGCONT). Usage: ``%resume ID...``. Example: ``%resume 3``"""
        words = _split(line)
        self._no_other_options(words, "%resume", "none")
        jobs = self._select(self._need(words, "%resume"), local_ns)
        with _as_usage("%resume"):
            return psjobs.resume_job(jobs)

    @line_magic  # type: ignore[untyped-decorator]
    @needs_local_scope  # type: ignore[untyped-decorator]
    def remove(self, line: str, local_ns: dict[str, Any] | None = None) -> None:
        """Drop finished jobs and their data (Remove-Job); --force stops running ones first.

        Usage: ``%remove ID... [--force]``. Example: ``%remove * --force``
        """
        words = _split(line)
        force = _take_flag(words, "--force")
        self._no_other_options(words, "%remove", "--force")
        jobs = self._select(self._need(words, "%remove"), local_ns)
        with _as_usage("%remove"):
            psjobs.remove_job(jobs, force=force)
        self.ext.forget(jobs)

    # --- helpers ---------------------------------------------------------------------------
    @staticmethod
    def _need(words: list[str], magic: str) -> list[str]:
        if not words:
            raise UsageError(f"{magic}: name the jobs: an id, a name (wildcards allowed) or a variable "
                             f"holding a job, e.g. {magic} 3; %jobs lists them")
        return words

    @staticmethod
    def _no_other_options(words: list[str], magic: str, known: str) -> None:
        for word in words:
            if word.startswith("--"):
                raise UsageError(f"{magic}: unknown option {word}; options: {known}")

    def _select(self, words: list[str], local_ns: dict[str, Any] | None) -> list[Any]:
        """Ids, job names (wildcards over top-level jobs) and variables holding jobs."""
        namespace = dict(self.shell.user_ns) if self.shell is not None else {}
        if local_ns:
            namespace.update(local_ns)
        out: list[Any] = []
        for word in words:
            if word.isdigit():
                out.append(int(word))
                continue
            value = namespace.get(word) if word.isidentifier() else None
            if isinstance(value, Job):
                out.append(value)
            elif isinstance(value, (list, tuple)) and value and all(isinstance(v, Job) for v in value):
                out.extend(value)
            elif any(c in word for c in "*?["):
                # Top-level jobs only: "%remove *" must not try to remove child jobs on their own.
                out.extend(j for j in psjobs.get_job() if fnmatch.fnmatchcase(j.name.lower(), word.lower()))
            else:
                out.append(word)
        return out


def _split(line: str) -> list[str]:
    try:
        return shlex.split(line, comments=True)  # "%stop 3  # the slow one" works as it reads
    except ValueError as exc:
        raise UsageError(f"cannot read the arguments {line!r}: {exc}") from None


def _take_flag(words: list[str], flag: str) -> bool:
    if flag in words:
        while flag in words:
            words.remove(flag)
        return True
    return False


def _take_option(words: list[str], option: str, magic: str) -> str | None:
    if option not in words:
        return None
    i = words.index(option)
    if i + 1 >= len(words):
        raise UsageError(f"{magic}: {option} needs a value")
    value = words[i + 1]
    del words[i:i + 2]
    return value


def _take_seconds(words: list[str], magic: str) -> float | None:
    text = _take_option(words, "--timeout", magic)
    if text is None:
        return None
    try:
        seconds = float(text)
    except ValueError:
        raise UsageError(f"{magic}: --timeout takes seconds, such as 2.5, not {text!r}") from None
    if seconds < 0:
        raise UsageError(f"{magic}: --timeout takes seconds >= 0, not {text}")
    return seconds


class _as_usage:
    """Turn psjobs' own errors into IPython usage errors: one line, no traceback to read."""

    def __init__(self, magic: str) -> None:
        self.magic = magic

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc is not None and isinstance(exc, (PsJobsError, ValueError, TypeError)):
            raise UsageError(f"{self.magic}: {exc}") from exc


# --- display --------------------------------------------------------------------------------

_STATE_STYLE = {
    "Running": "yellow", "NotStarted": "dim", "Completed": "green", "Failed": "bold red",
    "Stopped": "magenta", "Stopping": "magenta", "Blocked": "bold cyan", "Suspended": "blue",
    "Suspending": "blue", "Disconnected": "red",
}
_STATE_HTML = {
    "Running": "#b58900", "Completed": "#2e7d32", "Failed": "#c62828", "Stopped": "#8e24aa",
    "Stopping": "#8e24aa", "Blocked": "#00838f", "Suspended": "#1565c0", "Disconnected": "#c62828",
}


def render_rich(jobs: Iterable[Job], *, width: int = 100, color: bool = True) -> str:
    """The Get-Job table drawn by rich (ANSI colours when ``color``), as text."""
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, header_style="bold", pad_edge=False)
    for name in COLUMNS:
        table.add_column(name, overflow="ellipsis", no_wrap=name != "Command",
                         justify="right" if name == "Id" else "left")
    for job in jobs:
        row = list(job_row(job))
        row[6] = " ".join(row[6].split())
        state = row[3]
        table.add_row(*row[:3], f"[{_STATE_STYLE.get(state, '')}]{state}[/]" if color else state,
                      *row[4:])
    out = io.StringIO()
    console = Console(file=out, width=width, force_terminal=color, color_system="standard" if color else None,
                      highlight=False, emoji=False, markup=True)
    console.print(table)
    return out.getvalue().rstrip("\n")


def render_html(jobs: Iterable[Job]) -> str:
    """The Get-Job table as an HTML table (for Jupyter)."""
    head = "".join(f"<th style='text-align:left'>{h}</th>" for h in COLUMNS)
    rows = []
    for job in jobs:
        cells = [html.escape(c) for c in job_row(job)]
        color = _STATE_HTML.get(cells[3])
        if color:
            cells[3] = f"<span style='color:{color};font-weight:bold'>{cells[3]}</span>"
        cells[6] = f"<code>{cells[6]}</code>"
        rows.append("<tr>" + "".join(f"<td style='text-align:left'>{c}</td>" for c in cells) + "</tr>")
    return (f"<table class='psjobs'><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


# --- the extension --------------------------------------------------------------------------

class _Extension:
    """What one shell has loaded: the transform, the magics, the formatters, the announcer."""

    #: more finished jobs than this at once are announced in one summary line
    MAX_LINES = 5

    def __init__(self, shell: Any) -> None:
        self.shell = shell
        self.config = PsJobs(parent=shell)
        self.magics = JobMagics(shell, self)
        self._watched: dict[int, Job] = {}
        self._told_blocked: set[int] = set()
        self._last_id = 0
        self._printers: list[tuple[str, type]] = []

    # --- lifetime --------------------------------------------------------------------------
    def load(self) -> None:
        shell = self.shell
        shell.configurables.append(self.config)
        shell.input_transformer_manager.token_transformers.append(BackgroundOperator)
        shell.register_magics(self.magics)
        plain = shell.display_formatter.formatters["text/plain"]
        rich_html = shell.display_formatter.formatters["text/html"]
        for cls in (Job, JobList):
            plain.for_type(cls, self._pretty)
            rich_html.for_type(cls, self._html)
            self._printers += [("text/plain", cls), ("text/html", cls)]
        self._last_id = max((j.id for j in self._jobs_now()), default=0)
        shell.events.register("post_run_cell", self.post_run_cell)

    def unload(self) -> None:
        shell = self.shell
        with _suppress():
            shell.events.unregister("post_run_cell", self.post_run_cell)
        transformers = shell.input_transformer_manager.token_transformers
        while BackgroundOperator in transformers:
            transformers.remove(BackgroundOperator)
        registry = shell.magics_manager.magics["line"]
        for name in ("bg", "jobs", "receive", "wait", "stop", "remove"):
            fn = registry.get(name)
            if getattr(fn, "__self__", None) is self.magics:
                del registry[name]
        shell.magics_manager.registry.pop(type(self.magics).__name__, None)
        for mime, cls in self._printers:
            with _suppress():
                shell.display_formatter.formatters[mime].pop(cls)
        self._printers.clear()
        if self.config in shell.configurables:
            shell.configurables.remove(self.config)

    # --- display ---------------------------------------------------------------------------
    def _jobs_of(self, obj: Any) -> list[Job] | None:
        if isinstance(obj, Job):
            return [obj]
        if obj and all(isinstance(j, Job) for j in obj):
            return list(obj)
        return None

    def _pretty(self, obj: Any, p: Any, cycle: bool) -> None:
        jobs = self._jobs_of(obj)
        if jobs is None:
            p.text(list.__repr__(obj))
            return
        if self._use_rich():
            width = shutil.get_terminal_size((100, 24)).columns
            color = str(getattr(self.shell, "colors", "")).lower() != "nocolor"
            p.text(render_rich(jobs, width=width, color=color))
        else:
            p.text(format_table(jobs))

    def _html(self, obj: Any) -> str | None:
        jobs = self._jobs_of(obj)
        return None if jobs is None else render_html(jobs)

    def _use_rich(self) -> bool:
        # By name: importing IPython.terminal would pull prompt_toolkit into a notebook kernel.
        terminal = any(c.__name__ == "TerminalInteractiveShell" for c in type(self.shell).__mro__)
        if not self.config.rich or not terminal:
            return False
        try:
            if not sys.stdout.isatty():
                return False
            import rich  # noqa: F401
        except (ImportError, AttributeError, ValueError):
            return False
        return True

    # --- announcements ---------------------------------------------------------------------
    def watch(self, job: Job) -> None:
        """Announce this job once when it is finished."""
        self._watched[job.id] = job

    def seen(self, jobs: Iterable[Any]) -> None:
        """The user has just waited for or received these: a finished one needs no announcement."""
        for job in jobs:
            if isinstance(job, Job) and job.state.is_finished:
                self._watched.pop(job.id, None)
            elif isinstance(job, int):
                found = self._watched.get(job)
                if found is not None and found.state.is_finished:
                    del self._watched[job]

    def forget(self, jobs: Iterable[Any]) -> None:
        for job in jobs:
            self._watched.pop(job.id if isinstance(job, Job) else job, None)

    @staticmethod
    def _jobs_now() -> list[Job]:
        from psjobs import _api

        if _api._default is None:
            return []  # nothing started yet: do not create the session just to look
        return list(psjobs.get_job())

    def post_run_cell(self, result: Any = None) -> None:
        # Jobs this cell started some other way (psjobs.start_job(...)) that are still running
        # when it ends are background jobs too; those it waited for itself are not announced.
        jobs = self._jobs_now()
        newest = self._last_id
        for job in jobs:
            if job.id > self._last_id:
                newest = max(newest, job.id)
                if not job.state.is_finished:
                    self._watched.setdefault(job.id, job)
        self._last_id = newest
        if not self._watched:
            return
        live = {j.id for j in jobs}
        done: list[Job] = []
        asking: list[Job] = []
        for jid, job in list(self._watched.items()):
            if jid not in live:
                del self._watched[jid]  # removed by the user: nothing to announce
            elif job.state.is_finished:
                done.append(job)
                del self._watched[jid]
            elif job.state is psjobs.JobState.BLOCKED and jid not in self._told_blocked:
                asking.append(job)  # a shell says "Stopped (tty input)": say it once too
                self._told_blocked.add(jid)
        self._told_blocked.intersection_update(self._watched)
        if not self.config.announce:
            return
        for job in asking:
            prompt = next((j.prompt for j in [job, *job.child_jobs] if j.prompt), None)
            asked = f" {prompt.strip()!r}" if prompt else ""
            print(f"[{job.id}] Blocked  {_short(job.command)}  (waits for input{asked}: "
                  f"%receive {job.id} to answer)")
        if done:
            print(announcement(done, self.MAX_LINES))


def _short(command: str) -> str:
    command = " ".join(command.split())
    return command if len(command) <= 60 else command[:57] + "..."


def announcement(done: list[Job], max_lines: int = 5) -> str:
    """``[3] Completed  2 + 3`` per job, or one summary line for many."""
    done = sorted(done, key=lambda j: j.id)
    if len(done) > max_lines:
        counts: dict[str, int] = {}
        for job in done:
            counts[str(job.state)] = counts.get(str(job.state), 0) + 1
        parts = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
        return f"[{done[0].id}-{done[-1].id}] {len(done)} jobs done: {parts} (%jobs lists them)"
    width = max(len(str(j.state)) for j in done)
    lines = []
    for job in done:
        line = f"[{job.id}] {str(job.state).ljust(width)}  {_short(job.command)}"
        reason = job.reason
        if job.state is psjobs.JobState.FAILED and reason is not None:
            text = f"{type(reason).__name__}: {reason}".splitlines()[0]
            line += f"  ({text[:80]})"
        lines.append(line)
    return "\n".join(lines)


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> bool:
        return exc_type is not None and issubclass(exc_type, (ValueError, KeyError, LookupError))


_loaded: dict[int, _Extension] = {}


def load_ipython_extension(ip: Any) -> None:
    """Called by ``%load_ext psjobs.ipython``: install ``&``, the magics and the display."""
    if id(ip) in _loaded:
        return  # loaded already, perhaps under the other name (psjobs / psjobs.ipython)
    ext = _Extension(ip)
    ext.load()
    _loaded[id(ip)] = ext


def unload_ipython_extension(ip: Any) -> None:
    """Called by ``%unload_ext``: take everything out again (running jobs go on)."""
    ext = _loaded.pop(id(ip), None)
    if ext is not None:
        ext.unload()


def start_shell(argv: list[str] | None = None) -> int:
    """Open an IPython terminal shell with the extension loaded; return its exit status.

    ``argv`` are IPython's own command-line options (``--no-banner``, ``--colors=NoColor``...).
    """
    from IPython import start_ipython

    args = ["--ext", "psjobs.ipython",
            "--TerminalInteractiveShell.banner2=psjobs: end a line with ' &' to run it as a job; "
            "%jobs, %receive, %wait, %stop, %remove manage them.\n",
            *(argv or [])]
    try:
        start_ipython(argv=args)  # type: ignore[no-untyped-call]
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0
