"""The Get-Job table: ``Id Name PSJobTypeName State HasMoreData Location Command``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ._job import Job

COLUMNS = ("Id", "Name", "PSJobTypeName", "State", "HasMoreData", "Location", "Command")


def _cell(text: str, width: int) -> str:
    text = " ".join(text.split())  # a multi-line command stays on its row
    return text if len(text) <= width else text[: width - 3] + "..."


def job_row(job: Job) -> tuple[str, ...]:
    return (str(job.id), job.name, job.job_type, str(job.state), str(job.has_more_data),
            job.location, job.command)


def format_table(jobs: Job | Iterable[Job], *, width: int = 40) -> str:
    """The jobs as PowerShell's Get-Job shows them; ``width`` caps the Name, Location and Command cells."""
    items = [jobs] if isinstance(jobs, Job) else list(jobs)
    rows = [tuple(_cell(c, width) if i in (1, 5, 6) else c for i, c in enumerate(job_row(j))) for j in items]
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(COLUMNS)]
    lines = [
        "  ".join(h.ljust(w) for h, w in zip(COLUMNS, widths)).rstrip(),
        "  ".join(("-" * len(h)).ljust(w) for h, w in zip(COLUMNS, widths)).rstrip(),
    ]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


class JobList(list[Job]):
    """A list of jobs that shows itself as the Get-Job table in a REPL."""

    def __repr__(self) -> str:
        if not self or not all(isinstance(j, Job) for j in self):
            return list.__repr__(self)
        return format_table(self)

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))

    def _repr_html_(self) -> str:
        import html

        head = "".join(f"<th>{h}</th>" for h in COLUMNS)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in job_row(j)) + "</tr>"
                       for j in self if isinstance(j, Job))
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
