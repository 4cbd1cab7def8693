"""Cluster jobs (ClusterJob): psjobs' verbs over tasks of a Dask cluster, the session side.

::

    start_cluster_job --checks, pickles (TypeError/ValueError before any job)--> parent + children
        --DaskBackend.connect(cluster): one _Conn per cluster (Client, topic, guard plugin)-->
        _Conn.submit --> scheduler --> workers (run_task, _dask_worker.py)
    records, results, lost workers and stops then flow through the _Conn's dispatcher thread
    (_dask_conn.py); the scheduler plugin is _dask_guard.py.

Nothing here imports ``distributed`` until a cluster is used, so ``import psjobs`` works without it.
"""

from __future__ import annotations

import itertools
import os
import pickle
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ..._errors import WorkerError, missing_dependency
from ...core._backend import NullPrepare, report
from ...core._job import Job, _next_ids
from ...core._spec import CALL, _arg, make_spec
from ...core._state import Event, JobState
from ._conn import _Conn, _Group, _Leaf

if TYPE_CHECKING:
    from ...core._session import Session

CONNECT_TIMEOUT = 10  # seconds to reach a scheduler given by address


def _probe(address: str) -> None:
    """Fail at once on a refused TCP address (the Client would retry it for CONNECT_TIMEOUT seconds)."""
    import socket

    from distributed.comm.addressing import parse_address, parse_host_port

    scheme, location = parse_address(address)
    if scheme != "tcp":
        return
    host, port = parse_host_port(location)
    socket.create_connection((host, port), timeout=CONNECT_TIMEOUT).close()


