"""Issue 13 ("nothing left running, nothing hangs"): cases 2, 7, 8 and the thread cases of 10.

Each test is named after its case. Real processes throughout; a window in which something must
not happen is the test's claim (``stays``), never a synchronisation.
"""

from __future__ import annotations

import gc
import math
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

import psjobs
from psjobs import JobState

from .conftest import wait_until
from .test_kinds import stays

TRIES = 20


def beat(path: str) -> None:
    """The side effect: appends to ``path`` every 10 ms until ``path.release`` exists."""
    import time

    while not os.path.exists(path + ".release"):
        with open(path, "a") as f:
            f.write(".")
        time.sleep(0.01)


SHELL_BEAT = 'while [ ! -e "$1.release" ]; do printf . >> "$1"; sleep 0.01; done'


def _starter(kind: str, session: psjobs.Session) -> Callable[[Path], psjobs.Job]:
    if kind == "thread":
        return lambda path: session.start_thread_job(beat, str(path))
    if kind == "process":
        return lambda path: session.start_job(beat, str(path))
    return lambda path: session.start_job(SHELL_BEAT, str(path))


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _fd_targets() -> dict[int, str]:
    """This process's descriptors and what each one is (to name a leak's owner when one fails)."""
    found = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            found[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # closed meanwhile, or listdir's own descriptor
            pass
    return found


def _job_fds(me: psutil.Process, session: psjobs.Session) -> int:
    """This process's descriptors, less the warm spares' sockets the fork server hands the session:
    it refills them when it likes, so their number moves by one or two whatever the jobs did."""
    server = getattr(session._backends.get("process"), "_server", None)
    return me.num_fds() - (len(server.spares) if server is not None else 0)


@pytest.mark.parametrize("kind", ["callable", "command"])
def test_a_process_jobs_descriptors_are_closed_when_wait_job_returns(kind: str) -> None:
    """The I/O thread closes a finished process job's socket and pipes before it tells the end,
    so none of them is open once wait_job returns: nothing to wait for, nothing closed later."""
    session = psjobs.Session()
    server_spares = lambda: getattr(session._backends.get("process"), "_server", None)  # noqa: E731
    try:
        session.remove_job(session.start_job(["true"] if kind == "command" else (lambda: 1)), force=True)
        for _ in range(TRIES):
            before = set(_fd_targets().values())
            job = session.start_job(["true"] if kind == "command" else (lambda: 1))
            opened = set(_fd_targets().values()) - before  # the job's (and maybe a new spare's socket)
            assert session.wait_job(job, timeout=30) == [job] and job.state is JobState.COMPLETED
            now = _fd_targets()
            server = server_spares()
            spares = {now.get(sock.fileno()) for _, sock in (server.spares if server is not None else ())}
            left = (opened & set(now.values())) - spares
            assert not left, f"{kind}: {left} of {job!r} still open when wait_job returned"
            session.remove_job(job)
    finally:
        session.close()


@pytest.mark.parametrize("kind", ["thread", "process", "command"])
def test_case2_stop_or_remove_right_after_start_leaves_nothing_running(kind: str, tmp_path: Path) -> None:
    """A job stopped, or removed with force, right after its start never runs afterwards: its
    side effect does not change once the verb returned, and no descriptor of it is left."""
    me = psutil.Process()
    session = psjobs.Session(stop_grace=2.0)
    paths: list[Path] = []
    try:
        start = _starter(kind, session)
        warm = tmp_path / "warm"  # the loop, the fork server and its spares exist before we count
        session.remove_job(start(warm), force=True)
        wait_until(lambda: not session.get_job(), 10, "the warm-up job to go")
        fds, targets = _job_fds(me, session), _fd_targets()
        for i in range(TRIES):
            stopped, forced = tmp_path / f"stopped{i}", tmp_path / f"forced{i}"
            paths += [stopped, forced]
            job = start(stopped)
            session.stop_job(job)
            assert job.state is JobState.STOPPED
            session.remove_job(job)
            job = start(forced)
            session.remove_job(job, force=True)
            assert job.state is JobState.STOPPED
        assert session.get_job() == []
        sizes = {path: _size(path) for path in paths}
        assert stays(lambda: any(_size(p) != sizes[p] for p in paths), 1.0), \
            f"{kind}: a job stopped or removed right after its start ran afterwards"
        # The workers' sockets and pipes close as they exit; the fork server refills its spares.
        # One descriptor of slack: a clean-clone run saw 29 -> 30 once for commands (1 in 4 full runs,
        # never alone; its owner is not known yet, see issue 13's note). A leak per job is 40 here.
        try:
            wait_until(lambda: _job_fds(me, session) <= fds + 1, 10, f"{kind}: the descriptors of {2 * TRIES} "
                       f"stopped jobs to be closed")
        except AssertionError as exc:
            now = _fd_targets()
            raise AssertionError(f"{exc} (had {fds}, now {_job_fds(me, session)}; opened since: "
                                 f"{sorted(set(now.items()) - set(targets.items()))})") from None
    finally:
        for path in [*paths, tmp_path / "warm"]:
            path.with_name(path.name + ".release").touch()
        session.close()


def test_case2_queued_thread_jobs_stopped_or_removed_never_run(session: psjobs.Session, tmp_path: Path) -> None:
    """A job stopped or removed while it waited for a throttle slot never runs, not even later."""
    gate = threading.Event()
    busy = session.start_thread_job(gate.wait, 30, throttle_limit=1)
    stopped, forced = tmp_path / "stopped", tmp_path / "forced"
    job = session.start_thread_job(beat, str(stopped))
    assert job.state is JobState.NOT_STARTED
    session.stop_job(job)
    other = session.start_thread_job(beat, str(forced))
    session.remove_job(other, force=True)
    gate.set()
    assert busy.wait(10)
    assert stays(lambda: stopped.exists() or forced.exists(), 0.5), "a queued job ran after its stop"


# --- case 8: NaN and infinity ------------------------------------------------------------------

@pytest.mark.parametrize("bad", [math.nan, -1.0])
def test_case8_a_nan_or_negative_timeout_is_refused_before_waiting(session: psjobs.Session, bad: float) -> None:
    job = session.start_thread_job(lambda: 1)
    for verb in (lambda: session.wait_job(job, timeout=bad),
                 lambda: session.receive_job(job, wait=True, timeout=bad),
                 lambda: job.wait(bad),
                 lambda: list(session.read_entries(job, wait=True, timeout=bad))):
        with pytest.raises(ValueError, match="timeout must be a number of seconds"):
            verb()


def test_case8_an_infinite_timeout_means_no_limit(session: psjobs.Session) -> None:
    import time

    # The job's own work takes a while, so each verb below really waits (inf overflowed there).
    job = session.start_thread_job(lambda: (time.sleep(0.2), 7)[1])
    assert session.wait_job(job, timeout=math.inf) == [job]
    assert session.receive_job(job, wait=True, timeout=math.inf) == [7]
    assert job.wait(math.inf)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0])
