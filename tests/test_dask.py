"""Cluster jobs on real Dask clusters: a LocalCluster of worker processes, and a scheduler and two
workers started through the ``dask`` command line on 127.0.0.1 and 127.0.0.2.

The common verb behaviours run over both (``cluster`` fixture). The worker processes are children
of the test run, so the autouse check of conftest also proves that a stop leaves nothing behind
on the workers.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import psjobs
from psjobs import JobState

from .clusters import local_client as make_client
from .conftest import wait_until

distributed = pytest.importorskip("distributed")
cloudpickle = pytest.importorskip("cloudpickle")

# The job bodies below travel by value: the command-line workers cannot import this test module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.dask

SRC = str(Path(__file__).resolve().parents[1] / "src")


# --- clusters -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def local_client() -> Iterator[Any]:
    """A LocalCluster of two worker processes, everything bound to 127.0.0.1 (its HTTP port too)."""
    with make_client(n_workers=2, threads_per_worker=2) as client:
        yield client


@contextlib.contextmanager
def cli_cluster(logs: Path, hosts: tuple[str, ...]) -> Iterator[tuple[str, list[subprocess.Popen[bytes]]]]:
    """``dask scheduler`` on 127.0.0.1 and one ``dask worker`` per host, through the command line."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]))
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(argv: list[str], log: str) -> subprocess.Popen[bytes]:
        with open(logs / log, "wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=logs)
        procs.append(proc)
        return proc

    try:
        spawn([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
               "--dashboard-address", "127.0.0.1:0", "--no-show"], "scheduler.log")
        address = ""

        def scheduler_up() -> bool:
            nonlocal address
            for line in (logs / "scheduler.log").read_text().splitlines():
                if "Scheduler at:" in line:
                    address = line.split("Scheduler at:")[1].strip()
                    return True
            return False

        wait_until(scheduler_up, 30, "the dask scheduler to listen")
        for n, host in enumerate(hosts):
            spawn([sys.executable, "-m", "distributed.cli.dask_worker", address, "--host", host, "--nthreads", "2",
                   "--no-nanny", "--dashboard-address", f"{host}:0", "--name", f"cli-{n}"], f"worker{n}.log")
        with distributed.Client(address, set_as_default=False) as client:
            client.wait_for_workers(len(hosts), timeout=30)
            assert {w["host"] for w in client.scheduler_info()["workers"].values()} == set(hosts)
        yield address, procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def cli_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A scheduler and two workers, on 127.0.0.1 and 127.0.0.2, started as a user would."""
    with cli_cluster(tmp_path_factory.mktemp("dask-cli"), ("127.0.0.1", "127.0.0.2")) as (address, _):
        yield address


@pytest.fixture(scope="module", params=["local", "cli"])
def cluster(request: pytest.FixtureRequest) -> Any:
    """The cluster argument: the LocalCluster's Client, or the command-line scheduler's address."""
    if request.param == "local":
        return request.getfixturevalue("local_client")
    return request.getfixturevalue("cli_address")


@pytest.fixture
def session() -> Iterator[psjobs.Session]:
    s = psjobs.Session(stop_grace=1.0)
    try:
        yield s
    finally:
        s.close()


# --- job bodies (module level: the workers import them from here) ---------------------------------

def square(x: int) -> int:
    return x * x


def numbers(n: int) -> Iterator[int]:
    yield from range(n)


def chatty() -> Iterator[int]:
    import logging

    print("hello")
    warnings.warn("careful", stacklevel=1)
    logging.getLogger("psjobs.test").warning("logged")
    psjobs.write_progress("copy", "half", 50)
    psjobs.write_error("soft")
    yield 1
    psjobs.write_verbose("done")


def until_stopped(touch: str | None = None) -> Iterator[int]:
    yield os.getpid()
    if touch:
        Path(touch).write_text("started")
    while not psjobs.stop_requested():
        time.sleep(0.01)
    yield -1  # never reached: the stop raises JobStopped at the sleep above


def spin() -> None:
    while True:
        pass


def child_process() -> None:
    subprocess.run(["sh", "-c", "sleep 100 | cat"], check=False)


def collects_then_yields(flags: str) -> Iterator[int]:
    """Yields 0, then collects garbage: a callback spins there until the stop lands in it (Python
    drops it), and says so in ``flags``; then yields on, and the first of those raises the stop."""
    import gc

    me = threading.get_ident()
    entered, landed = Path(flags, "entered"), Path(flags, "landed")

    def spins(phase: str, info: dict[str, int]) -> None:
        if phase != "start" or threading.get_ident() != me or entered.exists():
            return
        entered.touch()
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                pass
        except psjobs.JobStopped:
            landed.touch()
            raise

    gc.callbacks.append(spins)
    try:
        yield 0
        gc.collect()
        i = 1
        while True:
            yield i
            i += 1
    finally:
        gc.callbacks.remove(spins)


def boom() -> None:
    raise ValueError("bad input 42")


def fails_on_three(x: int) -> int:
    if x == 3:
        raise KeyError(x)
    return x


def append_and_wait(x: int, path: str) -> int:
    with open(path, "a") as f:
        f.write(f"{x}\n")
    while not psjobs.stop_requested():
        time.sleep(0.01)
    return x


def echo_input() -> Iterator[str]:
    for item in psjobs.job_input():
        yield f"got {item}"


def pid_then_wait() -> Iterator[int]:
    yield os.getpid()
    time.sleep(60)


def pid_then_return(marker: str) -> Iterator[Any]:
    yield os.getpid()
    if not os.path.exists(marker):  # the first run waits to be killed; a second run goes on
        Path(marker).write_text("first run")
        time.sleep(30)
    yield "done"


def sleepy(seconds: float) -> str:
    time.sleep(seconds)
    return "woke"


# --- the common verbs ---------------------------------------------------------------------------

def test_a_callable_runs_on_a_worker(session: psjobs.Session, cluster: Any) -> None:
    job = session.start_job(square, 7, cluster=cluster, name="sq")
    assert job.job_type == "ClusterJob"
    assert job.state is JobState.RUNNING
    assert len(job.child_jobs) == 1
    assert job.wait(30)
    assert job.state is JobState.COMPLETED
    assert session.receive_job(job) == [49]
    child = job.child_jobs[0]
    assert child.location.startswith("tcp://127.0.0.")
    assert child.computer_name == child.location
    assert job.location == child.location
    assert child.begin_time is not None and child.end_time is not None
    assert repr(job).startswith("<Job ") and "'sq' Completed tcp://127.0.0." in repr(job)
    if isinstance(cluster, distributed.Client):  # a cluster object works as well as its Client
        again = session.start_job(square, 8, cluster=cluster.cluster)
        assert again.wait(30) and again.receive() == [64]


def test_scheduling_options_hold_a_cluster_job_as_any_other(session: psjobs.Session, cluster: Any) -> None:
    """docs/guide.md: every kind takes group=, after= and delay= (start_job(cluster=) dropped them,
    so a cluster job ran at once, even after a dependency that failed)."""
    gate = threading.Event()
    first = session.start_thread_job(gate.wait, 30)
    after_it = session.start_job(square, 3, cluster=cluster, after=first)
    later = session.start_cluster_job(square, for_each=[4], cluster=cluster, delay=0.3)
    assert after_it.state is JobState.NOT_STARTED and later.state is JobState.NOT_STARTED
    assert "waiting for" in after_it.status_message and not after_it.wait(0.2)
    gate.set()
    assert session.wait_job([after_it, later], timeout=60) == [after_it, later]
    assert after_it.receive() == [9] and later.receive() == [16]
    assert after_it.child_jobs[0].begin_time >= first.end_time  # type: ignore[operator]
    failed = session.start_thread_job(boom)
    assert failed.wait(30)
    never = session.start_job(square, 5, cluster=cluster, after=failed)
    assert never.wait(30) and never.state is JobState.FAILED and never.receive() == []
    assert all("did not run: it runs after" in str(c.reason) for c in never.child_jobs)
    with pytest.raises(ValueError, match="group"):
        session.start_job(square, 1, cluster=cluster, group="no-such-group")
    with pytest.raises(ValueError, match="delay"):
        session.start_cluster_job(square, for_each=[1], cluster=cluster, delay=float("nan"))


def asks() -> str:
    return psjobs.read_host("Name? ")


def test_read_host_in_a_cluster_task_fails_the_job_with_a_job_state_error(session: psjobs.Session,
                                                                          cluster: Any) -> None:
    """docs/dask.md: read_host() cannot be answered from a cluster task; it raises JobStateError
    (the job fails with it and says what to do), it never blocks waiting for an answer."""
    job = session.start_job(asks, cluster=cluster)
    assert job.wait(30) and job.state is JobState.FAILED
    reason = job.child_jobs[0].reason
    assert isinstance(reason, psjobs.JobStateError) and "pass what it needs as arguments" in str(reason)


def test_receive_with_and_without_keep(session: psjobs.Session, cluster: Any) -> None:
    job = session.start_job(numbers, 5, cluster=cluster)
    assert job.wait(30)
    assert session.receive_job(job, keep=True) == [0, 1, 2, 3, 4]
    assert session.receive_job(job, keep=True) == [0, 1, 2, 3, 4]
    assert session.receive_job(job) == [0, 1, 2, 3, 4]
    assert session.receive_job(job) == []
    assert job.output == [0, 1, 2, 3, 4]
    assert not job.has_more_data


def test_wait_with_a_timeout_leaves_the_job_running(session: psjobs.Session, cluster: Any) -> None:
    job = session.start_job(until_stopped, cluster=cluster)
    wait_until(lambda: job.child_jobs[0].state is JobState.RUNNING, 30, "the task to start")
    assert session.wait_job(job, timeout=0.2) == []
    assert job.state is JobState.RUNNING
    session.stop_job(job)
    assert job.state is JobState.STOPPED


def test_records_stream_while_the_task_runs_in_production_order(session: psjobs.Session, cluster: Any) -> None:
    job = session.start_job(until_stopped, cluster=cluster)
    wait_until(lambda: len(job.output) == 1, 30, "the first item while the task runs")
    assert job.state is JobState.RUNNING
    assert isinstance(job.output[0], int)
    session.stop_job(job)

    job = session.start_job(chatty, cluster=cluster)
    assert job.wait(30)
    seen = [(stream.name, str(payload)) for _, stream, payload, _ in session.read_entries(job)]
    assert seen == [("INFORMATION", "hello"), ("WARNING", "careful"), ("WARNING", "logged"),
                    ("PROGRESS", "copy - half - 50%"), ("ERROR", "soft"), ("OUTPUT", "1"), ("VERBOSE", "done")]
    where = job.child_jobs[0].location
    assert all(r.computer_name == where for r in job.warning)
    assert job.progress[0].percent_complete == 50
    assert job.state is JobState.COMPLETED


def test_stop_really_stops(session: psjobs.Session, cluster: Any) -> None:
    job = session.start_job(spin, cluster=cluster)  # a pure-Python loop that never checks
    wait_until(lambda: job.child_jobs[0].state is JobState.RUNNING, 30, "the loop to start")
    session.stop_job(job)
    assert job.state is JobState.STOPPED
    assert job.child_jobs[0].state is JobState.STOPPED
    # The worker thread is free again: a new job on the same cluster runs at once.
    again = session.start_job(square, 3, cluster=cluster)
    assert again.wait(30) and again.receive() == [9]


def test_a_stop_python_drops_in_a_task_is_raised_by_its_next_item(
        session: psjobs.Session, cluster: Any, tmp_path: Path) -> None:
    """A stop that lands in a garbage-collector callback of the task's thread is dropped by Python;
    the task's next item raises it (worker/_thread_stop: a task has no nudge, so it ran on)."""
    job = session.start_job(collects_then_yields, str(tmp_path), cluster=cluster)
    child = job.child_jobs[0]
    wait_until(lambda: (tmp_path / "entered").exists() and child.output, 30, "the task's collection")
    session.stop_job(job)  # warnings are errors here: a task still running after the grace fails
    assert (tmp_path / "landed").exists(), "the stop did not land in the collector's callback"
    assert job.state is JobState.STOPPED
    assert session.receive_job(job) == [0], "the task yielded on after Python dropped its stop"


def test_stop_kills_the_processes_the_task_started(session: psjobs.Session, cluster: Any) -> None:
    job = session.start_job(child_process, cluster=cluster)
    child = job.child_jobs[0]
    wait_until(lambda: child.state is JobState.RUNNING, 30, "the task to start")
    session.stop_job(job)
    assert job.state is JobState.STOPPED
    # conftest's check (after the test) proves no `sleep 100` or `cat` is left on the workers.


def test_a_command_runs_on_a_worker(session: psjobs.Session, cluster: Any, tmp_path: Path) -> None:
    job = session.start_job("echo one $1; echo two >&2", "arg", cluster=cluster)
    assert job.wait(30)
    assert job.state is JobState.COMPLETED and job.exit_code == 0
    assert session.receive_job(job) == ["one arg"]
    assert [str(e) for e in job.error] == ["two"]

    bad = session.start_job(["sh", "-c", "exit 3"], cluster=cluster)
    assert bad.wait(30)
    assert bad.state is JobState.FAILED and bad.exit_code == 3
    assert isinstance(bad.child_jobs[0].job_state_info.reason, psjobs.ExitStatusError)

    here = session.start_job("pwd; echo $GREETING", cluster=cluster, working_directory=tmp_path,
                             env={"GREETING": "hi"})
    assert here.wait(30) and session.receive_job(here) == [str(tmp_path), "hi"]

    fed = session.start_job("cat", cluster=cluster, input=["a", "b"])
    assert fed.wait(30) and session.receive_job(fed) == ["a", "b"]


def test_a_stopped_command_leaves_nothing(session: psjobs.Session, cluster: Any) -> None:
    job = session.start_job("sleep 100 | cat", cluster=cluster)
    wait_until(lambda: job.child_jobs[0].state is JobState.RUNNING, 30, "the command to start")
    session.stop_job(job)
    assert job.state is JobState.STOPPED


def test_failure_reason(session: psjobs.Session, cluster: Any) -> None:
    job = session.start_job(boom, cluster=cluster, name="bad")
    assert job.wait(30)
    assert job.state is JobState.FAILED
    reason = job.child_jobs[0].job_state_info.reason
    assert isinstance(reason, ValueError) and str(reason) == "bad input 42"
    assert isinstance(reason.__cause__, psjobs.RemoteTraceback)
    assert "boom" in reason.__cause__.tb
    with pytest.raises(psjobs.JobFailedError) as info:
        session.receive_job(job, error_action="stop")
    assert info.value.reason is reason


def test_input_reaches_the_task(session: psjobs.Session, cluster: Any) -> None:
    job = session.start_job(echo_input, cluster=cluster, input=[1, 2])
    assert job.wait(30) and job.receive() == ["got 1", "got 2"]


def test_remove(session: psjobs.Session, cluster: Any) -> None:
    done = session.start_job(square, 2, cluster=cluster)
    running = session.start_job(until_stopped, cluster=cluster)
    assert done.wait(30)
    session.remove_job(done)
    with pytest.raises(psjobs.JobNotFoundError):
        session.get_job(done.id)
    with pytest.raises(psjobs.JobNotFinishedError):
        session.remove_job(running)
    session.remove_job(running, force=True)
    assert running.state is JobState.STOPPED
    assert session.get_job() == []


# --- fan-out ----------------------------------------------------------------------------------------

def test_fan_out_runs_one_child_per_item(session: psjobs.Session, cluster: Any) -> None:
    job = session.start_cluster_job(square, for_each=range(40), cluster=cluster, name="squares")
    assert job.job_type == "ClusterJob" and len(job.child_jobs) == 40
    assert [c.id for c in job.child_jobs] == list(range(job.id + 1, job.id + 41))
    assert job.wait(60)
    assert job.state is JobState.COMPLETED
    assert session.receive_job(job) == [x * x for x in range(40)]
    workers = {c.location for c in job.child_jobs}
    assert all(w.startswith("tcp://127.0.0.") for w in workers)
    assert job.location == ", ".join(sorted(workers))


def test_fan_out_with_a_failing_item(session: psjobs.Session, cluster: Any) -> None:
    job = session.start_cluster_job(fails_on_three, for_each=range(6), cluster=cluster)
    assert job.wait(60)
    assert job.state is JobState.FAILED
    states = [c.state for c in job.child_jobs]
    assert states == [JobState.COMPLETED] * 3 + [JobState.FAILED] + [JobState.COMPLETED] * 2
    assert isinstance(job.child_jobs[3].job_state_info.reason, KeyError)
    assert sorted(session.receive_job(job)) == [0, 1, 2, 4, 5]


def test_fan_out_of_commands_and_an_empty_fan_out(session: psjobs.Session, cluster: Any) -> None:
    job = session.start_cluster_job("echo item $1 $2", "x", for_each=["a", "b", 3], cluster=cluster)
    assert job.wait(60)
    assert session.receive_job(job) == ["item a x", "item b x", "item 3 x"]
    empty = session.start_cluster_job(square, for_each=[], cluster=cluster)
    assert empty.state is JobState.COMPLETED and empty.child_jobs == [] and empty.receive() == []


def test_stopping_a_fan_out_stops_running_and_queued_children(
        session: psjobs.Session, local_client: Any, tmp_path: Path) -> None:
    log = tmp_path / "ran"
    job = session.start_cluster_job(append_and_wait, str(log), for_each=range(30), cluster=local_client)
    wait_until(lambda: sum(c.state is JobState.RUNNING for c in job.child_jobs) >= 2, 30, "children to run")
    session.stop_job(job)
    assert job.state is JobState.STOPPED
    assert all(c.state is JobState.STOPPED for c in job.child_jobs)
    # The scheduler forgets them all, and no queued child ever starts after the stop.
    wait_until(lambda: not _psjobs_tasks(local_client), 30,
               f"the scheduler to drop the stopped tasks; left: {_psjobs_tasks(local_client)}")
    ran = log.read_text().split()
    assert len(ran) < 30
    assert sum(c.begin_time is not None and c.history[0][0] is JobState.RUNNING for c in job.child_jobs) >= len(ran) - 4


def test_a_fan_out_stopped_right_after_its_start_never_runs_later(
        session: psjobs.Session, local_client: Any, tmp_path: Path) -> None:
    # Issue 13, case 2: children Stopped before they were seen running once began on a worker
    # after stop_job returned (the stop reached the workers by an asynchronous broadcast).
    log = tmp_path / "ran"
    job = session.start_cluster_job(append_and_wait, str(log), for_each=range(12), cluster=local_client)
    session.stop_job(job)
    assert job.state is JobState.STOPPED
    size = log.stat().st_size if log.exists() else 0
    deadline = time.monotonic() + 1.5  # a window: what did leak showed within 0.1 s
    while time.monotonic() < deadline:
        assert (log.stat().st_size if log.exists() else 0) == size, "a child began after stop_job returned"
        time.sleep(0.02)
    wait_until(lambda: not _psjobs_tasks(local_client), 30,
               f"the scheduler to drop the stopped tasks; left: {_psjobs_tasks(local_client)}")


def _psjobs_tasks(client: Any) -> list[str]:
    """The psjobs tasks the scheduler still knows (queued, running or holding a result)."""
    def keys(dask_scheduler: Any) -> list[str]:
        return [k for k in dask_scheduler.tasks if isinstance(k, str) and k.startswith("psjobs-")]

    return list(client.run_on_scheduler(keys))


# --- what is special to clusters --------------------------------------------------------------------

def test_a_thread_that_cannot_be_interrupted_is_reported(local_client: Any) -> None:
    with psjobs.Session(stop_grace=0.2) as s:
        job = s.start_job(sleepy, 3.0, cluster=local_client)
        wait_until(lambda: job.child_jobs[0].state is JobState.RUNNING, 30, "the task to start")
        with pytest.warns(psjobs.StopTimeoutWarning, match=f"Job {job.id}"):
            s.stop_job(job)
        assert job.state is JobState.STOPPING
        assert "cannot be interrupted" in job.child_jobs[0].status_message
        assert job.wait(10)
        assert job.state is JobState.STOPPED  # once time.sleep returned, JobStopped ended it


@pytest.mark.leaves_processes  # the nanny starts a new worker process in place of the killed one
def test_a_killed_worker_fails_its_job_and_it_is_not_run_again(session: psjobs.Session, local_client: Any) -> None:
    job = session.start_job(pid_then_wait, cluster=local_client, name="victim")
    wait_until(lambda: len(job.output) == 1, 30, "the task to report its worker's pid")
    where = job.child_jobs[0].location
    os.kill(job.output[0], signal.SIGKILL)
    assert job.wait(30)
    assert job.state is JobState.FAILED
    reason = job.child_jobs[0].job_state_info.reason
    assert isinstance(reason, psjobs.WorkerError)
    assert where in str(reason) and "lost" in str(reason) and f"Job {job.child_jobs[0].id}" in str(reason)
    assert len(job.output) == 1  # not run a second time
    wait_until(lambda: not _psjobs_tasks(local_client), 30, "the scheduler to drop the task")
    local_client.wait_for_workers(2, timeout=30)


@pytest.mark.leaves_processes  # the nanny starts a new worker process in place of the killed one
def test_retries_let_dask_run_a_task_again(session: psjobs.Session, local_client: Any, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    job = session.start_cluster_job(pid_then_return, str(marker), cluster=local_client, retries=1)
    wait_until(lambda: len(job.output) == 1 and marker.exists(), 30, "the task to report its worker's pid")
    os.kill(job.output[0], signal.SIGKILL)
    assert job.wait(60)
    assert job.state is JobState.COMPLETED
    first, second, last = job.output
    assert first != second and last == "done"  # it ran again, in another worker process
    assert any("Dask runs it again (retry 1 of 1)" in str(w) for w in job.warning)
    local_client.wait_for_workers(2, timeout=30)


def test_a_lost_scheduler_fails_the_job_with_a_reason(session: psjobs.Session, tmp_path: Path) -> None:
    with cli_cluster(tmp_path, ("127.0.0.1",)) as (address, procs):
        job = session.start_job(sleepy, 1.0, cluster=address, name="orphan")
        wait_until(lambda: job.child_jobs[0].state is JobState.RUNNING, 30, "the task to start")
        procs[0].kill()  # the scheduler
        assert job.wait(30)
        assert job.state is JobState.FAILED
        reason = job.child_jobs[0].job_state_info.reason
        assert isinstance(reason, psjobs.WorkerError)
        assert "connection to the Dask scheduler" in str(reason) and address in str(reason)


def test_bad_arguments_raise_before_a_job_exists(session: psjobs.Session, local_client: Any) -> None:
    with pytest.raises(TypeError, match="cluster must be"):
        session.start_job(square, 1, cluster=42)
    with pytest.raises(ValueError, match="retries"):
        session.start_cluster_job(square, 1, cluster=local_client, retries=-1)
    with pytest.raises(TypeError, match="for_each"):
        session.start_cluster_job(square, cluster=local_client, for_each="abc")
    with pytest.raises(ValueError, match="working_directory and env"):
        session.start_job(square, 1, cluster=local_client, env={"A": "b"})
    with pytest.raises(TypeError, match="cannot be sent"):
        session.start_job(square, threading.Lock(), cluster=local_client)
    with pytest.raises(TypeError, match="item 1 of for_each"):
        session.start_cluster_job(square, cluster=local_client, for_each=[1, threading.Lock()])
    with pytest.raises(psjobs.WorkerError, match="cannot reach the Dask scheduler"):
        session.start_job(square, 1, cluster="tcp://127.0.0.1:1")
    assert session.get_job() == []


def test_import_psjobs_without_distributed() -> None:
    code = ("import sys; sys.modules['distributed'] = None\n"
            "import psjobs\n"
            "try:\n"
            "    psjobs.start_job(print, cluster='tcp://127.0.0.1:1')\n"
            "except ImportError as exc:\n"
            "    assert isinstance(exc, psjobs.PsJobsError) and 'psjobs[dask]' in str(exc), exc\n"
            "    print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                         env=dict(os.environ, PYTHONPATH=SRC))
    assert out.stdout.strip() == "ok", out.stderr


def test_module_default_session_verbs(local_client: Any) -> None:
    job = psjobs.start_job(square, 5, cluster=local_client)
    try:
        assert psjobs.wait_job(job, timeout=30) == [job]
        assert psjobs.receive_job(job) == [25]
        fan = psjobs.start_cluster_job(square, for_each=[1, 2], cluster=local_client)
        assert fan.wait(30) and fan.receive() == [1, 4]
    finally:
        psjobs.remove_job([job, fan], force=True)


# --- pure logic --------------------------------------------------------------------------------------

def test_parent_state_from_counts_matches_the_scan() -> None:
    from collections import Counter

    from psjobs.core._state import derive_parent_state_counts

    def scan(states: list[JobState], stop: bool) -> JobState:  # the definition, written out
        unfinished = [s for s in states if not s.is_finished]
        if not states:
            return JobState.STOPPED if stop else JobState.RUNNING
        if all(s is JobState.DISCONNECTED for s in unfinished):
            if unfinished:
                return JobState.DISCONNECTED
            if JobState.FAILED in states:
                return JobState.FAILED
            return JobState.STOPPED if stop or JobState.STOPPED in states else JobState.COMPLETED
        if JobState.BLOCKED in unfinished:
            return JobState.BLOCKED
        if stop:
            return JobState.STOPPING
        if all(s is JobState.SUSPENDED for s in unfinished):
            return JobState.SUSPENDED
        if all(s in (JobState.SUSPENDED, JobState.SUSPENDING) for s in unfinished):
            return JobState.SUSPENDING
        return JobState.RUNNING

    for n in range(4):
        for combo in itertools.product(list(JobState), repeat=n):
            for stop in (False, True):
                assert derive_parent_state_counts(Counter(combo), stop) is scan(list(combo), stop)