class DaskBackend(NullPrepare):
    """The session's way to Dask clusters: one connection per cluster given to start_cluster_job."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.token = uuid.uuid4().hex[:12]
        self.lock = threading.Lock()
        self.conns: dict[Any, _Conn] = {}
        self.retired: list[_Conn] = []
        self._specs = itertools.count(1)

    def connect(self, cluster: Any, verb: str) -> _Conn:
        """The connection for ``cluster`` (a Client, a cluster object or an address), made once."""
        try:
            import distributed
        except ImportError as exc:
            raise missing_dependency(f"{verb} (jobs on a Dask cluster)", "dask", exc) from exc
        if isinstance(cluster, distributed.Client):
            if cluster.asynchronous:
                raise TypeError(f"{verb}: cluster must be a synchronous dask Client (this one was made with "
                                f"asynchronous=True); give its scheduler address instead")
            key: Any = ("client", id(cluster))
            address = None
        elif isinstance(cluster, str):
            if not cluster.strip():
                raise ValueError(f"{verb}: cluster is an empty address; give one such as 'tcp://127.0.0.1:8786'")
            key = address = cluster.strip()
        elif isinstance(getattr(cluster, "scheduler_address", None), str):
            key = address = cluster.scheduler_address
        else:
            raise TypeError(f"{verb}: cluster must be a dask Client, a cluster object (LocalCluster, "
                            f"SSHCluster...) or a scheduler address, not {type(cluster).__name__}")
        with self.lock:
            conn = self.conns.get(key)
            if conn is not None and not conn.closed and conn.connected():
                return conn
            if conn is not None:
                self.retired.append(conn)  # its jobs end on their own; it is closed with the session
            if address is None:
                if cluster.status not in ("running", "connecting"):
                    raise WorkerError(f"{verb}: the dask Client given as cluster is {cluster.status}; give an "
                                      f"open one, or the scheduler's address")
                client, owned = cluster, False
            else:
                try:
                    _probe(address)
                    client = distributed.Client(  # type: ignore[no-untyped-call]
                        address, set_as_default=False, timeout=CONNECT_TIMEOUT)
                except Exception as exc:
                    raise WorkerError(f"{verb}: cannot reach the Dask scheduler at {address!r} "
                                      f"({type(exc).__name__}: {exc}); start it (dask scheduler) or check the "
                                      f"address") from exc
                owned = True
            try:
                conn = _Conn(self, client, owned)
            except BaseException:
                if owned:
                    client.close()
                raise
            self.conns[key] = conn
            return conn

    # --- the Backend interface --------------------------------------------------------------------
    def start(self, job: Job, spec: Any) -> None:
        raise NotImplementedError("cluster jobs start through start_cluster_job")

    def stop(self, job: Job, grace: float) -> None:
        leaf = job.backend_data
        if isinstance(leaf, _Leaf):
            leaf.conn.request_stop(leaf, grace)

    def forget(self, job: Job) -> None:
        leaf = job.backend_data
        if isinstance(leaf, _Leaf):
            leaf.conn.forget(leaf)

    def close(self) -> None:
        with self.lock:
            conns = [*self.conns.values(), *self.retired]
            self.conns.clear()
            self.retired.clear()
        for conn in conns:
            conn.close()


# --- starting -------------------------------------------------------------------------------------

def start_cluster_job(session: Session, target: Any, *args: Any, cluster: Any,
                      for_each: Iterable[Any] | None = None, name: str | None = None,
                      input: Iterable[Any] | None = None, init: Callable[[], Any] | None = None,
                      working_directory: str | os.PathLike[str] | None = None,
                      env: Mapping[str, str | None] | None = None, retries: int = 0,
                      resources: Mapping[str, float] | None = None, **kwargs: Any) -> Job:
    """Check everything, make the job tree, submit its tasks (see Session.start_cluster_job)."""
    from ...core._session import _check_name

    verb = "start_cluster_job"
    _check_name(verb, name)
    if cluster is None:
        raise TypeError(f"{verb}: cluster is required: a dask Client, a cluster object or a scheduler address")
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"{verb}: retries must be a whole number >= 0, not {retries!r}")
    if resources is not None:
        if not isinstance(resources, Mapping) or not all(
                isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
                for k, v in resources.items()):
            raise TypeError(f"{verb}: resources must map resource names to amounts, such as {{'GPU': 1}}, "
                            f"not {resources!r}")
    items: list[Any] | None = None
    if for_each is not None:
        if isinstance(for_each, (str, bytes)) or not isinstance(for_each, Iterable):
            raise TypeError(f"{verb}: for_each must be an iterable of items (a list, a range...), not "
                            f"{type(for_each).__name__}; wrap a single value in a list")
        if input is not None:
            raise ValueError(f"{verb}: give each item through for_each, or input for one job, not both")
        items = list(for_each)
    spec = make_spec(target, (), kwargs, init=init, input=input, verb=verb)
    data: dict[str, Any] = {"kind": "call" if spec.kind == CALL else "command", "retries": retries,
                            "input": None if input is None else list(input)}
    if spec.kind == CALL:
        if working_directory is not None or env is not None:
            raise ValueError(f"{verb}: working_directory and env apply to commands on a cluster; a callable "
                             f"shares its worker process with other tasks, so it cannot have its own (change "
                             f"them inside the callable, or run a command)")
        data.update(target=target, args=tuple(args), kwargs=dict(kwargs), init=init)
        if items is not None:
            items = [_dump_item(verb, n, item) for n, item in enumerate(items)]
    else:
        data.update(argv=spec.argv, args=[_arg(verb, a) for a in args], cwd=_check_cwd(verb, working_directory),
                    env=_check_env(verb, env))
        if items is not None:
            items = [_arg(verb, item) for item in items]
    import cloudpickle

    try:
        blob: bytes = cloudpickle.dumps(data, protocol=5)
    except Exception as exc:
        raise TypeError(f"{verb}: the callable {spec.command!r} or its arguments cannot be sent to the cluster "
                        f"({type(exc).__name__}: {exc}); pass picklable values") from exc

    backend = session._backend("dask")
    assert isinstance(backend, DaskBackend)
    conn = backend.connect(cluster, verb)

    count = 1 if items is None else len(items)
    ids = _next_ids(1 + count)
    parent = Job(session, ids[0], job_type="ClusterJob", name=name, command=spec.command, location=conn.address,
                 state=JobState.RUNNING)
    group = _Group(f"{conn.topic}-g{ids[0]}", parent)
    for cid in ids[1:]:
        child = Job(session, cid, job_type="", name=None, command=spec.command, parent=parent,
                    location=conn.address)
        leaf = _Leaf(conn, group, child, retries)
        child.backend_data = leaf
        group.leaves.append(leaf)
    session._register([parent, *parent.child_jobs])
    if not count:
        report(parent, Event.COMPLETE)  # an empty for_each: nothing to run, nothing failed
        return parent
    try:
        conn.submit(group, f"{backend.token}-{next(backend._specs)}", blob, items, resources)
    except Exception as exc:
        for leaf in group.leaves:
            conn._fail(leaf, WorkerError(f"psjobs could not submit "
                                         f"its task to the scheduler at {conn.address} ({type(exc).__name__}: "
                                         f"{exc}); start it again"), exc)
    return parent


def _dump_item(verb: str, n: int, item: Any) -> bytes:
    """An item as bytes, so the scheduler never has to import the classes of the user's data."""
    try:
        data = pickle.dumps(item, protocol=5)
        if b"__main__" not in data:
            return data
    except Exception:
        pass
    import cloudpickle  # values of classes made at run time (defined in __main__, closures...)

    try:
        out: bytes = cloudpickle.dumps(item, protocol=5)
        return out
    except Exception as exc:
        raise TypeError(f"{verb}: item {n} of for_each ({_short(item)}) cannot be sent to the cluster "
                        f"({type(exc).__name__}: {exc}); pass picklable values") from exc


def _short(value: Any) -> str:
    try:
        text = repr(value)
    except Exception:
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 80 else text[:77] + "..."


def _check_cwd(verb: str, working_directory: str | os.PathLike[str] | None) -> str | None:
    """The command's directory on the worker (not checked here: it is another machine's)."""
    if working_directory is None:
        return None
    if not isinstance(working_directory, (str, os.PathLike)):
        raise TypeError(f"{verb}: working_directory must be a str or a path, not {type(working_directory).__name__}")
    path = os.fspath(working_directory)
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"{verb}: working_directory is empty; give a directory of the workers or leave it out "
                         f"to use the worker's own")
    return path


def _check_env(verb: str, env: Mapping[str, str | None] | None) -> dict[str, str | None] | None:
    """Changes to the worker's environment for a command (None removes a variable)."""
    if env is None:
        return None
    if not isinstance(env, Mapping):
        raise TypeError(f"{verb}: env must be a mapping of names to values, not {type(env).__name__}")
    out: dict[str, str | None] = {}
    for key, value in env.items():
        if not isinstance(key, str) or not key or "=" in key:
            raise ValueError(f"{verb}: env has an invalid variable name {key!r}")
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{verb}: env[{key!r}] must be a str (or None to remove it), not {type(value).__name__}")
        out[key] = value
    return out
