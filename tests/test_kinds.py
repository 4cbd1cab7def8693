"""The behaviour every job kind shares, run over each kind through one parametrized fixture.

::

    kind_env (module scope, one param per kind)     starts what the kind needs once: nothing,
        |                                           an sshd on loopback, a Dask LocalCluster
        v
    kind (per test)  ->  Kind adapter: a fresh Session, a starter, the standard jobs (counts
        |                1, 2, 3 / fails / runs until stopped / chatty / heartbeat to a file)
        v                and what a user sees of them on this kind
    test_*           ->  the same assertions on every kind, through the public API only

Where a kind really differs (PowerShell semantics or a documented psjobs choice), the difference
is an attribute of the adapter, set with a comment saying why, so that no test skips a kind.
The tests are ordered by kind (the fixture is module-scoped), so the sshd and the cluster each
start once, before the first test that needs them; conftest's check of leftover processes then
sees them as already there, and sees every process a job leaves behind (on the "remote" side
too: sshd's sessions and the Dask workers are children of the test run).
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

import psjobs
from psjobs import Job, JobState

from .clusters import local_client as make_client
from .conftest import wait_until

# --- job bodies: module level, so that every kind can ship them ---------------------------------

def counts() -> Iterator[int]:
    yield 1
    yield 2
    yield 3


def fails() -> None:
    raise ValueError("bad input 42")


def until_stopped() -> Iterator[str]:
    yield "started"
    # Never checks stop_requested(): the stop has to end it for real. Short sleeps, because a
    # thread (or Dask task) is interrupted only between Python instructions (docs/guide.md).
    while True:
        time.sleep(0.01)


def chatty() -> int:
    psjobs.write_warning("careful")
    psjobs.write_error("soft")
    return 1


def heartbeat(beats: str) -> None:
    # Appends to ``beats`` every 10 ms until stopped, or until ``beats.release`` exists (the test
    # creates it at its end, so that work a stop failed to end cannot outlive the test).
    while not os.path.exists(beats + ".release"):
        with open(beats, "a") as f:
            f.write(".")
        time.sleep(0.01)


@dataclass(frozen=True)
class Bodies:
    """The standard jobs as targets of one form (callables, or shell lines)."""

    counts: Any
    fails: Any
    until_stopped: Any
    chatty: Any
    heartbeat: Any


CALLABLES = Bodies(counts, fails, until_stopped, chatty, heartbeat)
COMMANDS = Bodies(
    "echo 1; echo 2; echo 3",
    'echo "bad input 42" >&2; exit 3',
    "echo started; sleep 100 | cat",  # a process tree: the stop must end both
    "echo soft >&2; echo 1",
    'while [ ! -e "$1.release" ]; do printf . >> "$1"; sleep 0.01; done',
)


# --- the adapter ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Kind:
    """One job kind: how to start the standard jobs, and what a user sees of them there."""

    name: str
    session: psjobs.Session
    start: Callable[..., Job]  # (target, *args) -> the job
    bodies: Bodies
    #: what counts() outputs: a callable's values, or a command's stdout lines (always str)
    counted: list[Any]
    #: the failing job's reason (the callable's exception, or ExitStatusError for a command),
    #: a text its message holds, and its exit_code (None where no command ran, API.md 2)
    failure: type[BaseException]
    failure_text: str
    failure_exit_code: int | None
    #: where the traceback of the failure is kept: "local" (the exception ran in this process),
    #: "remote" (the worker's traceback text rides as __cause__, a RemoteTraceback), or "none"
    #: (a command: no Python ran, and what it wrote on stderr is in its error stream)
    failure_traceback: str
    #: what the failing job wrote on its error stream
    failure_errors: list[str]
    #: what chatty() leaves in output, warning and error
    chatty_output: list[Any]
    chatty_warnings: list[str]
    chatty_errors: list[str]
    #: whether the work runs in a child job (every kind but threads)
    has_children: bool = True

    def counts(self) -> Job:
        return self.start(self.bodies.counts)

    def fails(self) -> Job:
        return self.start(self.bodies.fails)

    def until_stopped(self) -> Job:
        return self.start(self.bodies.until_stopped)

    def chatty(self) -> Job:
        return self.start(self.bodies.chatty)

    def heartbeat(self, beats: Any) -> Job:
        return self.start(self.bodies.heartbeat, str(beats))

    def leaf(self, job: Job) -> Job:
        """The job that does the work, where PowerShell users look for the failure reason."""
        if self.has_children:
            assert len(job.child_jobs) == 1, job.child_jobs
            return job.child_jobs[0]
        # A ThreadJob has no child (API.md section 2): the job itself does the work and holds
        # the reason in its own job_state_info.
        assert job.child_jobs == []
        return job

    def wait_until_running(self, job: Job) -> None:
        """Until the job's first item arrived: its work has really begun (a command's processes
        exist, a remote command runs, a Dask task runs on a worker)."""
        wait_until(lambda: job.output == ["started"], 30, f"{self.name}: the first item of a running job")


def for_callables(name: str, session: psjobs.Session, start: Callable[..., Job], *,
                  in_this_process: bool = False) -> Kind:
    # A thread job runs in this process: its exception keeps its own traceback, and it has no
    # child job (API.md 2). Every other kind ships the traceback text back as __cause__.
    return Kind(name, session, start, CALLABLES, counted=[1, 2, 3], failure=ValueError,
                failure_text="bad input 42", failure_exit_code=None,
                failure_traceback="local" if in_this_process else "remote", failure_errors=[],
                chatty_output=[1], chatty_warnings=["careful"], chatty_errors=["soft"],
                has_children=not in_this_process)


def for_commands(name: str, session: psjobs.Session, start: Callable[..., Job]) -> Kind:
    # A command's stdout lines are its output, as str; its stderr lines are error records, and a
    # shell line has no warning stream (docs/remote.md, docs/dask.md). A non-zero exit status
    # fails the job with ExitStatusError naming the status; the stderr text stays an error record.
    return Kind(name, session, start, COMMANDS, counted=["1", "2", "3"], failure=psjobs.ExitStatusError,
                failure_text="status 3", failure_exit_code=3, failure_traceback="none",
                failure_errors=["bad input 42"], chatty_output=["1"], chatty_warnings=[], chatty_errors=["soft"])


# --- what each kind needs, once per module ----------------------------------------------------------

@pytest.fixture(scope="module")
def sshd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One loopback OpenSSH server for both ssh kinds (tests/sshd.py)."""
    from . import sshd as sshd_helper

    with sshd_helper.module_server(tmp_path_factory) as server:
        yield server


