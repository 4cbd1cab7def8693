"""What the session keeps of a batch of records, or a reason, that does not unpickle: all it can.

::

    RECORDS / RECORDS_OOB payload --_wire.decode_entries (pickle.loads: the fast path)--> entries
        | raised anything (a class missing here, a __setstate__ that raises, even KeyboardInterrupt)
        v
    entries(): the same payload again --_wire.decode_entries(loads=salvage loads)-->
        1. pickle.Unpickler (C) whose find_class gives a stand-in for a class missing here
        2. if that fails too: pickle's pure-Python unpickler, the same stand-ins, and every
           opcode that runs the values' code (BUILD, REDUCE, NEWOBJ, APPENDS, SETITEMS, ...)
           guarded: what raises becomes a Snapshot in its place, the rest of the batch is intact
        --> entries, in order, each value itself or a psjobs.Snapshot
        | the payload cannot be read at all (truncated, garbage)
        v
    one error record naming the job and what was lost (the job goes on)

    DONE's pickled exception --_outcome.load_reason--> reason(): the same stand-ins, and an
        exception whose class is missing here comes back as a RemoteError with its text

Nothing here lets an exception out, BaseException included: the callers are the threads that
read every job of a session (the process I/O loop, the SSH event loop, the Dask dispatcher), and
one job's value that raised KeyboardInterrupt or SystemExit while it was rebuilt ended such a
thread, and every process job after it hung. The session side only: the worker never unpickles
what it sends.
"""

from __future__ import annotations

import io
import pickle
import time
from collections.abc import Callable
from typing import Any, ClassVar

from .._errors import RemoteError
from .._records import ErrorRecord, Snapshot, Stream
from ._wire import decode_entries

Entry = tuple[int, Any, float]
_TEXT_MAX = 10_000  # as _records.snapshot cuts a repr


class _Absent(Snapshot):
    """A Snapshot that pickle fills as it rebuilds an object whose class is missing here.

    pickle makes it as it would make the object (``cls.__new__(cls, *args)``, ``cls(*args)``),
    gives it the state (``__setstate__``) and the items of a list or dict subclass; ``finish``
    then writes its text (``geo.Point(x=1)``) and its public attributes. One subclass per missing
    class (find_class must hand pickle a class), made by ``_Finder.find_class``.
    """

    __slots__ = ("_args", "_items", "_kwargs", "_pairs", "_state")
    _args: tuple[Any, ...]
    _kwargs: dict[str, Any]
    _state: Any
    _items: list[Any]
    _pairs: list[tuple[Any, Any]]
    qualified: ClassVar[str] = ""
    why: ClassVar[str] = ""
    made: ClassVar[list[_Absent]] = []

    def __new__(cls, *args: Any, **kwargs: Any) -> _Absent:
        self = object.__new__(cls)
        self._start(args, kwargs)
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass  # pickle's REDUCE calls cls(*args): __new__ kept them

    def _start(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._args, self._kwargs, self._state = args, kwargs, None
        self._items, self._pairs = [], []
        type(self).made.append(self)

    def __setstate__(self, state: Any) -> None:
        try:
            self._state = state
        except AttributeError:  # pragma: no cover - made by object.__new__ (copyreg, protocol < 2)
            self._start((), {})
            self._state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self._pairs.append((key, value))  # SETITEMS of a dict subclass

    def __getattr__(self, name: str) -> Any:
        # APPENDS and ADDITEMS look these up on the object; not methods of the class, so that once
        # rebuilt a snapshot's attribute of the same name reads as the object's own.
        if name in ("extend", "add", "append") and not hasattr(self, "type_name"):
            items = self._items
            return items.extend if name == "extend" else items.append
        return super().__getattr__(name)

    def finish(self) -> None:
        """Write the text and the attributes, once pickle has given everything."""
        cls = type(self)
        self.type_name, self.error = cls.qualified, cls.why
        self.repr, self.attributes = describe(cls.qualified, self._args, self._kwargs, self._state,
                                              self._items, self._pairs)


class _Finder:
    """find_class that gives a stand-in (an _Absent subclass) for a class it cannot import here."""

    made: list[_Absent]
    absent: dict[tuple[str, str], type[_Absent]]

    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)  # type: ignore[misc]
        except BaseException as exc:  # an import that fails, or raises SystemExit at its top level
            stand_in = self.absent.get((module, name))
            if stand_in is None:
                qualified = f"{module}.{name}"
                why = (f"{qualified} cannot be imported in this session ({_said(exc)}); "
                       f"this stand-in holds its state: make {module} importable here to get the object")
                stand_in = type("Snapshot", (_Absent,), {"__slots__": (), "qualified": qualified, "why": why,
                                                         "made": self.made, "__module__": "psjobs"})
                self.absent[(module, name)] = stand_in
            return stand_in


