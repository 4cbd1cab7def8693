"""The psjobs command against a real session host in a temporary PSJOBS_HOME."""

from __future__ import annotations

import importlib.util
import json
import re
import stat
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

import psjobs
from psjobs._cli import ALIASES, EXIT_CODES, build_parser, main

from .clitools import ok, private_home, run, subprocess_env
from .conftest import wait_until

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with private_home(tmp_path_factory.mktemp("cli")) as h:
        yield h


def start(*args: str) -> int:
    return int(ok("start", "-q", *args).strip())


def rows(*args: str) -> list[dict[str, object]]:
    return json.loads(ok("get", "--json", *args))  # type: ignore[no-any-return]


def state(job: int) -> object:
    return rows(str(job))[0]["state"]


# --- help -------------------------------------------------------------------------------------

def _subcommands() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, type(parser._subparsers._group_actions[0])))  # type: ignore[union-attr]
    return sorted(set(action.choices))  # type: ignore[arg-type]


@pytest.mark.parametrize("command", [[], *[[c] for c in _subcommands()]])
def test_every_help_ends_with_an_example(command: list[str]) -> None:
    code, out, _ = run(*command, "--help")
    assert code == 0
    last = out.rstrip().splitlines()[-2:]
    assert last[0] == "Example:", out
    assert last[1].strip().startswith("psjobs "), out


POWERSHELL = {"start": "Start-Job", "get": "Get-Job", "receive": "Receive-Job", "wait": "Wait-Job",
              "stop": "Stop-Job", "remove": "Remove-Job", "suspend": "Suspend-Job", "resume": "Resume-Job",
              "invoke": "Invoke-Command"}


@pytest.mark.parametrize(("verb", "cmdlet"), sorted(POWERSHELL.items()))
def test_every_powershell_name_is_its_verb_in_any_case(verb: str, cmdlet: str) -> None:
    assert ALIASES[verb] == cmdlet
    code, usage, _ = run(verb, "--help")
    assert code == 0
    for name in (cmdlet, cmdlet.lower(), cmdlet.upper()):
        assert run(name, "--help") == (0, usage, ""), f"psjobs {name} is not psjobs {verb}"


def test_every_verb_has_its_powershell_alias_in_any_case(home: Path) -> None:
    assert ALIASES == POWERSHELL  # every verb PowerShell has a cmdlet for; the others have no alias
    job = int(ok("START-JOB", "-q", "--", "echo", "via alias").strip())
    assert ok("wait-job", str(job), "--json")
    assert ok("Receive-Job", str(job)) == "via alias\n"
    assert "Completed" in ok("get-JOB", str(job))
    ok("Remove-Job", str(job))
    nap = int(ok("Start-Job", "-q", "-n", "nap", "--", "sleep", "300").strip())
    assert re.search(r"nap\s+BackgroundJob\s+Suspended", ok("Suspend-Job", "nap"))
    assert re.search(r"nap\s+BackgroundJob\s+Running", ok("resume-job", "nap"))
    assert re.search(r"nap\s+BackgroundJob\s+Stopped", ok("STOP-JOB", str(nap)))
    ok("Remove-Job", "nap")


def test_exit_codes_are_distinct_and_documented() -> None:
    assert sorted(EXIT_CODES) == [0, 1, 2, 3, 4, 5, 6]
    _, out, _ = run("--help")
    for code in EXIT_CODES:
        assert re.search(rf"^\s+{code}\s+\w", out, re.M), f"exit status {code} is not in --help"


# --- round trips ------------------------------------------------------------------------------

def test_start_prints_the_row_and_get_shows_the_table(home: Path) -> None:
    out = ok("start", "-n", "table-demo", "--", "echo hi")
    assert out.splitlines()[0].split() == ["Id", "Name", "PSJobTypeName", "State", "HasMoreData", "Location",
                                           "Command"]
    assert "table-demo" in out and "BackgroundJob" in out
    ok("wait", "table-demo")
    table = ok("get", "table-demo")
    assert re.search(r"table-demo\s+BackgroundJob\s+Completed\s+True\s+localhost\s+echo hi", table), table
    ok("receive", "table-demo")
    assert "Completed  False" in ok("get", "table-demo")
    ok("remove", "table-demo")


