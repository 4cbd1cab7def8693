"""The verbs as module functions, over one default Session per process (thin, as httpx's _api)."""

from __future__ import annotations

import atexit
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime
from typing import Any

from .core import _future
from .core._format import JobList
from .core._job import Job
from .core._session import JobSelector, Session
from .core._state import JobState

_default: Session | None = None
_lock = threading.Lock()


def default_session() -> Session:
    """The process's default session, made on first use and closed at exit."""
    global _default
    if _default is None:
        with _lock:
            if _default is None:
                _default = Session()
                atexit.register(_close_default)
    return _default


def existing_default_session() -> Session | None:
    """The default session if something made it already; None, without making one."""
    return _default


def _close_default() -> None:
    if _default is not None:
        _default.close()


def _after_fork_in_child() -> None:
    # The parent's default session is the parent's (core/_fork closes the child's copy in place):
    # the module's verbs make one of the child's own on first use.
    global _default, _lock
    _default, _lock = None, threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def start_job(target: Any, *args: Any, name: str | None = None, input: Iterable[Any] | None = None,
              init: Callable[[], Any] | None = None, working_directory: str | os.PathLike[str] | None = None,
              env: Mapping[str, str | None] | None = None, cluster: Any = None, group: str | None = None,
              after: Any = None, delay: Any = None, retries: int = 0, **kwargs: Any) -> Job:
    """Run ``target`` in another process and return its BackgroundJob at once.

    ``target`` is a callable (run with ``*args, **kwargs``), a shell command line (``*args`` are
    ``$1, $2...``) or an argv list. Example: ``job = psjobs.start_job("ls -l /tmp")``.
    With ``cluster=`` (a dask Client, cluster or scheduler address) it runs on a Dask cluster
    as a ClusterJob (see start_cluster_job). ``group``, ``after``, ``delay``, ``retries``: when it
    runs, and how often it is run again after a failure (see configure_group and docs/guide.md; a
    ClusterJob's ``retries`` are Dask's, after a lost worker: docs/dask.md).
    """
    return default_session().start_job(target, *args, name=name, input=input, init=init,
                                       working_directory=working_directory, env=env, cluster=cluster,
                                       group=group, after=after, delay=delay, retries=retries, **kwargs)


def start_cluster_job(target: Any, *args: Any, cluster: Any, for_each: Iterable[Any] | None = None,
                      name: str | None = None, input: Iterable[Any] | None = None,
                      init: Callable[[], Any] | None = None,
                      working_directory: str | os.PathLike[str] | None = None,
                      env: Mapping[str, str | None] | None = None, retries: int = 0,
                      resources: Mapping[str, float] | None = None, group: str | None = None,
                      after: Any = None, delay: Any = None, **kwargs: Any) -> Job:
    """Run ``target`` as Dask tasks on ``cluster`` and return its ClusterJob at once.

    ``for_each=items`` makes one child job per item, each running ``target(item, *args, **kwargs)``
    (PowerShell's ``ForEach-Object -Parallel -AsJob``). Example:
    ``job = psjobs.start_cluster_job(square, for_each=range(100), cluster="tcp://127.0.0.1:8786")``.
    """
    return default_session().start_cluster_job(target, *args, cluster=cluster, for_each=for_each, name=name,
                                               input=input, init=init, working_directory=working_directory,
                                               env=env, retries=retries, resources=resources, group=group,
                                               after=after, delay=delay, **kwargs)


def start_thread_job(target: Any, *args: Any, name: str | None = None, input: Iterable[Any] | None = None,
                     init: Callable[[], Any] | None = None, throttle_limit: int | None = None,
                     group: str | None = None, after: Any = None, delay: Any = None, retries: int = 0,
                     **kwargs: Any) -> Job:
    """Run ``target`` in a thread and return its ThreadJob at once (queued past the throttle limit)."""
    return default_session().start_thread_job(target, *args, name=name, input=input, init=init,
                                              throttle_limit=throttle_limit, group=group, after=after,
                                              delay=delay, retries=retries, **kwargs)


def invoke_command(target: Any, *args: Any, computer_name: str | Iterable[str] | None = None,
                   as_job: bool = True, throttle_limit: int = 32, job_name: str | None = None,
                   group: str | None = None, after: Any = None, delay: Any = None, retries: int = 0,
                   **kwargs: Any) -> Any:
    """Run ``target`` on every computer over SSH; one RemoteJob with a child per computer."""
    return default_session().invoke_command(target, *args, computer_name=computer_name, as_job=as_job,
                                            throttle_limit=throttle_limit, job_name=job_name, group=group,
                                            after=after, delay=delay, retries=retries, **kwargs)


def get_job(id: Any = None, *, name: str | Iterable[str] | None = None, instance_id: Any = None,
            state: JobState | str | None = None, command: str | Iterable[str] | None = None,
            has_more_data: bool | None = None, before: datetime | None = None, after: datetime | None = None,
            newest: int | None = None, include_child_jobs: bool = False,
            child_job_state: JobState | str | None = None) -> list[Job]:
    """The session's jobs by ascending id (all top-level jobs without arguments), filtered."""
    return default_session().get_job(id, name=name, instance_id=instance_id, state=state, command=command,
                                     has_more_data=has_more_data, before=before, after=after, newest=newest,
                                     include_child_jobs=include_child_jobs, child_job_state=child_job_state)


