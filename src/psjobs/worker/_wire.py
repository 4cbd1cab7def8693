"""The one codec between a session and the code it runs elsewhere: frames and named messages.

::

    +----------------+--------+---------------------------+
    | length: uint32 | kind:1 | payload (length bytes)    |
    +----------------+--------+---------------------------+

    session --JOB, ANSWER--> process worker (a socket) or remote bootstrap (the SSH channel's stdin)
    worker  --HELLO, RECORDS / RECORDS_OOB, PROMPT, DONE--> session
    remote bootstrap --R_INFO, R_REFUSE, R_EXIT--> session;  session --R_MODULES, R_STOP, R_PAUSE--> it

Every kind is in ``Kind``; every message but the record batches is a named class below with
``encode()`` (its payload), ``frame()`` and ``decode(payload)``, decoded here and nowhere else
(CPython ``concurrent/futures/process.py``'s ``_CallItem``/``_ResultItem`` are the model). The first
frame a worker sends is HELLO with the protocol version and its Python version; a session that
speaks another version refuses it with a clear error instead of unpickling. A length above
MAX_FRAME is a protocol error (never an allocation). The channel is a socket of its own: a job's
stdout is never part of it. A batch the session cannot unpickle is read again by _salvage.

Standard library only: the remote bootstrap runs it from source before psjobs exists there (BOOT0).
"""

from __future__ import annotations

import enum
import os
import pickle
import socket
import struct
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

try:
    from .._errors import ProtocolError
    from .._recordclass import record  # dataclasses' exec of generated code cost ~3 ms at import
except ImportError:  # run from source by the remote bootstrap: no package around it
    from dataclasses import dataclass as record

    class ProtocolError(Exception):  # type: ignore[no-redef]
        """A frame that breaks the protocol (psjobs' own class where psjobs is installed)."""

VERSION = 3  # 2: RECORDS are columns (streams, values, times); 3: RECORDS_OOB
HEADER = struct.Struct("!IB")
# A fork server or spawned worker is started with psjobs on its PYTHONPATH; the caller's own value
# ("=" and it; empty: it had none) rides along in this variable and is put back before any job runs.
CALLER_PYTHONPATH = "PSJOBS_CALLER_PYTHONPATH"
MAX_FRAME = 1 << 30  # 1 GiB: larger values fail their job with a clear error instead


class Kind(enum.IntEnum):
    """Every frame kind. Below 128: the worker's own; from 129: the remote bootstrap's."""

    HELLO = 1         # worker -> session: Hello
    JOB = 2           # session -> worker: JobMsg
    RECORDS = 3       # worker -> session: pickled (bytes of streams, [values], [times]): decode_records
    DONE = 4          # worker -> session: Done
    PROMPT = 5        # worker -> session: Prompt (the job waits for input)
    ANSWER = 6        # session -> worker: Answer
    RECORDS_OOB = 7   # worker -> session: RECORDS whose large buffers follow raw (encode_records)
    R_INFO = 129      # remote -> session: Info (json: Python version, psjobs and cloudpickle found there)
    R_REFUSE = 130    # remote -> session: Refuse (plain text: why; BOOT0 writes it, see boot0)
    R_EXIT = 131      # remote -> session: Exit (json: wait status of the worker)
    R_MODULES = 132   # session -> remote: {module name: [code or source, is_package]} (_remote_boot)
    R_STOP = 133      # session -> remote: Stop (json: grace seconds)
    R_PAUSE = 134     # session -> remote: Pause (b"stop": SIGSTOP the job's group, b"cont": SIGCONT)
    R_SOURCE = 135    # session -> BOOT0: a module to run from source (its name, a newline, the source)


# Plain ints for the hot paths (a frame's kind compares against these).
HELLO, JOB, RECORDS, DONE, PROMPT, ANSWER, RECORDS_OOB = (int(k) for k in list(Kind)[:7])
_KINDS = frozenset(int(k) for k in Kind)
OOB_MIN = 1 << 20  # a buffer this large travels out of band (see encode_records)
_U32 = struct.Struct("!I")
_BIG = 1 << 20  # payloads above this are received straight into their own buffer


def header(kind: int, size: int) -> bytes:
    """The header of a frame of ``size`` payload bytes; over MAX_FRAME is refused here."""
    if size > MAX_FRAME:
        raise ProtocolError(f"a {size}-byte frame is over the {MAX_FRAME}-byte limit")
    return HEADER.pack(size, kind)


def frame(kind: int, payload: bytes) -> bytes:
    """One whole frame."""
    return header(kind, len(payload)) + payload