@pytest.fixture(scope="module")
def dask_client() -> Iterator[Any]:
    """A LocalCluster of one worker process, everything bound to 127.0.0.1."""
    # The bodies travel by value, so that the worker never needs to import this test module.
    with make_client(n_workers=1, threads_per_worker=4, by_value=__name__) as client:
        yield client


@pytest.fixture(scope="module", params=[
    "thread", "process", "command",
    pytest.param("ssh", marks=pytest.mark.ssh),
    pytest.param("ssh-callable", marks=pytest.mark.ssh),
    pytest.param("dask", marks=pytest.mark.dask),
])
def kind_env(request: pytest.FixtureRequest) -> tuple[str, Any]:
    """The kind's name and what it runs against (the sshd, the Dask client, or nothing).

    Module scope, so that the server or cluster starts before the first test of its kind, ahead
    of conftest's per-test snapshot of processes."""
    name: str = request.param
    if name.startswith("ssh"):
        return name, request.getfixturevalue("sshd_server")
    if name == "dask":
        return name, request.getfixturevalue("dask_client")
    return name, None


@pytest.fixture
def kind(kind_env: tuple[str, Any]) -> Iterator[Kind]:
    """The adapter of one kind over a fresh session, closed (its jobs stopped) after the test."""
    name, backing = kind_env
    session = psjobs.Session(stop_grace=2.0)
    try:
        if name == "thread":
            yield for_callables(name, session, session.start_thread_job, in_this_process=True)
        elif name == "process":
            yield for_callables(name, session, session.start_job)
        elif name == "command":
            yield for_commands(name, session, session.start_job)
        elif name.startswith("ssh"):
            # The remote interpreter is this one, so remote callables find psjobs installed.
            psjobs.configure_ssh(session, config=str(backing.ssh_config), python=sys.executable)

            def remote(target: Any, *args: Any) -> Job:
                return session.invoke_command(target, *args, computer_name="127.0.0.1")

            if name == "ssh":
                yield for_commands(name, session, remote)
            else:
                yield for_callables(name, session, remote)
        elif name == "dask":
            def on_cluster(target: Any, *args: Any) -> Job:
                return session.start_cluster_job(target, *args, cluster=backing)

            yield for_callables(name, session, on_cluster)
        else:
            raise AssertionError(f"no adapter for the kind {name!r}")
    finally:
        session.close()


# --- the shared behaviour -------------------------------------------------------------------------