def receive_job(jobs: JobSelector, *, keep: bool = False, wait: bool = False, timeout: float | None = None,
                auto_remove: bool = False, no_recurse: bool = False, error_action: str = "continue",
                records: bool = False) -> list[Any]:
    """The output items not yet received, in production order; other records go to the host.

    ``keep`` reads without consuming; ``wait`` follows the jobs until they finish (``timeout``
    bounds it); ``records`` returns OutputRecords; ``error_action="stop"`` raises JobFailedError.
    """
    return default_session().receive_job(jobs, keep=keep, wait=wait, timeout=timeout, auto_remove=auto_remove,
                                         no_recurse=no_recurse, error_action=error_action, records=records)


def wait_job(jobs: JobSelector, *, any: bool = False, timeout: float | None = None,
             state: JobState | str | None = None, show_progress: bool = False) -> list[Job]:
    """Wait until the jobs are done (the first one with ``any=True``); ``[]`` on timeout."""
    return JobList(default_session().wait_job(jobs, any=any, timeout=timeout, state=state,
                                              show_progress=show_progress))


def stop_job(jobs: JobSelector, *, pass_thru: bool = False) -> list[Job]:
    """Stop the jobs for real and return when they are finished."""
    return JobList(default_session().stop_job(jobs, pass_thru=pass_thru))


def remove_job(jobs: JobSelector, *, force: bool = False) -> None:
    """Drop finished jobs and all their data; ``force=True`` stops running ones first."""
    default_session().remove_job(jobs, force=force)


def suspend_job(jobs: JobSelector) -> list[Job]:
    """Pause running process jobs (SIGSTOP to the whole process group); they show Suspended."""
    return JobList(default_session().suspend_job(jobs))


def resume_job(jobs: JobSelector) -> list[Job]:
    """Let suspended jobs run on (SIGCONT); they show Running."""
    return JobList(default_session().resume_job(jobs))


def connect(home: str | os.PathLike[str] | None = None, *, verbose: bool = False, debug: bool = False) -> Session:
    """A Session whose jobs live in the per-user session host, the one the ``psjobs`` command uses
    (started now if none runs): they show in ``psjobs get``, outlive this interpreter and keep
    every record through a host restart. ``home``: the host's state directory (default: the
    command's: ``$PSJOBS_HOME``, else ``$XDG_STATE_HOME/psjobs``, else ``~/.local/state/psjobs``).
    See docs/connect.md.
    Example: ``jobs = psjobs.connect(); job = jobs.start_job(build, "all")``.
    """
    from ._connect import HostSession  # lazily: the host's client is not part of `import psjobs`

    return HostSession(home=home, verbose=verbose, debug=debug)


def as_completed(jobs: JobSelector, timeout: float | None = None) -> Iterator[Job]:
    """Yield the jobs as they finish, the finished ones first (``concurrent.futures.as_completed``
    for jobs); ``TimeoutError`` if some are unfinished after ``timeout`` seconds (they go on)."""
    return _future.as_completed(_future.session_of(jobs, default_session), jobs, timeout)


async def async_wait_job(jobs: JobSelector, *, any: bool = False, timeout: float | None = None,
                         state: JobState | str | None = None) -> list[Job]:
    """``await``-able ``wait_job``: the event loop runs on while the jobs do (no thread per waiter)."""
    session = _future.session_of(jobs, default_session)
    return JobList(await _future.wait_async(session, jobs, any=any, timeout=timeout, state=state))


async def async_receive_job(jobs: JobSelector, *, keep: bool = False, wait: bool = False,
                            timeout: float | None = None, auto_remove: bool = False, no_recurse: bool = False,
                            error_action: str = "continue", records: bool = False) -> list[Any]:
    """``await``-able ``receive_job``: with ``wait=True`` the jobs are awaited without blocking the loop."""
    session = _future.session_of(jobs, default_session)
    return await _future.receive_async(session, jobs, keep=keep, wait=wait, timeout=timeout,
                                       auto_remove=auto_remove, no_recurse=no_recurse,
                                       error_action=error_action, records=records)


# --- scheduling (core/_sched) -----------------------------------------------------------------
def configure_group(name: str, parallel: int = 1) -> None:
    """Make group ``name`` (or change its limit): at most ``parallel`` of its jobs run at once.

    Example: ``psjobs.configure_group("build", parallel=2); psjobs.start_job(cmd, group="build")``.
    """
    default_session().configure_group(name, parallel)


def pause_group(name: str) -> None:
    """Start none of the group's waiting jobs until resume_group; running ones go on."""
    default_session().pause_group(name)


def resume_group(name: str) -> None:
    """Start the group's waiting jobs again, up to its ``parallel`` limit."""
    default_session().resume_group(name)


def get_group(name: str | None = None) -> list[dict[str, Any]]:
    """The groups: ``{"name", "parallel", "paused", "running", "waiting"}`` each, by name."""
    return default_session().get_group(name)


def restart_job(job: Any) -> Job:
    """A new job with the same target, arguments and options as the finished ``job``."""
    return default_session().restart_job(job)
