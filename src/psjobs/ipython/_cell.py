"""``%%bg``: a whole cell as one job, and the code that runs it where the job runs.

::

    %%bg [--name N] [--thread] [-c HOST[,HOST]]   cell source
        source --linecache (this kernel), under "<psjobs %%bg N>"--> tracebacks show its lines
        --process--> run_cell(source, filename, the names it uses, copied) in a worker process
        --thread---> run_cell(source, filename, the shell's namespace itself)
        -c HOST----> the same, over SSH (invoke_command): the runner travels by value, since the
                     remote Python need not have psjobs' IPython extension
    the job's output: what the cell's code yields with psjobs.write_output, prints (information),
    and the value of its last line when that line is an expression, as a cell's Out
"""

from __future__ import annotations

import ast
import itertools
import linecache
import types
from typing import Any

_counter = itertools.count(1)

# The runner is compiled here, in a namespace no module owns, so cloudpickle sends it by value:
# a worker, or a remote Python, runs it without importing psjobs.ipython (nor IPython).
_RUNNER_SOURCE = '''
def run_cell(source, filename, namespace):
    import ast
    tree = ast.parse(source, filename)
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(tree.body.pop().value)
    namespace.setdefault("__name__", "__main__")
    exec(compile(tree, filename, "exec"), namespace)
    if last is not None:
        return eval(compile(last, filename, "eval"), namespace)
    return None
'''
#: the runner's file name in tracebacks: psjobs' frame, which a user's traceback leaves out
RUNNER_FILENAME = "<psjobs %%bg runner>"
_runner_ns: dict[str, Any] = {"__name__": "psjobs-cell-runner"}
exec(compile(_RUNNER_SOURCE, RUNNER_FILENAME, "exec"), _runner_ns)
run_cell: types.FunctionType = _runner_ns["run_cell"]


def runner_for(source: str) -> types.FunctionType:
    """``run_cell`` under the name of the cell's first line, which the job table shows as its
    command (``%%bg: total = 0 ...``)."""
    lines = [line.strip() for line in source.strip().splitlines() if line.strip()]
    label = "%%bg: " + (lines[0] if lines else "") + (" ..." if len(lines) > 1 else "")
    fn = types.FunctionType(run_cell.__code__, run_cell.__globals__, "run_cell")
    fn.__qualname__ = label
    return fn


def register(source: str, what: str = "%%bg") -> str:
    """Keep ``source`` in this process's linecache under a new name; return the name."""
    filename = f"<psjobs {what} {next(_counter)}>"
    lines = [line + "\n" for line in source.splitlines()]
    linecache.cache[filename] = (len(source), None, lines, filename)
    return filename


def names_used(source: str, filename: str) -> set[str]:
    """Every name the cell's code reads (its free names, as a superset)."""
    tree = ast.parse(source, filename)
    return {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
