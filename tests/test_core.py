"""The core alone, through an inline backend whose events the test scripts (as httpx's MockTransport).

The inline backend is registered under the kind "inline" for this module only; it runs nothing:
each test says, through the jobs' ports, what the work did (started, records, blocked, ended
with each outcome, late events after the end). This is the only fake backend of the project.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import psjobs
from psjobs import JobState
from psjobs.core import (
    Backend,
    JobPort,
    JobSpec,
    Outcome,
    Place,
    Plan,
    backend_class,
    make_spec,
    register_backend,
    unregister_backend,
)
from psjobs.core._session import Session


class InlineBackend(Backend):
    """Runs nothing: keeps the ports it is given, and does what the test's options say."""

    can_pause = True
    can_send_input = True

    def __init__(self, session: Session) -> None:
        super().__init__(session)
        self.ports: list[JobPort] = []
        self.specs: dict[int, JobSpec] = {}  # the port does not keep the spec: backends that need it do
        self.stops: list[tuple[int, float]] = []
        self.forgotten: list[int] = []
        self.answers: list[str] = []
        self.closed = False

    def plan(self, spec: JobSpec) -> Plan:
        places = spec.options.get("places")
        if places is None:
            return Plan()
        return Plan([Place(p, p) for p in places], ", ".join(places), follow_where=spec.options.get("follow", False))

    def start(self, ports: list[JobPort], spec: JobSpec) -> None:
        self.ports.extend(ports)
        self.specs.update((port.job_id, spec) for port in ports)
        if spec.options.get("run", True):
            for port in ports:
                port.started(pid=4242)

    def stop(self, port: JobPort, grace: float) -> None:
        self.stops.append((port.job_id, grace))
        if self.specs[port.job_id].options.get("stop_ends", True):
            port.ended(Outcome.stopped())

    def forget(self, port: JobPort) -> None:
        self.forgotten.append(port.job_id)

    def suspend(self, port: JobPort) -> None:
        port.suspended()

    def resume(self, port: JobPort) -> None:
        port.resumed()

    def send_input(self, port: JobPort, text: str) -> None:
        self.answers.append(text)
        port.unblocked()

    def close(self) -> None:
        self.closed = True


class QueuedInline(InlineBackend):
    """Like a cluster: a job stopped while it waited must still be told."""

    stops_unstarted = True
    can_pause = False


@pytest.fixture(autouse=True)
def _inline_kinds() -> Iterator[None]:
    register_backend("inline", InlineBackend)
    register_backend("queued", QueuedInline)
    yield
    unregister_backend("inline")
    unregister_backend("queued")


@pytest.fixture
def s() -> Iterator[Session]:
    session = psjobs.Session(stop_grace=0.5)
    try:
        yield session
    finally:
        session.close()


def start(s: Session, *, kind: str = "inline", name: str | None = None, parent: bool = True,
          **options: Any) -> tuple[psjobs.Job, list[JobPort]]:
    spec = make_spec(lambda: None, (), {}, verb="start_inline")
    spec.options = options
    job = s._start_tree(kind, spec, job_type="InlineJob", name=name, parent=parent)
    backend: Any = s._backends[kind]
    ports = [p for p in backend.ports if backend.specs[p.job_id] is spec]
    return job, ports


def out(n: Any, stream: int = psjobs.Stream.OUTPUT) -> tuple[int, Any, float]:
    return (stream, n, time.time())


# --- the state machine, through the port --------------------------------------------------------

def test_a_job_runs_reports_and_completes(s: Session) -> None:
    job, (port,) = start(s, name="inline")
    leaf = job.child_jobs[0]
    assert job.state is JobState.RUNNING and leaf.state is JobState.RUNNING and leaf.pid == 4242
    port.records([out(1), out(2)])
    assert port.ended(Outcome.completed(0), [out(3)])
    assert leaf.state is JobState.COMPLETED and job.state is JobState.COMPLETED
    assert job.exit_code == 0 and not port.stop_requested
    assert [s for s, _ in leaf.history] == [JobState.RUNNING, JobState.COMPLETED]
    assert job.receive() == [1, 2, 3]


def test_a_failure_keeps_its_reason_and_exit_code(s: Session) -> None:
    job, (port,) = start(s)
    boom = ValueError("boom")
    port.ended(Outcome.failed(boom, 3))
    assert job.state is JobState.FAILED and job.reason is boom and job.exit_code == 3
    assert job.child_jobs[0].job_state_info.reason is boom


def test_a_top_level_leaf_waits_not_started_until_its_backend_starts_it(s: Session) -> None:
    job, (port,) = start(s, parent=False, run=False)
    assert job.parent is None and job.child_jobs == [] and job.state is JobState.NOT_STARTED
    assert port.started() and job.state is JobState.RUNNING


