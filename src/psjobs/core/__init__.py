"""psjobs' core: the Session, its jobs, their states, and the port backends report through.

This is the facade backends import (``from ...core import JobPort, Outcome, Backend, ...``); what
is not here is the core's own business. Stdlib only; the core imports no backend (they are found
by name in :mod:`._backend`'s registry and imported on first use).

After ``os.fork()`` the child's copies of the parent's sessions are closed in place (core/_fork);
the module's verbs make the child a default session of its own.

Threads psjobs starts, in the session's process
-----------------------------------------------
- ``psjobs-thread-N`` (backends/_thread): run thread jobs, at most ``thread_throttle_limit`` at
  once; an idle one ends after 2 s, ``Session.close`` ends them all.
- ``psjobs-sched`` (core/_sched): one per session while jobs wait for a group slot, a dependency
  or a delay, or may be retried; waits on the session's condition, starts what may run (outside
  the lock), and ends when nothing waits.
- ``psjobs-io`` (backends/process/_loop): one per session with process jobs; reads every job's
  socket, pipes and pidfd, runs the fork client's messages and the stop timers.
- an unnamed resubmit thread (backends/process/_backend) per job whose fork server died before it
  forked the job: hands the job to the new server, then ends.
- ``psjobs-ssh`` (backends/ssh/_engine): the asyncio loop of asyncssh, one per session with
  remote jobs.
- ``psjobs-dask-N`` (backends/dask/_conn): one dispatcher per cluster connection, the only thread
  that reports for cluster jobs; ``psjobs-dask-stop`` helpers broadcast a stop to the workers
  (and put their answer in the inbox), or stop the tasks of a Client closed under its jobs.
  (distributed's Client runs its own event-loop thread; psjobs only puts things in an inbox there.)
- ``psjobs-callbacks`` (core/_dispatch): one per process, started by the first of psjobs' own
  callbacks that is due (a future's settling, the Executor's queue, as_completed, the asyncio
  waiters' wake-ups) and ended after a second without work; runs them in order, outside every
  psjobs lock, and never a user's code.
- ``psjobs-user-callbacks`` (core/_dispatch): the users' callbacks (a job's done and state
  callbacks, a future's), in order, outside every psjobs lock; one per process, one more while a
  callback runs and others are due (to take over should it run 0.2 s), and one per callback
  that ran that long (it ends when that callback returns). Each ends after a second without work.
- ``psjobs-connect-watch`` (psjobs/_connect_watch): one per connected session (``psjobs.connect()``)
  while something waits on one of its unfinished jobs (result(), a future, ``await``, as_completed,
  a callback): asks the host to wait for them (a round of at most 1 s) and updates the mirrors, so
  their callbacks fire and waiters wake; ends when nothing unfinished is watched, or at ``close()``.
- ``psjobs-host-writer`` (host/_journal: writes every journal's records, cursors and states to
  SQLite, one transaction per pass) and ``psjobs-host-conn`` (one per client connection, host/_server):
  the session host's.
- No thread writes spilled records (core/_spill): the thread that reports a job's records past
  the session's memory window writes the oldest to disk itself, after the session lock.
  ``psjobs-spill-prune`` (core/_spill): once per process, at the first spill, deletes the spill
  directories of this user's sessions that were killed, then ends.
- Outside the session's process: ``psjobs-pump`` in a process worker (worker/_process_worker: fd 1
  and 2 to records), ``psjobs-dask-shipper`` on a Dask worker (backends/dask/_on_worker: a task's
  records to the session).

Locks, and the order in which they may be taken (outer first)
---------------------------------------------------------------
1. ``Session._backend_lock``: making a backend. Nothing else is taken under it but the
   registry's lock and the backend's constructor's own.
2. Backend locks, each its own: ``ThreadBackend._cond`` (the queue), ``ThreadStopper.lock``
   (worker/_thread_stop: a thread job's in-user flag, for raising a stop), ``ProcessBackend._server_lock``,
   ``IOLoop.sel.mutex`` (an RLock: registering descriptors; the loop's handlers run under it, and
   report through ports, so it comes before the session lock), ``SSHBackend._engine_lock``,
   ``DaskBackend.lock``, ``_Conn.lock``; ssh's ``_PICKLE_LOCK``. Two backend locks are never held
   together. A backend may report through a port while it holds one of its own locks.
2b. ``Spill.lock`` (core/_spill): one spill pass of a session at a time, and a journal's drop.
   Taken after any backend lock (a reporting thread holds its own), never under the session
   lock; the session lock is taken under it, briefly, to claim and then index what is written.
2c. ``Watcher.lock`` (psjobs/_connect_watch): a connected session's watched jobs and its watcher
   thread; the session lock is taken under it, briefly, and it is never taken under the session lock.
3. The session lock, ``Session._lock`` under ``Session._cond``: every job of the session. Only the
   core takes it (JobPort, Session, Job, and a Journal's ``extend``/``append``/``close``, which
   only count and queue). It is the innermost lock: nothing else is taken while it is held, no
   backend is called under it, and nothing slow runs under it. The waiter locks of wait_job
   (``Session._targets``, core/_receive) are released under it, as the Condition's own are.
4. Leaves: the registry's lock (core/_backend), the id counter's (core/_job), the default session's
   (psjobs/_api), each callbacks dispatcher's ``Dispatcher.cond`` (core/_dispatch: taken under the
   session lock to queue a callback), ``Executor._lock`` (psjobs/_executor: its queue and count;
   no job is started or settled under it), the host store's ``Store._lock`` (SQLite, taken by the
   writer thread and by reads outside the session lock); nothing is taken under them.

Outside the session's process, a process worker has two: ``Writer._lock`` then ``Channel.lock``
(worker/_batching), both RLocks with a busy flag, since a finalizer that prints re-enters them in
the same thread: its records then go to a side list, never into a half-updated batch.
"""

import importlib
import typing

if typing.TYPE_CHECKING:  # what type checkers read; what runs is __getattr__, below
    from ._backend import Backend, Place, Plan, backend_class, register_backend, unregister_backend
    from ._job import Entry, Job, result_shape
    from ._port import JobPort, Outcome, wait_free
    from ._session import Session
    from ._spec import ARGV, CALL, SHELL, JobSpec, command_arg, make_spec
    from ._state import JobState

# name -> module, imported on first use (PEP 562): the command, which shows the job table
# (._format) and records (._pshost), does not import the Session and its machinery. A new name
# goes here, in the TYPE_CHECKING imports and in __all__ (tests/test_startup.py checks all three).
_EXPORTS = {
    "ARGV": "._spec",
    "CALL": "._spec",
    "SHELL": "._spec",
    "Backend": "._backend",
    "Entry": "._job",
    "Job": "._job",
    "JobPort": "._port",
    "JobSpec": "._spec",
    "JobState": "._state",
    "Outcome": "._port",
    "Place": "._backend",
    "Plan": "._backend",
    "Session": "._session",
    "backend_class": "._backend",
    "command_arg": "._spec",
    "make_spec": "._spec",
    "register_backend": "._backend",
    "result_shape": "._job",
    "unregister_backend": "._backend",
    "wait_free": "._port",
}


def __getattr__(name: str) -> typing.Any:
    where = _EXPORTS.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(where, __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "ARGV",
    "CALL",
    "SHELL",
    "Backend",
    "Entry",
    "Job",
    "JobPort",
    "JobSpec",
    "JobState",
    "Outcome",
    "Place",
    "Plan",
    "Session",
    "backend_class",
    "command_arg",
    "make_spec",
    "register_backend",
    "result_shape",
    "unregister_backend",
    "wait_free",
]