class _Tolerant(_Finder, pickle.Unpickler):
    """The C unpickler with stand-ins for missing classes: a batch of such values at full speed."""


_SETSTATE, _REDUCE, _NEW = "__setstate__", "the call that rebuilds it", "__new__"


def _guard(opcode: bytes, operands: int, what: str) -> Callable[[Any], None]:
    """The pure-Python unpickler's handler of ``opcode``, with whatever it raises turned into a
    Snapshot in place of its result (the ``operands`` top items of the stack, or with a mark, the
    object the marked items go into)."""
    base = pickle._Unpickler.dispatch[opcode[0]]  # noqa: SLF001 (stdlib's own)

    def guarded(self: Any) -> None:
        if operands:
            stack = self.stack
            n = len(stack) - operands
            taken = stack[n:] if n >= 0 else None
            try:
                base(self)
            except BaseException as exc:
                if taken is None:
                    raise  # a broken stream, not a value's own code
                del stack[n:]
                stack.append(_broken(taken, what, exc))
            return
        inner = self.stack  # the marked items; the object they go into ends the stack before the mark
        into = self.metastack[-1][-1] if self.metastack and self.metastack[-1] else None
        try:
            base(self)
        except BaseException as exc:
            if into is None or not self.stack or self.stack[-1] is not into:
                raise
            self.stack[-1] = _broken([into, list(inner)], what, exc)

    return guarded


class _Guarded(_Finder, pickle._Unpickler):  # noqa: SLF001 (stdlib's own)
    """The pure-Python unpickler, so each opcode that runs a value's code can be guarded alone."""

    dispatch = dict(pickle._Unpickler.dispatch)  # noqa: SLF001
    for _op, _n, _what in ((pickle.BUILD, 2, _SETSTATE), (pickle.REDUCE, 2, _REDUCE),
                           (pickle.NEWOBJ, 2, _NEW), (pickle.NEWOBJ_EX, 3, _NEW),
                           (pickle.APPEND, 2, "append"), (pickle.SETITEM, 3, "__setitem__"),
                           (pickle.APPENDS, 0, "extend"), (pickle.SETITEMS, 0, "__setitem__"),
                           (pickle.ADDITEMS, 0, "add")):
        dispatch[_op[0]] = _guard(_op, _n, _what)
    del _op, _n, _what


def loads(data: Any, buffers: Any = ()) -> Any:
    """``pickle.loads`` that keeps what it can: stand-ins for classes missing here, Snapshots
    for objects whose own code raised. Raises only when the stream itself cannot be read."""
    raw = bytes(data)
    made: list[_Absent] = []
    absent: dict[tuple[str, str], type[_Absent]] = {}
    try:
        value = _load(_Tolerant, raw, buffers, made, absent)
    except BaseException:
        made.clear()
        value = _load(_Guarded, raw, buffers, made, absent)
    for stand_in in reversed(made):  # the objects inside first: an outer text shows theirs
        stand_in.finish()
    return value


def _load(cls: Any, raw: bytes, buffers: Any, made: list[_Absent], absent: dict[Any, Any]) -> Any:
    unpickler = cls(io.BytesIO(raw), buffers=list(buffers))
    unpickler.made, unpickler.absent = made, absent
    return unpickler.load()


def entries(kind: int, payload: bytes | bytearray, first: BaseException, job: str, computer: str) -> list[Entry]:
    """The entries of a batch ``_wire.decode_entries`` could not decode (it raised ``first``).

    Never raises: values that cannot be rebuilt here are Snapshots in their place; a payload that
    cannot be read at all is one error record that names ``job`` (``Job 3 'x'``) and the loss.
    """
    try:
        out = decode_entries(kind, payload, loads)
        for i, (stream, value, t) in enumerate(out):
            if isinstance(value, type) and issubclass(value, _Absent):  # a missing class (or function) itself
                out[i] = (stream, Snapshot(value.qualified, value.qualified, {}, value.why), t)
            elif isinstance(value, ErrorRecord) and not isinstance(value.exception, (BaseException, type(None))):
                value.exception = _exception(value.exception)
        return out
    except BaseException as exc:
        now = time.time()
        error = exc if isinstance(exc, Exception) else RuntimeError(_said(exc))
        return [(Stream.ERROR, ErrorRecord(
            f"{job} goes on, but psjobs could not unpickle a batch of its records from its worker on {computer} "
            f"({_said(first)}; read again: {_said(exc)}): that batch of "
            f"{len(payload)} bytes is lost. Send values whose classes this session can import, or plain "
            f"values", now, computer, error), now)]


def reason(blob: bytes, first: BaseException) -> BaseException:
    """The exception of a DONE frame that ``pickle.loads`` could not rebuild (it raised ``first``):
    itself if the stand-ins get it back, else a RemoteError with its class name and text. Never raises."""
    try:
        value = loads(blob)
    except BaseException as exc:
        return RemoteError(f"(the exception could not be brought back: {_said(first)}; read again: {_said(exc)})",
                           "Exception")
    return _exception(value)


