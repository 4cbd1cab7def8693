"""What the ``psjobs`` command prints: the Get-Job table or JSON, records in production order,
and any text from a job's name or command made safe for the terminal.

::

    host's rows --_print_jobs--> format_table(_View...) or JSON lines --> stdout
    records of several streams --_Ordered--> stdout and stderr, in the order they were produced
    names, commands, reasons --printable--> control characters escaped (no terminal driving)
"""

from __future__ import annotations

import codecs
import contextlib
import json
import re
from datetime import datetime, timezone
from typing import Any, TextIO, cast

from .core._format import format_table

# --- output ----------------------------------------------------------------------------------------

# C0 and C1 controls but tab, newline and return (which the table folds into spaces), DEL, and the
# bidirectional overrides: a job's name or command that holds them must not drive the terminal.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """``text`` with its control characters written as escapes (ESC as ``\\x1b``), for the
    terminal: the command's own words (tables, messages), never a job's output."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode(), text)


class _View:
    """A job as format_table reads it, its text made printable."""

    def __init__(self, row: dict[str, Any]) -> None:
        self.id = row["id"]
        self.name = printable(row["name"])
        self.job_type = printable(row["job_type"])
        self.state = printable(row["state"])
        self.has_more_data = row["has_more_data"]
        self.location = printable(row["location"])
        self.command = printable(row["command"])


def _print_jobs(rows: list[dict[str, Any]] | dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(rows, indent=2))
    elif rows:
        print(format_table(cast(Any, [_View(r) for r in (rows if isinstance(rows, list) else [rows])])))


class _Ordered:
    """stdout and stderr written in the order records were produced: switching from one to the
    other flushes the first, so a terminal (or `2>&1`) shows them interleaved as they happened."""

    def __init__(self) -> None:
        self.last: TextIO | None = None

    def stream(self, target: TextIO) -> TextIO:
        ordered = self

        class _Side:
            def write(self, text: str) -> int:
                if ordered.last is not None and ordered.last is not target:
                    ordered.last.flush()
                ordered.last = target
                return target.write(text)

            def flush(self) -> None:
                target.flush()

        return cast(TextIO, _Side())


def keep_bytes(stream: TextIO) -> None:
    """Have ``stream`` write lone surrogates as the bytes they stand for: what a command printed
    that is not UTF-8 arrives so (worker/_procs.text), and is written as it was; one that stands
    for no byte (a name given as "\\ud800" through connect()) as its escape, never a traceback."""
    reconfigure = getattr(stream, "reconfigure", None)  # a TextIOWrapper (not a test's StringIO)
    if reconfigure is not None:
        with contextlib.suppress(ValueError, OSError):
            reconfigure(errors=_AS_BYTES)


def _as_bytes(exc: UnicodeError) -> tuple[str | bytes, int]:
    """An encoding error handler: surrogateescape's U+DC80-U+DCFF as the byte each stands for,
    any other lone surrogate as backslashreplace writes it."""
    if not isinstance(exc, UnicodeEncodeError):
        raise exc
    out = bytearray()
    for char in exc.object[exc.start:exc.end]:
        code = ord(char)
        out += bytes([code - 0xDC00]) if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}".encode()
    return bytes(out), exc.end


_AS_BYTES = "psjobs.as_bytes"
codecs.register_error(_AS_BYTES, _as_bytes)


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).astimezone().isoformat()


# --- commands --------------------------------------------------------------------------------------