def test_case8_a_stop_grace_must_be_finite(bad: float) -> None:
    with pytest.raises(ValueError, match="stop grace must be a finite number"):
        psjobs.Session(stop_grace=bad)
    session = psjobs.Session()
    try:
        with pytest.raises(ValueError, match="stop grace must be a finite number"):
            session.close(grace=bad)
    finally:
        session.close()


def test_case8_the_command_takes_inf_as_no_limit_and_refuses_nan(tmp_path: Path) -> None:
    from .clitools import ok, private_home, run

    with private_home(tmp_path / "home"):
        job = ok("start", "-q", "--", "true").strip()
        assert ok("wait", "--timeout", "inf", job)
        code, _, err = run("wait", "--timeout", "nan", job)
        assert code == 2 and "a timeout is >= 0 seconds (or inf: no limit), not nan" in err
        ok("remove", "--force", job)


# --- case 10: a thread job waiting on itself, a suspend of a queued thread job ----------------------

def _waits_on_itself(how: str) -> str:
    me = psjobs.get_job(name="me")[0]
    try:
        if how == "wait":
            me.wait()
        else:
            psjobs.receive_job(me, wait=True)
    except psjobs.JobStateError as exc:
        return str(exc)
    return "it waited"


@pytest.mark.parametrize("how", ["wait", "receive"])
def test_case10_a_thread_job_waiting_on_itself_is_refused(default_session: psjobs.Session, how: str) -> None:
    job = psjobs.start_thread_job(_waits_on_itself, how, name="me")
    assert job.wait(10), "the job hung waiting for itself"
    (message,) = job.receive()
    assert f"Job {job.id} 'me'" in message and "is the job this code runs in" in message


