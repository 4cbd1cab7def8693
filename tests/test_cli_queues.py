"""Queues through the `psjobs` command (issue 15): groups, --after, --delay, --retries, restart,
suspend/resume, remove --state and wildcards, get's filters, the completion hook, and computer
names on a fan-out's output. Each runs the real command against a real session host."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .clitools import ok, private_home, run
from .conftest import wait_until


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with private_home(tmp_path_factory.mktemp("cliq")) as h:
        yield h


def start(*args: str) -> int:
    return int(ok("start", "-q", *args).strip())


def row(job: int) -> dict[str, Any]:
    rows: list[dict[str, Any]] = json.loads(ok("get", "--json", str(job)))
    return rows[0]


def test_a_group_of_parallel_2_never_runs_3(home: Path, tmp_path: Path) -> None:
    ok("group", "add", "two", "--parallel", "2")
    script = f'touch {tmp_path}/$$; ls {tmp_path} | wc -l; sleep 0.3; rm {tmp_path}/$$'
    jobs = [start("-g", "two", "--", script) for _ in range(5)]
    waiting = [row(j) for j in jobs if row(j)["state"] == "NotStarted"]
    assert any("slot in group 'two'" in r["status_message"] for r in waiting), waiting
    ok("wait", "--timeout", "60", *map(str, jobs))
    seen = [int(line) for j in jobs for line in ok("receive", str(j)).split()]
    assert len(seen) == 5 and max(seen) <= 2, seen
    listed = ok("group", "list")
    assert listed.splitlines()[0].split() == ["Group", "Parallel", "Running", "Waiting", "Status"]
    assert "two" in listed
    assert json.loads(ok("group", "list", "--json"))[0]["parallel"] == 2
    code, _, err = run("group", "add", "two")
    assert code == 2 and "group set two" in err
    ok("remove", *map(str, jobs))


def test_pause_and_resume_a_group(home: Path) -> None:
    ok("group", "add", "nightly", "-p", "3")
    ok("group", "pause", "nightly")
    job = start("-g", "nightly", "--", "echo resumed")
    code, _, _ = run("wait", "--timeout", "0.3", str(job))
    assert code == 6 and row(job)["state"] == "NotStarted"
    assert "is paused" in row(job)["status_message"]
    assert json.loads(ok("group", "list", "--json"))[-1]["paused"] in (True, False)
    ok("group", "resume", "nightly")
    ok("wait", "--timeout", "30", str(job))
    assert ok("receive", str(job)) == "resumed\n"
    code, _, err = run("start", "-g", "nope", "--", "true")
    assert code == 2 and "no group 'nope'" in err


def test_group_refusals_name_the_group_and_the_command_to_run(home: Path) -> None:
    before = ok("get", "--json")
    for args, said in [
        (("group", "pause", "nosuch"), "group pause: there is no group 'nosuch'; make it first with "
                                       "`psjobs group add nosuch --parallel N`"),
        (("group", "resume", "nosuch"), "group resume: there is no group 'nosuch'; make it first with "
                                        "`psjobs group add nosuch --parallel N`"),
        (("group", "add", "zero", "--parallel", "0"), "group add: --parallel must be a whole number from 1 to "
                                                      "1000000, not 0"),
        (("start", "-g", "undefined", "--", "true"), "start: there is no group 'undefined'; make it first with "
                                                     "`psjobs group add undefined --parallel N`"),
        (("start", "--retries", "-1", "--", "true"), "start: --retries must be a whole number"),
    ]:
        code, out, err = run(*args)
        assert (code, out) == (2, ""), err
        assert err.startswith(f"psjobs: {said}"), err
        assert "configure_group" not in err and "start_job" not in err and "_group" not in err, err
    assert ok("get", "--json") == before  # no job was made by any of them


def test_after_a_failed_job_its_dependent_fails_without_running(home: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    first = start("--", "sleep 0.3; exit 4")
    second = start("--after", str(first), "--", f"touch {marker}")
    assert row(second)["state"] == "NotStarted"
    assert f"waiting for Job {first}" in row(second)["status_message"]
    code, _, _ = run("wait", "--timeout", "30", str(first), str(second))
    assert code == 5
    failed = row(second)
    assert failed["state"] == "Failed" and f"runs after Job {first}" in failed["reason"]
    assert f"psjobs restart {second}" in failed["reason"]
    assert not marker.exists()
    ok_first = start("--", "echo a")
    then = start("-a", f"{ok_first}", "--", "echo b")
    ok("wait", "--timeout", "30", str(then))
    assert ok("receive", str(then)) == "b\n"


def test_retries_delay_and_restart(home: Path) -> None:
    job = start("--retries", "2", "--", "echo try; exit 1")
    code, _, _ = run("wait", "--timeout", "30", str(job))
    assert code == 5
    assert row(job)["attempts"] == 3
    code, out, err = run("receive", str(job))
    assert out == "try\ntry\ntry\n"
    assert err.count("running it again") == 2
    late = start("--delay", "0.5", "--", "echo late")
    assert row(late)["state"] == "NotStarted" and row(late)["status_message"].endswith("(delay)")
    ok("wait", "--timeout", "30", str(late))
    again = json.loads(ok("restart", "--json", str(late)))[0]
    assert again["id"] > late and again["command"] == "echo late"
    ok("wait", "--timeout", "30", str(again["id"]))
    assert ok("receive", str(again["id"])) == "late\n"
    code, _, err = run("start", "--retries", "-1", "--", "true")
    assert code == 2 and "retries" in err


def test_a_delay_is_finite_seconds_in_range_or_no_job_is_made(home: Path) -> None:
    before = json.loads(ok("get", "--json"))
    for delay, says in [("inf", "finite seconds >= 0"), ("nan", "finite seconds >= 0"),  # inf started at once
                        ("-1", "finite seconds >= 0"), ("soon", "not a number of seconds"),
                        ("1e12", "after 9998-12-31"), ("1e300", "after 9998-12-31")]:
        for verb in (["start"], ["invoke", "-c", "web1"]):
            code, _, err = run(*verb, "--delay", delay, "--", "true")
            assert code == 2 and "--delay" in err and says in err, (delay, err)
            assert "timeout" not in err
    assert json.loads(ok("get", "--json")) == before


def test_suspend_and_resume(home: Path) -> None:
    job = start("--", "sleep 30")
    wait_until(lambda: row(job)["state"] == "Running", what="the job to run")
    assert "Suspended" in ok("suspend", str(job))
    assert row(job)["state"] == "Suspended"
    ok("resume", str(job))
    assert row(job)["state"] == "Running"
    ok("stop", str(job))
    ok("remove", str(job))


def test_get_filters_like_the_library(home: Path) -> None:
    a = start("-n", "fq-make", "--", "echo make all")
    b = start("-n", "fq-test", "--", "echo run tests")
    ok("wait", "--timeout", "30", str(a), str(b))
    by_command = json.loads(ok("get", "--json", "--command", "*MAKE*"))
    assert [r["id"] for r in by_command] == [a]
    assert [r["id"] for r in json.loads(ok("get", "--json", "fq-t*"))] == [b]
    ok("receive", str(a))
    fresh = json.loads(ok("get", "--json", "fq-*", "--has-more-data"))
    assert [r["id"] for r in fresh] == [b]
    kids = json.loads(ok("get", "--json", "--child-state", "Completed", "--name", "fq-make"))
    assert [r["id"] for r in kids] == [a, a + 1]


def test_wildcards_and_remove_state(home: Path) -> None:
    ok("remove", "*", "--force")
    done = start("--", "true")
    failed = start("--", "exit 3")
    running = start("--", "sleep 30")
    run("wait", "--timeout", "30", str(done), str(failed))
    stopped = json.loads(ok("stop", "--json", "Job*"))
    assert [r["id"] for r in stopped] == [done, failed, running]  # no child rows
    ok("remove", "--state", "Failed")
    assert [r["id"] for r in json.loads(ok("get", "--json"))] == [done, running]
    ok("remove", "*")
    assert ok("get") == ""
    code, _, err = run("remove")
    assert code == 2 and "--state" in err


def test_the_completion_hook_runs_with_the_jobs_facts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "finished.log"
    monkeypatch.setenv("PSJOBS_CALLBACK", f'echo "$PSJOBS_JOB_ID $PSJOBS_JOB_NAME $PSJOBS_JOB_STATE '
                                          f'$PSJOBS_JOB_EXIT_CODE" >> {log}')
    with private_home(tmp_path / "state"):
        good = start("-n", "good", "--", "true")
        bad = start("-n", "bad", "--", "exit 3")
        wait_until(lambda: log.exists() and len(log.read_text().splitlines()) == 2, 30, "both callbacks")
        assert sorted(log.read_text().splitlines()) == sorted([f"{good} good Completed 0", f"{bad} bad Failed 3"])


# --- computer names (a real sshd) ----------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from . import sshd as sshd_helper

    with sshd_helper.module_server(tmp_path_factory) as srv:
        yield srv


@pytest.mark.ssh
def test_fan_out_output_names_its_computers(server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "user"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "config").write_text(server.ssh_config.read_text())
    monkeypatch.setenv("HOME", str(home))
    with private_home(tmp_path / "state"):
        job = json.loads(ok("invoke", "--json", "-c", "127.0.0.1,127.0.0.3", "--", "echo hello"))["id"]
        ok("wait", "--timeout", "60", str(job))
        assert sorted(ok("receive", "--keep", str(job)).splitlines()) == ["[127.0.0.1] hello", "[127.0.0.3] hello"]
        lines = [json.loads(line) for line in ok("receive", "--json", str(job)).splitlines()]
        assert {(x["id"], x["computer_name"], x["value"]) for x in lines} == {
            (job, "127.0.0.1", "hello"), (job, "127.0.0.3", "hello")}
        assert sorted(x["child_id"] for x in lines) == [job + 1, job + 2]
        one = json.loads(ok("invoke", "--json", "-c", "127.0.0.2", "--", "echo alone"))["id"]
        ok("wait", "--timeout", "60", str(one))
        assert ok("receive", str(one)) == "alone\n"  # one computer: no prefix
        ok("remove", "*")


@pytest.mark.ssh
def test_remote_jobs_queue_in_a_group(server: Any) -> None:
    import psjobs

    with psjobs.Session(stop_grace=2.0) as s:
        psjobs.configure_ssh(s, config=str(server.ssh_config), python=f"{sys.executable} -S")
        s.configure_group("remote", parallel=1)
        first = s.invoke_command("sleep 0.5; echo one", computer_name=["127.0.0.1", "127.0.0.2"], group="remote")
        second = s.invoke_command("echo two", computer_name="127.0.0.3", group="remote", retries=1)
        assert second.state is psjobs.JobState.NOT_STARTED and "slot in group" in second.status_message
        assert s.wait_job([first, second], timeout=60)
        assert second.begin_time is not None and first.end_time is not None
        assert second.child_jobs[0].begin_time >= first.end_time  # type: ignore[operator]
        records = s.receive_job(first, records=True)
        assert sorted((r.computer_name, r.value) for r in records) == [("127.0.0.1", "one"), ("127.0.0.2", "one")]


@pytest.mark.ssh
def test_a_failing_remote_child_is_retried(server: Any) -> None:
    import psjobs

    with psjobs.Session(stop_grace=2.0) as s:
        psjobs.configure_ssh(s, config=str(server.ssh_config), python=f"{sys.executable} -S")
        job = s.invoke_command("echo run; exit 3", computer_name=["127.0.0.1", "127.0.0.2"], retries=1)
        assert s.wait_job(job, timeout=60)
        assert job.state is psjobs.JobState.FAILED and job.exit_code == 3
        assert [c.attempts for c in job.child_jobs] == [2, 2]
        assert [c.output for c in job.child_jobs] == [["run", "run"], ["run", "run"]]


@pytest.mark.ssh
def test_invoke_takes_the_scheduling_options(server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "user"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "config").write_text(server.ssh_config.read_text())
    monkeypatch.setenv("HOME", str(home))
    with private_home(tmp_path / "state"):
        ok("group", "add", "hosts")
        ok("group", "pause", "hosts")
        first = int(ok("invoke", "-q", "-g", "hosts", "-c", "127.0.0.1", "--", "echo first").strip())
        then = int(ok("invoke", "-q", "--after", str(first), "--retries", "1", "-c", "127.0.0.2",
                      "--", "echo then; exit 2").strip())
        assert row(first)["state"] == "NotStarted" and "paused" in row(first)["status_message"]
        ok("group", "resume", "hosts")
        code, _, _ = run("wait", "--timeout", "60", str(first), str(then))
        assert code == 5  # `then` failed, twice
        assert ok("receive", str(first)) == "first\n"
        assert row(then)["attempts"] == 2
        assert run("receive", str(then))[1] == "then\nthen\n"
        ok("remove", "*")
