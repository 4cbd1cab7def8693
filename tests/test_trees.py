"""Issue 13, cases 4 and 5: a job's processes die with its session, and a stop ends all of them.

Each test runs real processes: a child interpreter that owns a session and dies in one of the ways
a user's program dies (case 4), and commands or callables whose descendants leave their process
group with ``setsid`` (case 5), under both ways of finding a job's processes (worker/_tree).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

import psjobs
from psjobs import JobState
from psjobs.worker._tree import make_session_cgroup, remove_cgroups

from .conftest import wait_until


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _cgroups_here() -> bool:
    path = make_session_cgroup()
    if path is None:
        return False
    remove_cgroups(path)
    return True


# --- case 4: command jobs die with their session, however its process ends --------------------

ENDINGS = {
    "sigkill": "os.kill(os.getpid(), signal.SIGKILL)",
    "sigterm": "os.kill(os.getpid(), signal.SIGTERM)",
    "os_exit": "os._exit(0)",
    "exit_without_close": "sys.exit(0)",  # the Session is never closed
}

OWNER = """
import os, signal, sys, time
import psjobs
s = psjobs.Session()
s.commands_outlive_process = {outlive}
pidfile = {pidfile!r}
# sh and its child sleep: both must go (sh alone is what a kill of the leader would end).
s.start_job(["sh", "-c", f"sleep 1000 & echo $$ $! > {{pidfile}}.tmp && mv {{pidfile}}.tmp {{pidfile}}; wait"])
deadline = time.monotonic() + 20
while not os.path.exists(pidfile) and time.monotonic() < deadline:
    time.sleep(0.01)  # polling a file another process writes
{ending}
"""


def _run_owner(tmp_path: Path, ending: str, outlive: bool = False, direct: str = "1") -> list[int]:
    """Run a child interpreter whose session starts `sh` + `sleep 1000`, then ends; their pids.
    ``direct``: PSJOBS_DIRECT_COMMANDS, "0" for commands started by the fork server."""
    pidfile = str(tmp_path / "pids")
    code = OWNER.format(outlive=outlive, pidfile=pidfile, ending=ENDINGS[ending])
    subprocess.run([sys.executable, "-c", textwrap.dedent(code)], timeout=60, check=False,
                   stdout=subprocess.DEVNULL, env={**os.environ, "PSJOBS_DIRECT_COMMANDS": direct})
    pids = [int(p) for p in Path(pidfile).read_text().split()]
    assert len(pids) == 2
    return pids


@pytest.mark.parametrize("path", ["direct", "fork server"])
@pytest.mark.parametrize("ending", sorted(ENDINGS))
def test_case4_a_command_job_dies_with_its_session(tmp_path: Path, ending: str, path: str) -> None:
    """Started straight from the session into a cgroup under the fork server's (_direct), or by
    the fork server itself: either way the fork server ends it when the session's process ends."""
    pids = _run_owner(tmp_path, ending, direct="1" if path == "direct" else "0")
    wait_until(lambda: not any(_alive(p) for p in pids), timeout=10,
               what=f"the command (sh and sleep {pids}) to end after its session's process ended ({ending}, {path})")


@pytest.mark.parametrize("mode", ["cgroup", "process-tree"])
@pytest.mark.parametrize("ending", ["sigkill", "os_exit"])
def test_case4_what_left_its_group_dies_with_the_session_too(tmp_path: Path, ending: str, mode: str) -> None:
    """A setsid'd descendant of a command (its own session and process group) dies with its
    session's process, with cgroups or, without them, found by the fork server's walk."""
    if mode == "cgroup" and not _cgroups_here():
        pytest.skip("cgroup v2 is not writable here")
    pidfile = str(tmp_path / "pids")
    code = OWNER.format(outlive=False, pidfile=pidfile, ending=ENDINGS[ending]).replace(
        "sleep 1000 & echo", "setsid sleep 1000 & echo")
    env = {**os.environ, "PSJOBS_CGROUPS": "1" if mode == "cgroup" else "0"}
    subprocess.run([sys.executable, "-c", textwrap.dedent(code)], timeout=60, check=False,
                   stdout=subprocess.DEVNULL, env=env)
    pids = [int(p) for p in Path(pidfile).read_text().split()]
    assert len(pids) == 2 and os.getsid(pids[1]) == pids[1]  # the sleep left its group and session
    wait_until(lambda: not any(_alive(p) for p in pids), timeout=10,
               what=f"sh and its setsid'd sleep {pids} to end with their session ({ending}, {mode})")