def check(length: int, kind: int) -> None:
    """A header just read: a kind of this protocol and a length within the cap, or ProtocolError."""
    if kind not in _KINDS:
        raise ProtocolError(f"unknown frame kind {kind} (a worker of another psjobs version, or garbage)")
    if length > MAX_FRAME:
        raise ProtocolError(f"a frame announced {length} bytes, over the {MAX_FRAME}-byte limit")


# --- messages -------------------------------------------------------------------------------------

_M = TypeVar("_M", bound="_Message")


def _checked(decode: Callable[[type[_M], bytes | bytearray], _M]) -> Callable[[type[_M], bytes | bytearray], _M]:
    """A payload that does not decode is a ProtocolError naming its frame, whatever broke inside
    (pickle, JSON, a field of the wrong type): the reader fails its job with that reason instead
    of dying of a stray exception (tests/test_fuzz.py feeds it garbage)."""
    def decode_checked(cls: type[_M], payload: bytes | bytearray) -> _M:
        try:
            return decode(cls, payload)
        except ProtocolError:
            raise
        except Exception as exc:
            raise ProtocolError(f"a broken {cls.kind.name} frame of {len(payload)} bytes "
                                f"({type(exc).__name__}: {exc})") from exc
    return decode_checked


def _typed(value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise TypeError(f"{what} is a {type(value).__name__}")  # _checked names the frame
    return value


class _Message:
    __slots__ = ()
    kind: ClassVar[Kind]

    def encode(self) -> bytes:
        raise NotImplementedError

    def frame(self) -> bytes:
        return frame(self.kind, self.encode())


@record
class Hello(_Message):
    """The worker exists: its protocol version, pid and Python (major, minor)."""

    kind: ClassVar[Kind] = Kind.HELLO
    version: int
    pid: int
    python: tuple[int, ...]

    def encode(self) -> bytes:
        return pickle.dumps((self.version, self.pid, tuple(self.python)))

    @classmethod
    @_checked
    def decode(cls, payload: bytes | bytearray) -> Hello:
        version, pid, python = pickle.loads(payload)
        return cls(_typed(version, int, "its version"), _typed(pid, int, "its pid"), tuple(python))


@record
class JobMsg(_Message):
    """The job: where to run (None: leave as it is) and the pickled call (pickle_call)."""

    kind: ClassVar[Kind] = Kind.JOB
    call: bytes
    cwd: str | None = None
    env: dict[str, str] | None = None
    sys_path: list[str] | None = None
    umask: int | None = None   # the starting client's (the session host's jobs), else leave as it is

    def encode(self) -> bytes:
        meta: dict[str, Any] = {"cwd": self.cwd, "env": self.env, "sys_path": self.sys_path, "call": self.call}
        if self.umask is not None:  # only the session host's jobs carry one
            meta["umask"] = self.umask
        return pickle.dumps(meta, protocol=5)

    @classmethod
    @_checked
    def decode(cls, payload: bytes | bytearray) -> JobMsg:
        meta: dict[str, Any] = pickle.loads(payload)
        return cls(_typed(meta["call"], bytes, "its call"), _typed(meta.get("cwd"), (str, type(None)), "its cwd"),
                   _typed(meta.get("env"), (dict, type(None)), "its env"),
                   _typed(meta.get("sys_path"), (list, type(None)), "its sys_path"),
                   _typed(meta.get("umask"), (int, type(None)), "its umask"))


def pickle_call(target: Any, args: tuple[Any, ...], kwargs: dict[str, Any], init: Any, items: Any) -> bytes:
    """A call as ``JobMsg.call`` carries it (``load_call`` reads it). cloudpickle is imported where
    it is used: a remote bootstrap runs this module's source before cloudpickle may exist there."""
    return cloudpickle_dumps((target, args, kwargs, init, items), protocol=5)  # file names kept


def load_call(call: bytes) -> tuple[Any, tuple[Any, ...], dict[str, Any], Any, Any]:
    """(target, args, kwargs, init, input items) from ``pickle_call``'s bytes, in the worker."""
    import cloudpickle
    target, args, kwargs, init, items = cloudpickle.loads(call)
    return target, args, kwargs, init, items


@record
class Done(_Message):
    """The worker's last word: "complete", "fail" or "stopped", the pickled exception and its
    traceback text (_outcome.dump_reason / load_reason), and a sys.exit status."""

    kind: ClassVar[Kind] = Kind.DONE
    event: str
    reason: bytes | None = None
    traceback: str | None = None
    exit_code: int | None = None

    def encode(self) -> bytes:
        return pickle.dumps((self.event, self.reason, self.traceback, self.exit_code))

    @classmethod
    @_checked
    def decode(cls, payload: bytes | bytearray) -> Done:
        event, reason, tb, code = pickle.loads(payload)
        if event not in ("complete", "fail", "stopped"):
            raise ProtocolError(f"a DONE frame with the unknown end {event!r}")
        return cls(event, _typed(reason, (bytes, type(None)), "its reason"),
                   _typed(tb, (str, type(None)), "its traceback"), _typed(code, (int, type(None)), "its exit code"))


@record
class Prompt(_Message):
    """The job waits for input (read_host) with this prompt."""

    kind: ClassVar[Kind] = Kind.PROMPT
    text: str

    def encode(self) -> bytes:
        return pickle.dumps(self.text)

    @classmethod
    @_checked
    def decode(cls, payload: bytes | bytearray) -> Prompt:
        return cls(str(pickle.loads(payload)))


@record
class Answer(_Message):
    """The input a job asked for."""

    kind: ClassVar[Kind] = Kind.ANSWER
    text: str

    def encode(self) -> bytes:
        return pickle.dumps(self.text)

    @classmethod
    @_checked
    def decode(cls, payload: bytes | bytearray) -> Answer:
        return cls(str(pickle.loads(payload)))


def _json_dump(value: Any) -> bytes:
    import json  # the remote's messages only: a local worker never loads it (see tests/test_startup.py)
    return json.dumps(value).encode()


def _json_load(payload: bytes | bytearray) -> Any:
    import json
    return json.loads(bytes(payload).decode("utf-8"))


@record
class Info(_Message):
    """What the remote interpreter has (_remote_boot.probe): the session sends what is missing."""

    kind: ClassVar[Kind] = Kind.R_INFO
    info: dict[str, Any]

    def encode(self) -> bytes:
        return _json_dump(self.info)

    @classmethod
    @_checked
    def decode(cls, payload: bytes | bytearray) -> Info:
        return cls(dict(_json_load(payload)))


@record
class Refuse(_Message):
    """Why the remote refuses to go on (a Python version mismatch), as plain text."""

    kind: ClassVar[Kind] = Kind.R_REFUSE
    text: str

    def encode(self) -> bytes:
        return self.text.encode()

    @classmethod
    @_checked
    def decode(cls, payload: bytes | bytearray) -> Refuse:
        return cls(bytes(payload).decode("utf-8", "replace"))


@record
class Exit(_Message):
    """The remote worker process is gone: its wait status (None: unknown)."""

    kind: ClassVar[Kind] = Kind.R_EXIT
    status: int | None

    def encode(self) -> bytes:
        return _json_dump({"status": self.status})

    @classmethod
    @_checked
    def decode(cls, payload: bytes | bytearray) -> Exit:
        return cls(_typed(_json_load(payload).get("status"), (int, type(None)), "its status"))


@record
class Stop(_Message):
    """Stop the remote job: SIGTERM to its group, SIGKILL after ``grace`` seconds (None: the
    remote's default)."""

    kind: ClassVar[Kind] = Kind.R_STOP
    grace: float | None

    def encode(self) -> bytes:
        return _json_dump({"grace": self.grace})

    @classmethod
    @_checked
    def decode(cls, payload: bytes | bytearray) -> Stop:
        try:
            return cls(float(_json_load(payload)["grace"]))
        except Exception:
            return cls(None)


@record
class Pause(_Message):
    """Suspend (True) or resume (False) the remote job's process group."""

    kind: ClassVar[Kind] = Kind.R_PAUSE
    pause: bool

    def encode(self) -> bytes:
        return b"stop" if self.pause else b"cont"

    @classmethod
    @_checked
    def decode(cls, payload: bytes | bytearray) -> Pause:
        return cls(bytes(payload) == b"stop")


# --- record batches -------------------------------------------------------------------------------

def decode_entries(kind: int, payload: bytes | bytearray,
                   loads: Callable[..., Any] = pickle.loads) -> list[tuple[int, Any, float]]:
    """Journal entries from a RECORDS or RECORDS_OOB payload (``loads``: the session's
    _salvage.loads, to read again a batch that pickle.loads could not)."""
    return decode_records(payload, loads) if kind == RECORDS else decode_records_oob(payload, loads)


def decode_records(payload: bytes | bytearray,
                   loads: Callable[..., Any] = pickle.loads) -> list[tuple[int, Any, float]]:
    """A RECORDS payload as journal entries ``(stream, value or record, time)``. On the wire a batch
    is three columns: ~10 ns an item to pickle, where a list of 3-tuples cost ~65 ns (measured)."""
    streams, values, times = loads(payload)
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


def decode_records_oob(payload: bytes | bytearray,
                       loads: Callable[..., Any] = pickle.loads) -> list[tuple[int, Any, float]]:
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
    streams, values, times = loads(data, buffers=parts[:pickled])
    for index, part in zip(slots, parts[pickled:]):
        values[index] = bytes(part)
    return list(zip(streams, values, times))


# --- reading frames --------------------------------------------------------------------------------

class FrameReader:
    """Whole frames from a byte stream: ``read`` a non-blocking socket (the session's side) or
    ``feed`` bytes that came some other way (an SSH channel, a pipe). Every header is checked
    (kind, MAX_FRAME) before anything is allocated for it.

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
            self._buf += chunk
            self._parse(frames)
        return True

    def feed(self, data: bytes | bytearray) -> list[tuple[int, bytes | bytearray]]:
        """The whole frames ``data`` completes."""
        frames: list[tuple[int, bytes | bytearray]] = []
        big = self._big
        if big is not None:
            n = min(len(big) - self._pos, len(data))
            big[self._pos:self._pos + n] = memoryview(data)[:n]
            self._pos += n
            if self._pos < len(big):
                return frames
            frames.append((self._kind, big))
            self._big = None
            data = data[n:]
        self._buf += data
        self._parse(frames)
        return frames

    def pending(self) -> bool:
        """Part of a frame is waiting for the rest."""
        return bool(self._buf) or self._big is not None

    def _parse(self, frames: list[tuple[int, bytes | bytearray]]) -> None:
        buf = self._buf
        start = 0
        size = HEADER.size
        while len(buf) - start >= size:
            length, kind = HEADER.unpack_from(buf, start)
            check(length, kind)
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
        if self.pending():
            raise ProtocolError("the worker's channel closed in the middle of a frame")
        return False


def recv_frame(fd: int) -> tuple[int, bytes] | None:
    """Blocking read of one frame from a file descriptor (the worker's side); None at its end."""
    head = _read_exact(lambda k: os.read(fd, k), HEADER.size)
    if head is None:
        return None
    length, kind = HEADER.unpack(head)
    check(length, kind)
    body = _read_exact(lambda k: os.read(fd, k), length)
    if body is None:
        raise ProtocolError("the channel closed in the middle of a frame")
    return kind, body


def recv_exact(sock: socket.socket, n: int) -> bytes | None:
    """Exactly ``n`` bytes from a blocking socket; None at a clean end, ProtocolError mid-frame."""
    return _read_exact(sock.recv, n)


_recv_exact = recv_exact  # the name host/_client imports


def _read_exact(read: Callable[[int], bytes], n: int) -> bytes | None:
    chunks = []
    got = 0
    while got < n:
        chunk = read(n - got)
        if not chunk:
            if got == 0:
                return None
            raise ProtocolError("the channel closed in the middle of a frame")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


_pickler: Any = None


def cloudpickle_dumps(obj: Any, protocol: int = 5) -> bytes:
    """``cloudpickle.dumps``, keeping the file name of each function shipped by value.

    cloudpickle 3 writes ``<dynamic-code>`` in place of a code object's file name (for payloads
    that do not depend on where a function was defined). A worker's traceback then names no file,
    and no one can show the failing line: neither the worker, for a function of a script, nor the
    session's Jupyter kernel, for a function of a cell (issue 17). Reaches into cloudpickle's
    ``_code_reduce`` (here rather than in _compat, the bottom layer, which may import nothing but
    the standard library); without it, plain ``dumps``.
    """
    import io

    import cloudpickle

    global _pickler
    if _pickler is None:
        reduce = getattr(getattr(cloudpickle, "cloudpickle", None), "_code_reduce", None)
        table = getattr(cloudpickle.Pickler, "dispatch_table", None)
        if reduce is None or table is None:
            _pickler = False
        else:
            import collections
            import types

            def keep_name(code: types.CodeType) -> Any:
                rebuild, args = reduce(code)  # the file name comes before the function's names
                i = args.index("<dynamic-code>") if "<dynamic-code>" in args else -1
                return rebuild, args if i < 0 else (*args[:i], code.co_filename, *args[i + 1:])

            base: Any = table

            class Pickler(cloudpickle.Pickler):  # type: ignore[misc]
                dispatch_table = collections.ChainMap({types.CodeType: keep_name}, base)

            _pickler = Pickler
    if _pickler is False:
        data: bytes = cloudpickle.dumps(obj, protocol=protocol)
        return data
    out = io.BytesIO()
    _pickler(out, protocol=protocol).dump(obj)
    return out.getvalue()
