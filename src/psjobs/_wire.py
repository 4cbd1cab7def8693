"""Frames between the session and a worker: a length, a kind, a payload.

::

    +----------------+--------+---------------------------+
    | length: uint32 | kind:1 | payload (length bytes)    |
    +----------------+--------+---------------------------+

The first frame a worker sends is HELLO with the protocol version and its Python version; a
session that speaks another version refuses it with a clear error instead of unpickling. A
length above MAX_FRAME is a protocol error (never an allocation). The channel is a socket of its
own: a job's stdout is never part of it.
"""

from __future__ import annotations

import pickle
import socket
import struct
from typing import Any

from ._errors import ProtocolError

VERSION = 3  # 2: RECORDS are columns (streams, values, times); 3: RECORDS_OOB
HEADER = struct.Struct("!IB")
# A fork server or spawned worker is started with psjobs on its PYTHONPATH; the caller's own value
# ("=" and it; empty: it had none) rides along in this variable and is put back before any job runs.
CALLER_PYTHONPATH = "PSJOBS_CALLER_PYTHONPATH"
MAX_FRAME = 1 << 30  # 1 GiB: larger values fail their job with a clear error instead

HELLO = 1     # worker -> session: (VERSION, pid, python version)
JOB = 2       # session -> worker: the pickled job
RECORDS = 3   # worker -> session: pickled (bytes of streams, [values], [times]): see decode_records
DONE = 4      # worker -> session: pickled (event name, reason, traceback text, exit code)
PROMPT = 5    # worker -> session: the job waits for input (prompt text)
ANSWER = 6    # session -> worker: the input
RECORDS_OOB = 7  # worker -> session: RECORDS whose large bytes values follow raw (encode_records_oob)

KINDS = frozenset({HELLO, JOB, RECORDS, DONE, PROMPT, ANSWER, RECORDS_OOB})
OOB_MIN = 1 << 20  # a bytes or bytearray value this large travels out of band
_U32 = struct.Struct("!I")
_BIG = 1 << 20  # payloads above this are read straight into their own buffer


def decode_records(payload: bytes | bytearray) -> list[tuple[int, Any, float]]:
    """A RECORDS payload as journal entries ``(stream, value or record, time)``.

    On the wire a batch is three columns: pickling them costs ~10 ns an item where a list of
    3-tuples cost ~65 ns (measured), on each side.
    """
    streams, values, times = pickle.loads(payload)
    return list(zip(streams, values, times))


def encode_records_oob(streams: bytes, values: list[Any], times: list[float]) -> list[Any] | None:
    """A RECORDS_OOB payload as parts to write one after the other, or None (no large value).

    ::

        | pickle size: uint32 | pickle of (streams, values with None for each large one, times,
        [(index, is bytes, size)]) | the large values' bytes, in that order |

    The large values are written from their own memory: pickling them in band copied 100 MB
    once more in the worker (page faults included, ~40 ms), half of psjobs' overhead there.
    """
    big = [i for i, v in enumerate(values) if type(v) in (bytes, bytearray) and len(v) >= OOB_MIN]
    if not big:
        return None
    slim = list(values)
    slots = []
    for i in big:
        slim[i] = None
        slots.append((i, type(values[i]) is bytes, len(values[i])))
    meta = pickle.dumps((streams, slim, times, slots), protocol=5)
    return [_U32.pack(len(meta)), meta, *(values[i] for i in big)]


def decode_records_oob(payload: bytes | bytearray) -> list[tuple[int, Any, float]]:
    """Journal entries from a RECORDS_OOB payload (see encode_records_oob)."""
    view = memoryview(payload)
    (size,) = _U32.unpack_from(view)
    streams, values, times, slots = pickle.loads(view[4:4 + size])
    pos = 4 + size
    for index, is_bytes, length in slots:
        chunk = view[pos:pos + length]
        pos += length
        values[index] = bytes(chunk) if is_bytes else bytearray(chunk)
    if pos != len(view):
        raise ProtocolError(f"a RECORDS_OOB frame of {len(view)} bytes announced {pos}")
    return list(zip(streams, values, times))


def frame(kind: int, payload: bytes) -> bytes:
    if len(payload) > MAX_FRAME:
        raise ProtocolError(f"a {len(payload)}-byte frame is over the {MAX_FRAME}-byte limit")
    return HEADER.pack(len(payload), kind) + payload


def send_frame(sock: socket.socket, kind: int, payload: bytes) -> None:
    """Blocking send (worker side): the header, then the payload without copying it."""
    if len(payload) > MAX_FRAME:
        raise ProtocolError(f"a {len(payload)}-byte frame is over the {MAX_FRAME}-byte limit")
    if len(payload) < 65536:
        sock.sendall(HEADER.pack(len(payload), kind) + payload)
    else:
        sock.sendall(HEADER.pack(len(payload), kind))
        sock.sendall(payload)


def recv_frame(sock: socket.socket) -> tuple[int, bytes] | None:
    """Blocking read of one frame (worker side); None at end of stream."""
    head = _recv_exact(sock, HEADER.size)
    if head is None:
        return None
    length, kind = HEADER.unpack(head)
    _check(length, kind)
    body = _recv_exact(sock, length)
    if body is None:
        raise ProtocolError("the channel closed in the middle of a frame")
    return kind, body


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            if got == 0:
                return None
            raise ProtocolError("the channel closed in the middle of a frame")
        got += k
    return bytes(buf)


def _check(length: int, kind: int) -> None:
    if kind not in KINDS:
        raise ProtocolError(f"unknown frame kind {kind} (a worker of another psjobs version, or garbage)")
    if length > MAX_FRAME:
        raise ProtocolError(f"a frame announced {length} bytes, over the {MAX_FRAME}-byte limit")


class FrameReader:
    """Non-blocking reader (session side): feed it what the socket has, get whole frames.

    Large payloads are received straight into a buffer of their announced size, so a 100 MB
    value is copied from the kernel once.
    """

    __slots__ = ("_big", "_buf", "_kind", "_pos")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._big: bytearray | None = None
        self._pos = 0
        self._kind = 0

    def read(self, sock: socket.socket, frames: list[tuple[int, bytes | bytearray]],
             budget: int = 16) -> bool:
        """Read what is there (at most ``budget`` reads); False at end of stream."""
        for _ in range(budget):
            big = self._big
            if big is not None:
                try:
                    n = sock.recv_into(memoryview(big)[self._pos:])
                except (BlockingIOError, InterruptedError):
                    return True
                if n == 0:
                    return self._eof()
                self._pos += n
                if self._pos == len(big):
                    frames.append((self._kind, big))
                    self._big = None
                continue
            try:
                chunk = sock.recv(262144)
            except (BlockingIOError, InterruptedError):
                return True
            if not chunk:
                return self._eof()
            buf = self._buf
            buf += chunk
            self._parse(frames)
        return True

    def _parse(self, frames: list[tuple[int, bytes | bytearray]]) -> None:
        buf = self._buf
        start = 0
        size = HEADER.size
        while len(buf) - start >= size:
            length, kind = HEADER.unpack_from(buf, start)
            _check(length, kind)
            end = start + size + length
            if len(buf) >= end:
                frames.append((kind, bytes(buf[start + size:end])))
                start = end
                continue
            if length > _BIG:
                big = bytearray(length)
                have = len(buf) - start - size
                big[:have] = buf[start + size:]
                self._big, self._pos, self._kind = big, have, kind
                start = len(buf)
            break
        if start:
            del buf[:start]

    def _eof(self) -> bool:
        if self._buf or self._big is not None:
            raise ProtocolError("the worker's channel closed in the middle of a frame")
        return False
