"""How the fork server starts a command (worker/_spawn): posix_spawn where it can, Popen where not.

Each test starts real commands through a session's fork server and checks what the command sees,
or the error the caller gets, so the cheaper start keeps Popen's behaviour: the program found along
the job's own PATH or relative to its working directory, Popen's error for a program that is not
there, SIGPIPE not ignored, no descriptor but 0, 1 and 2, and each command in its own directory.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import psjobs
from psjobs import JobState
from psjobs.core._shipped import start_for_client
from psjobs.host._client import current_umask

from .conftest import wait_until


def _tool(directory: Path, name: str, line: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(f"#!/bin/sh\necho {line}\n")
    path.chmod(0o755)
    return path


def _run(session: psjobs.Session, argv: list[str], **kwargs: object) -> psjobs.Job:
    job = session.start_job(argv, **kwargs)  # type: ignore[arg-type]
    assert job.wait(10)
    return job


def test_the_program_is_found_along_the_jobs_own_path(session: psjobs.Session, tmp_path: Path) -> None:
    _tool(tmp_path / "bin", "psjobs-hello", "from-the-jobs-PATH")
    job = _run(session, ["psjobs-hello"], env={"PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"})
    assert job.state is JobState.COMPLETED, job.child_jobs[0].job_state_info.reason
    assert job.receive() == ["from-the-jobs-PATH"]


def test_a_relative_program_is_relative_to_the_working_directory(session: psjobs.Session, tmp_path: Path) -> None:
    _tool(tmp_path, "tool", "relative")
    job = _run(session, ["./tool"], working_directory=tmp_path)
    assert job.receive() == ["relative"]
    assert job.state is JobState.COMPLETED


def test_a_missing_program_fails_with_popens_error(session: psjobs.Session, tmp_path: Path) -> None:
    job = _run(session, ["psjobs-no-such-program"], working_directory=tmp_path)
    assert job.state is JobState.FAILED
    reason = job.child_jobs[0].job_state_info.reason if job.child_jobs else job.job_state_info.reason
    assert isinstance(reason, FileNotFoundError)
    assert "psjobs-no-such-program" in str(reason)


def test_the_command_does_not_ignore_sigpipe(session: psjobs.Session) -> None:
    job = _run(session, ["grep", "^SigIgn", "/proc/self/status"])
    (line,) = job.receive()
    ignored = int(line.split()[1], 16)
    for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT):
        assert not ignored & (1 << (sig - 1)), f"{sig.name} is ignored in the command"


def test_the_command_holds_no_descriptor_but_its_stdio(session: psjobs.Session, tmp_path: Path) -> None:
    # Another command running meanwhile: its pipes pass through the server too.
    other = session.start_job(["sleep", "30"])
    wait_until(lambda: other.state is JobState.RUNNING, what="the other command to run")
    code = "import os; print(*sorted(int(f) for f in os.listdir('/proc/self/fd')))"
    job = _run(session, [sys.executable, "-S", "-c", code], working_directory=tmp_path)
    fds = [int(fd) for fd in job.receive()[0].split()]
    assert fds[:3] == [0, 1, 2]
    assert len(fds) == 4, f"the command kept descriptors {fds[3:-1]} (the last is listdir's own)"
    session.stop_job([other])


def test_each_command_runs_in_its_own_directory(session: psjobs.Session, tmp_path: Path) -> None:
    here = os.getcwd()
    first = _run(session, ["pwd"], working_directory=tmp_path)
    second = _run(session, ["pwd"])
    third = session.start_job(os.getcwd)
    assert third.wait(10)
    assert (first.receive(), second.receive(), third.receive()) == ([str(tmp_path)], [here], [here])


def test_without_input_the_command_reads_an_empty_stdin(session: psjobs.Session) -> None:
    job = _run(session, ["cat"])
    assert job.state is JobState.COMPLETED
    assert job.receive() == []


def test_each_command_runs_with_its_own_umask(session: psjobs.Session) -> None:
    # The session host starts a client's command with the client's umask (core/_shipped); through
    # the fork server, the next command without one still gets the session's own.
    ours = current_umask()
    umask = ["grep", "^Umask", "/proc/self/status"]
    private = start_for_client(session, umask, thread=False, umask=0o077, name=None, working_directory=None,
                               env=None)
    assert private.wait(10)
    plain = _run(session, umask)
    assert [private.receive(), plain.receive()] == [["Umask:\t0077"], [f"Umask:\t{ours:04o}"]]