def test_receive_writes_output_to_stdout_and_errors_to_stderr_in_order(home: Path) -> None:
    job = start("--", "echo one; echo two >&2; echo three; echo four >&2")
    ok("wait", str(job))
    proc = subprocess.run([sys.executable, "-m", "psjobs", "receive", str(job), "--keep"],
                          capture_output=True, text=True, check=True)
    assert proc.stdout == "one\nthree\n"
    assert proc.stderr == "two\nfour\n"
    # The order the records were stored in (two pipes of a job have no order between them until
    # psjobs reads them) is the order a terminal, or `2>&1`, shows them.
    stored = [json.loads(x) for x in ok("receive", str(job), "--keep", "--json").splitlines()]
    both = subprocess.run(f"{sys.executable} -m psjobs receive {job} 2>&1", shell=True, capture_output=True,
                          text=True, check=True)
    assert both.stdout == "".join(f"{x.get('value', x.get('message'))}\n" for x in stored)
    assert ok("receive", str(job)) == ""  # the subprocess consumed them
    ok("remove", str(job))


def test_receive_partial_results_then_the_rest_nothing_twice(home: Path, tmp_path: Path) -> None:
    flag = tmp_path / "go"
    job = start("--", f"echo first; while [ ! -e {flag} ]; do sleep 0.01; done; echo second")
    wait_until(lambda: ok("receive", str(job), "--keep") == "first\n", what="the first line")
    assert ok("receive", str(job)) == "first\n"
    assert state(job) == "Running"
    assert ok("receive", str(job)) == ""
    flag.touch()
    assert ok("receive", str(job), "--wait") == "second\n"
    assert state(job) == "Completed"
    assert ok("receive", str(job), "--keep") == ""
    ok("remove", str(job))


def test_receive_wait_auto_remove(home: Path) -> None:
    job = start("--", "seq 1 3")
    assert ok("receive", str(job), "--wait", "--auto-remove") == "1\n2\n3\n"
    assert run("get", str(job))[0] == 3


def test_thread_jobs_run_in_the_clients_directory(home: Path, tmp_path: Path) -> None:
    out = ok("start", "--thread", "--json", "-C", str(tmp_path), "--", "pwd")
    row = json.loads(out)
    assert row["job_type"] == "ThreadJob"
    assert ok("receive", str(row["id"]), "--wait") == f"{tmp_path}\n"


def test_process_jobs_get_the_clients_environment_and_directory(home: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PSJOBS_TEST_VALUE", "from the client")
    monkeypatch.chdir(tmp_path)
    job = start("--", 'echo "$PSJOBS_TEST_VALUE"; pwd')
    assert ok("receive", str(job), "--wait") == f"from the client\n{tmp_path}\n"


def test_a_job_gets_the_umask_of_the_shell_that_started_it(tmp_path: Path) -> None:
    with private_home(tmp_path / "h") as h:
        env = subprocess_env(PSJOBS_HOME=str(h))

        def psjobs(*args: str, umask: int) -> str:
            done = subprocess.run([sys.executable, "-m", "psjobs", *args], capture_output=True, text=True, env=env,
                                  cwd=tmp_path, umask=umask, timeout=60)
            assert done.returncode == 0, done.stderr
            return done.stdout

        psjobs("host", "start", umask=0o022)  # the host's own umask lets others read
        # A private file made by a job started from a private shell stays private, from a thread
        # job's command too; a lax shell gets its lax mode.
        psjobs("start", "-q", "--", "touch private", umask=0o077)
        psjobs("start", "-q", "--thread", "--", "touch", "thread", umask=0o077)
        psjobs("start", "-q", "--", "touch", "shared", umask=0o002)
        psjobs("wait", "*", umask=0o077)
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir() if p.is_file()}
        assert modes == {"private": 0o600, "thread": 0o600, "shared": 0o664}


def test_receive_writes_what_a_command_printed_byte_for_byte(home: Path) -> None:
    # Bytes that are not UTF-8 (\377, \376), and UTF-8 that is (é), on both streams.
    job = start("--", r"printf 'a\377b \303\251\n'; printf 'e\376r\n' >&2")
    ok("wait", str(job))
    shown = subprocess.run([sys.executable, "-m", "psjobs", "receive", str(job), "--keep"], capture_output=True,
                           env=subprocess_env(), timeout=60)
    assert (shown.returncode, shown.stdout, shown.stderr) == (0, b"a\xffb \xc3\xa9\n", b"e\xfer\n")
    # --json is Unicode text for JSON readers: what is not UTF-8 there is U+FFFD, as in Python.
    lines = [json.loads(x) for x in ok("receive", str(job), "--keep", "--json").splitlines()]
    assert [(x["stream"], x.get("value", x.get("message"))) for x in lines] == [
        ("Output", "a\ufffdb \u00e9"), ("Error", "e\ufffdr")]
    with psjobs.connect() as jobs:
        assert jobs.receive_job(job) == ["a\ufffdb \u00e9"]
        assert [str(e) for e in jobs.get_job(job)[0].error] == ["e\ufffdr"]


