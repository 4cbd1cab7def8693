"""The IPython extension, driven through IPython's own InteractiveShell (a fresh one per test),
and once through a real terminal (tmux) as a user sees it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("IPython")

from IPython.core.interactiveshell import InteractiveShell
from traitlets.config import Config

import psjobs
from psjobs import _api
from psjobs.ipython import BackgroundOperator, announcement, render_html, render_rich

from .conftest import wait_until

SRC = str(Path(__file__).resolve().parent.parent / "src")


@pytest.fixture
def ip(session: psjobs.Session, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Any]:
    """A fresh IPython shell with the extension loaded; `&` and the magics use this test's session."""
    monkeypatch.setattr(_api, "_default", session)
    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    shell = InteractiveShell(config=config, ipython_dir=str(tmp_path / "ipython"))
    shell.run_line_magic("load_ext", "psjobs")
    try:
        yield shell
    finally:
        shell.run_line_magic("unload_ext", "psjobs")
        shell.history_manager.end_session()


def run(ip: Any, cell: str) -> Any:
    """Run a cell; return its value (raise what it raised)."""
    result = ip.run_cell(cell, silent=False)
    result.raise_error()
    return result.result


def transform(ip: Any, cell: str) -> str:
    return str(ip.input_transformer_manager.transform_cell(cell))


# --- the operator: what it rewrites and what it leaves alone -------------------------------

@pytest.mark.parametrize(("cell", "expected"), [
    ("x = 2 + 3 &", "x = get_ipython().run_line_magic('bg', '2 + 3')\n"),
    ("2 + 3 &", "get_ipython().run_line_magic('bg', '2 + 3')\n"),
    ("!make all &", "get_ipython().run_line_magic('bg', '!make all')\n"),
    ("out = !make all &", "out = get_ipython().run_line_magic('bg', '!make all')\n"),
    ("!make && make install &", "get_ipython().run_line_magic('bg', '!make && make install')\n"),
    ("x = f() &  # start it", "x = get_ipython().run_line_magic('bg', 'f()')\n"),
    ("bad = (1 / 0) &", "bad = get_ipython().run_line_magic('bg', '(1 / 0)')\n"),
    ("(a, b) &\nprint(1)", "get_ipython().run_line_magic('bg', '(a, b)')\nprint(1)\n"),
    ("a = 1; b = f(a) &", "a = 1; b = get_ipython().run_line_magic('bg', 'f(a)')\n"),
    ("x = f(1,\n      2) &", "x = get_ipython().run_line_magic('bg', 'f(1,\\n      2)')\n\n"),
    ("!make \\\n  all &\ny = 1", "get_ipython().run_line_magic('bg', '!make    all')\n\ny = 1\n"),
    ("for i in r:\n    y = g(i,\n          2) &\n    z = 1", "for i in r:\n    y = get_ipython().run_line_magic("
     "'bg', 'g(i,\\n          2)')\n\n    z = 1\n"),
    ("for i in r:\n    y = g(i) &\n", "for i in r:\n    y = get_ipython().run_line_magic('bg', 'g(i)')\n"),
])
def test_a_line_ending_in_ampersand_becomes_a_job(ip: Any, cell: str, expected: str) -> None:
    assert transform(ip, cell) == expected
    # The terminal asks check_complete before running: the line must not wait for more input.
    assert ip.input_transformer_manager.check_complete(cell + "\n")[0] == "complete"


def test_lines_after_a_statement_over_several_lines_keep_their_numbers(ip: Any) -> None:
    # An error further down the cell names the line the user sees (the job's statement spans two).
    result = ip.run_cell("def f(a, b): return a + b\nx = f(1,\n      2) &\nyy = 1\n1/0")
    assert isinstance(result.error_in_exec, ZeroDivisionError)
    tb = result.error_in_exec.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    assert tb is not None and tb.tb_lineno == 5
    job = ip.user_ns["x"]
    assert job.wait(timeout=20) and job.receive() == [3]


@pytest.mark.parametrize("cell", [
    "c = a & b",                      # the bitwise and
    "c = a &\\\n    b",               # the same, continued
    "a &&",                           # not an operator in Python: stays a syntax error
    "x &= 3",                         # augmented assignment
    "x &=",                           # an unfinished one
    "x = f('a &')",                   # in a string
    's = """\nabc &\n"""',            # in a triple-quoted string
    "x = f()  # run & forget",        # in a comment
    "x = 2+3&",                       # not spaced: only ` &` is the operator
    "import os &",                    # not an expression: Python's own error
    "x += f() &",
    "!make && make install",          # the shell's && in a command
    "!cmd &&",
])
def test_other_uses_of_ampersand_keep_their_meaning(ip: Any, cell: str) -> None:
    assert "run_line_magic('bg'" not in transform(ip, cell)