def test_the_parent_state_follows_its_children(s: Session) -> None:
    job, (a, b, c) = start(s, places=["a", "b", "c"])
    assert [j.location for j in job.child_jobs] == ["a", "b", "c"] and job.location == "a, b, c"
    a.ended(Outcome.completed())
    assert job.state is JobState.RUNNING
    b.blocked("name?")
    assert job.state is JobState.BLOCKED
    b.ended(Outcome.stopped())
    c.ended(Outcome.failed(RuntimeError("c")))
    assert job.state is JobState.FAILED  # Failed > Stopped > Completed


def test_the_parent_location_follows_where_its_leaves_run(s: Session) -> None:
    job, ports = start(s, places=["cluster", "cluster"], follow=True, run=False)
    ports[1].started(where="w2")
    ports[0].started(where="w1")
    assert job.location == "w1, w2" and job.child_jobs[0].computer_name == "w1"


def test_an_empty_fan_out_completes_at_once(s: Session) -> None:
    job, ports = start(s, places=[])
    assert ports == [] and job.state is JobState.COMPLETED and job.wait(0)


# --- records, the cursor, waiting -------------------------------------------------------------------

def test_receive_moves_the_cursor_unless_keep(s: Session) -> None:
    job, (port,) = start(s)
    port.records([out(1), out(2)])
    assert job.receive(keep=True) == [1, 2]
    assert job.receive() == [1, 2]
    assert job.receive() == []
    port.record(out(3))
    assert job.receive() == [3] and job.output == [1, 2, 3] and job.has_more_data


def test_the_tail_arrives_with_the_end(s: Session) -> None:
    # A waiter woken by the end must find every record: the tail and the end are one step.
    for _ in range(50):
        job, (port,) = start(s)
        threading.Thread(target=port.ended, args=(Outcome.completed(), [out(n) for n in range(100)])).start()
        assert job.receive(wait=True, timeout=10) == list(range(100))
        s.remove_job(job)


def test_wait_times_out_then_sees_the_end(s: Session) -> None:
    job, (port,) = start(s)
    t0 = time.monotonic()
    assert s.wait_job(job, timeout=0.05) == []
    assert time.monotonic() - t0 >= 0.05
    threading.Timer(0.02, port.ended, args=(Outcome.completed(),)).start()
    assert s.wait_job(job, timeout=10) == [job]


def _waiting(s: Session, jobs: list[psjobs.Job], timeout: float = 10) -> tuple[threading.Thread, list[Any]]:
    """wait_job(jobs) in a thread of its own; what it returned, or raised, lands in the list."""
    got: list[Any] = []

    def wait() -> None:
        try:
            got.append(s.wait_job(jobs, timeout=timeout))
        except Exception as exc:  # the test looks at it
            got.append(exc)
    thread = threading.Thread(target=wait)
    thread.start()
    return thread, got


def _settle(s: Session, waiters: int) -> None:
    """Until ``waiters`` wait_job calls are waiting (polled, with a deadline)."""
    deadline = time.monotonic() + 10
    while sum(map(len, s._targets.values())) < waiters:
        assert time.monotonic() < deadline, "wait_job never started waiting"
        time.sleep(0.001)


def test_wait_for_many_returns_when_the_last_ends_whatever_the_order(s: Session) -> None:
    jobs, ports = zip(*(start(s) for _ in range(300)))
    thread, got = _waiting(s, list(jobs))
    _settle(s, 1)
    for i, (port,) in enumerate(ports[::-1]):  # the last first: the one waited for ends last
        port.records([out(i)])
        port.ended(Outcome.completed())
        assert not got or i == len(ports) - 1, f"wait_job returned with {len(ports) - 1 - i} jobs running"
    thread.join(10)
    assert got == [list(jobs)]


def test_a_suspended_job_counts_as_done_for_a_wait_until_it_runs_again(s: Session) -> None:
    (a, (pa,)), (b, (pb,)) = start(s), start(s)
    s.suspend_job(a)
    thread, got = _waiting(s, [a, b])
    _settle(s, 1)
    s.resume_job(a)  # runs again after wait_job went past it
    pb.ended(Outcome.completed())
    thread.join(0.2)
    assert got == [] and thread.is_alive(), "wait_job returned while a resumed job ran"
    pa.ended(Outcome.completed())
    thread.join(10)
    assert got == [[a, b]]


def test_a_wait_ends_when_any_of_its_jobs_asks_for_input_not_only_the_first(s: Session) -> None:
    (a, _), (b, (pb,)) = start(s), start(s)
    thread, got = _waiting(s, [a, b])
    _settle(s, 1)
    pb.blocked("your name?")  # a runs on: wait_job must not wait for it to see b's prompt
    thread.join(10)
    assert len(got) == 1 and isinstance(got[0], psjobs.JobBlockedError), got
    assert f"receive_job({b.id})" in str(got[0])