def test_start_returns_at_once_and_get_job_lists_it(kind: Kind) -> None:
    running = kind.until_stopped()
    # A job that never ends is not finished when start returns: start did not wait for it.
    # A ThreadJob may still be NotStarted (queued for a throttle slot); the parent of every other
    # kind is Running from the moment it is returned, its child possibly NotStarted (API.md 1).
    expected = {JobState.NOT_STARTED, JobState.RUNNING} if not kind.has_children else {JobState.RUNNING}
    assert running.state in expected
    assert kind.session.get_job() == [running]
    done = kind.counts()
    assert kind.session.get_job() == [running, done]  # every top-level job, by ascending id
    assert kind.session.get_job(done.id) == [done]
    kind.session.stop_job(running)


def test_wait_returns_the_job_once_done_and_nothing_on_timeout(kind: Kind) -> None:
    running = kind.until_stopped()
    done = kind.counts()
    assert kind.session.wait_job(done, timeout=30) == [done]
    assert done.state is JobState.COMPLETED
    assert kind.session.wait_job(running, timeout=0.2) == []
    assert not running.state.is_finished  # the timeout leaves the job going on
    assert kind.session.wait_job([running, done], any=True, timeout=30) == [done]
    kind.session.stop_job(running)
    assert kind.session.wait_job([running, done], timeout=30) == [running, done]


def test_receive_returns_output_in_order_and_consumes_it(kind: Kind) -> None:
    job = kind.counts()
    assert job.wait(30)
    assert kind.session.receive_job(job, keep=True) == kind.counted
    assert kind.session.receive_job(job, keep=True) == kind.counted  # keep=True consumes nothing
    assert kind.session.receive_job(job) == kind.counted
    assert kind.session.receive_job(job) == []  # the first receive consumed it
    assert job.output == kind.counted  # receiving never empties the stream list


def test_receive_returns_output_while_the_job_runs(kind: Kind) -> None:
    job = kind.until_stopped()
    got: list[Any] = []

    def first_item() -> bool:
        got.extend(kind.session.receive_job(job))
        return bool(got)

    wait_until(first_item, 30, f"{kind.name}: the first item while the job runs")
    assert got == ["started"]
    assert job.state is JobState.RUNNING
    job.stop()
    assert job.receive() == []


def test_a_failing_job_fails_with_its_reason(kind: Kind) -> None:
    job = kind.fails()
    assert job.wait(30)
    assert job.state is JobState.FAILED
    reason = kind.leaf(job).job_state_info.reason
    assert isinstance(reason, kind.failure), repr(reason)
    assert kind.failure_text in str(reason)
    assert kind.leaf(job).job_state_info.state is JobState.FAILED
    assert (job.exit_code, kind.leaf(job).exit_code) == (kind.failure_exit_code, kind.failure_exit_code)
    assert [str(r) for r in job.error] == kind.failure_errors
    if kind.failure_traceback == "local":
        assert "fails" in [frame.name for frame in traceback.extract_tb(reason.__traceback__)]
    elif kind.failure_traceback == "remote":
        assert isinstance(reason.__cause__, psjobs.RemoteTraceback), repr(reason.__cause__)
        assert "in fails" in reason.__cause__.tb
    else:
        assert kind.failure_traceback == "none" and isinstance(reason, psjobs.ExitStatusError)
        assert reason.status == kind.failure_exit_code
    with pytest.raises(psjobs.JobFailedError) as info:
        kind.session.receive_job(job, error_action="stop")
    assert info.value.reason is reason


def test_stop_ends_a_running_job_and_leaves_nothing_running(kind: Kind) -> None:
    job = kind.until_stopped()
    kind.wait_until_running(job)
    began = time.monotonic()
    kind.session.stop_job(job)
    # Well inside the session's stop grace (2 s): none of these jobs ignores the stop request.
    assert time.monotonic() - began < 2.0
    assert job.state is JobState.STOPPED
    assert kind.leaf(job).state is JobState.STOPPED
    assert job.end_time is not None
    assert kind.session.wait_job(job, timeout=0) == [job]
    # conftest's check, after the test, proves that no process of the job is left (locally, in
    # sshd's sessions, and on the Dask worker). A thread job is Stopped only once its thread
    # has left the job's code (API.md 5), so Stopped is the proof there.

    done = kind.counts()
    assert done.wait(30)
    assert kind.session.stop_job(done, pass_thru=True) == [done]
    assert done.state is JobState.COMPLETED  # a finished job is left alone
    assert done.receive() == kind.counted


def test_remove_drops_a_finished_job_and_refuses_a_running_one(kind: Kind) -> None:
    done = kind.counts()
    running = kind.until_stopped()
    assert done.wait(30)
    kind.session.remove_job(done)
    assert kind.session.get_job() == [running]
    with pytest.raises(psjobs.JobNotFoundError):
        kind.session.get_job(done.id)
    if kind.has_children:  # (a ThreadJob has none)
        with pytest.raises(psjobs.JobStateError):
            kind.session.remove_job(kind.leaf(running))  # a child goes with its parent only
    with pytest.raises(psjobs.JobNotFinishedError):
        kind.session.remove_job(running)
    assert kind.session.get_job() == [running] and not running.state.is_finished
    kind.session.remove_job(running, force=True)  # stops it first
    assert running.state is JobState.STOPPED
    assert kind.session.get_job() == []


