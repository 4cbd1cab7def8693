"""The session host's protocol: the frame codec and one typed request and response per verb.

::

    client: XRequest(...).to_json() --pack--> | magic b"PSJH" | version: u8 | length: u32 | JSON |
    server: read_frame --decode_request--> XRequest (checked) --handler--> XResponse.to_json()
            <--pack-- {"ok": true, "more": false, "result": ..., "warnings": [...]}
                      {"ok": true, "more": true, "result": {"records": [...]}}     (receive's parts)
    client (a receive with ack): after each part --pack--> {"ack": records delivered}
                      {"ok": false, "more": false, "error": {"type", "message", "exit_code"}}

    request:  {"verb": "start", "args": {...}}      (args: the request's fields, by name)

Used by both sides, so the frame format, the size caps and the version-skew message exist once.
JSON only: the host never unpickles or runs what a client sends. A broken frame or a request
that is malformed raises ProtocolError here; each side maps it to its own error at its boundary.
"""

from __future__ import annotations

import json
import math
import re
import struct
from typing import TYPE_CHECKING, Any, ClassVar

from .._errors import ProtocolError
from .._recordclass import field as _field
from .._recordclass import plain as _plain
from .._recordclass import record as _record

if TYPE_CHECKING:  # at run time the command imports no socket.py (host/_client uses _socket)
    from _socket import socket as Socket

MAGIC = b"PSJH"
VERSION = 1
HEADER = struct.Struct("!4sBI")
MAX_REQUEST = 1 << 20        # 1 MiB: a request is a verb and a few arguments (an environment at most)
MAX_RESPONSE = 1 << 30       # responses come from the user's own host; pages are ~4 MiB
# Characters in one selector (an id, a name or a wildcard pattern): the host compiles a pattern into a
# regular expression and matches it against every job's name, which costs about its length each
# time (4,096 `*a` took 0.04 s; 1 MiB of them, half a minute).
MAX_SELECTOR = 4096
MAX_DEPTH = 16               # a request nests 3 levels ({"args": {"env": {...}}}); json recurses per level


# --- frames ----------------------------------------------------------------------------------------

def pack(payload: Any) -> bytes:
    """A frame around ``payload``: JSON text as it is, or a value to encode."""
    body = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
    return HEADER.pack(MAGIC, VERSION, len(body)) + body


def read_frame(sock: Socket, cap: int, who: str) -> bytes | None:
    """One frame's body; None at a clean end of stream. Raises ProtocolError on a broken frame."""
    head = _recv_exact(sock, HEADER.size, who)
    if head is None:
        return None
    magic, version, length = HEADER.unpack(head)
    if magic != MAGIC:
        raise ProtocolError(f"{who} sent something that is not a psjobs frame (it starts with {head[:4]!r})")
    if version != VERSION:
        raise ProtocolError(f"{who} speaks psjobs protocol version {version}, this side speaks {VERSION}: "
                            f"the host and the command come from different psjobs versions; stop the host "
                            f"with `psjobs host stop` (jobs and records are kept) and run the command again")
    if length > cap:
        raise ProtocolError(f"{who} sent a {length}-byte frame, over the {cap}-byte limit")
    body = _recv_exact(sock, length, who) if length else b""
    if body is None:
        raise ProtocolError(f"{who} closed the connection in the middle of a frame")
    return body


def _recv_exact(sock: Socket, n: int, who: str) -> bytes | None:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            if got == 0:
                return None
            raise ProtocolError(f"{who} closed the connection in the middle of a frame")
        got += k
    return bytes(buf)


# --- checking what a client sent ---------------------------------------------------------------

_MISSING: Any = object()


def _arg(args: dict[str, Any], verb: str, name: str, kind: type | tuple[type, ...],
         default: Any = _MISSING) -> Any:
    if name not in args or args[name] is None:
        if default is _MISSING:
            raise ProtocolError(f"{verb}: the request lacks the argument {name!r}")
        return default
    value = args[name]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, (int, float))):
        raise ProtocolError(f"{verb}: the argument {name!r} has the wrong type ({type(value).__name__})")
    return value


def _strs(args: dict[str, Any], verb: str, name: str, default: Any = _MISSING) -> list[str]:
    value = _arg(args, verb, name, list, default)
    if not all(isinstance(v, str) for v in value):
        raise ProtocolError(f"{verb}: the argument {name!r} must be a list of strings")
    return list(value)


