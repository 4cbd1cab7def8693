"""What a process job sends back that the session cannot unpickle: kept, as a psjobs.Snapshot, in its place.

Real workers. A class that exists only in the job's working directory (a module the session cannot
import), and classes whose ``__setstate__`` raises KeyboardInterrupt or SystemExit in the session,
which before stopped the session's I/O thread and hung every process job after it.
"""

from __future__ import annotations

import itertools
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

import psjobs
from psjobs import JobState
from psjobs.worker import _salvage, _wire

DEADLINE = 20
_names = itertools.count()


def finished(job: psjobs.Job) -> psjobs.Job:
    assert job.wait(DEADLINE), f"{job!r} did not finish within {DEADLINE}s (the session's I/O thread died?)"
    return job.child_jobs[0]


@pytest.fixture
def only_there(tmp_path: Path) -> tuple[str, str]:
    """(directory, module name): a module with a class Point and an exception GeoError that only
    that directory has (a name of its own, so that no test finds another's in sys.modules)."""
    name = f"geo_only_there_{os.getpid()}_{next(_names)}"
    where = tmp_path / "wd"
    where.mkdir()
    (where / f"{name}.py").write_text(
        "class Point:\n    def __init__(self, x):\n        self.x = x\n\n\n"
        "class GeoError(Exception):\n    pass\n")
    return str(where), name


def _module(name: str) -> Any:
    import importlib
    import sys

    sys.path.insert(0, os.getcwd())  # the job's working directory: the session's sys.path lacks it
    return importlib.import_module(name)


def points(name: str) -> Iterator[Any]:
    geo = _module(name)
    yield "before"
    yield geo.Point(1)
    yield [geo.Point(2), "inside"]
    yield "after"


def point(name: str) -> Any:
    return _module(name).Point(2)


def big_and_point(name: str) -> Any:
    # The bytearray travels out of band (a RECORDS_OOB frame), beside the pickle of the Point.
    return bytearray(2 * _wire.OOB_MIN), _module(name).Point(3)


def geo_error(name: str) -> None:
    raise _module(name).GeoError("the map is wrong", 7)


def test_generator_items_of_a_class_the_session_cannot_import_come_back_as_snapshots_in_place(
        session: psjobs.Session, only_there: tuple[str, str]) -> None:
    where, name = only_there
    job = session.start_job(points, name, working_directory=where)
    child = finished(job)
    assert child.state is JobState.COMPLETED
    before, snap, (inner, inside), after = job.receive()  # nothing lost, in order
    assert (before, inside, after) == ("before", "inside", "after")
    assert isinstance(snap, psjobs.Snapshot) and isinstance(inner, psjobs.Snapshot)
    assert snap.type_name == f"{name}.Point" and snap.repr == f"{name}.Point(x=1)" and snap.x == 1
    assert inner.repr == f"{name}.Point(x=2)"
    assert "cannot be imported in this session" in snap.error and name in snap.error
    assert child.error == []  # nothing to report: every value is there
    assert pickle.loads(pickle.dumps(snap)) == snap  # a plain Snapshot again (a session spills it)


def test_a_return_value_of_a_class_the_session_cannot_import_is_a_snapshot(
        session: psjobs.Session, only_there: tuple[str, str]) -> None:
    where, name = only_there
    job = session.start_job(point, name, working_directory=where)
    assert finished(job).state is JobState.COMPLETED
    (snap,) = job.receive()
    assert isinstance(snap, psjobs.Snapshot) and snap.repr == f"{name}.Point(x=2)" and snap.attributes == {"x": 2}


def test_a_value_beside_large_buffers_is_a_snapshot_and_the_buffers_arrive(
        session: psjobs.Session, only_there: tuple[str, str]) -> None:
    where, name = only_there
    job = session.start_job(big_and_point, name, working_directory=where)
    assert finished(job).state is JobState.COMPLETED
    ((big, snap),) = job.receive()
    assert big == bytearray(2 * _wire.OOB_MIN)
    assert isinstance(snap, psjobs.Snapshot) and snap.repr == f"{name}.Point(x=3)"


def test_an_exception_of_a_class_the_session_cannot_import_keeps_its_name_and_text(
        session: psjobs.Session, only_there: tuple[str, str]) -> None:
    where, name = only_there
    child = finished(session.start_job(geo_error, name, working_directory=where))
    assert child.state is JobState.FAILED
    reason = child.job_state_info.reason
    assert isinstance(reason, psjobs.RemoteError) and reason.type_name == f"{name}.GeoError"
    assert "the map is wrong" in str(reason) and "7" in str(reason)
    assert isinstance(reason.__cause__, psjobs.RemoteTraceback) and "geo_error" in str(reason.__cause__)


