"""The package's layers, checked on every run (read from the source, nothing imported).

::

    faces:     __init__ (public door)  _api  _cli  ipython/  tour  _tour
    host/      the session host: imports core, the bottom layer (and worker's codec is not needed)
    backends/  thread, process/, ssh/, dask/: import core's facade and worker/, never each other
    core/      Session, Job, states, selection, port: the bottom layer only, stdlib only
    worker/    what runs outside the session: the bottom layer only
    bottom:    _errors  _records  _recordclass  _inside  _compat: the standard library only

A rule broken here is a seam broken in the code: give the lower layer a public function instead.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

import psjobs

PKG = Path(psjobs.__file__).resolve().parent
BOTTOM = {"_errors", "_records", "_recordclass", "_inside", "_compat", "_version"}
FACES = {"_api", "_cli", "ipython", "tour", "_tour", "__main__"}
# What each layer may import from psjobs (by top-level part of the module name under psjobs).
ALLOWED = {
    "bottom": BOTTOM,
    "core": BOTTOM | {"core"},
    "worker": BOTTOM | {"worker"},
    "backends": BOTTOM | {"core", "worker", "backends"},  # their own backend package only: see below
    "host": BOTTOM | {"core", "host"},
}
# Third-party packages a layer may import (lazily or not); everything else must be stdlib.
THIRD_PARTY = {
    "bottom": set(),
    "core": {"rich"},  # core/_progress draws bars with rich when it is installed (lazily)
    "worker": {"cloudpickle"},
    "host": set(),
}


def _layer(parts: tuple[str, ...]) -> str:
    head = parts[0]
    if head in BOTTOM:
        return "bottom"
    if head in {"core", "worker", "backends", "host"}:
        return head
    return "face"


def _modules() -> dict[tuple[str, ...], Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        out[parts or ("__init__",)] = path
    return out


def _imports(parts: tuple[str, ...], path: Path) -> list[tuple[str, int]]:
    """Every module ``path`` imports (anywhere in it), as absolute dotted names, with line numbers."""
    is_pkg = path.name == "__init__.py"
    package = ("psjobs", *parts) if is_pkg else ("psjobs", *parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                name = ".".join(base + ((node.module,) if node.module else ()))
                if node.module is None:  # from . import a, b: each name may be a module
                    out += [(f"{name}.{alias.name}", node.lineno) for alias in node.names]
                    continue
            else:
                name = node.module or ""
            out.append((name, node.lineno))
    return out


def _psjobs_part(name: str) -> str | None:
    """'psjobs.core._job' -> 'core'; None for a name outside psjobs."""
    bits = name.split(".")
    if bits[0] != "psjobs":
        return None
    return bits[1] if len(bits) > 1 else "__init__"


def test_every_layer_imports_only_what_is_below_it() -> None:
    broken = []
    for parts, path in _modules().items():
        layer = _layer(parts)
        if layer == "face":
            continue
        for name, line in _imports(parts, path):
            part = _psjobs_part(name)
            where = f"{path.relative_to(PKG.parent)}:{line} imports {name}"
            if part is None:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == "__future__" or layer == "backends":
                    continue
                if top not in THIRD_PARTY[layer]:
                    broken.append(f"{where} (the {layer} layer uses the standard library only)")
                continue
            if part in FACES or part == "__init__":
                if parts == ("worker", "_remote_boot") and name == "psjobs":
                    continue  # the remote bootstrap reads which psjobs version the remote computer has
                broken.append(f"{where} (nothing below the faces imports a face or the public door)")
                continue
            if part not in ALLOWED[layer]:
                broken.append(f"{where} (the {layer} layer may import only {sorted(ALLOWED[layer])})")
            elif layer == "backends":
                bits = name.split(".")
                if part == "backends" and len(bits) > 2 and bits[2] != parts[1]:
                    broken.append(f"{where} (a backend never imports another backend)")
                if part == "core" and len(bits) > 2:
                    broken.append(f"{where} (backends use core's facade, psjobs.core, not its modules)")
    assert not broken, "\n".join(broken)


def _group(parts: tuple[str, ...]) -> str:
    layer = _layer(parts)
    return "faces" if layer == "face" else layer


def test_no_import_cycle_between_packages() -> None:
    modules = _modules()
    by_name = {"psjobs." + ".".join(parts) if parts != ("__init__",) else "psjobs": parts for parts in modules}
    graph: dict[str, set[str]] = defaultdict(set)
    for parts, path in modules.items():
        for name, _ in _imports(parts, path):
            if parts == ("worker", "_remote_boot") and name == "psjobs":
                continue  # run on the remote computer, to read which psjobs is installed there
            while name and name not in by_name:
                name = name.rpartition(".")[0]  # psjobs.core._job.Job -> psjobs.core._job
            if name and _group(by_name[name]) != _group(parts):
                graph[_group(parts)].add(_group(by_name[name]))

    def cycle_from(node: str, path: list[str]) -> list[str] | None:
        for nxt in sorted(graph.get(node, ())):
            if nxt in path:
                return [*path[path.index(nxt):], nxt]
            found = cycle_from(nxt, [*path, nxt])
            if found:
                return found
        return None

    for start in sorted(graph):
        found = cycle_from(start, [start])
        assert found is None, " -> ".join(found or [])


def test_no_module_is_over_600_lines() -> None:
    long = {str(p.relative_to(PKG)): n for p in PKG.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 600}
    assert not long, long


def test_the_library_faces_import_no_interactive_face() -> None:
    """The library's own faces (the module verbs, connect(), the Executor) never import the
    command, the IPython extension or the tour: `import psjobs` and psjobs.connect() must not pull
    in (or register) what only those faces need."""
    interactive = {"_cli", "_cli_output", "ipython", "tour", "_tour", "__main__"}
    broken = []
    for parts, path in _modules().items():
        if parts not in {("_api",), ("_api_ssh",), ("_connect",), ("_executor",), ("__init__",)}:
            continue
        for name, line in _imports(parts, path):
            if _psjobs_part(name) in interactive:
                broken.append(f"{path.relative_to(PKG.parent)}:{line} imports {name}")
    assert not broken, "\n".join(broken)