def _selectors(args: dict[str, Any], verb: str, name: str, default: Any = _MISSING) -> list[str]:
    items = _strs(args, verb, name, default)
    for item in items:
        if len(item) > MAX_SELECTOR:
            raise ProtocolError(f"{verb}: a job selector is at most {MAX_SELECTOR} characters, not {len(item)} "
                                f"({item[:20]!r}...); select the job by its id")
    return items


def _timeout(args: dict[str, Any], verb: str) -> float | None:
    value = _arg(args, verb, "timeout", (int, float), None)
    if value is not None and (math.isnan(value) or value < 0):
        raise ProtocolError(f"{verb}: the timeout must be >= 0 seconds (or inf: no limit), not {value}")
    return None if value is None or math.isinf(value) else float(value)  # inf: no limit, as in the library


# --- requests: one class per verb ---------------------------------------------------------------

class Request:
    """A request's fields are its arguments; ``from_json`` checks each one's presence and type."""

    verb: ClassVar[str]

    def to_json(self) -> dict[str, Any]:
        return {"verb": self.verb, "args": _plain(self)}

    @classmethod
    def from_json(cls, args: dict[str, Any]) -> Request:
        raise NotImplementedError


@_record
class StartRequest(Request):
    verb: ClassVar[str] = "start"
    command: list[str]
    cwd: str
    name: str | None = None
    thread: bool = False
    env: dict[str, str] | None = None     # the client's whole environment (process jobs)
    input: list[str] | None = None        # lines fed to the command's stdin (psjobs.connect())
    group: str | None = None              # scheduling (core/_sched): --group --after --delay --retries
    after: list[str] = _field(default_factory=list)
    delay: float | None = None
    retries: int = 0
    umask: int | None = None              # the client's: the job's process gets it (None: the host's)

    @classmethod
    def from_json(cls, args: dict[str, Any]) -> StartRequest:
        v = cls.verb
        env = _arg(args, v, "env", dict, None)
        if env is not None and not all(isinstance(k, str) and isinstance(x, str) for k, x in env.items()):
            raise ProtocolError("start: env must map names to strings")
        return cls(command=_strs(args, v, "command"), cwd=_arg(args, v, "cwd", str),
                   name=_arg(args, v, "name", str, None), thread=_arg(args, v, "thread", bool, False), env=env,
                   input=None if args.get("input") is None else _strs(args, v, "input"),
                   group=_arg(args, v, "group", str, None), after=_strs(args, v, "after", []),
                   delay=_arg(args, v, "delay", (int, float), None), retries=_arg(args, v, "retries", int, 0),
                   umask=_umask(args, v))


def _umask(args: dict[str, Any], verb: str) -> int | None:
    value = _arg(args, verb, "umask", int, None)
    if value is not None and not 0 <= value <= 0o777:
        raise ProtocolError(f"{verb}: a umask is 0 to 0o777, not {value:#o}")
    return value  # type: ignore[no-any-return]


@_record
class InvokeRequest(Request):
    verb: ClassVar[str] = "invoke"
    command: list[str]
    computers: list[str]
    throttle: int = 32
    name: str | None = None
    group: str | None = None              # scheduling, as StartRequest's
    after: list[str] = _field(default_factory=list)
    delay: float | None = None
    retries: int = 0

    @classmethod
    def from_json(cls, args: dict[str, Any]) -> InvokeRequest:
        v = cls.verb
        return cls(command=_strs(args, v, "command"), computers=_strs(args, v, "computers"),
                   throttle=_arg(args, v, "throttle", int, 32), name=_arg(args, v, "name", str, None),
                   group=_arg(args, v, "group", str, None), after=_strs(args, v, "after", []),
                   delay=_arg(args, v, "delay", (int, float), None), retries=_arg(args, v, "retries", int, 0))


@_record
class GetRequest(Request):
    verb: ClassVar[str] = "get"
    ids: list[str] = _field(default_factory=list)
    state: str | None = None
    newest: int | None = None
    children: bool = False
    names: list[str] = _field(default_factory=list)   # names taken literally (--name)
    commands: list[str] = _field(default_factory=list)   # the library's get_job filters
    has_more_data: bool | None = None
    child_state: str | None = None

    @classmethod
    def from_json(cls, args: dict[str, Any]) -> GetRequest:
        v = cls.verb
        return cls(ids=_selectors(args, v, "ids", []), state=_arg(args, v, "state", str, None),
                   newest=_arg(args, v, "newest", int, None), children=_arg(args, v, "children", bool, False),
                   names=_selectors(args, v, "names", []), commands=_strs(args, v, "commands", []),
                   has_more_data=_arg(args, v, "has_more_data", bool, None),
                   child_state=_arg(args, v, "child_state", str, None))


