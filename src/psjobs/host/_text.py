"""Text that is not Unicode, made safe for JSON: shared by the command's ``--json`` and a
connected session (both read what the host stored), so neither face imports the other.

::

    a command's output that is not UTF-8 --(worker/_procs: surrogateescape)--> "\\udcff" in a str
        --json_safe--> U+FFFD: a JSON reader expects Unicode text

Standard library only.
"""

from __future__ import annotations

import codecs
from typing import Any

_FFFD = "\ufffd".encode()


def _byte_or_fffd(exc: UnicodeError) -> tuple[str | bytes, int]:
    """An encoding error handler: surrogateescape's U+DC80-U+DCFF as the byte each stands for
    (so the bytes of a character split by the escape decode together again), any other lone
    surrogate as U+FFFD."""
    if not isinstance(exc, UnicodeEncodeError):
        raise exc
    out = bytearray()
    for char in exc.object[exc.start:exc.end]:
        code = ord(char)
        out += bytes([code - 0xDC00]) if 0xDC80 <= code <= 0xDCFF else _FFFD
    return bytes(out), exc.end


_BYTE_OR_FFFD = "psjobs.byte_or_fffd"
codecs.register_error(_BYTE_OR_FFFD, _byte_or_fffd)


def json_safe(value: Any) -> Any:
    """``value`` for JSON: lone surrogates (bytes a command printed that are not UTF-8, or a name
    given as "\\ud800") become U+FFFD, each, since a JSON reader expects Unicode text; everything
    else as it is."""
    if isinstance(value, str):
        if value.isascii():
            return value
        return value.encode("utf-8", _BYTE_OR_FFFD).decode("utf-8", "replace")
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    return value
