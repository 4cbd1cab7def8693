"""Job tables for the shell and notebooks (rich text, HTML), and the "[3] Completed" announcements.

Pure functions of jobs to text: no IPython import, and rich only when ``render_rich`` is called.
"""

from __future__ import annotations

import html
import io
from collections.abc import Iterable

import psjobs
from psjobs.core._format import COLUMNS, job_row
from psjobs.core._job import Job

_STATE_STYLE = {
    "Running": "yellow", "NotStarted": "dim", "Completed": "green", "Failed": "bold red",
    "Stopped": "magenta", "Stopping": "magenta", "Blocked": "bold cyan", "Suspended": "blue",
    "Suspending": "blue", "Disconnected": "red",
}
_STATE_HTML = {
    "Running": "#b58900", "Completed": "#2e7d32", "Failed": "#c62828", "Stopped": "#8e24aa",
    "Stopping": "#8e24aa", "Blocked": "#00838f", "Suspended": "#1565c0", "Disconnected": "#c62828",
}


def render_rich(jobs: Iterable[Job], *, width: int = 100, color: bool = True) -> str:
    """The Get-Job table drawn by rich (ANSI colours when ``color``), as text."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, header_style="bold", pad_edge=False)
    for name in COLUMNS:
        table.add_column(name, overflow="ellipsis", no_wrap=name != "Command",
                         justify="right" if name == "Id" else "left")
    for job in jobs:
        row = list(job_row(job))
        row[6] = " ".join(row[6].split())
        # Text, not markup: a command or a name is the user's text ("sed 's/[/]//'", "[bold]x"),
        # drawn as typed; rich would read brackets in a str as style tags, or fail on them.
        cells = [Text(cell) for cell in row]
        if color:
            cells[3].stylize(_STATE_STYLE.get(row[3], ""))
        table.add_row(*cells)
    out = io.StringIO()
    console = Console(file=out, width=width, force_terminal=color, color_system="standard" if color else None,
                      highlight=False, emoji=False, markup=False)
    console.print(table)
    return out.getvalue().rstrip("\n")


def render_html(jobs: Iterable[Job]) -> str:
    """The Get-Job table as an HTML table (for Jupyter)."""
    head = "".join(f"<th style='text-align:left'>{h}</th>" for h in COLUMNS)
    rows = []
    for job in jobs:
        cells = [html.escape(c) for c in job_row(job)]
        color = _STATE_HTML.get(cells[3])
        if color:
            cells[3] = f"<span style='color:{color};font-weight:bold'>{cells[3]}</span>"
        cells[6] = f"<code>{cells[6]}</code>"
        rows.append("<tr>" + "".join(f"<td style='text-align:left'>{c}</td>" for c in cells) + "</tr>")
    return (f"<table class='psjobs'><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def short_command(command: str) -> str:
    command = " ".join(command.split())
    return command if len(command) <= 60 else command[:57] + "..."


def announcement(done: list[Job], max_lines: int = 5) -> str:
    """``[3] Completed  2 + 3`` per job, or one summary line for many."""
    done = sorted(done, key=lambda j: j.id)
    if len(done) > max_lines:
        counts: dict[str, int] = {}
        for job in done:
            counts[str(job.state)] = counts.get(str(job.state), 0) + 1
        parts = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
        return f"[{done[0].id}-{done[-1].id}] {len(done)} jobs done: {parts} (%jobs lists them)"
    width = max(len(str(j.state)) for j in done)
    lines = []
    for job in done:
        line = f"[{job.id}] {str(job.state).ljust(width)}  {short_command(job.command)}"
        reason = job.reason
        if job.state is psjobs.JobState.FAILED and reason is not None:
            text = f"{type(reason).__name__}: {reason}".splitlines()[0]
            line += f"  ({text[:80]})"
        lines.append(line)
    return "\n".join(lines)