def _exception(value: Any) -> BaseException:
    """An exception, whatever a salvaged value holds in its place; never raises."""
    if isinstance(value, BaseException):
        return value
    try:
        if isinstance(value, _Absent):  # an exception of a class missing here: its args are its text
            args = value._args  # noqa: SLF001 (this module's own class)
            text = str(args[0]) if len(args) == 1 else ", ".join(map(_text, args)) if args else value.repr
            return RemoteError(text, value.type_name)
        if isinstance(value, Snapshot):
            return RemoteError(f"{value.repr} ({value.error})", value.type_name)
        return RemoteError(f"(not an exception: {_text(value)})", "Exception")
    except BaseException as exc:
        return RemoteError(f"(the exception could not be brought back: {_said(exc)})", "Exception")


def _broken(taken: list[Any], what: str, exc: BaseException) -> Snapshot:
    """The Snapshot in place of an object whose ``what`` raised ``exc`` while pickle rebuilt it.

    ``taken``: the stack items the opcode used: the class or function and its arguments
    (``__new__``, rebuilding), the object and its state (``__setstate__``), or the object and
    the items given to it. Read from what pickle had, never from the half-built object's code.
    """
    subject, rest = taken[0], taken[1:]
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = {}
    state: Any = None
    items: list[Any] = []
    pairs: list[tuple[Any, Any]] = []
    if what in (_NEW, _REDUCE):
        name = _name(subject)
        args = tuple(rest[0]) if rest and isinstance(rest[0], tuple) else ()
        kwargs = rest[1] if len(rest) > 1 and isinstance(rest[1], dict) else {}
    else:
        name = _name(type(subject))
        if what == _SETSTATE:
            state = rest[0] if rest else None
            if isinstance(subject, BaseException):  # its text, read past any property of its class
                args = tuple(vars(BaseException)["args"].__get__(subject))
        else:
            given = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], list) and what != "append" else rest
            if what == "__setitem__":
                pairs = list(zip(given[::2], given[1::2]))
            else:
                items = given
    text, attributes = describe(name, args, kwargs, state, items, pairs)
    return Snapshot(name, text, attributes, f"{what} of {name} raised {_said(exc)} in this session; this "
                                            f"stand-in holds what pickle had for it")


def _said(exc: BaseException) -> str:
    """``KeyError: 'x'``, or the class alone when its text is empty (``SystemExit``)."""
    try:
        text = str(exc)
    except BaseException:
        text = ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _name(obj: Any) -> str:
    try:
        module = getattr(obj, "__module__", None) or "builtins"
        return f"{module}.{getattr(obj, '__qualname__', None) or type(obj).__qualname__}"
    except BaseException:
        return "<unknown>"


def _text(value: Any) -> str:
    """A value's repr that never raises; a stand-in reads as its own text."""
    if isinstance(value, Snapshot):
        try:
            return str(value.repr)
        except AttributeError:  # a stand-in not finished yet (a cycle through it)
            return f"{type(value).qualified}(...)" if isinstance(value, _Absent) else "Snapshot(...)"
    try:
        return repr(value)
    except BaseException as exc:
        return f"<repr failed: {type(exc).__name__}: {exc}>"


def describe(name: str, args: tuple[Any, ...], kwargs: dict[str, Any], state: Any,
             items: list[Any], pairs: list[tuple[Any, Any]]) -> tuple[str, dict[str, Any]]:
    """An object's text as a call (``geo.Point(x=1)``) and its public attributes, from what pickle
    had for it: arguments, state (a dict, a (dict, slots) pair, or anything), items."""
    parts = [_text(a) for a in args] + [f"{k}={_text(v)}" for k, v in kwargs.items()]
    attributes: dict[str, Any] = {}
    dicts = state if isinstance(state, tuple) and len(state) == 2 and all(
        d is None or isinstance(d, dict) for d in state) else (state,)
    for part in dicts:
        if isinstance(part, dict):
            for key, value in part.items():
                parts.append(f"{key}={_text(value)}" if isinstance(key, str) else f"{_text(key)}: {_text(value)}")
                if isinstance(key, str) and not key.startswith("_"):
                    attributes[key] = value
        elif part is not None:
            parts.append(_text(part))
    if items:
        parts.append("[" + ", ".join(map(_text, items)) + "]")
    if pairs:
        parts.append("{" + ", ".join(f"{_text(k)}: {_text(v)}" for k, v in pairs) + "}")
    text = f"{name}({', '.join(parts)})"
    return (text[:_TEXT_MAX] + "..." if len(text) > _TEXT_MAX else text), attributes
