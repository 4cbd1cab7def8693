"""What a job runs: a callable, a shell command line or an argv, checked before any job exists."""

from __future__ import annotations

import ast
import functools
import linecache
import os
import shlex
import textwrap
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

CALL, SHELL, ARGV = "call", "shell", "argv"


# Every finished top-level job keeps its spec until remove_job, for restart_job (core/_sched): what
# a spec holds stays small. Slots, a kwargs dict and an options dict shared when empty (~130 bytes
# a job), the working directory shared while it does not change (see check_directory).
_NO_KWARGS: dict[str, Any] = {}  # never written to: read by ``target(*args, **kwargs)`` and pickled


def _no_kwargs_dict() -> dict[str, Any]:
    return _NO_KWARGS


class _NoOptions(dict[str, Any]):
    """The options of a verb that has none, one shared instance: writing to it is a bug (a verb
    with options gives the spec its own dict)."""

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("JobSpec.options is shared when empty: give the spec its own dict")

    __setitem__ = __delitem__ = update = setdefault = pop = popitem = clear = _refuse


_NO_OPTIONS = _NoOptions()


def _no_options() -> dict[str, Any]:
    return _NO_OPTIONS


@dataclass(slots=True)
class JobSpec:
    """A checked description of a job's work, shared by every backend."""

    kind: str                       # CALL, SHELL or ARGV
    target: Any                     # the callable, or the argv list for SHELL and ARGV
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=_no_kwargs_dict)
    init: Callable[[], Any] | None = None
    input: Iterable[Any] | None = None
    cwd: str | None = None
    env: dict[str, str] | None = None   # the whole environment, for process jobs (None: the caller's)
    command: str = ""
    payload: bytes | None = None        # the pickled call, made by the backend's prepare()
    #: the verb's arguments meant for its backend (computers, a cluster...), checked by its prepare()
    options: dict[str, Any] = field(default_factory=_no_options)
    #: how the job was started, for restart_job (core/_sched.keep_recipe): (backend kind, job type,
    #: whether it has a parent, the name given, its When), one tuple shared by a verb's plain starts
    recipe: tuple[str, str, bool, str | None, Any] | None = None

    @property
    def argv(self) -> list[str]:
        assert self.kind != CALL
        return list(self.target)


def make_spec(target: Any, args: tuple[Any, ...], kwargs: dict[str, Any], *,
              init: Callable[[], Any] | None = None, input: Iterable[Any] | None = None,
              verb: str = "start_job") -> JobSpec:
    """Check a job's target and arguments; raise TypeError/ValueError before any job exists."""
    if init is not None and not callable(init):
        raise TypeError(f"{verb}: init must be a callable run before the target, not {type(init).__name__}")
    if input is not None and (isinstance(input, (str, bytes)) or not isinstance(input, Iterable)):
        raise TypeError(f"{verb}: input must be an iterable of items (a list, a generator...), "
                        f"not {type(input).__name__}; wrap a single value in a list")
    if isinstance(target, str):
        if not target.strip():
            raise ValueError(f"{verb}: the command line is empty; give a command such as 'ls -l'")
        _no_kwargs(verb, kwargs, "a command line")
        if init is not None:
            raise TypeError(f"{verb}: init applies to Python callables, not to a command line")
        _no_nul(verb, "the command line", target)
        # $0 is "sh" and the arguments become $1, $2...: they are never pasted into the text.
        argv = ["/bin/sh", "-c", target, "sh", *(command_arg(verb, a) for a in args)]
        return JobSpec(SHELL, argv, input=input, command=target)
    if isinstance(target, (list, tuple)):
        if not target:
            raise ValueError(f"{verb}: the argv list is empty; give at least the program name")
        _no_kwargs(verb, kwargs, "an argv list")
        if init is not None:
            raise TypeError(f"{verb}: init applies to Python callables, not to an argv list")
        argv = [command_arg(verb, a) for a in (*target, *args)]
        return JobSpec(ARGV, argv, input=input, command=shlex.join(argv))
    if callable(target):
        return JobSpec(CALL, target, tuple(args), dict(kwargs) if kwargs else _NO_KWARGS, init, input,
                       command=describe(target), options=_NO_OPTIONS)
    raise TypeError(f"{verb}: target must be a callable, a command line (str) or an argv (list of str), "
                    f"not {type(target).__name__}")


def _no_kwargs(verb: str, kwargs: Mapping[str, Any], what: str) -> None:
    if kwargs:
        names = ", ".join(sorted(kwargs))
        raise TypeError(f"{verb}: keyword arguments ({names}) apply to callables, not to {what}; "
                        f"pass them as positional arguments")


def command_arg(verb: str, value: Any) -> str:
    """An argument of a command as text (a str, a path or a number), or TypeError (ValueError
    for a NUL byte, which no exec can pass: refused here, before a job exists)."""
    if isinstance(value, (str, os.PathLike)):
        text = os.fspath(value)
        if isinstance(text, str):
            _no_nul(verb, f"the argument {text!r}", text)
        return text
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise TypeError(f"{verb}: arguments of a command must be strings, paths or numbers, "
                    f"not {type(value).__name__} ({value!r})")


def _no_nul(verb: str, what: str, text: str) -> None:
    # exec and the environment take C strings: a NUL byte failed in Popen after the job was
    # registered, leaving it NotStarted (its parent Running) for good (issue 13, case 7).
    if "\0" in text:
        raise ValueError(f"{verb}: {what} contains a NUL byte, which a command cannot receive; remove it")