def test_case4_the_session_hosts_commands_outlive_it(tmp_path: Path) -> None:
    pids = _run_owner(tmp_path, "sigkill", outlive=True)
    try:
        # Nothing to wait for: the command must simply be running still, as `psjobs start` promises.
        assert all(_alive(p) for p in pids), "a command of the session host's kind ended with its session"
    finally:
        for pid in pids:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        wait_until(lambda: not any(_alive(p) for p in pids), what="the outliving command to be killed")


# --- case 5: a stop ends the whole tree, escaped descendants included --------------------------

MODES = ["cgroup", "process-tree"]


@pytest.fixture(params=MODES)
def tree_session(request: pytest.FixtureRequest,
                 monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[psjobs.Session, str]]:
    """A session whose fork server finds a job's processes by its cgroup, or by walking /proc."""
    if request.param == "cgroup":
        if not _cgroups_here():
            pytest.skip("cgroup v2 is not writable here")
    else:
        monkeypatch.setenv("PSJOBS_CGROUPS", "0")
    s = psjobs.Session(stop_grace=2.0)
    try:
        yield s, request.param
    finally:
        s.close()


def _escaper() -> None:
    """A callable job that starts a grandchild in a session of its own, then waits."""
    subprocess.Popen(["setsid", "sleep", "1000"])
    time.sleep(1000)


@pytest.mark.parametrize("kind", ["command", "callable"])
def test_case5_a_stop_ends_escaped_setsid_descendants(tree_session: tuple[psjobs.Session, str],
                                                      kind: str) -> None:
    s, mode = tree_session
    job = s.start_job("setsid sleep 1000 & sleep 1000") if kind == "command" else s.start_job(_escaper)
    child = job.child_jobs[0]  # the parent job has no process; its one child has
    wait_until(lambda: child.pid is not None, what=f"{child!r} to start")
    assert child.pid is not None
    root = psutil.Process(child.pid)

    def sleeps() -> list[psutil.Process]:
        return [p for p in root.children(recursive=True) if p.name() == "sleep"]

    wait_until(lambda: len(sleeps()) == (2 if kind == "command" else 1), what=f"{job!r}'s sleeps to start")
    tree = [root, *root.children(recursive=True)]
    assert any(os.getsid(p.pid) != os.getsid(root.pid) for p in tree), "no process left the job's session"
    if mode == "cgroup":
        where = Path(f"/proc/{root.pid}/cgroup").read_text().strip().rsplit(":", 1)[-1]
        # one below its fork server's: a worker's is named by its pid (a command's by the server's pool)
        below = where.rpartition("/psjobs-")[2].split("/")
        assert len(below) == 2 and (kind == "command" or below[1] == str(root.pid)), \
            f"{child!r} has no cgroup of its own: {where}"

    started = time.monotonic()
    s.stop_job(job)
    took = time.monotonic() - started
    assert job.state is JobState.STOPPED, f"{job!r} is {job.state.name} after stop_job"
    assert took < s.stop_grace + 1.0, f"stop_job took {took:.2f}s, the grace is {s.stop_grace}s"
    left = [p.pid for p in tree if _alive(p.pid)]
    assert not left, f"{job!r} is Stopped but its processes {left} are still running"