def test_names_that_are_not_utf8_are_listed_not_a_traceback(home: Path) -> None:
    # A name from a shell argument that is not UTF-8 ("\udcff": the byte \377) is written as that
    # byte; one no byte stands for ("\ud800", only connect() can give it) as its escape.
    with psjobs.connect() as jobs:
        for name in ("\udcff", "\ud800"):
            assert jobs.start_job("true", name=name).wait(30)
    for verb in (["get"], ["wait", "*"]):
        shown = subprocess.run([sys.executable, "-m", "psjobs", *verb], capture_output=True,
                               env=subprocess_env(), timeout=60)
        assert shown.returncode == 0 and shown.stderr == b"", shown.stderr
        assert b" \xff " in shown.stdout and b" \\ud800 " in shown.stdout


def test_argv_commands_run_without_a_shell(home: Path) -> None:
    job = start("--", "echo", "$HOME", "a;b")
    assert ok("receive", str(job), "--wait") == "$HOME a;b\n"


def test_json_everywhere(home: Path) -> None:
    row = json.loads(ok("start", "--json", "-n", "json-demo", "--", "echo x; echo y >&2"))
    # start shows the job as it is when it returns: two echos can be Completed by then, never
    # Failed or Stopped.
    assert row["name"] == "json-demo" and row["state"] in ("NotStarted", "Running", "Completed")
    done = json.loads(ok("wait", "--json", "json-demo"))
    assert [d["state"] for d in done] == ["Completed"]
    lines = [json.loads(x) for x in ok("receive", "--json", "json-demo").splitlines()]
    got = [(x["stream"], x.get("value", x.get("message"))) for x in lines]
    assert got == [("Output", "x"), ("Error", "y")]
    assert json.loads(ok("remove", "--json", "json-demo")) == {"removed": [row["id"]]}
    status = json.loads(ok("host", "status", "--json"))
    assert status["running"] is True and status["pid"] > 0


def test_get_filters(home: Path) -> None:
    a = start("-n", "filt-a", "--", "true")
    b = start("-n", "filt-b", "--", "exit 1")
    assert run("wait", str(a), str(b))[0] == 5  # one of them failed
    assert [r["id"] for r in rows("filt-*")] == [a, b]
    assert [r["id"] for r in rows("filt-*", "--state", "Failed")] == [b]
    assert [r["id"] for r in rows("filt-*", "--newest", "1")] == [b]
    kids = rows(str(a), "--children")
    assert [r["id"] for r in kids] == [a, a + 1] and kids[1]["parent_id"] == a
    assert rows("no-such-*") == []
    ok("remove", "filt-*")


def test_stop_then_remove(home: Path) -> None:
    job = start("-n", "stoppable", "--", "sleep 300")
    out = ok("stop", "stoppable")
    assert re.search(r"stoppable\s+BackgroundJob\s+Stopped", out), out
    ok("remove", str(job))
    assert run("get", str(job))[0] == 3


# --- exit codes --------------------------------------------------------------------------------

def test_exit_code_usage(home: Path) -> None:
    assert run("get", "--no-such-option")[0] == 2
    assert run("start")[0] == 2
    assert run("wait")[0] == 2
    assert run("start", "-C", "/no/such/directory", "--", "true")[0] == 2
    assert run()[0] == 2


def test_exit_code_not_found(home: Path) -> None:
    code, _, err = run("receive", "999999")
    assert code == 3 and "999999" in err
    assert run("get", "nobody-has-this-name")[0] == 3


def test_exit_code_not_finished(home: Path) -> None:
    job = start("--", "sleep 300")
    code, _, err = run("remove", str(job))
    assert code == 4 and "not finished" in err and f"psjobs stop {job}" in err
    ok("remove", "--force", str(job))


def test_exit_code_failed_job_reports_its_reason_every_time(home: Path) -> None:
    job = start("-n", "failing", "--", "echo partial; exit 3")
    code, out, err = run("wait", str(job))
    assert code == 5 and "Failed" in out
    for _ in range(2):
        code, out, err = run("receive", str(job))
        assert code == 5
        assert "failed: ExitStatusError: the command exited with status 3" in err
    assert out == ""  # the output was received by the first receive
    ok("remove", str(job))


def test_exit_code_timeout(home: Path) -> None:
    job = start("--", "sleep 300")
    code, out, err = run("wait", str(job), "--timeout", "0.1")
    assert code == 6 and out == "" and "timed out" in err
    code, _, _ = run("receive", str(job), "--wait", "--timeout", "0.1")
    assert code == 6
    assert state(job) == "Running"  # a timeout leaves the job going
    ok("remove", "--force", str(job))