_cwd = ""  # the last working directory check_directory gave


def check_directory(verb: str, working_directory: str | os.PathLike[str] | None) -> str:
    """The job's working directory: the caller's now, or the one given, which must exist."""
    global _cwd
    if working_directory is None:
        cwd = os.getcwd()
        if cwd != _cwd:
            _cwd = cwd
        return _cwd  # the same str object while it does not change: every finished job keeps it
    if not isinstance(working_directory, (str, os.PathLike)):
        raise TypeError(f"{verb}: working_directory must be a str or a path, "
                        f"not {type(working_directory).__name__}")
    path = os.fspath(working_directory)
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"{verb}: working_directory is empty; give a directory or leave it out "
                         f"to use the current one")
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{verb}: cannot find the working directory {path!r}; create it or give "
                                f"another one")
    return path


def make_env(verb: str, env: Mapping[str, str | None] | None) -> dict[str, str] | None:
    """The caller's environment now, updated with ``env`` (a None value removes a variable).

    None when ``env`` is None: the job gets the caller's environment as it is when it starts, and
    the backend sends only what its worker would lack (copying it cost ~50 us a job).
    """
    if env is None:
        return None
    if not isinstance(env, Mapping):
        raise TypeError(f"{verb}: env must be a mapping of names to values, not {type(env).__name__}")
    out = dict(os.environ)
    for key, value in env.items():
        if not isinstance(key, str) or not key or "=" in key or "\0" in key:
            raise ValueError(f"{verb}: env has an invalid variable name {key!r}")
        if value is None:
            out.pop(key, None)
        elif isinstance(value, str):
            _no_nul(verb, f"env[{key!r}]", value)
            out[key] = value
        else:
            raise TypeError(f"{verb}: env[{key!r}] must be a str (or None to remove it), "
                            f"not {type(value).__name__}")
    return out


def describe(fn: Any) -> str:
    """Readable text for a callable: its qualified name, or a lambda's source."""
    if isinstance(fn, functools.partial):
        return f"partial({describe(fn.func)})"
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    if name is None:
        name = type(fn).__qualname__
    if name == "<lambda>" or name.endswith(".<lambda>"):
        src = _lambda_source(fn)
        if src:
            return src
    return str(name)


def _lambda_source(fn: Any) -> str | None:
    code = getattr(fn, "__code__", None)
    if code is None:
        return None
    return _code_source(code)


@functools.lru_cache(maxsize=256)
def _code_source(code: types.CodeType) -> str | None:
    # Only the lines the lambda's code spans, through linecache: inspect.getsource tokenizes the
    # whole enclosing block, which cost ~4 ms a job in an IPython cell (measured). Cached by code
    # object: parsing cost ~0.1 ms, a tenth of a process job's start.
    lines = linecache.getlines(code.co_filename)
    if not lines:
        return None
    first = code.co_firstlineno
    last = max([line for _, _, line in code.co_lines() if line is not None] or [first])
    src = textwrap.dedent("".join(lines[first - 1:last]))
    tree = None
    for candidate in (src, src.rstrip().rstrip(",)") + "\n", "(" + src.strip() + ")"):
        try:
            tree = ast.parse(candidate)
            src = candidate
            break
        except SyntaxError:
            continue
    if tree is None:
        return None
    lambdas = [node for node in ast.walk(tree) if isinstance(node, ast.Lambda)]
    # Several lambdas on a line: take the one whose body is this code's (the text at its columns),
    # then whose parameters are. Parameters alone named `lambda: "first"` for `lambda: "second"`
    # on the same line, and get_job(command="*second*") found nothing.
    body = _body_text(code, lines)
    names = list(code.co_varnames[:code.co_argcount + code.co_kwonlyargcount])
    lambdas.sort(key=lambda node: (body is not None and _squeeze(ast.get_source_segment(src, node.body)) != body,
                                   [a.arg for a in (*node.args.args, *node.args.kwonlyargs)] != names))
    for node in lambdas:
        text = ast.get_source_segment(src, node)
        if text:
            text = " ".join(text.split())
            return text if len(text) <= 200 else text[:197] + "..."
    return None


def _body_text(code: types.CodeType, lines: list[str]) -> str | None:
    """The source text of a lambda's body, from its code's columns (co_positions, Python 3.11+;
    None before, or when the code has no columns): the span of all its instructions."""
    positions = getattr(code, "co_positions", None)
    if positions is None:
        return None
    spans = [(line, col, end_line, end_col) for line, end_line, col, end_col in positions()
             if line is not None and end_line is not None and col is not None and end_col is not None
             and (end_line, end_col) > (line, col)]  # RESUME and the like: an empty span at column 0
    if not spans:
        return None
    line, col = min((line, col) for line, col, _, _ in spans)
    end_line, end_col = max((end_line, end_col) for _, _, end_line, end_col in spans)
    if line < 1 or end_line > len(lines):
        return None
    # Columns count UTF-8 bytes.
    raw = [lines[n - 1].encode() for n in range(line, end_line + 1)]
    text = raw[0][col:end_col] if len(raw) == 1 else raw[0][col:] + b"".join(raw[1:-1]) + raw[-1][:end_col]
    return _squeeze(text.decode("utf-8", "replace"))


def _squeeze(text: str | None) -> str | None:
    return " ".join(text.split()) if text is not None else None
