"""One error tree: the drawing in _errors.py is the class tree, and a missing optional dependency
always says what to install (checked in real interpreters where the dependency cannot be imported)."""

from __future__ import annotations

import importlib
import json
import logging
import os
import pickle
import pkgutil
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import psjobs
from psjobs import _errors

from .conftest import wait_until

SRC = str(Path(__file__).resolve().parents[1] / "src")

# One line of the drawing: an indent of "│   "/"    " steps, an optional branch, the class name,
# an optional "(Base)" for a root or "(also A, B)" for extra bases, then two spaces or the end.
_LINE = re.compile(r"^    (?P<indent>(?:│   |    )*)(?P<branch>[├└]── )?(?P<name>[A-Z]\w+)"
                   r"(?: \((?P<also>also )?(?P<bases>[\w, ]+)\))?(?:  |$)")
_ROOTS = (_errors.PsJobsError, _errors.JobStopped, _errors.PsJobsWarning)


def _drawn() -> dict[str, tuple[str, set[str]]]:
    """{class name: (parent as drawn, every base it names)} from _errors' docstring."""
    assert _errors.__doc__ is not None
    drawn: dict[str, tuple[str, set[str]]] = {}
    stack: list[str] = []
    for line in _errors.__doc__.splitlines():
        m = _LINE.match(line)
        if m is None:
            continue
        depth = len(m["indent"]) // 4 + (1 if m["branch"] else 0)
        named = {b.strip() for b in m["bases"].split(",")} if m["bases"] else set()
        if depth == 0:
            assert not m["also"], line
            parent = named.pop() if named else ""
            bases = {parent}
        else:
            assert len(stack) >= depth, f"a branch without a parent: {line!r}"
            parent = stack[depth - 1]
            bases = {parent} | named
        del stack[depth:]
        stack.append(m["name"])
        assert m["name"] not in drawn, f"{m['name']} is drawn twice"
        drawn[m["name"]] = (parent, bases)
    return drawn


def _walk(cls: type) -> list[type]:
    out = [cls]
    for sub in cls.__subclasses__():
        out += _walk(sub)
    return out


def _tree() -> list[type]:
    # Every module first, so that a class defined anywhere in psjobs is walked (and must be drawn).
    for info in pkgutil.walk_packages(psjobs.__path__, "psjobs."):
        if info.name != "psjobs.__main__":  # that one runs the command
            importlib.import_module(info.name)
    classes = [c for root in _ROOTS for c in _walk(root)]
    return list(dict.fromkeys(classes))  # a class with two psjobs bases would be walked twice


def test_the_docstring_draws_the_class_tree() -> None:
    drawn = _drawn()
    real = {}
    tree = _tree()
    for cls in tree:
        ours = [b for b in cls.__bases__ if b in tree]
        parent = ours[0].__name__ if ours else cls.__bases__[0].__name__
        real[cls.__name__] = (parent, {b.__name__ for b in cls.__bases__})
    assert drawn == real


def test_every_class_says_when_it_is_raised_and_can_be_imported() -> None:
    for cls in _tree():
        assert cls.__dict__.get("__doc__"), f"{cls.__name__} has no docstring"
        assert getattr(psjobs, cls.__name__, None) is cls or getattr(_errors, cls.__name__, None) is cls, \
            f"{cls.__name__} is neither in psjobs nor in psjobs._errors"


def test_the_command_s_exit_statuses_come_from_the_classes() -> None:
    assert (_errors.UsageError.exit_code, _errors.RequestError.exit_code, _errors.WaitTimeoutError.exit_code,
            _errors.JobNotFoundError.exit_code, _errors.HostError.exit_code) == (2, 2, 6, 3, 1)


def test_missing_dependency_error_is_an_import_error_that_survives_pickling() -> None:
    err = _errors.missing_dependency("invoke_command", "ssh", ModuleNotFoundError("no asyncssh", name="asyncssh"))
    assert isinstance(err, ImportError) and isinstance(err, psjobs.PsJobsError)
    back = pickle.loads(pickle.dumps(err))
    assert (type(back), str(back), back.name, back.extra) == (type(err), str(err), "asyncssh", "ssh")


# --- a missing optional dependency, in a real interpreter ---------------------------------------

