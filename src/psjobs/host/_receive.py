"""How the session host hands a job's records out: each record to exactly one receiver.

::

    receive handler --consume: Claims.take(leaves)--> the leaves no other consuming receive reads
        |                                             now (with --wait: the others once let go)
        +--Sender.acked (psjobs receive): read from the cursor, keep it; each part's ack moves it
        |                                 past what the client delivered
        +--Sender.plain (psjobs.connect(), and --keep): read_batches moves the cursors as it reads
        +--Claims.release(leaves)

A consuming receive holds its leaves for as long as it reads them, whichever kind it is. That is
what keeps the two kinds apart: a `psjobs receive` into a slow pipe has records in flight that
the cursor does not cover yet (they are consumed once the reader takes them), and a plain read
from the cursor meanwhile handed the same records out again (100,000 produced, 200,000 delivered).
A receive that only keeps (--keep) consumes nothing and takes no claim.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .._errors import RequestError
from ._client import read_frame
from ._protocol import HEADER, MAGIC, MAX_REQUEST, VERSION, RecordRow, read_ack, records_part

if TYPE_CHECKING:
    from ..core import Job, Session
    from ._journal import Writer

PAGE_BYTES = 4 << 20         # a receive sends records in parts of about this size
_GONE_POLL = 0.2             # how often a receive waiting for a claim looks whether its client left


class Reply:
    """What a handler uses to send parts of a streamed result before its end."""

    def __init__(self, conn: socket.socket) -> None:
        self._conn = conn

    def part(self, frame_json: str) -> None:
        body = frame_json.encode()
        self._conn.sendall(HEADER.pack(MAGIC, VERSION, len(body)))  # apart: a part is megabytes,
        self._conn.sendall(body)                                    # not copied once more

    def ack(self, sent: int) -> int:
        """Wait for the client's ack of the part just sent: how many of its ``sent`` records it
        delivered (0 if it went away)."""
        try:
            body = read_frame(self._conn, MAX_REQUEST, "the client")
        except (OSError, RequestError):
            return 0
        return read_ack(body, sent)

    def gone(self) -> bool:
        """True when the client has hung up. Between parts a client sends nothing, so a readable
        connection is one at its end (or one that broke the protocol, which is over as well)."""
        try:
            poller = select.poll()
            poller.register(self._conn.fileno(), select.POLLIN)
            return bool(poller.poll(0))
        except (OSError, ValueError):
            return True


class Claims:
    """Which leaves a consuming receive reads now: one receive at a time per leaf."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._held: set[int] = set()

    def take(self, leaves: list[Job], *, block: bool, deadline: float | None,
             gone: Callable[[], bool]) -> list[Job]:
        """The leaves no other receive holds, now held by the caller. With ``block``, when every
        one is held, wait until one is let go, the ``deadline`` passes or the client is ``gone``."""
        with self._cond:
            while True:
                free = [leaf for leaf in leaves if leaf.id not in self._held]
                if free or not block:
                    break
                remaining = _GONE_POLL if deadline is None else min(_GONE_POLL, deadline - time.monotonic())
                if remaining <= 0 or gone():
                    break
                self._cond.wait(remaining)
            self._held.update(leaf.id for leaf in free)
            return free

    def release(self, leaves: list[Job]) -> None:
        with self._cond:
            self._held.difference_update(leaf.id for leaf in leaves)
            self._cond.notify_all()


def consume(claims: Claims, leaves: list[Job], *, wait: bool, timeout: float | None, reply: Reply,
            send: Callable[[list[Job], float | None], bool]) -> tuple[bool, bool]:
    """Hand each leaf to ``send(leaves, timeout)`` while this receive holds it; without ``wait``
    a leaf another receive holds is left to it (it hands those records out), with ``wait`` it is
    taken once let go, within the ``timeout``. Returns (all that was sent was delivered, every
    leaf was taken): a receive that left a leaf to another must not auto-remove its job."""
    deadline = None if timeout is None else time.monotonic() + timeout
    pending = list(leaves)
    while pending:
        mine = claims.take(pending, block=wait, deadline=deadline, gone=reply.gone)
        if not mine:
            return True, False
        try:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not send(mine, left):
                return False, False
        finally:
            claims.release(mine)
        taken = {leaf.id for leaf in mine}
        pending = [leaf for leaf in pending if leaf.id not in taken]
        if not wait:
            return True, not pending
    return True, True


class Sender:
    """Sends one receive's records to its client: ``tops`` (which top-level job and computer each
    leaf belongs to, for the --json ids and the [web1] prefixes) rides on its first part."""

    def __init__(self, session: Session, writer: Writer, reply: Reply, tops: dict[int, list[Any]]) -> None:
        self.session = session
        self.writer = writer
        self.reply = reply
        self._tops: dict[int, list[Any]] | None = tops

    def _part(self, rows: list[RecordRow]) -> None:
        self.reply.part(records_part(rows, self._tops))
        self._tops = None  # once, on the first part

    def opening(self) -> None:
        """A part without records, for a receive whose client acknowledges nothing: the map goes
        out before the read waits."""
        self._part([])

    def plain(self, leaves: list[Job], *, keep: bool, wait: bool, timeout: float | None) -> bool:
        """The leaves' records in parts, consumed as they are read unless ``keep``."""
        rows: list[RecordRow] = []
        size = 0
        # A part per batch (at most about PAGE_BYTES): what arrived goes out before the read waits again.
        for leaf, entries in self.session.read_batches(leaves, keep=keep, wait=wait, timeout=timeout):
            for stream, stored, t in entries:
                rows.append((stored.seq, leaf.id, stream, t, stored.flag, stored.data))
                size += len(stored.data) + 40
                if size >= PAGE_BYTES:
                    self._part(rows)
                    rows, size = [], 0
            if rows:
                self._part(rows)
                rows, size = [], 0
        return True

    def acked(self, leaves: list[Job], *, wait: bool, timeout: float | None) -> bool:
        """The leaves' unread records in parts, read without moving the cursors; each part's ack
        moves them past the delivered records only. False if the client delivered only some."""
        journals = {leaf.id: self.writer.journals.get(leaf.id) for leaf in leaves}
        position = {i: 0 if j is None else j.cursor for i, j in journals.items()}  # next unsent record
        rows: list[RecordRow] = []
        at: list[int] = []  # per row: the position after it (its job's cursor once it is delivered)
        size = 0

        def flush() -> bool:
            nonlocal rows, at, size
            self._part(rows)
            delivered = self.reply.ack(len(rows))
            moved: dict[int, tuple[int, int]] = {}
            for row, end in zip(rows[:delivered], at):
                moved[row[1]] = (end, row[0])
            for job_id, (end, seq) in moved.items():
                journal = journals[job_id]
                if journal is not None and end > journal.cursor:
                    journal.receive_to(end, seq)
            complete = delivered == len(rows)
            rows, at, size = [], [], 0
            return complete

        for leaf, entries in self.session.read_batches(leaves, keep=True, wait=wait, timeout=timeout):
            for stream, stored, t in entries:
                rows.append((stored.seq, leaf.id, stream, t, stored.flag, stored.data))
                position[leaf.id] += 1
                at.append(position[leaf.id])
                size += len(stored.data) + 40
                if size >= PAGE_BYTES and not flush():
                    return False
            if rows and wait and not flush():  # what arrived goes out before the read waits again
                return False
        return not rows or flush()  # without --wait, many jobs' records share parts
