"""Issue 11's stop pass: a stop right after a job's output still ends it by SIGTERM, and what ends a
stopped job's tree keeps its promise (nothing of it left) without a walk of /proc.

Real workers, real signals; deadlines, never sleeps, as synchronisation.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

import psjobs
from psjobs import JobState
from psjobs.worker._tree import ProcessTree, make_session_cgroup, remove_cgroups

from .conftest import wait_until

ROUNDS = 10


def writes_then_loops(marker: str) -> None:
    """Write one item, then loop in pure Python; the finally block leaves a mark on the way out."""
    psjobs.write_output("go")
    try:
        while True:
            pass
    finally:
        with open(marker, "w") as f:
            f.write("ran")


def own_alarm_then_loops(marker: str) -> None:
    """As writes_then_loops, with a SIGALRM handler of the job's own: psjobs then sends the
    batches from a thread (worker/_batching._Pump), the path remote workers always take."""
    signal.signal(signal.SIGALRM, lambda *_: None)
    writes_then_loops(marker)


def _wait_for_go(session: psjobs.Session, job: psjobs.Job) -> None:
    for _leaf, stream, payload, _t in session.read_entries(job, keep=True, wait=True, timeout=30):
        if stream is psjobs.Stream.OUTPUT and payload == "go":
            return
    raise AssertionError(f"{job!r} did not write 'go' within 30 s")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("target", [writes_then_loops, own_alarm_then_loops], ids=["timer", "thread"])
def test_a_stop_just_after_the_first_output_runs_the_jobs_finally(session: psjobs.Session, tmp_path: Path,
                                                                  target: Callable[[str], None]) -> None:
    # The stop lands while the worker may still be sending "go" (from its timer, or its flusher
    # thread): the SIGTERM must act once the send is over, not wait for the SIGKILL at the end
    # of the grace, which runs no finally block (it did in 2 of 3 stops, and 1 in 5).
    for i in range(ROUNDS):
        marker = tmp_path / f"finally-{i}"
        job = session.start_job(target, str(marker))
        _wait_for_go(session, job)
        began = time.monotonic()
        session.stop_job(job)
        took = time.monotonic() - began
        assert job.state is JobState.STOPPED, f"{job!r} is {job.state.name} after stop_job"
        assert marker.exists() and marker.read_text() == "ran", \
            f"round {i}: {job!r}'s finally block did not run (stop_job took {took:.2f} s, grace " \
            f"{session.stop_grace} s: killed, not stopped)"
        session.remove_job(job)


# --- worker/_tree: what "nothing of it is left" looks at, with real processes --------------------

def _cgroup_base() -> str:
    base = make_session_cgroup()
    if base is None:
        pytest.skip("cgroup v2 is not writable here")
    return base


def _sleeper_in(cgroup: str | None) -> subprocess.Popen[bytes]:
    """`sleep 1000` leading a process group of its own, born in ``cgroup`` if one is given."""
    code = "import os, sys\n" \
           "if sys.argv[1]:\n" \
           "    os.makedirs(sys.argv[1], exist_ok=True)\n" \
           "    open(os.path.join(sys.argv[1], 'cgroup.procs'), 'w').write('0')\n" \
           "os.execvp('sleep', ['sleep', '1000'])\n"
    proc = subprocess.Popen([sys.executable, "-c", code, cgroup or ""], start_new_session=True)
    wait_until(lambda: psutil.Process(proc.pid).name() == "sleep", what="the sleeper to exec sleep")
    return proc


@pytest.mark.timeout(60)
def test_an_emptied_cgroup_is_the_whole_answer_and_an_unreaped_leader_does_not_count() -> None:
    base = _cgroup_base()
    proc = _sleeper_in(os.path.join(base, "job"))
    try:
        tree = ProcessTree(proc.pid, os.path.join(base, "job"))
        assert tree.signal(0) == [proc.pid] and tree.contained, "the job's first process was not seen in its cgroup"
        assert not tree.gone(), "a running job was taken for gone"
        tree.kill()
        # Dead but not reaped (its zombie still holds the group): nothing live is left of it.
        wait_until(lambda: psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE, what="the leader to die")
        assert tree.gone(), "a job whose only process is an unreaped zombie was not gone"
    finally:
        proc.kill()
        proc.wait()
        remove_cgroups(base)


@pytest.mark.timeout(60)
def test_a_first_process_outside_its_cgroup_is_still_found_by_its_group() -> None:
    # A join that failed leaves the job where it was: its empty cgroup must not make it gone.
    base = _cgroup_base()
    proc = _sleeper_in(None)
    try:
        tree = ProcessTree(proc.pid, os.path.join(base, "never-joined"))
        tree.signal(0)
        assert not tree.contained
        assert not tree.gone(), "a live job outside its cgroup was taken for gone"
        tree.kill()
        proc.wait(10)
        assert tree.gone()
    finally:
        proc.kill()
        proc.wait()
        remove_cgroups(base)


@pytest.mark.timeout(60)
def test_without_a_cgroup_a_descendant_that_left_the_group_holds_the_job() -> None:
    # `sh` starts `setsid sleep`: the sleep leaves the group; once seen by a look at the tree, it
    # keeps the job from being gone after sh is dead, until it is killed too.
    proc = subprocess.Popen(["sh", "-c", "setsid sleep 1000 & wait"], start_new_session=True)
    found: list[int] = []
    try:
        wait_until(lambda: any(p.name() == "sleep" for p in psutil.Process(proc.pid).children()),
                   what="sh to start its setsid sleep")
        tree = ProcessTree(proc.pid, None)
        found = tree.signal(0)
        assert len(found) == 1 and os.getpgid(found[0]) != proc.pid
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        assert not tree.gone(), "a live descendant that left the group was not seen"
        tree.kill()
        wait_until(tree.gone, what="the tree to be gone after its kill")
    finally:
        for pid in found:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.kill()
        proc.wait()


def test_stops_of_process_trees_leave_no_descriptor_open_in_the_session(session: psjobs.Session) -> None:
    """A stop watches each process it waits for through a pidfd: every one is closed again."""
    def open_fds() -> int:  # pidfds only: the fork server's spares come and go as sockets
        count = 0
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                count += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[pidfd]"
        return count

    def stopped_tree() -> None:
        job = session.start_job("sleep 100 | cat")
        leaf = job.child_jobs[0]
        wait_until(lambda: leaf.pid is not None and len(psutil.Process(leaf.pid).children()) >= 2,
                   what="sh's two children")
        session.stop_job(job)
        assert job.state is JobState.STOPPED
        session.remove_job(job)

    stopped_tree()
    before = open_fds()
    for _ in range(20):
        stopped_tree()
    assert open_fds() == before