def _selection(args: dict[str, Any], verb: str) -> list[str]:
    ids = _selectors(args, verb, "ids")
    if not ids and not _selectors(args, verb, "names", []):
        raise ProtocolError(f"{verb}: name at least one job (an id or a name)")
    return ids


@_record
class ReceiveRequest(Request):
    verb: ClassVar[str] = "receive"
    ids: list[str]
    keep: bool = False
    wait: bool = False
    timeout: float | None = None
    auto_remove: bool = False
    names: list[str] = _field(default_factory=list)   # names taken literally (--name)
    ack: bool = False   # the client acknowledges each part (see ack_frame): only that is consumed

    @classmethod
    def from_json(cls, args: dict[str, Any]) -> ReceiveRequest:
        v = cls.verb
        return cls(ids=_selection(args, v), keep=_arg(args, v, "keep", bool, False),
                   wait=_arg(args, v, "wait", bool, False), timeout=_timeout(args, v),
                   auto_remove=_arg(args, v, "auto_remove", bool, False), names=_selectors(args, v, "names", []),
                   ack=_arg(args, v, "ack", bool, False))


def ack_frame(delivered: int) -> dict[str, Any]:
    """A client's answer to a part of an acknowledged receive: how many of its records (from the
    first) were delivered; fewer than all ends the receive, and the rest stays to be received."""
    return {"ack": delivered}


def read_ack(body: bytes | None, sent: int) -> int:
    """The count in a client's ack frame (0 for none or a malformed one), at most ``sent``."""
    if body is None:
        return 0
    try:
        n = json.loads(body).get("ack")
    except (ValueError, AttributeError):
        return 0
    return min(n, sent) if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else 0


@_record
class WaitRequest(Request):
    verb: ClassVar[str] = "wait"
    ids: list[str]
    any: bool = False
    timeout: float | None = None
    names: list[str] = _field(default_factory=list)   # names taken literally (--name)

    @classmethod
    def from_json(cls, args: dict[str, Any]) -> WaitRequest:
        v = cls.verb
        return cls(ids=_selection(args, v), any=_arg(args, v, "any", bool, False), timeout=_timeout(args, v),
                   names=_selectors(args, v, "names", []))


@_record
class StopRequest(Request):
    verb: ClassVar[str] = "stop"
    ids: list[str]
    names: list[str] = _field(default_factory=list)   # names taken literally (--name)

    @classmethod
    def from_json(cls, args: dict[str, Any]) -> StopRequest:
        return cls(ids=_selection(args, cls.verb), names=_selectors(args, cls.verb, "names", []))


@_record
class RemoveRequest(Request):
    verb: ClassVar[str] = "remove"
    ids: list[str]
    force: bool = False
    names: list[str] = _field(default_factory=list)   # names taken literally (--name)
    state: str | None = None  # every top-level job in this state (remove --state Completed)

    @classmethod
    def from_json(cls, args: dict[str, Any]) -> RemoveRequest:
        state = _arg(args, cls.verb, "state", str, None)
        return cls(ids=_selection(args, cls.verb) if state is None else _strs(args, cls.verb, "ids", []),
                   force=_arg(args, cls.verb, "force", bool, False),
                   names=_selectors(args, cls.verb, "names", []), state=state)


@_record
class StatusRequest(Request):
    verb: ClassVar[str] = "status"

    @classmethod
    def from_json(cls, args: dict[str, Any]) -> StatusRequest:
        return cls()


@_record
class ShutdownRequest(Request):
    verb: ClassVar[str] = "shutdown"

    @classmethod
    def from_json(cls, args: dict[str, Any]) -> ShutdownRequest:
        return cls()


# --- the requests of a connected session (psjobs.connect(): the verbs the command has no word for) ---