_REPORT = """
import json, sys
try:
    {call}
except ImportError as exc:
    print(json.dumps({{"type": type(exc).__name__, "psjobs": isinstance(exc, psjobs.PsJobsError),
                      "name": exc.name, "message": str(exc)}}))
else:
    print(json.dumps(None))
"""


def _without(module: str, setup: str, call: str, tmp_path: Path) -> dict[str, object]:
    """Run ``call`` where ``module`` cannot be imported; what it raised."""
    code = (f"import sys\nfor _m in {module!r}.split():\n    sys.modules[_m] = None\n{setup}\n"
            + _REPORT.format(call=call))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=SRC, PSJOBS_HOME=str(tmp_path)))
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report is not None, "no ImportError was raised"
    return report  # type: ignore[no-any-return]


def _says_what_to_install(report: dict[str, object], extra: str, needs: str) -> None:
    assert report["type"] == "MissingDependencyError" and report["psjobs"] is True, report
    message = str(report["message"])
    assert needs in message, message
    assert f"pip install 'psjobs[{extra}]'" in message, message
    assert f"pip install -e '.[{extra}]'" in message, message  # from a checkout of psjobs


def test_invoke_command_without_asyncssh(tmp_path: Path) -> None:
    report = _without("asyncssh", "import psjobs",
                      "psjobs.invoke_command('true', computer_name=['127.0.0.1'])", tmp_path)
    _says_what_to_install(report, "ssh", "invoke_command")
    assert report["name"] == "asyncssh"


def test_cluster_job_without_distributed(tmp_path: Path) -> None:
    report = _without("distributed", "import psjobs",
                      "psjobs.start_job(print, cluster='tcp://127.0.0.1:1')", tmp_path)
    _says_what_to_install(report, "dask", "(jobs on a Dask cluster) needs Dask's distributed")
    assert report["name"] == "distributed"


def test_ipython_extension_without_ipython(tmp_path: Path) -> None:
    report = _without("IPython", "import psjobs", "import psjobs.ipython", tmp_path)
    _says_what_to_install(report, "ipython", "psjobs.ipython")


def test_psjobs_shell_without_ipython(tmp_path: Path) -> None:
    code = ("import sys\nsys.modules['IPython'] = None\nfrom psjobs._cli import main\n"
            "sys.exit(main(['shell']))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=SRC, PSJOBS_HOME=str(tmp_path)))
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("psjobs shell: ") and "pip install 'psjobs[ipython]'" in out.stderr
    assert "Traceback" not in out.stderr


def test_progress_bars_without_rich(tmp_path: Path) -> None:
    report = _without("rich rich.console", "import psjobs\nfrom psjobs.core._progress import ProgressDisplay",
                      "ProgressDisplay(plain=False)", tmp_path)
    _says_what_to_install(report, "ipython", "ProgressDisplay(plain=False) needs rich")


# --- internal errors go to the psjobs logger ------------------------------------------------------

@pytest.mark.parametrize("kind", [RuntimeError, SystemExit, KeyboardInterrupt])
def test_an_internal_error_of_the_io_loop_is_logged_and_the_loop_goes_on(caplog: pytest.LogCaptureFixture,
                                                                          kind: type[BaseException]) -> None:
    # SystemExit and KeyboardInterrupt too: either one, out of a handler, ended the thread (SystemExit
    # silently) and every process job of the session hung.
    from psjobs.backends.process._loop import IOLoop

    def bug() -> None:  # a callback with no job to fail: what a bug in psjobs itself looks like
        raise kind("a bug in a callback")

    loop = IOLoop()
    alive = threading.Event()
    try:
        with caplog.at_level(logging.ERROR, logger="psjobs"):
            loop.call_soon(bug)
            loop.call_soon(alive.set)
            wait_until(alive.is_set, what="the I/O loop to run the next callback after the bug")
            wait_until(lambda: caplog.records, what="the internal error to be logged")
    finally:
        loop.close()
    [record] = caplog.records
    assert record.name.startswith("psjobs") and record.levelno == logging.ERROR
    assert record.exc_info is not None and str(record.exc_info[1]) == "a bug in a callback"
    assert record.threadName == "psjobs-io"
