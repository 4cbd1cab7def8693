"""Issue 11's stop pass: a stop right after a job's output still ends it by SIGTERM, and what ends a
stopped job's tree keeps its promise (nothing of it left) without a walk of /proc.

Real workers, real signals; deadlines, never sleeps, as synchronisation.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import psjobs
from psjobs import JobState

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


def _wait_for_go(session: psjobs.Session, job: psjobs.Job) -> None:
    for _leaf, stream, payload, _t in session.read_entries(job, keep=True, wait=True, timeout=30):
        if stream is psjobs.Stream.OUTPUT and payload == "go":
            return
    raise AssertionError(f"{job!r} did not write 'go' within 30 s")


@pytest.mark.timeout(120)
def test_a_stop_just_after_the_first_output_runs_the_jobs_finally(session: psjobs.Session,
                                                                  tmp_path: Path) -> None:
    # The stop lands while the worker may still be in the timer that sent "go" (its batch
    # writer busy): the SIGTERM must act once the send is over, not wait for the SIGKILL at the
    # end of the grace, which runs no finally block (it did in 2 of 3 stops).
    for i in range(ROUNDS):
        marker = tmp_path / f"finally-{i}"
        job = session.start_job(writes_then_loops, str(marker))
        _wait_for_go(session, job)
        began = time.monotonic()
        session.stop_job(job)
        took = time.monotonic() - began
        assert job.state is JobState.STOPPED, f"{job!r} is {job.state.name} after stop_job"
        assert marker.exists() and marker.read_text() == "ran", \
            f"round {i}: {job!r}'s finally block did not run (stop_job took {took:.2f} s, grace " \
            f"{session.stop_grace} s: killed, not stopped)"
        session.remove_job(job)