@_record
class StartCallRequest(Request):
    """A callable, pickled by the client (cloudpickle) and sent base64: the host never unpickles it,
    it hands the bytes to the job's worker process, which runs as the same user (peer uid checked)."""

    verb: ClassVar[str] = "start_call"
    payload: str
    command: str
    cwd: str
    env: dict[str, str]
    sys_path: list[str] = _field(default_factory=list)
    name: str | None = None
    python: str = ""         # the client's "major.minor": pickled code runs only on the same one
    umask: int | None = None  # the client's: the worker sets it before the call (None: the host's)
    # What result() makes of the output (core/_tree.shape_of, which the host cannot run on bytes it
    # never unpickles); None: a callable's value (an older client sends none)
    shape: str | None = None

    @classmethod
    def from_json(cls, args: dict[str, Any]) -> StartCallRequest:
        v = cls.verb
        env = _arg(args, v, "env", dict)
        if not all(isinstance(k, str) and isinstance(x, str) for k, x in env.items()):
            raise ProtocolError("start_call: env must map names to strings")
        return cls(payload=_arg(args, v, "payload", str), command=_arg(args, v, "command", str),
                   cwd=_arg(args, v, "cwd", str), env=env, sys_path=_strs(args, v, "sys_path", []),
                   name=_arg(args, v, "name", str, None), python=_arg(args, v, "python", str, ""),
                   umask=_umask(args, v), shape=_shape(args, v))


SHAPES = ("value", "items", "lines")  # what result() makes of a job's output: core/_future's VALUE...


def _shape(args: dict[str, Any], verb: str) -> str | None:
    value = _arg(args, verb, "shape", str, None)
    if value is not None and value not in SHAPES:
        raise ProtocolError(f"{verb}: a shape is one of {', '.join(SHAPES)}, not {value[:40]!r}")
    return value  # type: ignore[no-any-return]


@_record
class SuspendRequest(Request):
    verb: ClassVar[str] = "suspend"
    ids: list[str]
    resume: bool = False     # False: suspend; True: resume

    @classmethod
    def from_json(cls, args: dict[str, Any]) -> SuspendRequest:
        return cls(ids=_selection(args, cls.verb), resume=_arg(args, cls.verb, "resume", bool, False))


@_record
class InputRequest(Request):
    verb: ClassVar[str] = "input"
    ids: list[str]
    text: str

    @classmethod
    def from_json(cls, args: dict[str, Any]) -> InputRequest:
        return cls(ids=_selection(args, cls.verb), text=_arg(args, cls.verb, "text", str))


@_record
class RecordsRequest(Request):
    """Every record of one stream of a job (all its leaves), received or not; moves no cursor."""

    verb: ClassVar[str] = "records"
    id: int
    stream: int

    @classmethod
    def from_json(cls, args: dict[str, Any]) -> RecordsRequest:
        v = cls.verb
        return cls(id=_arg(args, v, "id", int), stream=_arg(args, v, "stream", int))


@_record
class ResumeRequest(Request):
    verb: ClassVar[str] = "resume"
    ids: list[str]

    @classmethod
    def from_json(cls, args: dict[str, Any]) -> ResumeRequest:
        return cls(ids=_selection(args, cls.verb))


@_record
class RestartRequest(Request):
    verb: ClassVar[str] = "restart"
    ids: list[str]

    @classmethod
    def from_json(cls, args: dict[str, Any]) -> RestartRequest:
        return cls(ids=_selection(args, cls.verb))


@_record
class GroupRequest(Request):
    """``psjobs group add|set|pause|resume|list``: the scheduler's groups (core/_sched)."""

    verb: ClassVar[str] = "group"
    action: str
    name: str | None = None
    parallel: int | None = None

    @classmethod
    def from_json(cls, args: dict[str, Any]) -> GroupRequest:
        v = cls.verb
        action = _arg(args, v, "action", str)
        if action not in ("add", "set", "pause", "resume", "list"):
            raise ProtocolError(f"group: unknown action {action!r}")
        return cls(action=action, name=_arg(args, v, "name", str, None), parallel=_arg(args, v, "parallel", int, None))


REQUESTS: dict[str, type[Request]] = {c.verb: c for c in (
    StartRequest, InvokeRequest, GetRequest, ReceiveRequest, WaitRequest, StopRequest, RemoveRequest,
    StatusRequest, ShutdownRequest, StartCallRequest, SuspendRequest, InputRequest, RecordsRequest,
    ResumeRequest, RestartRequest, GroupRequest)}