def test_bitwise_and_still_computes(ip: Any) -> None:
    run(ip, "a = 6\nb = 3\nc = a & b\nd = 12\nd &= 5")
    assert ip.user_ns["c"] == 2
    assert ip.user_ns["d"] == 4
    assert psjobs.get_job() == []


def test_cell_magics_keep_their_meaning(ip: Any) -> None:
    def body(line: str, cell: str) -> str:
        return cell

    ip.register_magic_function(body, "cell", "body")
    assert run(ip, "%%body\nx = 2 + 3 &\n!make &\n") == "x = 2 + 3 &\n!make &\n"
    assert psjobs.get_job() == []


def test_the_transform_only_claims_the_last_token(ip: Any) -> None:
    # Pure: find() on tokens, without a shell.
    from IPython.core.inputtransformer2 import make_tokens_by_line

    assert BackgroundOperator.find(make_tokens_by_line(["y = x & 1\n"])) is None
    assert BackgroundOperator.find(make_tokens_by_line(["y = x & 1 &\n"])) is not None


def test_the_transform_never_breaks_input_ipython_accepts(ip: Any) -> None:
    # A token transform that raises breaks every cell of the shell: feed it random cells made of
    # the awkward pieces (unclosed brackets and strings, escapes, continuations, unicode).
    import random

    pieces = ["x", " = ", "&", " &", "&&", "!", "!!", "%", "%%", "(", ")", "[", "]", "{", "}", "'", '"',
              '"""', "\\\n", "\n", "    ", "#", ";", ":", "f(1)", "é", "?", " ", "lambda", "if ", "\t",
              "=", ",", "*", "$x", "{y}", "\r\n"]
    rng = random.Random(6)
    manager = ip.input_transformer_manager
    for _ in range(3000):
        cell = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 12)))
        for step in (manager.transform_cell, manager.check_complete):
            try:
                step(cell)
            except SyntaxError:
                pass
            except Exception:
                manager.token_transformers.remove(BackgroundOperator)
                try:
                    with pytest.raises(Exception):  # noqa: B017 - IPython alone fails the same way
                        step(cell)
                finally:
                    manager.token_transformers.append(BackgroundOperator)


# --- process jobs (the default) ------------------------------------------------------------

def test_assignment_binds_the_job_and_its_value_is_the_expression(ip: Any) -> None:
    run(ip, "x = 2 + 3 &")
    job = ip.user_ns["x"]
    assert isinstance(job, psjobs.Job)
    assert job.job_type == "BackgroundJob"
    assert job.command == "2 + 3"
    assert job.wait(timeout=20)
    assert run(ip, "%receive x") == [5]


def test_a_bare_expression_shows_the_job(ip: Any, capsys: pytest.CaptureFixture[str]) -> None:
    job = run(ip, "sum(range(10)) &")
    assert isinstance(job, psjobs.Job)
    out = capsys.readouterr().out
    assert "BackgroundJob" in out and "sum(range(10))" in out  # the Get-Job row, as Out[...]
    assert job.wait(timeout=20)
    assert job.receive() == [45]


def test_free_names_are_captured_by_value_at_start(ip: Any) -> None:
    run(ip, "data = [1, 2, 3]\ndef total(d):\n    return sum(d) * factor\nfactor = 10")
    run(ip, "j = total(data) &")
    run(ip, "data.append(1000)\nfactor = 0")  # after the start: the job has its copies
    job = ip.user_ns["j"]
    assert job.wait(timeout=20)
    assert job.receive() == [60]
    assert job.command == "total(data)"