def test_case5_the_session_end_kills_what_a_finished_job_left(tree_session: tuple[psjobs.Session, str]) -> None:
    # A job that completed while a setsid grandchild it started runs on (its pipes handed to
    # /dev/null): that grandchild is the session's to end when the session ends.
    s, mode = tree_session
    job = s.start_job("setsid sleep 1000 >/dev/null 2>&1 </dev/null & echo $!")
    s.wait_job(job, timeout=20)
    assert job.state is JobState.COMPLETED, f"{job!r}"
    orphan = int(s.receive_job(job)[0])
    assert _alive(orphan)
    s.close()
    if mode == "cgroup":
        wait_until(lambda: not _alive(orphan), what=f"the orphan {orphan} to end with its session")
    else:
        # Without a cgroup an orphan is nobody's: the documented limit of that mode.
        os.kill(orphan, signal.SIGKILL)
        wait_until(lambda: not _alive(orphan), what=f"the orphan {orphan} to be killed")


# --- the fork server's start-up warmer (worker/_tree.Warmer) leaves nothing behind --------------

def test_the_fork_servers_start_up_warmer_leaves_no_thread_cgroup_or_move() -> None:
    """While it imports, the fork server moves itself between two cgroups so that its first
    workers' cgroup moves are fast; once it is ready it must be single-threaded again (it forks),
    back in the cgroup it started in (commands return there after their spawn), and the two
    cgroups must be gone."""
    if not _cgroups_here():
        pytest.skip("cgroup v2 is not writable here")
    mine = Path("/proc/self/cgroup").read_text()
    with psjobs.Session() as s:
        job = s.start_job(os.getpid)
        assert job.wait(30) and job.state is JobState.COMPLETED
        server: psutil.Process = psutil.Process(s._backends["process"]._server.proc.pid)
        assert server.num_threads() == 1, "the warmer thread outlived the fork server's start-up"
        assert Path(f"/proc/{server.pid}/cgroup").read_text() == mine, "the fork server was left in a warm cgroup"
        session_cgroup = s._backends["process"]._server.cgroup
        assert session_cgroup is not None
        assert not [e for e in os.listdir(session_cgroup) if e.startswith("warm-")], "a warm cgroup was left"


LOST_SERVER = """
import os, signal, sys, time
import psjobs

def work(pidfile):
    import os, subprocess, time
    child = subprocess.Popen(["setsid", "sleep", "1000"])
    with open(pidfile + ".tmp", "w") as f:
        f.write(f"{{os.getpid()}} {{child.pid}}")
    os.rename(pidfile + ".tmp", pidfile)
    time.sleep(1000)

s = psjobs.Session()
job = {start}
deadline = time.monotonic() + 30
while not os.path.exists({pidfile!r}) and time.monotonic() < deadline:
    time.sleep(0.01)  # polling a file another process writes
backend = s._backends["process"]
os.kill(backend._server.proc.pid, signal.SIGKILL)  # the server is lost; its job's worker runs on
while backend._server.alive and time.monotonic() < deadline:
    time.sleep(0.01)
assert s.start_job(abs, -1).wait(30)  # a new server, told of the lost one's cgroup
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("kind", ["callable", "command"])
def test_the_jobs_of_a_lost_fork_server_die_with_the_session_too(tmp_path: Path, kind: str) -> None:
    """A fork server killed (or replaced as unresponsive) leaves its running jobs to no server (a
    callable's worker, a command the session started into a cgroup under the server's); the next
    one is told of its cgroup and ends them with the session, however the session ends."""
    if not _cgroups_here():
        pytest.skip("cgroup v2 is not writable here")
    pidfile = str(tmp_path / "pids")
    start = f"s.start_job(work, {pidfile!r})" if kind == "callable" else (
        f"s.start_job(['sh', '-c', 'setsid sleep 1000 & echo $$ $! > {pidfile}.tmp && mv {pidfile}.tmp {pidfile}; "
        f"wait'])")
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(LOST_SERVER.format(pidfile=pidfile, start=start))],
                          timeout=90, check=False, capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stderr
    pids = [int(p) for p in Path(pidfile).read_text().split()]
    assert len(pids) == 2
    wait_until(lambda: not any(_alive(p) for p in pids), timeout=10,
               what=f"the lost server's worker and its setsid'd sleep {pids} to end with the session")
