"""Sessions after ``os.fork()``: the child gets a copy of every Session, not its threads.

::

    Session (its first backend made) --track--> _owners[session] = this pid
    os.fork() --> child: every tracked session not made here is closed in place, touching nothing
        (no stop, no socket shut down: they are the parent's), its starts refused with a word
        on fork; the module verbs' default session is made anew (psjobs._api)

Why: a child that closed its copy at exit shut down the socket it shares with the parent's fork
server, which then ended every job of the parent (and the child's requests reached the parent's
server, whose answers went to the parent). Standard library only.
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._session import Session

_owners: weakref.WeakKeyDictionary[Session, int] = weakref.WeakKeyDictionary()


def track(session: Session) -> None:
    """``session`` belongs to this process (called when it makes its first backend)."""
    _owners.setdefault(session, os.getpid())


def parent_of(session: Session) -> int | None:
    """The pid of the process ``session`` belongs to, when it is not this one (None: it is ours)."""
    owner = _owners.get(session)
    return None if owner is None or owner == os.getpid() else owner


def _after_fork_in_child() -> None:
    for session in list(_owners.keys()):
        if _owners.get(session) != os.getpid():
            # A thread of the parent may have held this lock at the fork: a fresh one, so that
            # close() (at the child's exit too) returns at once instead of waiting for it.
            session._backend_lock = threading.Lock()
            session._closed = True


os.register_at_fork(after_in_child=_after_fork_in_child)