def test_the_parent_state_follows_its_child(kind: Kind) -> None:
    # A ThreadJob is its own leaf (no child), so this holds trivially there; for every other
    # kind the parent's state is derived from its one child's.
    running = kind.until_stopped()
    kind.wait_until_running(running)
    assert running.state is kind.leaf(running).state is JobState.RUNNING
    completed, failed = kind.counts(), kind.fails()
    running.stop()
    assert kind.session.wait_job([completed, failed], timeout=30) == [completed, failed]
    for job, state in ((completed, JobState.COMPLETED), (failed, JobState.FAILED), (running, JobState.STOPPED)):
        assert (job.state, kind.leaf(job).state) == (state, state), job


def test_has_more_data_until_everything_is_received(kind: Kind) -> None:
    running = kind.until_stopped()
    kind.wait_until_running(running)
    assert running.receive() == ["started"]
    # psjobs' choice (docs/guide.md): True while the job is not finished, even with nothing
    # unread (PowerShell's thread jobs say False).
    assert running.has_more_data is True
    running.stop()
    assert running.has_more_data is False

    job = kind.counts()
    assert job.wait(30)
    assert job.has_more_data is True
    assert kind.leaf(job).has_more_data is True
    assert job.receive() == kind.counted
    assert job.has_more_data is False
    assert kind.leaf(job).has_more_data is False  # a child shares its parent's read position


def test_error_and_warning_records_land_in_their_streams(kind: Kind) -> None:
    job = kind.chatty()
    assert job.wait(30)
    assert job.state is JobState.COMPLETED  # an error record does not fail the job
    assert [str(r) for r in job.warning] == kind.chatty_warnings
    assert [str(r) for r in job.error] == kind.chatty_errors
    assert job.output == kind.chatty_output
    assert kind.session.receive_job(job) == kind.chatty_output  # the records are not output
    assert [str(r) for r in kind.leaf(job).error] == kind.chatty_errors




def test_output_records_name_the_job_and_computer_of_each_value(kind: Kind) -> None:
    job = kind.counts()
    assert job.wait(30)
    records = kind.session.receive_job(job, records=True)
    leaf = kind.leaf(job)
    assert [r.value for r in records] == kind.counted
    assert all(r.job is leaf for r in records)
    # localhost for process and command jobs, the computer for ssh, the worker's address for
    # Dask; None for a thread job, whose output PowerShell does not tag with PSComputerName.
    assert [r.computer_name for r in records] == [leaf.computer_name] * 3
    assert kind.session.receive_job(job, records=True) == []  # records=True consumes as well


# --- a stop before the work began ---------------------------------------------------------------

def stays(predicate: Callable[[], bool], seconds: float) -> bool:
    """True if ``predicate`` stays false for ``seconds`` (polled). Proving that something does not
    happen needs a window; its length is the test's claim, not a synchronisation."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return False
        time.sleep(0.02)  # polling interval within the window
    return not predicate()


def _size(path: Any) -> int:
    return int(path.stat().st_size) if path.exists() else 0


def test_a_job_removed_right_after_a_stop_never_runs_later(kind: Kind, tmp_path: Any) -> None:
    # Once process (a forget that dropped the job before its worker was known) and dask (a forget
    # that dropped the key before the dispatcher cancelled the task; then a stop that reached the
    # workers by an asynchronous broadcast, after the task began) failed here: issue 13, case 2.
    beats = {how: tmp_path / how for how in ("stopped", "forced")}
    try:
        # Both at once after start: the work of either may not have begun yet on any kind.
        stopped = kind.heartbeat(beats["stopped"])
        kind.session.stop_job(stopped)
        assert stopped.state is JobState.STOPPED
        kind.session.remove_job(stopped)
        forced = kind.heartbeat(beats["forced"])
        kind.session.remove_job(forced, force=True)
        assert forced.state is JobState.STOPPED
        assert kind.session.get_job() == []
        sizes = {how: _size(path) for how, path in beats.items()}
        # Where it leaked, the work showed within 0.5 s on this machine (process 0.16-0.41 s, dask 0.02-0.04 s).
        assert stays(lambda: any(_size(path) > sizes[how] for how, path in beats.items()), 1.5), \
            f"{kind.name}: a stopped and removed job still runs"
    finally:
        for path in beats.values():  # ends what a failed stop left running
            path.with_name(path.name + ".release").touch()