def test_a_name_that_cannot_be_pickled_is_named_and_no_job_starts(ip: Any,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    run(ip, "import threading\nlock = threading.Lock()\nitems = [1]")
    result = ip.run_cell("j = len([lock, items]) &")
    err = result.error_in_exec
    # One line, as IPython's own usage errors: no chained tracebacks through cloudpickle and psjobs
    from IPython.core.error import UsageError

    assert isinstance(err, UsageError)
    shown = capsys.readouterr().err
    assert shown.count("\n") == 1 and "Traceback" not in shown and shown.startswith("UsageError: ")
    assert "'lock'" in str(err) and "_thread.lock" in str(err)
    assert "'items'" not in str(err)
    assert "--thread" in str(err)  # what to do next
    assert "j" not in ip.user_ns
    assert psjobs.get_job() == []


def test_a_bg_cell_gets_copies_of_names_that_start_with_an_underscore(ip: Any) -> None:
    # The user's own _names travel as any other; IPython's history (_, _i1, _1...) does not.
    run(ip, "_scale = 3")
    run(ip, "41")  # an Out: _ and _2 hold it now
    job = run(ip, "%%bg\ntry:\n    seen = _\nexcept NameError:\n    seen = None\n_scale * 2, seen")
    assert job.wait(timeout=20)
    assert job.receive() == [(6, None)]


@pytest.mark.parametrize("cell", ["x = f.readline() &", "%%bg\nf.readline()"])
def test_an_open_file_is_not_copied_into_a_process_job(ip: Any, cell: str, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    # docs/ipython.md: an open file cannot be copied, so the line stops before any job exists
    # (cloudpickle would snapshot a text file open for reading, and the job would read the copy).
    from IPython.core.error import UsageError

    (tmp_path / "h.py").write_text("first\nsecond\n")
    ip.user_ns["path"] = str(tmp_path / "h.py")
    run(ip, "f = open(path)")
    try:
        result = ip.run_cell(cell)
        assert isinstance(result.error_in_exec, UsageError)
        err = capsys.readouterr().err
        assert err.startswith("UsageError: ") and err.count("\n") == 1 and "'f'" in err and "open file" in err
        assert psjobs.get_job() == [] and "x" not in ip.user_ns
        assert run(ip, "f.readline()") == "first\n"  # the user's file is untouched
    finally:
        run(ip, "f.close()")


def test_a_generator_streams_its_items(ip: Any) -> None:
    job = run(ip, "(i * i for i in range(4)) &")
    assert job.wait(timeout=20)
    assert job.receive() == [0, 1, 4, 9]


def test_a_line_inside_a_function_sees_its_locals(ip: Any) -> None:
    run(ip, "def double_later(n):\n    j = n * 2 &\n    return j\n")
    job = run(ip, "double_later(21)")
    assert job.wait(timeout=20)
    assert job.receive() == [42]


def test_a_failing_expression_fails_its_job(ip: Any) -> None:
    job = run(ip, "1 / 0 &")
    assert job.wait(timeout=20)
    assert job.state is psjobs.JobState.FAILED
    assert isinstance(job.reason, ZeroDivisionError)


# --- thread jobs -------------------------------------------------------------------------

def test_config_switches_to_thread_jobs_that_share_the_namespace(ip: Any) -> None:
    run(ip, "%config PsJobs.kind = 'thread'")
    run(ip, "import threading\nlock = threading.Lock()\nseen = []")
    job = run(ip, "seen.append(lock) &")  # a lock cannot be copied, but a thread shares it
    assert job.job_type == "ThreadJob"
    assert job.wait(timeout=20)
    assert ip.user_ns["seen"] == [ip.user_ns["lock"]]
    run(ip, "%config PsJobs.kind = 'process'")
    assert run(ip, "1 + 1 &").job_type == "BackgroundJob"


def test_kind_from_the_config_file(session: psjobs.Session, monkeypatch: pytest.MonkeyPatch,
                                   tmp_path: Path) -> None:
    # What `c.PsJobs.kind = 'thread'` in ipython_config.py does.
    monkeypatch.setattr(_api, "_default", session)
    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    config.PsJobs.kind = "thread"
    shell = InteractiveShell(config=config, ipython_dir=str(tmp_path / "ipython"))
    shell.run_line_magic("load_ext", "psjobs")
    try:
        job = run(shell, "'a  b' &")
        assert job.job_type == "ThreadJob"
        assert job.command == "'a  b'"  # the text as typed
    finally:
        shell.run_line_magic("unload_ext", "psjobs")


def test_bg_magic_options(ip: Any) -> None:
    job = run(ip, "%bg --thread --name adder 40 + 2")
    assert (job.job_type, job.name, job.command) == ("ThreadJob", "adder", "40 + 2")
    assert job.wait(timeout=20)
    assert run(ip, "%receive adder") == [42]
    result = ip.run_cell("%bg --name")
    assert result.error_in_exec is not None


@pytest.mark.parametrize(("line", "name"), [("%bg --name 'q' 1 + 1", "q"),
                                            ('%bg --name "my job" 1 + 1', "my job"),
                                            ("%bg --thread --name 'a b'   1 + 1", "a b")])
def test_bg_reads_a_quoted_name_as_the_other_magics_do(ip: Any, line: str, name: str) -> None:
    job = run(ip, line)
    assert (job.name, job.command) == (name, "1 + 1")
    assert run(ip, f"%receive '{name}' --wait") == [2]


def test_bg_keeps_the_expression_as_typed_after_the_options(ip: Any) -> None:
    job = run(ip, "%bg --name n 'x  \"y\"'")
    assert job.command == "'x  \"y\"'"
    assert job.wait(timeout=20) and job.receive() == ['x  "y"']


def test_bg_refuses_an_unknown_option_in_one_line(ip: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from IPython.core.error import UsageError

    result = ip.run_cell("%bg --bogus f()")
    assert isinstance(result.error_in_exec, UsageError)
    err = capsys.readouterr().err
    assert err.startswith("UsageError: %bg: unknown option --bogus; options: --thread, --process, --name NAME")
    assert err.count("\n") == 1
    assert psjobs.get_job() == []


def test_an_expression_that_starts_with_two_minus_signs_is_still_a_job(ip: Any) -> None:
    run(ip, "x = 5")
    assert run(ip, "j = --x &\n%receive j --wait") == [5]  # minus minus x, not an option of %bg
    assert run(ip, "%bg -- --x").receive(wait=True) == [5]  # "--" ends %bg's options


def test_bad_config_value_is_refused(ip: Any, caplog: pytest.LogCaptureFixture) -> None:
    run(ip, "%config PsJobs.kind = 'fiber'")
    assert "expected any of ['process', 'thread']" in caplog.text  # %config logs what it refused
    assert run(ip, "%config PsJobs.kind") == "process"


# --- shell commands --------------------------------------------------------------------------

def test_shell_command_job(ip: Any) -> None:
    run(ip, "word = 'hello'")
    run(ip, "!echo $word world &")
    (job,) = psjobs.get_job()
    assert job.command == "echo hello world"
    assert job.job_type == "BackgroundJob"
    assert job.wait(timeout=20)
    assert job.receive() == ["hello world"]


def test_shell_command_assigned(ip: Any) -> None:
    run(ip, "out = !echo one && echo two &")
    job = ip.user_ns["out"]
    assert isinstance(job, psjobs.Job)
    assert job.wait(timeout=20)
    assert job.receive() == ["one", "two"]


# --- magics ----------------------------------------------------------------------------------

def test_jobs_magic_shows_the_table(ip: Any, capsys: pytest.CaptureFixture[str]) -> None:
    run(ip, "a = 1 + 1 &\nb = 2 + 2 &")
    wait_until(lambda: all(j.state.is_finished for j in psjobs.get_job()), 20, "the jobs to finish")
    capsys.readouterr()
    table = run(ip, "%jobs")
    assert [j.id for j in table] == [j.id for j in psjobs.get_job()]
    out = capsys.readouterr().out
    for header in ("Id", "Name", "PSJobTypeName", "State", "HasMoreData", "Location", "Command"):
        assert header in out
    assert "1 + 1" in out and "2 + 2" in out and "Completed" in out
    assert [j.command for j in run(ip, "%jobs --state Completed")] == ["1 + 1", "2 + 2"]
    assert [j.command for j in run(ip, "%jobs b")] == ["2 + 2"]  # a variable holding a job


def test_receive_keep_and_by_id(ip: Any) -> None:
    job = run(ip, "'kept' &")
    assert job.wait(timeout=20)
    assert run(ip, f"%receive {job.id} --keep") == ["kept"]
    assert run(ip, f"%receive {job.id}") == ["kept"]
    assert run(ip, f"%receive {job.id}") == []


def test_receive_wait(ip: Any) -> None:
    run(ip, "import time")
    run(ip, "slow = (time.sleep(0.2), 'late')[1] &")
    assert run(ip, "%receive slow --wait --timeout 30") == ["late"]


def test_wait_magic_and_its_timeout(ip: Any, capsys: pytest.CaptureFixture[str]) -> None:
    run(ip, "import time")
    job = run(ip, "time.sleep(30) &")
    assert run(ip, f"%wait {job.id} --timeout 0.1") is None
    assert "timed out" in capsys.readouterr().err
    capsys.readouterr()
    run(ip, f"%stop {job.id}")
    assert job.state is psjobs.JobState.STOPPED
    assert capsys.readouterr().out == ""  # no notice for a job the user stopped
    done = run(ip, f"%wait {job.id}")
    assert list(done) == [job]


def test_remove_magic(ip: Any, capsys: pytest.CaptureFixture[str]) -> None:
    run(ip, "import time")
    job = run(ip, "time.sleep(30) &")
    result = ip.run_cell(f"%remove {job.id}")
    assert result.error_in_exec is not None
    assert "not finished" in capsys.readouterr().err  # one line: what is wrong and what to do
    run(ip, f"%remove {job.id} --force")
    assert psjobs.get_job() == []


def test_magics_report_unknown_jobs_in_one_line(ip: Any, capsys: pytest.CaptureFixture[str]) -> None:
    result = ip.run_cell("%receive 999")
    assert result.error_in_exec is not None
    err = capsys.readouterr().err
    assert "UsageError" in err and "999" in err and "Traceback" not in err
    assert ip.run_cell("%receive").error_in_exec is not None
    assert ip.run_cell("%wait 1 --bogus").error_in_exec is not None


@pytest.mark.parametrize("line", ["%wait *", "%wait nomatch*", "%wait nomatch* --timeout 2", "%receive [xyz]*",
                                  "%remove nomatch*"])
def test_a_wildcard_that_matches_no_job_is_one_line(ip: Any, line: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from IPython.core.error import UsageError

    run(ip, "%bg --name other 1")  # a job that the wildcards do not match ("*" aside)
    if line == "%wait *":
        run(ip, "%remove * --force")
    capsys.readouterr()
    result = ip.run_cell(line)
    assert isinstance(result.error_in_exec, UsageError)
    err = capsys.readouterr().err
    asked = line.split()[1]
    assert err == f"UsageError: {line.split()[0]}: no job has a name that matches {asked!r}; %jobs lists them\n"


def test_wildcards_select_top_level_jobs(ip: Any) -> None:
    run(ip, "%bg --name w1 1\n%bg --name w2 2")
    wait_until(lambda: all(j.state.is_finished for j in psjobs.get_job()), 20, "the jobs to finish")
    run(ip, "%remove w*")  # never the child jobs on their own (remove_job would refuse them)
    assert psjobs.get_job() == []


# --- display --------------------------------------------------------------------------------

def test_jobs_render_as_text_and_html(ip: Any) -> None:
    job = run(ip, "'x' &")
    assert job.wait(timeout=20)
    data, _ = ip.display_formatter.format(job)
    assert data["text/plain"] == psjobs.format_table([job])
    assert "<table" in data["text/html"] and "Completed" in data["text/html"]
    data, _ = ip.display_formatter.format(psjobs.get_job())
    assert data["text/plain"].splitlines()[0].split() == ["Id", "Name", "PSJobTypeName", "State",
                                                          "HasMoreData", "Location", "Command"]
    assert data["text/html"].count("<tr>") == 2  # header + one job


def test_a_connected_sessions_job_shows_as_the_table(ip: Any, tmp_path: Path) -> None:
    # psjobs.connect()'s jobs are a Job subclass with a __repr__ of its own: shown as the Get-Job
    # table all the same, not as <Job 1 'digest' Completed localhost>.
    from .clitools import private_home

    with private_home(tmp_path / "home"):
        jobs = psjobs.connect()
        try:
            job = jobs.start_job("echo digested", name="digest")
            assert jobs.wait_job([job], timeout=30)
            data, _ = ip.display_formatter.format(job)
            assert data["text/plain"] == psjobs.format_table([job])
            assert "digest" in data["text/plain"] and "<table" in data["text/html"]
            data, _ = ip.display_formatter.format(jobs.get_job())
            assert data["text/plain"] == psjobs.format_table([job])
        finally:
            jobs.close()


def test_html_escapes_commands(session: psjobs.Session) -> None:
    job = session.start_thread_job(lambda: None, name="<b>")
    job.wait(timeout=10)
    assert "&lt;b&gt;" in render_html([job]) and "<b>" not in render_html([job])


def test_rich_table(session: psjobs.Session) -> None:
    pytest.importorskip("rich")
    job = session.start_thread_job(lambda: None, name="richjob")
    job.wait(timeout=10)
    plain = render_rich([job], width=120, color=False)
    assert "\x1b[" not in plain
    assert "richjob" in plain and "Completed" in plain and "PSJobTypeName" in plain
    assert "\x1b[" in render_rich([job], width=120, color=True)


def test_rich_table_shows_commands_and_names_as_typed(ip: Any) -> None:
    # Brackets in a command or a name are the user's text, not rich markup: "[/]" closed no tag
    # (an error on every later %jobs) and "[bold]hello[/bold]" was drawn as "hello".
    pytest.importorskip("rich")
    run(ip, "j = !sed 's/[/]//' /dev/null &\nk = '[bold]hello[/bold]' &\n%bg --thread --name [red]x 1")
    jobs = psjobs.get_job()
    wait_until(lambda: all(j.state.is_finished for j in jobs), 20, "the jobs to finish")
    for color in (False, True):
        shown = render_rich(jobs, width=150, color=color)
        assert "sed 's/[/]//' /dev/null" in shown and "'[bold]hello[/bold]'" in shown and "[red]x" in shown


# --- announcements -------------------------------------------------------------------------

def test_done_is_announced_once(ip: Any, capsys: pytest.CaptureFixture[str]) -> None:
    run(ip, "x = 1 / 0 &\ny = 'fine' &")
    jobs = [ip.user_ns["x"], ip.user_ns["y"]]
    wait_until(lambda: all(j.state.is_finished for j in jobs), 20, "the jobs to finish")
    capsys.readouterr()
    run(ip, "pass")
    out = capsys.readouterr().out
    assert f"[{jobs[0].id}] Failed" in out and "ZeroDivisionError" in out and "1 / 0" in out
    assert f"[{jobs[1].id}] Completed" in out and "'fine'" in out
    run(ip, "pass")
    assert capsys.readouterr().out == ""  # never twice


def test_a_job_waiting_for_input_is_announced_once(ip: Any, capsys: pytest.CaptureFixture[str]) -> None:
    job = run(ip, "input('Name? ') &")
    wait_until(lambda: job.state is psjobs.JobState.BLOCKED, 20, "the job to ask for input")
    capsys.readouterr()
    run(ip, "pass")
    assert capsys.readouterr().out == f"[{job.id}] Blocked  input('Name? ')  (waits for input 'Name?': " \
                                      f"%receive {job.id} to answer)\n"
    run(ip, "pass")
    assert capsys.readouterr().out == ""
    job.send_input("Ada")
    assert job.wait(timeout=20)
    run(ip, "pass")
    assert f"[{job.id}] Completed" in capsys.readouterr().out
    assert job.receive() == ["Ada"]


def test_jobs_the_user_waited_for_are_not_announced(ip: Any, capsys: pytest.CaptureFixture[str]) -> None:
    run(ip, "x = 2 + 3 &")
    run(ip, "%receive x --wait")
    capsys.readouterr()
    run(ip, "pass")
    assert "Completed" not in capsys.readouterr().out


@pytest.mark.parametrize("start", ["%bg --name nn 1 + 1", "%%bg --name nn\nx = 1\nx + 1"])
def test_jobs_received_by_name_are_not_announced(ip: Any, start: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    job = run(ip, start)
    capsys.readouterr()
    assert run(ip, "%receive nn --wait") == [2]
    run(ip, "pass")
    assert f"[{job.id}] Completed" not in capsys.readouterr().out  # neither after %receive nor later


def test_jobs_started_by_code_and_left_running_are_announced(ip: Any, session: psjobs.Session,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    run(ip, "import psjobs, time")
    run(ip, "fg = psjobs.start_thread_job(lambda: 1); fg.wait()")  # waited for in its own cell
    run(ip, "bgj = psjobs.start_thread_job(time.sleep, 0.3)")     # left running
    job = ip.user_ns["bgj"]
    wait_until(lambda: job.state.is_finished, 20, "the job to finish")
    capsys.readouterr()
    run(ip, "pass")
    out = capsys.readouterr().out
    assert f"[{job.id}] Completed" in out
    assert f"[{ip.user_ns['fg'].id}]" not in out


def test_jobs_listed_as_done_are_not_announced_again(ip: Any, capsys: pytest.CaptureFixture[str]) -> None:
    job = run(ip, "'listed' &")
    assert job.wait(timeout=20)
    capsys.readouterr()
    run(ip, "%jobs")  # shows it Completed, as a shell's `jobs` shows Done
    assert "Completed" in capsys.readouterr().out
    run(ip, "pass")
    assert capsys.readouterr().out == ""


def test_removed_jobs_are_not_announced(ip: Any, capsys: pytest.CaptureFixture[str]) -> None:
    run(ip, "import time")
    job = run(ip, "time.sleep(30) &")
    run(ip, f"%remove {job.id} --force")
    capsys.readouterr()
    run(ip, "pass")
    assert capsys.readouterr().out == ""


def _interrupt_when_waiting_in(magic: str) -> threading.Thread:
    """SIGINT this process once its main thread waits inside the magic ``magic`` (Ctrl+C)."""
    main = threading.main_thread().ident

    def waiting() -> bool:
        frame = sys._current_frames().get(main or 0)
        while frame is not None:
            if frame.f_code.co_name == magic and frame.f_code.co_filename.endswith("_magics.py"):
                return True
            frame = frame.f_back
        return False

    def send() -> None:
        wait_until(waiting, 20, f"%{magic} to wait")
        os.kill(os.getpid(), signal.SIGINT)

    sender = threading.Thread(target=send)
    sender.start()
    return sender


@pytest.mark.parametrize("line", ["%wait {id}", "%receive {id} --wait"])
def test_ctrl_c_in_a_waiting_magic_stops_the_waiting_not_the_job(ip: Any, line: str,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """docs/ipython.md: Ctrl+C in %wait or %receive --wait stops the waiting with one line; the
    job goes on."""
    gate = threading.Event()
    ip.user_ns["gate"] = gate
    job = run(ip, "%bg --thread gate.wait(60)")
    try:
        sender = _interrupt_when_waiting_in(line.split()[0][1:])
        run(ip, line.format(id=job.id))
        sender.join(30)
        err = capsys.readouterr().err
        assert f"{line.split()[0]}: interrupted; the jobs go on" in err and err.count("\n") == 1
        assert job.state is psjobs.JobState.RUNNING
    finally:
        gate.set()
    assert job.wait(timeout=20) and job.state is psjobs.JobState.COMPLETED


def test_announcements_can_be_turned_off(ip: Any, capsys: pytest.CaptureFixture[str]) -> None:
    run(ip, "%config PsJobs.announce = False")
    job = run(ip, "1 &")
    assert job.wait(timeout=20)
    capsys.readouterr()
    run(ip, "pass")
    assert capsys.readouterr().out == ""


def test_many_jobs_are_summed_up(session: psjobs.Session) -> None:
    jobs = [session.start_thread_job(lambda: None) for _ in range(7)]
    jobs.append(session.start_thread_job(lambda: 1 / 0))
    session.wait_job(jobs, timeout=20)
    text = announcement(jobs, max_lines=5)
    assert text.count("\n") == 0
    assert "8 jobs done" in text and "7 Completed" in text and "1 Failed" in text


def test_more_than_five_finished_jobs_are_announced_in_one_line(ip: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """docs/ipython.md: more than five finished jobs at once become one line, `[first-last] N jobs
    done: ... (%jobs lists them)`, with the extension's own default."""
    # One cell starts them all: a job started by an earlier cell of the test, and done by the time
    # a later one ended, would be announced then, on its own, before the summary this test reads.
    run(ip, "\n".join([f"j{n} = {n} &" for n in range(5)] + ["j5 = 1 / 0 &"]))
    jobs = [ip.user_ns[f"j{n}"] for n in range(6)]
    wait_until(lambda: all(j.state.is_finished for j in jobs), 20, "the jobs to finish")
    capsys.readouterr()
    run(ip, "pass")
    assert capsys.readouterr().out == (f"[{jobs[0].id}-{jobs[-1].id}] 6 jobs done: 5 Completed, 1 Failed "
                                       f"(%jobs lists them)\n")


# --- loading ---------------------------------------------------------------------------------

def test_load_under_both_names_is_one_extension_and_unload_takes_it_out(ip: Any) -> None:
    run(ip, "%load_ext psjobs.ipython")  # the same extension under its other name: no second copy
    assert ip.input_transformer_manager.token_transformers.count(BackgroundOperator) == 1
    run(ip, "%unload_ext psjobs")
    assert BackgroundOperator not in ip.input_transformer_manager.token_transformers
    assert "jobs" not in ip.magics_manager.magics["line"]
    result = ip.run_cell("x = 2 + 3 &")
    assert isinstance(result.error_before_exec, SyntaxError)
    run(ip, "%load_ext psjobs")  # back, for the fixture's unload
    assert "jobs" in ip.magics_manager.magics["line"]


def test_import_psjobs_does_not_import_ipython() -> None:
    code = "import sys, psjobs; print('IPython' in sys.modules, hasattr(psjobs, 'load_ipython_extension'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                         env={**os.environ, "PYTHONPATH": SRC}, check=True).stdout
    assert out.split() == ["False", "True"]


# --- a real terminal -------------------------------------------------------------------------

def _tmux() -> str | None:
    found = shutil.which("tmux")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        # Bounded well under the 60 s test timeout: a slow mirror means a skip, not a hang.
        try:
            subprocess.run(["apt-get", "install", "-y", "-qq", "tmux"], capture_output=True, timeout=40,
                           env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        except subprocess.TimeoutExpired:
            return None
    return shutil.which("tmux")


def test_terminal_session_with_tmux(tmp_path: Path) -> None:
    tmux = _tmux()
    if tmux is None:
        pytest.skip("tmux is not installed and `apt-get install tmux` failed or is not possible here "
                    "(not root, no apt-get, or no package mirror within 40 s)")
    sock = str(tmp_path / "tmux.sock")
    env = {**os.environ, "PYTHONPATH": SRC, "IPYTHONDIR": str(tmp_path / "ipython"), "TERM": "xterm"}
    shell_cmd = (f"{sys.executable} -c 'import sys, psjobs.ipython; "
                 f"sys.exit(psjobs.ipython.start_shell([\"--no-banner\", \"--colors=NoColor\"]))'")
    base = [tmux, "-S", sock]
    subprocess.run([*base, "new-session", "-d", "-x", "150", "-y", "40", "-s", "t", shell_cmd],
                   env=env, check=True, timeout=30)

    def screen() -> str:
        return subprocess.run([*base, "capture-pane", "-p", "-t", "t", "-S", "-100"], capture_output=True,
                              text=True, timeout=10).stdout

    def send(text: str) -> None:
        subprocess.run([*base, "send-keys", "-t", "t", "-l", text], check=True, timeout=10)
        subprocess.run([*base, "send-keys", "-t", "t", "Enter"], check=True, timeout=10)

    marker = uuid.uuid4().hex[:6]
    try:
        wait_until(lambda: "In [1]:" in screen(), 30, "the IPython prompt")
        send("x = 2 + 3 &")
        wait_until(lambda: "In [2]:" in screen(), 20, "the next prompt")
        send("%receive x --wait")
        wait_until(lambda: "Out[2]: [5]" in screen(), 20, "the job's output [5] on the screen")
        send(f"'{marker}' &")  # a bare job shows its Get-Job row
        wait_until(lambda: "BackgroundJob" in screen() and f"'{marker}'" in screen(), 20, "the job's row")
        send("pass")
        wait_until(lambda: f"Completed  '{marker}'" in screen(), 20, "the Done announcement")
        send("exit")
        wait_until(lambda: subprocess.run([*base, "has-session", "-t", "t"], capture_output=True,
                                          timeout=10).returncode != 0, 30, "the shell to exit")
    except AssertionError:
        print(screen())
        raise
    finally:
        subprocess.run([*base, "kill-server"], capture_output=True, timeout=10)


def test_suspend_and_resume_magics(ip: Any, session: psjobs.Session) -> None:
    run(ip, "j = !sleep 30 &")
    job = ip.user_ns["j"]
    wait_until(lambda: job.child_jobs[0].state is psjobs.JobState.RUNNING, what="the command")
    ip.run_line_magic("suspend", "j")
    assert job.state is psjobs.JobState.SUSPENDED
    ip.run_line_magic("resume", str(job.id))
    assert job.state is psjobs.JobState.RUNNING
    ip.run_line_magic("stop", "j")
    assert job.state is psjobs.JobState.STOPPED


def test_a_job_that_ends_within_its_own_cell_is_announced_after_the_next(ip: Any,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """As a shell says "Done" at a later prompt, never in the output of the `&` line itself: where the
    notice appears does not depend on how fast the job was (docs/ipython.md's sessions rely on it)."""
    run(ip, "import psjobs")
    # The cell itself waits until its job is over, without waiting *for* it through psjobs.
    run(ip, "quick = 'fast' &\nwhile not quick.state.is_finished: pass")
    job = ip.user_ns["quick"]
    assert "Completed" not in capsys.readouterr().out
    run(ip, "pass")
    assert f"[{job.id}] Completed" in capsys.readouterr().out