# --- a value whose own code raises KeyboardInterrupt or SystemExit in the session ----------------

class _RaisesInSession:
    """Its __setstate__ runs only where it is unpickled: the session (the worker only pickles it)."""

    raises: ClassVar[type[BaseException]] = KeyboardInterrupt

    def __init__(self) -> None:
        self.v = 1

    def __setstate__(self, state: Any) -> None:
        raise self.raises("raised by __setstate__")


class InterruptsSession(_RaisesInSession):
    raises = KeyboardInterrupt


class ExitsSession(_RaisesInSession):
    raises = SystemExit


class InterruptingError(Exception):
    armed: ClassVar[bool] = True  # raises wherever it is unpickled (a subclass: only where a test arms it)

    def __setstate__(self, state: Any) -> None:
        if type(self).armed:
            raise KeyboardInterrupt
        self.__dict__.update(state)


class InterruptingInSession(InterruptingError):
    """Raises only in the session: the worker's own check (dump_reason unpickles it) passes there."""

    armed = False


def around(cls: type) -> Iterator[Any]:
    yield "first"
    yield cls()
    yield "last"


def fail_with_interrupting_error(cls: type[InterruptingError]) -> None:
    error = cls("its own text")
    error.detail = 5  # type: ignore[attr-defined]  # a __dict__: pickled as state, so __setstate__ runs
    raise error


def one() -> int:
    return 1


@pytest.mark.parametrize("cls", [InterruptsSession, ExitsSession])
def test_a_value_that_raises_keyboardinterrupt_or_systemexit_as_it_is_unpickled_is_a_snapshot(
        session: psjobs.Session, cls: type) -> None:
    returned = session.start_job(make, cls)
    assert finished(returned).state is JobState.COMPLETED
    (snap,) = returned.receive()
    assert isinstance(snap, psjobs.Snapshot) and snap.type_name.endswith(cls.__qualname__) and snap.v == 1
    assert cls.raises.__name__ in snap.error and "__setstate__" in snap.error

    streamed = session.start_job(around, cls)
    assert finished(streamed).state is JobState.COMPLETED
    first, snap, last = streamed.receive()
    assert (first, last) == ("first", "last") and isinstance(snap, psjobs.Snapshot)

    after = session.start_job(one)  # the I/O thread still serves every process job
    assert finished(after).state is JobState.COMPLETED and after.receive() == [1]


def test_an_exception_that_raises_keyboardinterrupt_as_the_session_unpickles_it_fails_its_job_with_its_text(
        session: psjobs.Session) -> None:
    InterruptingInSession.armed = True  # this process only: the worker has the class as the module defines it
    try:
        child = finished(session.start_job(fail_with_interrupting_error, InterruptingInSession))
    finally:
        InterruptingInSession.armed = False
    assert child.state is JobState.FAILED
    reason = child.job_state_info.reason
    assert isinstance(reason, psjobs.RemoteError) and reason.type_name.endswith("InterruptingInSession")
    assert "its own text" in str(reason) and "KeyboardInterrupt" in str(reason)
    assert isinstance(reason.__cause__, psjobs.RemoteTraceback)
    after = session.start_job(one)
    assert finished(after).state is JobState.COMPLETED


def test_an_exception_that_raises_keyboardinterrupt_as_the_worker_checks_it_fails_its_job_with_its_text(
        session: psjobs.Session) -> None:
    # The worker unpickles a reason before it sends it (dump_reason): a KeyboardInterrupt there ended
    # the worker (status 70) and the reason was lost.
    child = finished(session.start_job(fail_with_interrupting_error, InterruptingError))
    assert child.state is JobState.FAILED
    reason = child.job_state_info.reason
    assert isinstance(reason, psjobs.RemoteError) and reason.type_name.endswith("InterruptingError")
    assert "its own text" in str(reason)


def make(cls: type) -> Any:
    return cls()


def test_a_batch_that_cannot_be_read_at_all_is_an_error_record_naming_the_job() -> None:
    kind, parts = _wire.encode_records(bytes([0, 0]), ["a", "b"], [1.0, 2.0])
    payload = b"".join(parts)[:-5]  # cut: no unpickler can read it
    try:
        _wire.decode_entries(kind, payload)
    except Exception as exc:
        first = exc
    [(stream, record, _t)] = _salvage.entries(kind, payload, first, "Job 7 'nightly'", "localhost")
    assert stream == psjobs.Stream.ERROR and isinstance(record, psjobs.ErrorRecord)
    assert record.message.startswith("Job 7 'nightly' goes on") and "is lost" in record.message