def decode_request(body: bytes) -> Request:
    """A checked request from a frame's body; ProtocolError says what is wrong."""
    if body.count(b"[") + body.count(b"{") > MAX_DEPTH and _depth(body) > MAX_DEPTH:
        raise ProtocolError(f"the request nests deeper than {MAX_DEPTH} levels; a request is a verb "
                            f"and plain arguments")
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"the request is not valid JSON ({exc})") from None
    if not isinstance(request, dict) or not isinstance(request.get("verb"), str):
        raise ProtocolError('a request is a JSON object {"verb": ..., "args": {...}}')
    verb = request["verb"]
    args = request.get("args", {})
    kind = REQUESTS.get(verb)
    if kind is None:
        raise ProtocolError(f"unknown verb {verb!r}; the host knows: {', '.join(sorted(REQUESTS))}")
    if not isinstance(args, dict):
        raise ProtocolError(f"{verb}: the request's args must be a JSON object")
    return kind.from_json(args)


# A string, to its closing quote or (unterminated: invalid JSON anyway) to the end, so a match
# never fails and is never retried from a later quote: linear, even for `"\"\"\"...`.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_NOT_BRACKET = re.compile(rb"[^\[\]{}]+")


def _depth(body: bytes) -> int:
    """How deep arrays and objects nest in ``body``, in linear time (brackets in strings do not count)."""
    depth = deepest = 0
    for c in _NOT_BRACKET.sub(b"", _JSON_STRING.sub(b"", body)):
        depth += 1 if c in b"[{" else -1
        deepest = max(deepest, depth)
    return deepest


# --- responses: one shape per verb -----------------------------------------------------------------

class Response:
    def to_json(self) -> Any:
        return _plain(self)


@_record
class JobView(Response):
    """A job as clients see it (``--json``); start, invoke, get and stop answer with these."""

    id: int
    name: str
    job_type: str
    state: str
    has_more_data: bool
    location: str
    command: str
    parent_id: int | None
    child_ids: list[int]
    computer_name: str | None
    exit_code: int | None
    reason: str | None
    begin_time: str | None
    end_time: str | None
    instance_id: str
    pid: int | None
    cwd: str | None
    prompt: str | None = None      # what a Blocked job asks (psjobs.connect() shows it as job.prompt)
    status_message: str = ""       # what a NotStarted job waits for (a group slot, a dependency, a delay)
    attempts: int = 0              # runs started (retries)
    shape: str = "value"           # what result() makes of the output (core.result_shape); an older host sends none


@_record
class Failure(Response):
    """A failed job named after the top-level job the user knows, with the child that failed."""

    id: int
    name: str
    child_id: int
    computer_name: str | None
    reason: str


@_record
class ReceiveResult(Response):
    failures: list[Failure]
    timed_out: bool
    removed: list[int]
    pending: list[JobView] = _field(default_factory=list)  # with timed_out: the jobs still going


@_record
class WaitResult(Response):
    done: list[JobView]
    pending: list[JobView]


@_record
class RemoveResult(Response):
    removed: list[int]


@_record
class StatusResult(Response):
    pid: int
    version: str
    protocol: int
    started: str | None
    home: str
    socket: str
    database: str
    log: str
    jobs: int
    running_jobs: int
    records: int
    storage_problem: str | None = None   # why records cannot be stored now (None: they are)
    records_dropped: int = 0             # records lost while nothing could store them


@_record
class ShutdownResult(Response):
    stopped: list[int]


@_record
class RecordsResult(Response):
    """``records``' answer: [job id, time, is-json, value] per record, in production order per leaf."""

    records: list[list[Any]]


RecordRow = tuple[int, int, int, float, int, str]  # seq, job, stream, time, is-json, data


def records_part(rows: list[RecordRow], jobs: dict[int, list[Any]] | None = None) -> str:
    """A part of receive's answer: stored JSON goes out as it is, never decoded and encoded again.
    ``jobs`` (leaf id -> [top-level job id, computer]) rides along where a part carries it."""
    return ('{"ok":true,"more":true,"result":{' + ("" if jobs is None else f'"jobs":{json.dumps(jobs)},')
            + '"records":['
            + ",".join(f"[{seq},{job},{stream},{t!r},{flag},{data if flag else json.dumps(data)}]"
                       for seq, job, stream, t, flag, data in rows)
            + "]}}")


def final(result: Any, warnings: list[str]) -> dict[str, Any]:
    """The last response of a request."""
    payload = result.to_json() if isinstance(result, Response) else \
        [r.to_json() for r in result] if isinstance(result, list) else result
    return {"ok": True, "more": False, "result": payload, "warnings": warnings}


def error_reply(type_name: str, message: str, exit_code: int, warnings: list[str]) -> dict[str, Any]:
    return {"ok": False, "more": False,
            "error": {"type": type_name, "message": message, "exit_code": exit_code}, "warnings": warnings}