def test_case10_suspending_a_queued_thread_job_is_refused(session: psjobs.Session) -> None:
    gate = threading.Event()
    busy = session.start_thread_job(gate.wait, 30, throttle_limit=1)
    queued = session.start_thread_job(lambda: 1)
    assert queued.state is JobState.NOT_STARTED
    with pytest.raises(psjobs.JobStateError, match="cannot be suspended"):
        session.suspend_job(queued)
    gate.set()
    assert busy.wait(10) and queued.wait(10)
    assert queued.state is JobState.COMPLETED and queued.receive() == [1]


# --- case 7: ghost jobs -----------------------------------------------------------------------------

@pytest.mark.parametrize("start", [
    lambda s: s.start_job("echo a\0b"),
    lambda s: s.start_job(["echo", "a\0b"]),
    lambda s: s.start_job('echo "$1"', "a\0b"),
    lambda s: s.start_job(lambda: 1, env={"X": "a\0b"}),
    lambda s: s.start_thread_job(["echo", "a\0b"]),
], ids=["command", "argv", "shell-argument", "env", "thread-argv"])
def test_case7_a_nul_byte_is_refused_before_a_job_exists(session: psjobs.Session, start: Any) -> None:
    with pytest.raises(ValueError, match="NUL byte"):
        start(session)
    assert session.get_job(include_child_jobs=True) == []


@pytest.mark.parametrize("target", [beat, "true"], ids=["callable", "command"])
def test_case7_no_descriptor_left_fails_the_job_with_its_reason(session: psjobs.Session, target: Any,
                                                               tmp_path: Path) -> None:
    import resource

    warm = session.start_job(lambda: 1)  # the I/O loop and the fork server exist before the limit
    assert warm.wait(30)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    filler: list[int] = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (psutil.Process().num_fds() + 8, hard))
    try:
        while True:  # every descriptor taken: the start cannot make its socket, pipes or process
            try:
                filler.append(os.open(os.devnull, os.O_RDONLY))
            except OSError:
                break
        args = (str(tmp_path / "beats"),) if target is beat else ()
        job = session.start_job(target, *args)  # the failure can only happen at the start
    finally:
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert job.wait(30), f"{job} stayed {job.state}"
    assert job.state is JobState.FAILED
    leaf = job.child_jobs[0]
    assert leaf.state is JobState.FAILED
    assert "Too many open files" in str(leaf.job_state_info.reason)


def test_a_thread_job_whose_stop_was_lost_ends_at_its_next_write() -> None:
    """A stop raised into a thread can be lost (Python drops one raised inside a __del__; here the
    job swallows it and loops in its handler, where psjobs raises no stop again). Once the grace
    period is over (or the job was declared Stopped, or its session closed), its next write ends
    it: the thread does not run on, unseen."""
    done = threading.Event()
    landed: list[float] = []

    def swallows_once() -> None:
        try:
            while True:
                psjobs.write_output(1)
        except BaseException:  # the stop, lost; and while it is being handled, none is raised again
            landed.append(time.monotonic())
            try:
                while True:
                    psjobs.write_output(2)  # raises JobStopped once the job is declared Stopped
            finally:
                done.set()

    # Twice a full run of the suite ended this job just past its grace period: the stop landed in
    # the garbage-collector callback hypothesis leaves installed, Python dropped it, and the job
    # wrote on until half the grace was over; its handler then had half a grace more. Now a stop
    # Python drops is raised by the next write (next test), and a handler ends by three quarters
    # of the grace period (the one after).
    with psjobs.Session(stop_grace=4.0) as s:
        job = s.start_thread_job(swallows_once)
        wait_until(lambda: job.output, what="the first item")
        asked = time.monotonic()
        try:
            s.stop_job(job)  # once the grace is over, its next write raises the stop again, itself
        except psjobs.StopTimeoutWarning as late:  # warnings are errors here: say when the stop landed
            when = f"{landed[0] - asked:.2f} s after the request" if landed else "never"
            raise AssertionError(f"the job outlived its grace period; the stop landed {when}") from late
        assert job.state is psjobs.JobState.STOPPED
        assert done.wait(10), "the thread ran on after its job was Stopped"


