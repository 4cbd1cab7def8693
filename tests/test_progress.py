"""ProgressDisplay: live bars per job, gone when done (PowerShell #24575), a jobs-done counter
(PowerShell #12069), and plain lines where there is no terminal."""

from __future__ import annotations

import io
import re
import time

import pytest

import psjobs
from psjobs import ProgressRecord, Stream
from psjobs.core._progress import ProgressDisplay

rich_console = pytest.importorskip("rich.console")

_CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def terminal() -> tuple[object, io.StringIO]:
    out = io.StringIO()
    return rich_console.Console(file=out, force_terminal=True, width=100, color_system=None), out


def last_frame(out: io.StringIO) -> str:
    """What the terminal shows after the last redraw: rich erases the previous frame line by
    line with ESC[2K and ESC[1A, so the text after the last erase sequence is on screen."""
    text = out.getvalue()
    last = max(text.rfind("\x1b[2K"), text.rfind("\x1b[1A"))
    tail = text[last:] if last >= 0 else text
    return _CONTROL.sub("", tail).replace("\r", "")


def record(activity: str, percent: float | None = None, status: str | None = None,
           completed: bool = False) -> ProgressRecord:
    return ProgressRecord(activity, status, percent, completed, time.time())


@pytest.fixture
def jobs(session: psjobs.Session) -> list[psjobs.Job]:
    made = [session.start_thread_job(lambda: None, name=n) for n in ("copy", "build", "test")]
    assert session.wait_job(made, timeout=10)
    return made


def test_one_bar_per_job_and_finished_bars_are_removed(jobs: list[psjobs.Job]) -> None:
    console, out = terminal()
    shown = ProgressDisplay(console, min_interval=0)
    assert not shown.plain
    shown.update(jobs[0], record("Copying", 30, "file 3 of 10"))
    shown.update(jobs[1], record("Building", 60))
    shown.update(jobs[0], record("Copying", 40, "file 4 of 10"))
    assert set(shown.bars) == {jobs[0].id, jobs[1].id}  # one bar per job, not per record
    frame = last_frame(out)
    assert "copy Copying: file 4 of 10" in frame and "40%" in frame
    assert "build Building" in frame and "60%" in frame
    assert "file 3 of 10" not in frame

    shown.job_done(jobs[0])
    frame = last_frame(out)
    assert "Copying" not in frame and "Building" in frame  # not left behind
    assert set(shown.bars) == {jobs[1].id}

    shown.update(jobs[1], record("Building", completed=True))  # Write-Progress -Completed
    assert shown.bars == {}
    assert "Building" not in last_frame(out)
    shown.close()


def test_records_after_the_job_is_done_do_not_bring_its_bar_back(jobs: list[psjobs.Job]) -> None:
    # PowerShell #24575: a replay of old progress records redraws bars that were finished.
    console, out = terminal()
    with ProgressDisplay(console, min_interval=0) as shown:
        shown.update(jobs[0], record("Copying", 10))
        shown.job_done(jobs[0])
        shown.update(jobs[0], record("Copying", 90))
        assert shown.bars == {}
        assert "Copying" not in last_frame(out)
        shown.job_done(jobs[0])  # counted once
        assert shown.done == 1


def test_jobs_done_counter(jobs: list[psjobs.Job]) -> None:
    console, out = terminal()
    with ProgressDisplay(console, total=3, min_interval=0) as shown:
        assert "jobs done 0/3" in last_frame(out)
        shown.job_done(jobs[0])
        shown.job_done(jobs[2])
        assert "jobs done 2/3" in last_frame(out)
        assert shown.done == 2


def test_close_leaves_nothing_on_the_screen(jobs: list[psjobs.Job]) -> None:
    console, out = terminal()
    shown = ProgressDisplay(console, total=3, min_interval=0)
    shown.update(jobs[0], record("Copying", 50))
    shown.close()
    shown.close()  # idempotent
    assert last_frame(out).strip() == ""
    shown.update(jobs[1], record("late", 10))  # after close: ignored, no error
    assert shown.bars == {}


def test_unknown_percent_is_an_open_bar(jobs: list[psjobs.Job]) -> None:
    console, out = terminal()
    with ProgressDisplay(console, min_interval=0) as shown:
        shown.update(jobs[0], record("Scanning"))
        assert "copy Scanning" in last_frame(out)