def test_receive_wait_timeout_names_the_jobs_still_going_and_what_next(home: Path) -> None:
    job = start("-n", "slowpoke", "--", "echo early; sleep 300")
    code, out, err = run("receive", str(job), "--wait", "--timeout", "0.5")
    assert (code, out) == (6, "early\n")
    assert err == (f"psjobs: receive: timed out after 0.5s; still going: Job {job} 'slowpoke' (Running); receive "
                   f"the rest with `psjobs receive {job} --wait`, or stop them with `psjobs stop {job}`\n")
    # A suspended job goes nowhere until it is resumed: --wait ends there, as Receive-Job -Wait does.
    ok("suspend", str(job))
    assert run("receive", str(job), "--wait") == (0, "", "")
    ok("remove", "--force", str(job))


def test_a_stop_that_a_process_outlives_says_why_and_what_next(home: Path) -> None:
    # Once a thread job has run in the host (it routes warnings of job code), the host's own
    # warnings still reach the command.
    assert ok("receive", str(start("--thread", "--", "echo", "threaded")), "--wait") == "threaded\n"
    job = start("-n", "escaper", "--", "setsid sleep 300 & echo $!")  # sleep leaves the job's process group
    wait_until(lambda: ok("receive", str(job), "--keep"), what="the escaped process's pid")
    escaped = psutil.Process(int(ok("receive", str(job), "--keep")))
    assert escaped.name() == "sleep"
    try:
        code, out, err = run("stop", str(job))
        assert code == 0 and re.search(r"escaper\s+BackgroundJob\s+Stopping", out), out
        assert err.startswith(f"WARNING: stop: Job {job} 'escaper' (Stopping) did not stop within "), err
        assert "a process it started left its process group" in err
        assert err.endswith(f"`psjobs get {job} --json` shows its status_message; remove it later with "
                            f"`psjobs remove --force {job}`\n"), err
        assert "stop_job" not in err and "remove_job" not in err
        assert "left its process group" in str(rows(str(job))[0]["status_message"])
    finally:
        escaped.kill()
    wait_until(lambda: state(job) == "Stopped", timeout=30, what="the job to end once its last process did")
    ok("remove", str(job))


def test_exit_code_ok_for_a_wait_with_any(home: Path) -> None:
    slow = start("--", "sleep 300")
    fast = start("--", "true")
    done = json.loads(ok("wait", "--any", "--json", str(slow), str(fast)))
    assert [d["id"] for d in done] == [fast]
    ok("remove", "--force", str(slow), str(fast))


def test_a_state_directory_under_no_users_home_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PSJOBS_HOME", "~psjobs-no-such-user/x")
    code, out, err = run("get", "--json")
    error = json.loads(out)["error"]  # an error object for the script, not a traceback
    assert (code, error["type"], error["exit_code"], err) == (1, "HostError", 1, "")
    assert "PSJOBS_HOME is '~psjobs-no-such-user/x'" in error["message"]
    assert "no user 'psjobs-no-such-user'" in error["message"] and "set PSJOBS_HOME" in error["message"]
    code, out, err = run("get")
    assert (code, out) == (1, "")
    assert err == f"psjobs: {error['message']}\n"


@pytest.mark.skipif(importlib.util.find_spec("psjobs.backends.ssh._backend") is not None,
                    reason="the SSH backend is here")
def test_invoke_without_the_ssh_backend_says_what_to_install(home: Path) -> None:
    code, _, err = run("invoke", "-c", "127.0.0.1", "--", "true")
    assert code == 1 and "pip install 'psjobs[ssh]'" in err


# --- shell and tour ------------------------------------------------------------------------------

def test_shell_calls_start_shell_with_its_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    fake = types.ModuleType("psjobs.ipython")
    fake.start_shell = lambda argv: seen.append(argv) or 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "psjobs.ipython", fake)
    assert main(["shell", "--no-banner"]) == 0
    assert seen == [["--no-banner"]]


def test_shell_without_ipython_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psjobs.ipython", None)  # the import fails
    code, _, err = run("shell")
    assert code == 2 and "pip install 'psjobs[ipython]'" in err


def test_tour_runs_real_commands_and_leaves_nothing(tmp_path: Path) -> None:
    env = subprocess_env(PSJOBS_HOME=str(tmp_path / "untouched"), TMPDIR=str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "psjobs", "tour"], capture_output=True, text=True, env=env,
                          timeout=55)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for expected in ("$ psjobs start -n count", "$ psjobs get", "[exit status 6]", "line 1",
                     "[exit status 5]", "failed: ExitStatusError", "Stopped", "psjobs host: stopped"):
        assert expected in out + proc.stderr, f"{expected!r} not in the tour"
    assert not (tmp_path / "untouched").exists()  # the user's own state was never touched
    assert [p.name for p in tmp_path.iterdir()] == ["untouched"] or not list(tmp_path.iterdir())