def test_a_wait_that_times_out_leaves_nothing_behind(s: Session) -> None:
    job, (port,) = start(s)
    assert s.wait_job(job, timeout=0.01) == []
    assert s._targets == {}
    port.ended(Outcome.completed())
    assert s.wait_job(job, timeout=10) == [job]


def test_wait_free_returns_once_the_lock_is_free_and_never_holds_it() -> None:
    from psjobs.core import wait_free
    lock = threading.Lock()
    wait_free(lock)  # free: returns at once, and leaves it free
    assert not lock.locked()
    lock.acquire()
    released = threading.Timer(0.01, lock.release)
    released.start()
    deadline = time.monotonic() + 10
    while lock.locked():  # gives up after its hand-offs, leaving the blocking to the caller's with
        wait_free(lock)
        assert time.monotonic() < deadline, "the lock was never seen free"
    released.join()
    assert not lock.locked()


def test_a_blocked_job_is_answered_through_its_backend(s: Session) -> None:
    job, (port,) = start(s)
    port.blocked("your name?")
    leaf = job.child_jobs[0]
    assert leaf.state is JobState.BLOCKED and leaf.prompt == "your name?"
    with pytest.raises(psjobs.JobBlockedError):
        job.wait(timeout=1)
    job.send_input("Ada")
    backend: Any = s._backends["inline"]
    assert backend.answers == ["Ada"] and leaf.state is JobState.RUNNING and leaf.prompt is None


def test_suspend_is_requested_by_the_session_and_confirmed_by_the_backend(s: Session) -> None:
    job, _ = start(s)
    s.suspend_job(job)
    leaf = job.child_jobs[0]
    assert [st for st, _ in leaf.history][-2:] == [JobState.SUSPENDING, JobState.SUSPENDED]
    assert job.state is JobState.SUSPENDED
    s.resume_job(job)
    assert job.state is JobState.RUNNING


def test_a_backend_that_cannot_pause_refuses_and_changes_nothing(s: Session) -> None:
    job, _ = start(s, kind="queued")
    with pytest.raises(psjobs.JobStateError, match="cannot be suspended"):
        s.suspend_job(job)
    assert job.state is JobState.RUNNING


# --- stop, remove, close ------------------------------------------------------------------------------

def test_stop_asks_the_backend_with_the_grace_and_waits_for_the_end(s: Session) -> None:
    job, (port,) = start(s)
    s.stop_job(job)
    backend: Any = s._backends["inline"]
    assert backend.stops == [(port.job_id, 0.5)] and port.stop_requested
    assert job.state is JobState.STOPPED and job.child_jobs[0].state is JobState.STOPPED


def test_a_job_that_ends_well_after_a_stop_request_is_stopped(s: Session) -> None:
    job, (port,) = start(s, stop_ends=False)
    threading.Timer(0.05, port.ended, args=(Outcome.completed(0),)).start()
    s.stop_job(job)  # returns once the work ended
    assert job.state is JobState.STOPPED


def test_a_queued_job_is_stopped_at_once_and_only_a_queue_elsewhere_is_told(s: Session) -> None:
    job, (port,) = start(s, run=False)
    s.stop_job(job)
    assert job.state is JobState.STOPPED and s._backends["inline"].stops == []  # type: ignore[attr-defined]
    assert not port.started()  # the backend must then not run it
    job2, (port2,) = start(s, kind="queued", run=False)
    s.stop_job(job2)
    assert s._backends["queued"].stops == [(port2.job_id, 0.5)]  # type: ignore[attr-defined]


def test_remove_forgets_the_jobs_at_their_backend(s: Session) -> None:
    job, (port,) = start(s)
    with pytest.raises(psjobs.JobNotFinishedError):
        s.remove_job(job)
    port.data = "handle"
    s.remove_job(job, force=True)  # stops it first
    backend: Any = s._backends["inline"]
    assert backend.forgotten == [port.job_id] and port.data is None and s.get_job() == []
    assert backend.stops == [(port.job_id, 0.5)]


def test_close_stops_the_jobs_and_closes_the_backends() -> None:
    s = psjobs.Session(stop_grace=0.5)
    job, _ = start(s)
    s.close()
    assert job.state is JobState.STOPPED and s._backends["inline"].closed  # type: ignore[attr-defined]
    with pytest.raises(psjobs.JobStateError, match="closed"):
        start(s, kind="queued")  # a closed session makes no backend


# --- the port: late events, idempotence, threads ---------------------------------------------------------

