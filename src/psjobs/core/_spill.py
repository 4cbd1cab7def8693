"""Spilling journals: a session's records kept within a memory window, the rest on disk.

::

    Job._extend (session lock) --> SpillJournal.extend: append, add an estimate of its bytes to
                                   Spill.held (no I/O)
    JobPort.records / record / ended, after the lock --> Spill.relieve(), when held > WINDOW:
        under the session lock:  claim the biggest journals' oldest in-memory entries, down to
                                 half the window (no I/O)
        outside it:              encode them in blocks (plain records: _cspill.c; others: pickle),
                                 written after what each journal's file holds
        under the session lock:  index the blocks, drop the entries from memory, held -= bytes
    Session._read (no lock) --> SpillJournal.read(start, stop): blocks read back from the file
                                (pread), then the entries still in memory, in order
    remove_job --> drop(): the file deleted;  Session.close, interpreter exit --> the directory
    a session killed before its exit hook ran --> the next session's first spill deletes its directory
                                (unlocked: a live session holds a flock on it)

Why the spilling runs in the thread that reported the records, and not in a writer thread of
its own: that thread is what produces (a process job's ``psjobs-io`` reader, a thread job's own
thread, a Dask dispatcher), so while it writes, it reads nothing more, the pipes and sockets
behind it fill, and the job's processes wait: backpressure with no queue between a producer and
a writer, which would itself grow without bound when the disk is slower than the job. One pass
runs at a time (``Spill.lock``, taken outside the session lock); another reporter skips it, or
waits for it when memory is at twice the window.

A job's journal starts as a :class:`MemoryJournal` (most jobs hold one value); past
:data:`SMALL` entries it becomes a :class:`SpillJournal`, whose in-memory entries count against
its session's window. Spilled entries come back as equal copies of the same types, not the same
objects (they were encoded); an entry that cannot be pickled stays in memory where it is.
"""

from __future__ import annotations

import atexit
import bisect
import contextlib
import fcntl
import logging
import operator
import os
import pickle
import shutil
import sys
import tempfile
import threading
import time
from array import array
from collections.abc import Iterator
from itertools import accumulate
from typing import TYPE_CHECKING, Any

from .._errors import JobStateError
from ._journal import ENTRY, Entry, MemoryJournal
from ._pshost import describe_job

try:
    from . import _cspill  # optional (setup.py): without it every block is pickled
except ImportError:  # pragma: no cover - a build without a C compiler
    _cspill = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from ._job import Job

#: Bytes of records a session keeps in memory, across its jobs, before older ones go to disk.
WINDOW = 4 << 20
# A journal with more entries than SMALL (core/_journal) becomes a SpillJournal (most jobs hold
# one value).
_BLOCK_ENTRIES = 4096   # a block is read back whole: a read of one position unpickles at most this
_BLOCK_BYTES = 1 << 20
_RETRY_SECONDS = 5.0    # after a failed write (disk full), memory grows until the next try
_PLAIN = b"\x01"  # the first byte of a block _cspill wrote (a pickle's is 0x80)
_log = logging.getLogger("psjobs")


_ENTRY = ENTRY  # an entry's tuple, time and list slot, beside its value
_stream, _value, _time = operator.itemgetter(0), operator.itemgetter(1), operator.itemgetter(2)
#: Types whose sys.getsizeof is their own __sizeof__ (no GC header, no override): see _sizes.
_FLAT = frozenset({int, float, str, bytes, bool, type(None)})


def _sizes(entries: list[Entry]) -> Iterator[int]:
    """The ``sys.getsizeof`` of each entry's value, in C. A batch of one flat type (a stream of
    ints, of lines) takes the type's ``__sizeof__`` method itself: getsizeof parses its arguments,
    looks the method up by name and binds it, ~840 instructions a call against ~250 with the type
    check (callgrind)."""
    # The values taken out once: two itemgetter passes cost ~90 instructions an item more than the
    # list (callgrind, a process job's stream of 100,000 items).
    values = list(map(_value, entries))
    kinds = set(map(type, values))
    if len(kinds) == 1:
        kind: Any = kinds.pop()
        if kind in _FLAT:
            return map(kind.__sizeof__, values)  # the unbound method: kind.__sizeof__(value)
    return map(sys.getsizeof, values)