@pytest.mark.parametrize("writes", [True, False])
def test_a_stop_python_drops_in_a_gc_callback_is_raised_again(writes: bool) -> None:
    """Python drops an exception raised inside a garbage-collector callback (or a ``__del__``):
    a stop that lands there is raised again by the job's very next write, not a quarter of a
    second later, and not from psjobs' own hook (raised there, it is dropped too); in a job that
    does not write, by stop_job's wait."""
    entered = threading.Event()
    landed: list[bool] = []
    job_thread: list[int] = []

    def spins_until_stopped(phase: str, info: dict[str, int]) -> None:
        if phase != "start" or threading.get_ident() not in job_thread or entered.is_set():
            return
        entered.set()
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:  # the stop lands here, and Python drops it
                pass
        except psjobs.JobStopped:
            landed.append(True)
            raise

    def collects_then_writes() -> None:
        job_thread.append(threading.get_ident())
        psjobs.write_output(0)
        gc.collect()  # runs the callback above in this thread
        i = 1
        while writes:
            psjobs.write_output(i)  # the first one raises the stop the callback lost
            i += 1
        while True:
            i += 1  # no write: stop_job's wait raises it again

    gc.callbacks.append(spins_until_stopped)
    try:
        with psjobs.Session(stop_grace=10.0) as s:
            job = s.start_thread_job(collects_then_writes)
            assert entered.wait(20), f"{job!r} never ran the collection"
            s.stop_job(job)
            assert landed == [True], "the stop did not land in the collector's callback"
            assert job.state is psjobs.JobState.STOPPED
            assert s.receive_job(job) == [0], "the job wrote on after Python dropped its stop"
    finally:
        gc.callbacks.remove(spins_until_stopped)


def test_a_thread_job_whose_stop_handler_starts_late_still_ends_within_the_grace_period() -> None:
    """A job that ignores its stops for half the grace period, then handles the next one by
    writing on: the handler's writes end by three quarters of the grace period from the request,
    so stop_job returns the job Stopped and does not warn (with half a grace period from the
    handler's first write, as before, it ended just past the wait)."""
    grace = 4.0

    def ignores_then_handles() -> None:
        seen: float | None = None
        while True:
            try:
                while True:
                    psjobs.write_output(1)
                    if seen is None and psjobs.stop_requested():
                        seen = time.monotonic()
            except psjobs.JobStopped:
                if seen is None or time.monotonic() - seen < grace / 2:
                    continue  # swallowed: out of the handler, its writes go on
                while True:
                    psjobs.write_output(2)  # a handler: ends at its write past the limit

    with psjobs.Session(stop_grace=grace) as s:
        job = s.start_thread_job(ignores_then_handles)
        wait_until(lambda: job.output, what="the first item")
        s.stop_job(job)  # warnings are errors here: a StopTimeoutWarning fails the test
        assert job.state is psjobs.JobState.STOPPED
        assert 2 in s.receive_job(job), "the handler never wrote"


@pytest.mark.parametrize("hook", ["setprofile", "settrace"])
def test_stopping_a_thread_job_under_a_profiler_or_tracer_does_not_hang_the_session(hook: str) -> None:
    """A stop psjobs takes back at a job's end (it was raised, and may not have landed) must not
    leave CPython's eval loop signalled: with a profiler or a tracer on (cProfile, a debugger), the
    session's thread then looped forever at the start of its next generator, here in stop_job. A
    fresh interpreter runs it, so that a hang fails this test rather than wedging the suite."""
    script = textwrap.dedent("""
        import sys, time, psjobs

        def busy():
            psjobs.write_output("go")
            while True:
                pass

        def hook(frame, event, arg):
            return None

        sys.HOOK(hook)  # as cProfile (setprofile) or a debugger and coverage (settrace) do
        with psjobs.Session() as s:
            for _ in range(3):
                job = s.start_thread_job(busy)
                deadline = time.monotonic() + 30
                while not job.output and time.monotonic() < deadline:
                    time.sleep(0.001)
                s.stop_job(job)
                print(job.state.name, sum(x for x in range(3)), flush=True)
    """).replace("HOOK", hook)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=40)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n") == ["STOPPED 3"] * 3 + [""]
