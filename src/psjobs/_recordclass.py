"""Record classes for the protocols: dataclasses to mypy, a cheaper equivalent at run time.

The command imports host/_protocol on every run (`psjobs get` is a whole process). Decorating its ~20
classes with dataclasses cost ~12 ms of a ~60 ms command at load 0.8 (bench/FINDINGS.md): the module
imports inspect, and each class execs generated code. ``record`` gives the same __init__ (positional
or keyword, defaults, default factories), __eq__ and __repr__ from the same annotations, without either.
The worker's wire messages (worker/_wire) use it too: their 9 dataclasses cost the fork server ~3 ms
of its start-up (load 1.6), a program's first job waits for. Bottom layer: the standard library only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["field", "plain", "record"]


if TYPE_CHECKING:
    from dataclasses import dataclass as record
    from dataclasses import field
else:
    class _Factory:
        __slots__ = ("make",)

        def __init__(self, make: Any) -> None:
            self.make = make

    def field(*, default_factory: Any) -> Any:
        return _Factory(default_factory)

    _REQUIRED = object()

    def record(cls: type) -> type:
        fields = tuple((name, cls.__dict__.get(name, _REQUIRED))
                       for name, note in cls.__dict__.get("__annotations__", {}).items()  # noqa: RUF063 (own, not inherited; strings)
                       if not str(note).startswith(("ClassVar", "typing.ClassVar")))
        names = tuple(name for name, _ in fields)

        # Fields a positional call that stops short must still set: a required one (an error) or
        # one made by a factory. A plain default is the class's attribute, read through the class.
        special = tuple((i, name, default) for i, (name, default) in enumerate(fields)
                        if default is _REQUIRED or isinstance(default, _Factory))
        short = special[-1][0] + 1 if special else 0  # fewer arguments than this: look at `special`

        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            if not kwargs and len(args) <= len(names):
                # Positional only: every message on a process job's path (JobMsg, Done, Ended...)
                # costs one step (no line per field: a job's messages took ~30 lines of Python).
                self.__dict__.update(zip(names, args))
                if len(args) < short:
                    for i, name, default in special:
                        if i >= len(args):
                            if default is _REQUIRED:
                                raise TypeError(f"{cls.__name__}() missing required argument: {name!r}")
                            setattr(self, name, default.make())
                return
            if len(args) > len(fields):
                raise TypeError(f"{cls.__name__}() takes {len(fields)} arguments, {len(args)} given")
            for i, (name, default) in enumerate(fields):
                if i < len(args):
                    if name in kwargs:
                        raise TypeError(f"{cls.__name__}() got multiple values for argument {name!r}")
                    value = args[i]
                elif name in kwargs:
                    value = kwargs.pop(name)
                elif default is _REQUIRED:
                    raise TypeError(f"{cls.__name__}() missing required argument: {name!r}")
                else:
                    value = default.make() if isinstance(default, _Factory) else default
                setattr(self, name, value)
            if kwargs:
                raise TypeError(f"{cls.__name__}() got an unexpected keyword argument {next(iter(kwargs))!r}")

        def __eq__(self: Any, other: object) -> bool:
            if other.__class__ is not self.__class__:
                return NotImplemented
            return all(getattr(self, n) == getattr(other, n) for n in names)

        def __repr__(self: Any) -> str:
            return f"{cls.__name__}({', '.join(f'{n}={getattr(self, n)!r}' for n in names)})"

        for name, default in fields:
            if isinstance(default, _Factory):
                delattr(cls, name)
        cls.__init__ = __init__
        cls.__eq__ = __eq__
        cls.__hash__ = None  # as a dataclass with eq: mutable, so unhashable
        cls.__repr__ = __repr__
        cls._fields = names
        return cls


def plain(value: Any) -> Any:
    """A record as JSON-ready data, nested records and lists of them included (dataclasses.asdict)."""
    fields = getattr(value, "_fields", None)
    if fields is not None:
        return {name: plain(getattr(value, name)) for name in fields}
    if isinstance(value, list):
        return [plain(x) for x in value]
    if isinstance(value, dict):
        return {k: plain(x) for k, x in value.items()}
    return value