def cost(entries: list[Entry]) -> int:
    """An estimate of the bytes ``entries`` hold: ~100 each, and their values' ``sys.getsizeof``
    (a record counts its message, see Record.__sizeof__; a container only itself, not its items).
    C-level iteration: it runs under the session lock, for every batch of records."""
    return _ENTRY * len(entries) + sum(_sizes(entries))


class SpillJournal:
    """A job's journal whose oldest entries go to a segment file when the session needs memory.

    Positions below ``_mem_at[0]`` are in the file's blocks (``_starts``: each block's first
    position; ``_offs``, ``_lens``: where it lies in the file); the others in ``_mem_at[1]``.
    ``_mem_at`` is one attribute, replaced whole by a spill pass, so a reader without the lock
    always sees a base and a list that agree. ``_sizes`` holds each in-memory entry's value's
    ``sys.getsizeof`` as the window counted it, so a spill pass cuts its blocks without sizing the
    entries again (that was ~1,000 instructions a spilled item, callgrind). A list, not an
    array("q"): an array converts each item it takes with PyArg_Parse, ~230 instructions.
    """

    __slots__ = ("_bytes", "_dropped", "_lens", "_mem_at", "_offs", "_path", "_pinned", "_size",
                 "_sizes", "_spill", "_starts", "cursor", "job")

    def __init__(self, spill: Spill, job: Job, entries: list[Entry], cursor: int) -> None:
        self._spill = spill
        self.job = job             # for messages
        self.cursor = cursor
        self._mem_at: tuple[int, list[Entry]] = (0, entries)
        self._sizes = list(_sizes(entries))  # session lock
        self._bytes = _ENTRY * len(entries) + sum(self._sizes)  # the in-memory entries' estimate (cost())
        self._starts = array("q")
        self._offs = array("q")
        self._lens = array("q")
        self._size = 0             # bytes written to the file
        self._path: str | None = None
        self._pinned: dict[int, Entry] = {}  # entries that could not be pickled, by position
        self._dropped = False
        spill.held += self._bytes
        spill.journals[self] = None

    # --- with the session lock held (no I/O) -------------------------------------------------
    def __len__(self) -> int:
        base, mem = self._mem_at  # no count of its own: one addition less on every record
        return base + len(mem)

    def extend(self, entries: list[Entry]) -> None:
        sizes = list(_sizes(entries))  # cost(), kept for the pass
        self._sizes += sizes
        self._mem_at[1].extend(entries)
        n = _ENTRY * len(entries) + sum(sizes)
        self._bytes += n
        self._spill.held += n

    def append(self, entry: Entry) -> None:  # JobPort.record inlines it (a thread job's records)
        size = sys.getsizeof(entry[1])
        self._sizes.append(size)
        n = _ENTRY + size
        self._bytes += n
        self._spill.held += n
        self._mem_at[1].append(entry)  # last, as JobPort.record does

    def close(self) -> None:
        return None  # the records stay (in memory or in the file) until the job is removed

    # --- without it ----------------------------------------------------------------------------
    def read(self, start: int, stop: int) -> list[Entry]:
        base, mem = self._mem_at
        out: list[Entry] = []
        if start < base:
            out = self._read_file(start, min(stop, base))
        if stop > base:
            out.extend(mem[max(start, base) - base:stop - base])
        return out

    def _read_file(self, start: int, stop: int) -> list[Entry]:
        path = self._path
        if self._dropped or path is None:
            return []
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            if self._dropped:
                return []  # removed while being read: as a removed in-memory journal reads
            raise JobStateError(f"{describe_job(self.job)}: its records kept on disk are gone ({path} was "
                                f"deleted, as its session was closed); keep the session open while you "
                                f"receive a job's records") from None
        out: list[Entry] = []
        pinned = self._pinned
        try:
            i = bisect.bisect_right(self._starts, start) - 1
            pos = start
            while pos < stop:
                first = self._starts[i]
                data = os.pread(fd, self._lens[i], self._offs[i])
                if data[:1] == _PLAIN:
                    assert _cspill is not None  # only _cspill writes such a block
                    entries = _cspill.decode(data)
                    a, b = pos - first, min(len(entries), stop - first)
                    block = entries[a:b]
                    count = len(entries)
                else:
                    streams, values, times = pickle.loads(data)
                    a, b = pos - first, min(len(values), stop - first)
                    block = list(zip(streams[a:b], values[a:b], times[a:b]))
                    count = len(values)
                if pinned:  # entries that could not be pickled: a None in the file
                    for k in range(a, b):
                        if first + k in pinned:
                            block[k - a] = pinned[first + k]
                out.extend(block)
                pos = first + count
                i += 1
        finally:
            os.close(fd)
        return out

    def drop(self) -> None:
        spill = self._spill
        with spill.lock:  # no pass is writing this journal's file now
            with spill.session_lock:
                self._dropped = True
                spill.held -= self._bytes
                self._bytes = 0
                self._mem_at = (len(self), [])
                self._sizes = []
                self._pinned = {}
                spill.journals.pop(self, None)
            if self._path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(self._path)

    # --- a spill pass (holds Spill.lock) ----------------------------------------------------------
    def _write(self, directory: str, base: int, entries: list[Entry], sizes: list[int]) -> list[tuple[int, int, int]]:
        """Write ``entries`` (positions from ``base``; ``sizes``: their values' getsizeof) after what
        the file holds, a block at a time (so no second copy of them is made); the blocks' (start,
        offset, length). Written at explicit offsets: after a failed pass, the next one writes over
        what it left."""
        if self._path is None:
            self._path = os.path.join(directory, f"{id(self):x}.seg")
        blocks: list[tuple[int, int, int]] = []
        offset = self._size
        fd = os.open(self._path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            i = 0
            while i < len(entries):
                j = self._block_end(sizes, i)
                data = self._encode(base + i, entries[i:j])
                view = memoryview(data)
                at = offset
                while view:
                    n = os.pwrite(fd, view, at)
                    view, at = view[n:], at + n
                blocks.append((base + i, offset, len(data)))
                offset += len(data)
                i = j
        finally:
            os.close(fd)
        self._size = offset
        return blocks

    @staticmethod
    def _block_end(sizes: list[int], i: int) -> int:
        """Where the block from ``i`` ends: at _BLOCK_ENTRIES entries, or at the entry that brings
        it to _BLOCK_BYTES (as cost() counts them)."""
        j = min(i + _BLOCK_ENTRIES, len(sizes))
        # Most blocks hold _BLOCK_ENTRIES small entries: one C sum says so. A running sum over every
        # entry (accumulate) made an int object each, ~15 ns an entry of a pass's ~130 (a thread
        # job's stream of 100,000 ints, thread_time, load 0.4-2.5).
        if sum(sizes[i:j]) + _ENTRY * (j - i) <= _BLOCK_BYTES:
            return j
        ends = list(accumulate(sizes[i:j], initial=0))
        # The first end past _BLOCK_BYTES, that entry included (a block holds at least one entry).
        k = bisect.bisect_left(range(j - i + 1), _BLOCK_BYTES, 1, key=lambda n: ends[n] + _ENTRY * n)
        return i + min(k, j - i)

    def _encode(self, first: int, block: list[Entry]) -> bytes:
        # Plain entries (None, bools, 64-bit ints, floats, str, bytes: most streams) in one C pass
        # (core/_cspill.c): ~11 ns an entry, against ~55 to take the tuples apart into columns and
        # pickle them (a thread job's stream of 100,000 ints, thread_time, load 0.4-2.5). Any other
        # block is pickled.
        if _cspill is not None:
            data = _cspill.encode(block)
            if data is not None:
                return data
        # In columns, as the worker wire sends them: a list of 3-tuples pickled at ~900 instructions
        # an int item (each tuple saved and memoized), the columns at ~320 (callgrind). Not
        # zip(*block), which makes an iterator per entry; an array("d") of the times cost more than
        # a list (PyArg_Parse converts each item).
        streams, values, times = bytes(map(_stream, block)), list(map(_value, block)), list(map(_time, block))
        try:
            return pickle.dumps((streams, values, times), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:  # some value cannot be pickled: that one stays in memory
            kept: list[Any] = []
            for k, value in enumerate(values):
                try:
                    pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
                    kept.append(value)
                except Exception:
                    self._pinned[first + k] = block[k]
                    kept.append(None)  # read back from _pinned, by position
            return pickle.dumps((streams, kept, times), protocol=pickle.HIGHEST_PROTOCOL)


class Spill:
    """A session's memory window over its spilling journals, and the directory of their files."""

    def __init__(self, session_lock: Any, window: int = WINDOW) -> None:
        self.session_lock = session_lock
        self.window = window
        self.held = 0              # estimated bytes in the journals' memory (session lock)
        self.journals: dict[SpillJournal, None] = {}  # every SpillJournal not dropped
        self.lock = threading.Lock()  # one pass at a time; taken outside the session lock
        self.directory: str | None = None
        self._lock_fd = -1         # held (flock) while the directory is this live session's
        self.closed = False
        self._failed_at = 0.0

    def adopt(self, job: Job, small: MemoryJournal) -> SpillJournal:
        """The SpillJournal that takes over a grown MemoryJournal (session lock held)."""
        return SpillJournal(self, job, small.read(0, len(small)), small.cursor)

    def relieve(self) -> None:
        """Write the biggest journals' oldest entries to disk until memory is back to half the
        window. Called without the session lock by the thread that just added records."""
        if self.held <= self.window or self.closed:
            return
        if time.monotonic() - self._failed_at < _RETRY_SECONDS:
            return
        if self.lock.locked() and self.held <= 2 * self.window:
            return  # another pass runs and memory is not at twice the window: go on
        # ``with`` on the C lock, never acquire-then-try: a thread job's stop is raised in its thread
        # asynchronously, and one that came between the two would leave the lock taken for good.
        # A stop inside the pass leaves the claimed entries in memory: nothing is dropped before
        # it is indexed on disk.
        with self.lock:
            self._pass()

    def _pass(self) -> None:
        claims: list[tuple[SpillJournal, int, list[Entry], list[int], int]] = []
        with self.session_lock:
            if self.closed:
                return
            excess = self.held - self.window // 2
            for journal in sorted(self.journals, key=lambda j: j._bytes, reverse=True):
                if excess <= 0:
                    break
                base, mem = journal._mem_at
                if not mem:
                    continue
                sizes = journal._sizes
                if len(sizes) != len(mem):  # a stop landed inside a thread job's record (JobPort.record)
                    sizes = journal._sizes = list(_sizes(mem))
                    spill_bytes = _ENTRY * len(mem) + sum(sizes)
                    self.held += spill_bytes - journal._bytes
                    excess += spill_bytes - journal._bytes
                    journal._bytes = spill_bytes
                if journal._bytes <= excess:
                    k, n_bytes = len(mem), journal._bytes
                else:
                    # Only the oldest entries that bring memory back to half the window (the count
                    # at the journal's mean entry, then counted exactly), not the whole journal:
                    # the newest, which a reader that keeps up has not taken yet, stay in memory,
                    # and a thread job streaming 100,000 items spilled fewer of them (bench core's
                    # stream: the passes' CPU 108-115 -> 97 ms over 9 streams, writes 77-83 -> 63, load 0.3).
                    k = min(len(mem), -(-len(mem) * excess // journal._bytes))
                    n_bytes = _ENTRY * k + sum(sizes[:k])
                claims.append((journal, base, mem[:k], sizes[:k], n_bytes))
                excess -= n_bytes
        if not claims:
            return
        directory = self._directory()
        for journal, base, entries, sizes, n_bytes in claims:
            try:
                if directory is None:
                    raise OSError("no directory for psjobs' spill files")
                blocks = journal._write(directory, base, entries, sizes)
            except (OSError, pickle.PicklingError) as exc:
                self._failed_at = time.monotonic()
                _log.warning("psjobs: could not write %s's records to disk (%s); they stay in memory, "
                             "and psjobs tries again in %.0f s", describe_job(journal.job), exc, _RETRY_SECONDS)
                continue
            with self.session_lock:
                if journal._dropped:
                    continue
                for start, off, length in blocks:
                    journal._starts.append(start)
                    journal._offs.append(off)
                    journal._lens.append(length)
                # Entries added while the pass wrote stay; the list is new, so a reader holding the
                # old (base, list) still finds its entries there.
                now_base, mem = journal._mem_at
                journal._mem_at = (now_base + len(entries), mem[len(entries):])
                journal._bytes -= n_bytes  # what the claimed entries were counted at
                self.held -= n_bytes
                # No call between the three lines above (a stop raised into a thread job's thread
                # lands at a call's end): the count follows the list. The sizes after: one that
                # lands here leaves them uneven, and the next pass sizes its entries again.
                del journal._sizes[:len(entries)]
                if len(journal._sizes) != len(journal._mem_at[1]):  # a stop again, while the pass wrote
                    journal._sizes = list(_sizes(journal._mem_at[1]))

    def _directory(self) -> str | None:
        if self.directory is None:
            _prune_dead_soon()
            # Mode 0700. Made under a name no pruner looks at, locked, then renamed: a directory
            # named psjobs-spill-* always holds its lock while its session lives.
            made = None
            try:
                made = tempfile.mkdtemp(prefix=f"{_MAKING}{os.getpid()}-")
                self._lock_fd = _hold(made)
                directory = os.path.join(os.path.dirname(made), _PREFIX + os.path.basename(made)[len(_MAKING):])
                os.rename(made, directory)
            except OSError:
                if made is not None:
                    shutil.rmtree(made, ignore_errors=True)
                if self._lock_fd >= 0:
                    os.close(self._lock_fd)
                    self._lock_fd = -1
                return None
            self.directory = directory
            atexit.register(_remove, directory, os.getpid())
        return self.directory

    def close(self) -> None:
        """The session closed: delete every spilled record (records still in memory stay)."""
        with self.lock:
            self.closed = True
            if self.directory is not None:
                shutil.rmtree(self.directory, ignore_errors=True)
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
                self._lock_fd = -1


_PREFIX = "psjobs-spill-"
_MAKING = "psjobs-spillnew-"  # a directory being made: not yet locked, so no pruner looks at it


_LOCK = ".lock"
_pruned = False


def _hold(directory: str) -> int:
    """Lock ``directory`` for this process's life (the descriptor is kept; the kernel lets go of
    the lock when the process ends, however it ends)."""
    # Locked under another name, then renamed: a .lock that exists is always held (a pruner that
    # found it unlocked between its creation and the flock deleted the live directory).
    fresh = os.path.join(directory, _LOCK + "-new")
    fd = os.open(fresh, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(fresh, os.path.join(directory, _LOCK))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _prune_dead_soon() -> None:
    """Once per process, in a thread of its own (a dead session may have left gigabytes, and the
    first spill runs in a thread that reads a job's output): _prune_dead."""
    global _pruned
    if not _pruned:
        _pruned = True
        threading.Thread(target=_prune_dead, name="psjobs-spill-prune", daemon=True).start()


def _prune_dead() -> None:
    """Delete the spill directories of this user's sessions that are gone (SIGKILL, a crash: no
    exit hook ran), so their records do not stay on disk. A directory psjobs-spill-<pid>-* of this
    user's is a dead session's when its lock can be taken (a live session holds it, whatever pid
    namespace it runs in), or, with no lock in it yet, when no process has that pid."""
    root = tempfile.gettempdir()
    with contextlib.suppress(OSError):
        for entry in os.scandir(root):
            parts = entry.name[len(_PREFIX):].split("-", 1)
            if not entry.name.startswith(_PREFIX) or len(parts) != 2 or not parts[0].isdigit():
                continue
            with contextlib.suppress(OSError):
                pid = int(parts[0])
                if pid != os.getpid() and entry.is_dir(follow_symlinks=False) \
                        and entry.stat(follow_symlinks=False).st_uid == os.getuid() and _dead(entry.path, pid):
                    shutil.rmtree(entry.path, ignore_errors=True)


def _dead(directory: str, pid: int) -> bool:
    try:
        fd = os.open(os.path.join(directory, _LOCK), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return not _alive(pid)  # made, not locked yet (or by an older psjobs): judge by its pid
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: not ours to judge
    return True


def _remove(directory: str, pid: int) -> None:
    """At exit: delete a session's spill files, in the process that made them only (a child forked
    from it, which ran this hook too at its exit, must not delete its parent's records)."""
    if os.getpid() == pid:
        shutil.rmtree(directory, ignore_errors=True)
