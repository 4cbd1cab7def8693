"""Jobs that ask for input (Blocked) and jobs paused from outside (Suspended)."""

from __future__ import annotations

import time
from typing import Any

import psutil
import pytest

import psjobs
from psjobs import JobState

from .conftest import wait_until


def ask_twice() -> str:
    name = input("Name? ")
    age = psjobs.read_host("Age? ")
    return f"{name} is {age}"


class AnsweringHost(psjobs.Host):
    """A host whose user types answers (as a terminal user would at the prompt)."""

    def __init__(self, answers: list[str]) -> None:
        super().__init__()
        self.answers = answers
        self.asked: list[str] = []

    def read_input(self, job: psjobs.Job, prompt: str) -> str | None:
        self.asked.append(prompt)
        return self.answers.pop(0) if self.answers else None


def test_blocked_round_trip_with_send_input(session: psjobs.Session) -> None:
    job = session.start_job(ask_twice)
    child = job.child_jobs[0]
    wait_until(lambda: job.state is JobState.BLOCKED, what="the job to ask")
    assert child.state is JobState.BLOCKED and child.prompt == "Name? "
    with pytest.raises(psjobs.JobBlockedError, match="waits for input"):
        session.wait_job(job)
    job.send_input("Ada")  # the parent finds its blocked child
    wait_until(lambda: child.prompt == "Age? ", what="the second prompt")
    child.send_input("36")
    assert job.wait(10)
    assert job.receive() == ["Ada is 36"]


def test_receive_answers_prompts_through_the_host() -> None:
    host = AnsweringHost(["Grace", "85"])
    with psjobs.Session(host=host) as s:
        job = s.start_job(ask_twice)
        assert s.receive_job(job, wait=True, timeout=20) == ["Grace is 85"]
        assert host.asked == ["Name? ", "Age? "]
        assert job.state is JobState.COMPLETED


def test_a_host_that_cannot_answer_ends_the_wait_with_a_warning(session: psjobs.Session,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    job = session.start_job(ask_twice)
    t0 = time.monotonic()
    assert session.receive_job(job, wait=True, timeout=30) == []
    assert time.monotonic() - t0 < 20
    assert "waits for input: 'Name? '" in capsys.readouterr().err
    session.stop_job(job)
    assert job.state is JobState.STOPPED


def test_send_input_to_a_job_that_does_not_wait(session: psjobs.Session) -> None:
    job = session.start_job("sleep 30")
    with pytest.raises(psjobs.JobStateError, match="does not wait for input"):
        job.send_input("hello")
    with pytest.raises(TypeError):
        job.send_input(42)  # type: ignore[arg-type]
    session.stop_job(job)


def test_a_thread_job_cannot_ask(session: psjobs.Session) -> None:
    job = session.start_thread_job(lambda: input("x? "))
    job.wait(10)
    assert job.state is JobState.FAILED
    assert "thread job, which cannot ask for input" in str(job.job_state_info.reason)


def busy_counter():  # type: ignore[no-untyped-def]
    i = 0
    while True:
        i += 1
        if i % 200_000 == 0:
            yield i


def test_suspend_stops_cpu_use_and_resume_loses_nothing(session: psjobs.Session) -> None:
    job = session.start_job(busy_counter)
    child = job.child_jobs[0]
    wait_until(lambda: len(child.output) >= 2, what="the job to produce")
    session.suspend_job(job)
    assert job.state is JobState.SUSPENDED and child.state is JobState.SUSPENDED
    assert child.pid is not None
    proc = psutil.Process(child.pid)
    wait_until(lambda: proc.status() == psutil.STATUS_STOPPED, what="the process to stop")
    cpu = sum(proc.cpu_times()[:2])
    count = len(child.output)
    time.sleep(0.5)  # an interval to measure, not synchronisation
    assert sum(proc.cpu_times()[:2]) - cpu < 0.05
    wait_until(lambda: len(child.output) == count or len(child.output) > count, timeout=1)
    settled = len(child.output)
    time.sleep(0.2)
    assert len(child.output) == settled  # nothing is produced while suspended
    assert session.wait_job(job, timeout=0) == [job]  # Suspended counts as done, as in PowerShell
    session.resume_job(job)
    assert job.state is JobState.RUNNING
    wait_until(lambda: len(child.output) > settled + 2, what="more output after resume")
    session.stop_job(job)
    out = job.receive()
    assert out == [200_000 * (i + 1) for i in range(len(out))]


def test_stop_a_suspended_job(session: psjobs.Session) -> None:
    job = session.start_job("sleep 100 | cat")
    wait_until(lambda: job.child_jobs[0].state is JobState.RUNNING, what="the command")
    session.suspend_job(job)
    session.stop_job(job)
    assert job.state is JobState.STOPPED


def test_thread_jobs_cannot_be_suspended(session: psjobs.Session) -> None:
    job = session.start_thread_job(time.sleep, 0.2)
    wait_until(lambda: job.state is JobState.RUNNING, what="the thread job")
    with pytest.raises(psjobs.JobStateError, match="cannot be suspended"):
        session.suspend_job(job)
    job.wait(10)


def test_module_level_verbs(default_session: Any) -> None:
    job = psjobs.start_job("sleep 30")
    wait_until(lambda: job.child_jobs[0].state is JobState.RUNNING, what="the command")
    assert psjobs.suspend_job(job) == [job]
    assert psjobs.resume_job(job) == [job]
    psjobs.stop_job(job)


def stepper(n: int):  # type: ignore[no-untyped-def]
    for i in range(n):
        psjobs.write_progress("copying", f"file {i + 1} of {n}", 100 * (i + 1) / n)
        yield i
    psjobs.write_progress("copying", completed=True)


def test_progress_bars_while_receiving_and_waiting(tmp_path: Any) -> None:
    import io

    from rich.console import Console

    class BarHost(psjobs.Host):
        def __init__(self) -> None:
            super().__init__(progress=True)
            self.buffer = io.StringIO()
            self.displays: list[Any] = []

        def progress_display(self, total: int | None = None, force: bool = False) -> Any:
            from psjobs.core._progress import ProgressDisplay

            shown = ProgressDisplay(Console(file=self.buffer, force_terminal=True, width=100), total=total)
            self.displays.append(shown)
            return shown

    host = BarHost()
    with psjobs.Session(host=host) as s:
        jobs = [s.start_job(stepper, 3) for _ in range(2)]
        assert s.wait_job(jobs, show_progress=True, timeout=30) == jobs
        assert host.displays[-1].done == 2 and host.displays[-1].bars == {}
        job = s.start_job(stepper, 3)
        assert s.receive_job(job, wait=True, timeout=30) == [0, 1, 2]
        assert host.displays[-1].bars == {}  # finished bars are gone, not left behind
    assert "copying" in host.buffer.getvalue()
    assert "jobs done 2/2" in host.buffer.getvalue()


def ask_many(n: int) -> int:
    return sum(int(input(f"Number {i}? ")) for i in range(n))


def test_prompts_asked_back_to_back_are_each_answered() -> None:
    """A worker that asks again as soon as it is answered: each new prompt must stay Blocked until
    answered (an answer reported after it reached the worker used to undo the next prompt)."""
    host = AnsweringHost([str(i) for i in range(200)])
    with psjobs.Session(host=host) as s:
        job = s.start_job(ask_many, 200)
        assert s.receive_job(job, wait=True, timeout=30) == [sum(range(200))]
        assert len(host.asked) == 200 and job.state is JobState.COMPLETED
