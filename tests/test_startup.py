"""What starting costs: ``import psjobs``, the ``psjobs`` command and the fork server import only
what they use (issue 18). Each check runs a fresh interpreter and reads its ``sys.modules``."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import psjobs

INIT = Path(psjobs.__file__)


def _modules_after(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running ``code``."""
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True, timeout=30)
    return set(json.loads(out.stdout.splitlines()[-1]))


def _heavy(modules: set[str]) -> set[str]:
    """The loaded modules a light start must not have: the core, the backends, the worker, the
    host's server side, cloudpickle, asyncio."""
    prefixes = ("psjobs.core", "psjobs.backends", "psjobs.worker", "psjobs._api", "psjobs.host._server",
                "cloudpickle", "asyncio", "sqlite3")
    return {m for m in modules if m.startswith(prefixes)}


def test_import_psjobs_loads_only_the_bottom_layer() -> None:
    modules = _modules_after("import psjobs")
    assert not _heavy(modules), sorted(_heavy(modules))
    assert {m for m in modules if m.startswith("psjobs")} == {"psjobs", "psjobs._errors", "psjobs._records",
                                                               "psjobs._version"}


def test_a_public_name_is_imported_on_first_use_and_says_it_comes_from_psjobs() -> None:
    code = ("import sys, psjobs\n"
            "assert 'psjobs.core._session' not in sys.modules\n"
            "s = psjobs.Session\n"
            "assert 'psjobs.core._session' in sys.modules and s.__module__ == 'psjobs'\n"
            "assert 'psjobs.backends.ssh' not in sys.modules\n"
            "job = psjobs.start_thread_job(lambda: 1)\n"
            # a class reached through a job, never named through psjobs, still says psjobs
            "assert type(job).__module__ == 'psjobs', type(job).__module__\n"
            "assert psjobs.receive_job(psjobs.wait_job(job, timeout=20)) == [1]\n"
            "assert 'SSHOptions' in dir(psjobs) and 'Session' in vars(psjobs)\n")
    _modules_after(code)


def test_a_program_that_never_uses_ssh_does_not_import_it() -> None:
    """The module functions (psjobs.start_job...) do not pull in the SSH backend; configure_ssh does."""
    code = ("import sys, psjobs\n"
            "job = psjobs.start_job(['true'])\n"
            "psjobs.wait_job(job, timeout=20)\n"
            "assert not [m for m in sys.modules if 'ssh' in m], [m for m in sys.modules if 'ssh' in m]\n"
            "psjobs.configure_ssh\n"
            "assert 'psjobs.backends.ssh._backend' in sys.modules\n")
    _modules_after(code)


def test_errors_say_they_come_from_psjobs_from_the_start() -> None:
    # A traceback printed before any public name was used still shows psjobs.JobFailedError.
    code = ("from psjobs._errors import JobFailedError\n"
            "assert JobFailedError.__module__ == 'psjobs'\n")
    _modules_after(code)


def test_an_unknown_name_is_an_attribute_error() -> None:
    try:
        psjobs.no_such_name  # noqa: B018
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:
        raise AssertionError("psjobs.no_such_name did not raise AttributeError")


def _typing_names(init: Path = INIT) -> set[str]:
    """The names the ``if TYPE_CHECKING:`` block of a package's __init__.py imports."""
    tree = ast.parse(init.read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test))
    return {alias.asname or alias.name for node in block.body if isinstance(node, ast.ImportFrom)
            for alias in node.names}


def test_the_three_lists_of_public_names_agree() -> None:
    # See psjobs/__init__.py's docstring: a name is added to the TYPE_CHECKING imports, to
    # _EXPORTS and to __all__; a name added to one only is caught here.
    exports = set(psjobs._EXPORTS)
    assert exports == _typing_names()
    assert exports | {"load_ipython_extension", "unload_ipython_extension"} == set(psjobs.__all__)
    for name, where in psjobs._EXPORTS.items():
        assert getattr(psjobs, name) is getattr(sys.modules["psjobs" + where], name), name


def test_the_command_imports_the_host_client_not_the_library(tmp_path: Path) -> None:
    # `psjobs get` as a whole process: argparse, the host's protocol and client, the job table;
    # not the Session, the backends, the worker, nor socket.py (its enums cost ~5% of the command).
    home = tmp_path / "h"
    code = (f"import os; os.environ['PSJOBS_HOME'] = {str(home)!r}\n"
            "from psjobs._cli import main\n"
            "assert main(['get']) == 0\n"
            "assert main(['host', 'stop']) == 0\n")
    modules = _modules_after(code)
    # The job table (core._format) and the PSHost that prints records come from the core, through
    # its lazy facade: those modules, and what the table's Job needs, but no Session.
    table = {"psjobs.core", "psjobs.core._format", "psjobs.core._job", "psjobs.core._journal",
             "psjobs.core._state", "psjobs.core._pshost"}
    assert not _heavy(modules) - table, sorted(_heavy(modules) - table)
    assert {"psjobs.host._client", "psjobs.host._protocol"} <= modules
    assert "socket" not in modules and "psjobs.core._session" not in modules
    # dataclasses (and the inspect it imports) cost ~12 ms of a ~60 ms command: host/_protocol's records.
    assert "dataclasses" not in modules and "inspect" not in modules


def test_the_fork_server_imports_only_the_worker_runtime() -> None:
    # A process job's worker is forked from the fork server, so it holds what the server imported
    # (plus what the job needs): the worker runtime and cloudpickle, never the core or a backend.
    code = ("import json, psjobs\n"
            "def modules():\n"
            "    import sys\n"
            "    return sorted(sys.modules)\n"
            "job = psjobs.start_job(modules)\n"
            "print(json.dumps(psjobs.receive_job(psjobs.wait_job(job, timeout=25))[0]))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30)
    in_worker = set(json.loads(out.stdout.splitlines()[-1]))
    assert {"psjobs.worker._process_worker", "cloudpickle"} <= in_worker  # the server runs as __main__
    library = {m for m in in_worker if m.startswith(("psjobs.core", "psjobs.backends", "psjobs._api", "psjobs.host"))}
    assert not library, sorted(library)
    # Nor what only a command's Popen fallback (subprocess) or a remote's messages (json) use:
    # with their modules, ~0.2 MiB of the fork server and its two spares (bench/FINDINGS.md).
    unused = {"subprocess", "json", "locale"} & in_worker
    assert not unused, sorted(unused)


def test_the_core_facade_lists_agree() -> None:
    import psjobs.core as core

    assert set(core._EXPORTS) == set(core.__all__) == _typing_names(Path(core.__file__))
    for name in core.__all__:
        assert getattr(core, name) is getattr(sys.modules["psjobs.core" + core._EXPORTS[name]], name), name


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="bench.startup counts with valgrind")
def test_bench_startup_counts_instructions_and_modules(tmp_path: Path) -> None:
    from bench.startup import ROOT, count

    bare, bare_modules = count(ROOT, "pass", str(tmp_path))
    light, light_modules = count(ROOT, "import psjobs", str(tmp_path))
    assert 0 < bare < light and bare_modules < light_modules
