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
from collections.abc import Callable
from typing import Any

from .._errors import ProtocolError

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
RECORDS_OOB = 7  # worker -> session: RECORDS whose large buffers follow raw (encode_records)

KINDS = frozenset({HELLO, JOB, RECORDS, DONE, PROMPT, ANSWER, RECORDS_OOB})
OOB_MIN = 1 << 20  # a buffer this large travels out of band (see encode_records)
_U32 = struct.Struct("!I")
_BIG = 1 << 20  # payloads above this are read straight into their own buffer


def decode_records(payload: bytes | bytearray) -> list[tuple[int, Any, float]]:
    """A RECORDS payload as journal entries ``(stream, value or record, time)``.

    On the wire a batch is three columns: pickling them costs ~10 ns an item where a list of
    3-tuples cost ~65 ns (measured), on each side.
    """
    streams, values, times = pickle.loads(payload)
    return list(zip(streams, values, times))


_SCAN = 64  # batches this small are looked through for large bytes values (a blob comes alone)


def encode_records(streams: bytes, values: list[Any], times: list[float],
                   dumps: Callable[..., bytes] = pickle.dumps) -> tuple[int, list[Any]]:
    """A batch as ``(RECORDS, [pickle])``, or ``(RECORDS_OOB, parts)`` when it holds large buffers.

    Large buffers are written from their own memory, after the pickle, not copied into it: a
    bytes value of OOB_MIN or more at the top of a small batch, and anything pickle protocol 5
    hands out of band (bytearray, contiguous numpy arrays, PickleBuffer), at any depth. Pickling
    a 100 MB value in band cost a second copy in the worker (page faults included, ~40 ms). ::

        | header size: uint32 | header: pickle of (pickle size, part sizes, how many parts the
        pickle takes as buffers, [index of each bytes value taken out]) | pickle | parts |
    """
    parts: list[Any] = []

    def in_band(buffer: pickle.PickleBuffer) -> bool:
        try:
            view = buffer.raw()
        except BufferError:
            return True  # not contiguous: pickled in band
        if view.nbytes < OOB_MIN:
            return True
        parts.append(view)
        return False

    slim, slots = values, []
    if len(values) <= _SCAN:
        for i, value in enumerate(values):
            if type(value) is bytes and len(value) >= OOB_MIN:
                if slim is values:
                    slim = list(values)
                slim[i] = None
                slots.append(i)
    data = dumps((streams, slim, times), protocol=5, buffer_callback=in_band)
    if not parts and not slots:
        return RECORDS, [data]
    pickled = len(parts)
    parts += [values[i] for i in slots]
    head = pickle.dumps((len(data), [len(memoryview(p).cast("B")) for p in parts], pickled, slots))
    return RECORDS_OOB, [_U32.pack(len(head)), head, data, *parts]


def decode_records_oob(payload: bytes | bytearray) -> list[tuple[int, Any, float]]:
    """Journal entries from a RECORDS_OOB payload (see encode_records). Out-of-band buffers are
    views of the payload: a numpy array comes back without a copy."""
    view = memoryview(payload)
    (size,) = _U32.unpack_from(view)
    data_size, sizes, pickled, slots = pickle.loads(view[4:4 + size])
    pos = 4 + size
    data = view[pos:pos + data_size]
    pos += data_size
    parts = []
    for n in sizes:
        parts.append(view[pos:pos + n])
        pos += n
    if pos != len(view):
        raise ProtocolError(f"a RECORDS_OOB frame of {len(view)} bytes announced {pos}")
    streams, values, times = pickle.loads(data, buffers=parts[:pickled])
    for index, part in zip(slots, parts[pickled:]):
        values[index] = bytes(part)
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
