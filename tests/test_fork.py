"""A program that forks while it has a session: the child's copy is the parent's, left alone.

Before: a child that merely exited closed its copy of the default session at exit, shut down the
socket it shares with the parent's fork server, and the server ended every job of the parent;
a child that started jobs on its copy waited for ever (the answers went to the parent).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.timeout(120)


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=100)


def test_a_forked_child_that_exits_leaves_the_parents_jobs_running() -> None:
    done = _run("""
        import os, sys, time, psjobs
        def slow():
            time.sleep(4)
            return "slow done"
        call = psjobs.start_job(slow)
        command = psjobs.start_job("sleep 4; echo command done")
        pid = os.fork()
        if pid == 0:
            sys.exit(0)  # runs the exit hooks, which close the child's copy of the default session
        os.waitpid(pid, 0)
        psjobs.wait_job([call, command], timeout=30)
        print(call.state, call.output, command.state, command.output, call.reason, command.reason)
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[:2] == ["Completed", "['slow"] and "Completed ['command done']" in done.stdout


def test_a_forked_child_starts_jobs_on_a_session_of_its_own() -> None:
    done = _run("""
        import os, sys, psjobs
        assert psjobs.start_job(abs, -1).wait(30)
        mine = psjobs.Session()
        assert mine.start_job(abs, -3).wait(30)
        pid = os.fork()
        if pid == 0:
            job = psjobs.start_job(abs, -2)  # the module's verbs: a new default session, the child's
            got = psjobs.receive_job(job, wait=True, timeout=30)
            try:
                mine.start_job(abs, -4)  # the parent's own session: refused, saying why
                said = "not refused"
            except psjobs.JobStateError as exc:
                said = str(exc)
            print(got, job.state, said, flush=True)
            os._exit(0 if got == [2] else 1)
        _, status = os.waitpid(pid, 0)
        after = psjobs.start_job(abs, -5)
        print(os.waitstatus_to_exitcode(status), psjobs.receive_job(after, wait=True, timeout=30))
    """)
    assert done.returncode == 0, done.stderr
    child, parent = done.stdout.splitlines()
    assert child.startswith("[2] Completed this session belongs to process ")
    assert "which this one was forked from; create a new psjobs.Session() here" in child
    assert parent == "0 [5]"
