"""Spilled records come back as equal copies of the same types, whichever way a block was written:
plain records by the C codec (core/_cspill.c), anything else pickled; and a block that is not
what the codec wrote is an error, never a crash or wrong records."""

from __future__ import annotations

import enum
import os
import random
from typing import Any

import pytest

import psjobs
from psjobs.core import _spill
from psjobs.core._spill import WINDOW

pytestmark = pytest.mark.timeout(120)

codec = _spill._cspill
needs_codec = pytest.mark.skipif(codec is None, reason="the _cspill extension was not built (no C compiler at "
                                                       "install): every spilled block is pickled")


class Level(enum.IntEnum):
    HIGH = 3


PLAIN: list[Any] = [0, 1, -1, 2**63 - 1, -2**63, 1.5, -0.0, float("inf"), float("-inf"), True, False, None,
                    "", "line", "héllo wörld ✓", "nul\x00inside", b"", b"\x00\xffbytes"]
# Values the codec leaves to pickle: a block holding one is pickled whole, and each keeps its type.
OTHER: list[Any] = [2**63, -2**63 - 1, 10**40, bytearray(b"mutable"), Level.HIGH, "lone \udc80 surrogate",
                    (1, 2), [3], {"k": 4}, frozenset({5}), 3j, Exception("x")]


def _values(n: int) -> list[Any]:
    """``n`` values: long runs of plain ones, with the other kinds in a few places only."""
    out = [PLAIN[i % len(PLAIN)] for i in range(n)]
    for k, other in enumerate(OTHER):
        out[(k + 1) * n // (len(OTHER) + 2)] = other
    return out


def _same(got: list[Any], want: list[Any]) -> None:
    assert len(got) == len(want)
    assert [type(v) for v in got] == [type(v) for v in want]
    # repr, not ==: -0.0 == 0.0, and an Exception equals only itself
    assert [repr(v) for v in got] == [repr(v) for v in want]


def _block_kinds(journal: _spill.SpillJournal) -> set[bytes]:
    assert journal._path is not None
    with open(journal._path, "rb") as f:
        return {os.pread(f.fileno(), 1, off) for off in journal._offs}


def _spilled_job(session: psjobs.Session, values: list[Any]) -> psjobs.Job:
    job = session.start_thread_job(lambda: [psjobs.write_output(v) for v in values] and None)
    assert job.wait(timeout=60)
    journal = job._journal
    assert isinstance(journal, _spill.SpillJournal) and len(journal._starts) > 2, "the records were not spilled"
    return job


def test_spilled_records_come_back_equal_and_of_the_same_types(session: psjobs.Session) -> None:
    values = _values(3 * WINDOW // 100)  # ~3 windows of records: most of them go to disk
    job = _spilled_job(session, values)
    kinds = _block_kinds(job._journal)  # type: ignore[arg-type]
    assert b"\x80" in kinds  # the blocks with another kind of value: pickled
    if codec is not None:
        assert _spill._PLAIN in kinds  # the plain ones: the codec's
    _same(job.output, values)  # read twice: job.output, then a consuming receive
    _same(job.receive(), values)
    assert job.receive() == []
    _same(job.output, values)  # receiving does not empty the stream


def test_without_the_codec_every_block_is_pickled_and_reads_back_the_same(session: psjobs.Session,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_spill, "_cspill", None)
    values = _values(2 * WINDOW // 100)
    job = _spilled_job(session, values)
    assert _block_kinds(job._journal) == {b"\x80"}  # type: ignore[arg-type]
    _same(job.receive(), values)


@needs_codec
def test_the_codec_refuses_what_it_would_not_give_back_the_same() -> None:
    assert codec is not None
    for value in OTHER:
        assert codec.encode([(0, 1, 1.0), (0, value, 2.0)]) is None, value
    for entry in [(7, 1, 1.0), (-1, 1, 1.0), (0, 1, 1), (0, 1), (0, 1, 1.0, 2), [0, 1, 1.0]]:
        assert codec.encode([entry]) is None, entry  # type: ignore[list-item]
    with pytest.raises(TypeError):
        codec.encode((0, 1, 1.0))  # type: ignore[arg-type]
    entries = [(s, v, float(i)) for i, (s, v) in enumerate((i % 7, v) for i, v in enumerate(PLAIN))]
    data = codec.encode(entries)
    assert data is not None and data[:1] == _spill._PLAIN
    got = codec.decode(data)
    assert [s for s, _, _ in got] == [s for s, _, _ in entries]
    _same([v for _, v, _ in got], PLAIN)
    assert [t for _, _, t in got] == [t for _, _, t in entries]


@needs_codec
def test_a_block_cut_short_or_damaged_is_an_error_never_a_crash() -> None:
    assert codec is not None
    data = codec.encode([(i % 7, PLAIN[i % len(PLAIN)], 1.0) for i in range(200)])
    assert data is not None
    for k in range(len(data)):
        with pytest.raises(ValueError, match="not a spill block"):
            codec.decode(data[:k])
    with pytest.raises(ValueError, match="not a spill block"):
        codec.decode(data + b"\x00")
    rng = random.Random(7)
    for _ in range(3000):
        damaged = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            damaged[rng.randrange(1, len(damaged))] = rng.randrange(256)
        try:
            got = codec.decode(bytes(damaged))
        except (ValueError, UnicodeDecodeError):
            continue
        assert len(got) == 200 and all(type(e) is tuple and len(e) == 3 for e in got)
    for _ in range(3000):
        noise = _spill._PLAIN + rng.randbytes(rng.randrange(64))
        try:
            codec.decode(noise)
        except (ValueError, UnicodeDecodeError):
            pass
