"""The seven streams and the records they carry.

Output holds the produced values themselves; the six other streams hold records with at least
``message``, ``time`` and ``computer_name``. Records are small slotted objects: they cross process
boundaries pickled, so they hold only plain data (an error's exception travels beside its text).
"""

from __future__ import annotations

import enum
import operator
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any


class Stream(enum.IntEnum):
    """The seven ordered streams of a job."""

    OUTPUT = 0
    ERROR = 1
    WARNING = 2
    VERBOSE = 3
    DEBUG = 4
    INFORMATION = 5
    PROGRESS = 6


def _aware(t: float) -> datetime:
    return datetime.fromtimestamp(t, timezone.utc).astimezone()


class Record:
    """A record of the warning, verbose or debug stream (and the base of the others)."""

    __slots__ = ("_t", "computer_name", "message", "stream")

    def __init__(self, stream: Stream, message: str, t: float, computer_name: str | None = None) -> None:
        self.stream = stream
        self.message = message
        self._t = t
        self.computer_name = computer_name

    @property
    def time(self) -> datetime:
        """When the record was produced (aware)."""
        return _aware(self._t)

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        where = f" @{self.computer_name}" if self.computer_name else ""
        return f"<{type(self).__name__} {self.stream.name.lower()}{where} {self.message!r}>"

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, a) == getattr(other, a) for a in _all_slots(type(self)))

    __hash__ = None  # type: ignore[assignment]

    def __sizeof__(self) -> int:
        # With its message, the part that grows: a session's memory window (core/_spill) counts
        # records by sys.getsizeof, and a 1 MiB line must weigh 1 MiB there.
        return object.__sizeof__(self) + sys.getsizeof(self.message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), _values(type(self))(self)))


def record_time(record: Record) -> float:
    """When ``record`` was made, in seconds since the epoch (``record.time`` is the datetime)."""
    return record._t  # noqa: SLF001 (this module owns Record: the accessor for the others)


# Per class, since pickling records (to a session, to a spill file) asks for each record.
_SLOTS: dict[type, tuple[str, ...]] = {}
_GETTERS: dict[type, Callable[[Any], tuple[Any, ...]]] = {}


def _all_slots(cls: type) -> tuple[str, ...]:
    names = _SLOTS.get(cls)
    if names is None:
        found: list[str] = []
        for klass in reversed(cls.__mro__):
            found.extend(getattr(klass, "__slots__", ()))
        names = _SLOTS[cls] = tuple(found)
    return names


def _values(cls: type) -> Callable[[Any], tuple[Any, ...]]:
    """The getter of every slot's value at once, C-level (a Record has four slots or more: a tuple)."""
    getter = _GETTERS.get(cls)
    if getter is None:
        getter = _GETTERS[cls] = operator.attrgetter(*_all_slots(cls))
    return getter


def _rebuild(cls: type[Record], values: tuple[Any, ...]) -> Record:
    obj = cls.__new__(cls)
    for name, value in zip(_all_slots(cls), values):
        object.__setattr__(obj, name, value)
    return obj


class ErrorRecord(Record):
    """A record of the error stream: a message, the exception where there is one, its traceback."""

    __slots__ = ("exception", "traceback")

    def __init__(self, message: str, t: float, computer_name: str | None = None,
                 exception: BaseException | None = None, traceback: str | None = None) -> None:
        super().__init__(Stream.ERROR, message, t, computer_name)
        self.exception = exception
        self.traceback = traceback


class InformationRecord(Record):
    """A record of the information stream: ``print`` output, or an object given to write_information."""

    __slots__ = ("data",)

    def __init__(self, message: str, t: float, computer_name: str | None = None, data: Any = None) -> None:
        super().__init__(Stream.INFORMATION, message, t, computer_name)
        self.data = message if data is None else data


class ProgressRecord(Record):
    """A record of the progress stream."""

    __slots__ = ("activity", "completed", "percent_complete", "status")

    def __init__(self, activity: str, status: str | None, percent_complete: float | None,
                 completed: bool, t: float, computer_name: str | None = None) -> None:
        parts = [activity]
        if status:
            parts.append(status)
        if percent_complete is not None:
            parts.append(f"{percent_complete:g}%")
        if completed:
            parts.append("completed")
        super().__init__(Stream.PROGRESS, " - ".join(parts), t, computer_name)
        self.activity = activity
        self.status = status
        self.percent_complete = percent_complete
        self.completed = completed


class OutputRecord:
    """An output value with where and when it came from (``receive_job(records=True)``)."""

    __slots__ = ("_t", "computer_name", "job", "value")

    def __init__(self, value: Any, t: float, computer_name: str | None, job: Any) -> None:
        self.value = value
        self._t = t
        self.computer_name = computer_name
        self.job = job

    @property
    def time(self) -> datetime:
        return _aware(self._t)

    @property
    def message(self) -> str:
        return str(self.value)

    def __str__(self) -> str:
        return str(self.value)

    def __repr__(self) -> str:
        where = f" @{self.computer_name}" if self.computer_name else ""
        return f"<OutputRecord job={getattr(self.job, 'id', None)}{where} {self.value!r}>"


class Snapshot:
    """A readable stand-in for a value that could not be pickled back from a worker.

    It keeps the type's qualified name, the value's ``repr`` and its public attributes
    (each reduced to a repr when it is not a plain value), so the user sees what was produced.
    The session makes one too for a value it cannot unpickle: its class cannot be imported
    there (``repr`` then reads like ``geo.Point(x=1)``, the attributes are its state), or its
    own code raised as it was rebuilt; ``error`` says which.
    """

    __slots__ = ("attributes", "error", "repr", "type_name")

    def __init__(self, type_name: str, repr_text: str, attributes: dict[str, Any], error: str) -> None:
        self.type_name = type_name
        self.repr = repr_text
        self.attributes = attributes
        self.error = error

    def __getattr__(self, name: str) -> Any:
        try:
            return object.__getattribute__(self, "attributes")[name]
        except (KeyError, AttributeError):
            raise AttributeError(name) from None

    def __repr__(self) -> str:
        return f"<Snapshot of {self.type_name}: {self.repr}>"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Snapshot):
            return NotImplemented
        return (self.type_name, self.repr, self.attributes) == (other.type_name, other.repr, other.attributes)

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self) -> tuple[Any, ...]:
        return (Snapshot, (self.type_name, self.repr, self.attributes, self.error))


_PLAIN = (str, int, float, bool, bytes, type(None))


def snapshot(value: Any, error: BaseException | str) -> Snapshot:
    """Make a Snapshot of ``value``; never raises, whatever the value does."""
    cls = type(value)
    type_name = f"{cls.__module__}.{cls.__qualname__}"
    try:
        text = repr(value)
    except BaseException as exc:  # a broken __repr__ must not break the job
        text = f"<repr failed: {type(exc).__name__}: {exc}>"
    if len(text) > 10_000:
        text = text[:10_000] + "..."
    attributes: dict[str, Any] = {}
    try:
        names = [n for n in dir(value) if not n.startswith("_")]
    except BaseException:
        names = []
    for name in names[:200]:
        try:
            attr = getattr(value, name)
        except BaseException:
            continue
        if callable(attr):
            continue
        if isinstance(attr, _PLAIN):
            attributes[name] = attr
        else:
            try:
                attributes[name] = repr(attr)[:1000]
            except BaseException:
                attributes[name] = f"<{type(attr).__name__}>"
    return Snapshot(type_name, text, attributes, str(error))