def test_plain_lines_when_not_a_terminal(jobs: list[psjobs.Job]) -> None:
    out = io.StringIO()
    console = rich_console.Console(file=out, width=100)  # a file, not a terminal
    with ProgressDisplay(console, total=2) as shown:
        assert shown.plain
        for p in range(0, 101, 2):  # 51 records ...
            shown.update(jobs[0], record("Copying", p))
        shown.update(jobs[1], record("Building", None, "step one"))
        shown.update(jobs[1], record("Building", None, "step two"))  # same activity: no new line
        shown.job_done(jobs[0])
    lines = out.getvalue().splitlines()
    copying = [line for line in lines if "Copying" in line]
    assert len(copying) == 11  # ... one line per tenth, not per record
    assert copying[0] == f"[{jobs[0].id}] copy Copying (0%)"
    assert copying[-1].endswith("(100%)")
    assert [line for line in lines if "Building" in line] == [f"[{jobs[1].id}] build Building: step one"]
    assert lines[-1] == f"[{jobs[0].id}] copy Completed: jobs done 1/2"
    assert "\x1b[" not in out.getvalue()


def test_plain_without_rich_console(jobs: list[psjobs.Job]) -> None:
    out = io.StringIO()
    with ProgressDisplay(file=out, plain=True) as shown:
        shown.update(jobs[0], record("Copying", 50))
    assert out.getvalue() == f"[{jobs[0].id}] copy Copying (50%)\n"


def test_bad_total_is_refused() -> None:
    with pytest.raises(ValueError, match="total"):
        ProgressDisplay(plain=True, total=-1)


def test_fed_from_a_real_job(session: psjobs.Session) -> None:
    # What receive_job/wait_job will do: read the job's records and show the progress ones.
    def work() -> str:
        for p in (25, 50, 75):
            psjobs.write_progress("Working", status=f"{p}%", percent_complete=p)
        psjobs.write_progress("Working", completed=True)
        return "done"

    job = session.start_thread_job(work)
    console, out = terminal()
    seen = []
    with ProgressDisplay(console, total=1, min_interval=0) as shown:
        for leaf, stream, payload, _ in session.read_entries(job, keep=True, wait=True, timeout=20):
            if stream is Stream.PROGRESS:
                shown.update(leaf, payload)
                seen.append(dict(shown.bars))
        shown.job_done(job)
        assert "jobs done 1/1" in last_frame(out)
    label = f"[{job.id}] {job.name} Working"
    assert [list(b.values()) for b in seen[:3]] == [[f"{label}: {p}%"] for p in (25, 50, 75)]
    assert seen[-1] == {}  # the completed record took the bar away
    assert job.receive() == ["done"]



def test_the_jobs_text_is_shown_as_written(session: psjobs.Session) -> None:
    # A name and a status are the job's own text: brackets in them are not style tags, nor an
    # error (a path such as "[/data/file0]" would close a tag that is not open).
    job = session.start_thread_job(lambda: None, name="[bold]mine[/bold]")
    assert job.wait(timeout=10)
    console, out = terminal()
    with ProgressDisplay(console, min_interval=0) as shown:
        shown.update(job, record("copying", 0, "[/data/file0]"))
        assert f"[{job.id}] [bold]mine[/bold] copying: [/data/file0]" in last_frame(out)


def _report_a_file() -> str:
    psjobs.write_progress("copying", status="file 0", percent_complete=0)
    return "copied"


def test_a_process_jobs_bar_names_the_job_the_user_knows(session: psjobs.Session) -> None:
    # The records come from the process job's hidden child, which %jobs never lists: the bar
    # names the parent, as the notebook's progress lines do.
    job = session.start_job(_report_a_file, name="mine")
    console, out = terminal()
    frame = ""
    with ProgressDisplay(console, min_interval=0) as shown:
        for leaf, stream, payload, _ in session.read_entries(job, keep=True, wait=True, timeout=30):
            if stream is Stream.PROGRESS:
                assert leaf is not job  # read from the child ...
                shown.update(leaf, payload)
                frame = last_frame(out)
        expected = f"[{job.id}] mine copying: file 0"  # ... labelled as the parent
        assert list(shown.bars.values()) == [expected]
        assert expected in frame
    assert job.receive() == ["copied"]