def test_late_events_after_the_end_are_absorbed(s: Session) -> None:
    job, (port,) = start(s)
    port.records([out(1)])
    assert port.ended(Outcome.failed(ValueError("first"), 1))
    leaf = job.child_jobs[0]
    before = (leaf.state, leaf.reason, leaf.exit_code, leaf.end_time, list(leaf.history))
    assert not port.ended(Outcome.completed(0), [out(2)])
    assert not port.started(pid=1)
    port.records([out(3)])
    port.record(out(4))
    port.blocked("late?")
    port.suspended()
    port.resumed()
    assert (leaf.state, leaf.reason, leaf.exit_code, leaf.end_time, list(leaf.history)) == before
    assert leaf.prompt is None and job.receive() == [1] and port.finished


def test_records_of_work_that_ran_unseen_before_its_stop_are_kept(s: Session) -> None:
    """A queued job is Stopped at once, yet its work may have begun unseen (a cluster task):
    kept_records keeps what it wrote, and only for such a job; the state and history stay."""
    job, (port,) = start(s, kind="queued", run=False)
    s.stop_job(job)
    leaf = job.child_jobs[0]
    before = (leaf.state, leaf.end_time, list(leaf.history))
    port.kept_records([out(1)])
    assert not port.started(where="elsewhere")  # still never seen to run
    assert not port.ended(Outcome.stopped(), [out(2)])  # the state rule absorbs the end and its tail
    port.kept_records([out(2)])
    assert (leaf.state, leaf.end_time, list(leaf.history)) == before
    assert job.receive() == [1, 2] and job.state is JobState.STOPPED

    running, (rport,) = start(s)  # unfinished: appended as records() appends
    rport.kept_records([out(3)])
    s.stop_job(running)  # ran and was stopped: its end is final for records too
    rport.kept_records([out(4)])
    done, (dport,) = start(s)
    assert dport.ended(Outcome.completed(0))
    dport.kept_records([out(5)])
    assert running.receive() == [3] and done.receive() == []

    gone, (gport,) = start(s, kind="queued", run=False)
    s.remove_job(gone, force=True)
    gport.kept_records([out(6)])  # a removed job gets no journal again
    assert gone.child_jobs[0]._journal is None


def test_the_port_is_thread_safe(s: Session) -> None:
    job, (port,) = start(s)
    threads, per = 8, 2000
    ended: list[bool] = []
    go = threading.Barrier(threads)

    def report(t: int) -> None:
        go.wait()
        for n in range(0, per, 2):
            port.records([out((t, n)), out((t, n + 1))])
            port.record(out((t, n + 1.5)))
        ended.append(port.ended(Outcome.completed()))

    workers = [threading.Thread(target=report, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert sorted(ended) == [False] * (threads - 1) + [True]  # one end, whoever came first
    output = job.receive()
    assert job.state is JobState.COMPLETED
    for t in range(threads):
        mine = [n for who, n in output if who == t]
        assert mine == sorted(mine)  # each reporter's records in its order
    assert len(output) <= threads * per * 3 // 2  # records after the end were absorbed


def test_a_job_keeps_the_one_instance_id_that_threads_asking_first_at_once_were_given(s: Session) -> None:
    # The key is made on first use; the host's journal writer and a request may be first together.
    # A CI run once stored one key and showed another (test_connect's host restart).
    jobs = [start(s)[0] for _ in range(200)]
    threads = 4
    seen: list[list[Any]] = [[] for _ in range(threads)]
    go = threading.Barrier(threads)

    def ask(t: int) -> None:
        go.wait()
        seen[t] = [job.instance_id for job in jobs]

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as CPython allows, to meet the race
    try:
        workers = [threading.Thread(target=ask, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=30)
    finally:
        sys.setswitchinterval(old)
    kept = [job.instance_id for job in jobs]
    assert all(ids == kept for ids in seen)
    assert len(set(kept)) == len(jobs)


# --- the registry and the layers ---------------------------------------------------------------------

def test_the_registry_loads_backends_by_name_when_first_used() -> None:
    register_backend("inline-by-name", "tests.test_core:QueuedInline")
    try:
        assert backend_class("inline-by-name") is QueuedInline
    finally:
        unregister_backend("inline-by-name")
    with pytest.raises(KeyError, match="no backend"):
        backend_class("nowhere")


def test_import_psjobs_loads_no_backend_library() -> None:
    code = ("import sys, psjobs; s = psjobs.Session(); j = s.start_thread_job(lambda: 1); j.wait(); s.close(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('asyncssh', 'distributed') "
            "or m.startswith(('psjobs.backends.process', 'psjobs.backends.dask', 'psjobs.backends.ssh._engine'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]"


def test_the_core_imports_no_backend() -> None:
    core = Path(psjobs.__file__).parent / "core"
    for path in core.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom):
                names = [("psjobs.core." if node.level == 1 else "psjobs." if node.level == 2 else "")
                         + (node.module or "")]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            for name in names:
                parts = name.split(".")
                assert not {"backends", "host", "ipython", "asyncssh", "distributed"} & set(parts), \
                    f"{path.name} imports {name}"
