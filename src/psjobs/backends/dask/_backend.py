"""Cluster jobs (ClusterJob): psjobs' verbs over tasks of a Dask cluster, the session side.

::

    Session.start_cluster_job --> DaskBackend.prepare: checks, pickles (TypeError/ValueError before
        any job), connect(cluster): one _Conn per cluster (Client, topic, guard plugin)
    --> DaskBackend.plan: one leaf per item --> the Session makes the ClusterJob, its children, ports
    --> DaskBackend.start(ports): _Conn.submit --> scheduler --> workers (run_task, _on_worker.py)
    records, results, lost workers and stops then flow through the _Conn's dispatcher thread
    (_conn.py); the scheduler plugin is _on_scheduler.py.

Nothing here imports ``distributed`` until a cluster is used, so ``import psjobs`` works without it.
"""

from __future__ import annotations

import itertools
import os
import pickle
import threading
import uuid
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ..._errors import WorkerError, missing_dependency
from ...core import CALL, Backend, JobPort, Place, Plan, command_arg
from ._conn import _Conn, _Group, _Leaf

if TYPE_CHECKING:
    from ...core import JobSpec, Session

CONNECT_TIMEOUT = 10  # seconds to reach a scheduler given by address


def _check_address(verb: str, address: str) -> str:
    """``address`` if Dask can read it as a scheduler's, else ValueError: a bad argument, not a
    scheduler that cannot be reached (it raises before any job exists, as every bad argument)."""
    from distributed.comm.addressing import parse_address, parse_host_port
    from distributed.comm.registry import get_backend

    try:
        scheme, location = parse_address(address)
        get_backend(scheme)  # ValueError for a scheme Dask has no transport for (http://...)
        if scheme != "inproc":  # an in-process cluster's address has no port
            _host, port = parse_host_port(location)
            if not 0 < port < 65536:
                raise ValueError(f"port {port} is out of range")
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{verb}: cluster={address!r} is not a Dask scheduler address ({exc}); give "
                         f"scheme://host:port, such as 'tcp://10.0.0.5:8786' (what `dask scheduler` prints as "
                         f"'Scheduler at:'), or a Client or cluster object") from exc
    return address


def _probe(address: str) -> None:
    """Fail at once on a refused TCP address (the Client would retry it for CONNECT_TIMEOUT seconds)."""
    import socket

    from distributed.comm.addressing import parse_address, parse_host_port

    scheme, location = parse_address(address)
    if scheme != "tcp":
        return
    host, port = parse_host_port(location)
    socket.create_connection((host, port), timeout=CONNECT_TIMEOUT).close()


class DaskBackend(Backend):
    """The session's way to Dask clusters: one connection per cluster given to start_cluster_job."""

    stops_unstarted = True  # a queued child is Stopped at once, but its task must still be cancelled
    # A task's thread cannot be killed on a worker: a stop raised into it lands when Python runs again.
    stuck_stop = ("its task cannot be interrupted where it runs on the worker (a long C call?), or the worker "
                  "does not answer; it ends Stopped when the task returns, or Failed if the worker is lost")

    def __init__(self, session: Session) -> None:
        super().__init__(session)
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
            key = address = _check_address(verb, cluster.strip())
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
    def prepare(self, spec: JobSpec) -> None:
        """Check start_cluster_job's options, pickle the call and connect, before any job exists."""
        o = spec.options
        verb = o["verb"]
        cluster, for_each, retries, resources = o["cluster"], o["for_each"], o["retries"], o["resources"]
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
            if o["input"] is not None:
                raise ValueError(f"{verb}: give each item through for_each, or input for one job, not both")
            items = list(for_each)
        args, working_directory, env = o["args"], o["working_directory"], o["env"]
        data: dict[str, Any] = {"kind": "call" if spec.kind == CALL else "command", "retries": retries,
                                "input": None if o["input"] is None else list(o["input"])}
        if spec.kind == CALL:
            if working_directory is not None or env is not None:
                raise ValueError(f"{verb}: working_directory and env apply to commands on a cluster; a callable "
                                 f"shares its worker process with other tasks, so it cannot have its own (change "
                                 f"them inside the callable, or run a command)")
            data.update(target=spec.target, args=tuple(args), kwargs=dict(spec.kwargs), init=spec.init)
            if items is not None:
                items = [_dump_item(verb, n, item) for n, item in enumerate(items)]
        else:
            data.update(argv=spec.argv, args=[command_arg(verb, a) for a in args],
                        cwd=_check_cwd(verb, working_directory), env=_check_env(verb, env))
            if items is not None:
                items = [command_arg(verb, item) for item in items]
        import cloudpickle

        try:
            o["blob"] = cloudpickle.dumps(data, protocol=5)
        except Exception as exc:
            raise TypeError(f"{verb}: the callable {spec.command!r} or its arguments cannot be sent to the "
                            f"cluster ({type(exc).__name__}: {exc}); pass picklable values") from exc
        o["items"] = items
        o["conn"] = self.connect(cluster, verb)

    def plan(self, spec: JobSpec) -> Plan:
        conn: _Conn = spec.options["conn"]
        items = spec.options["items"]
        count = 1 if items is None else len(items)
        return Plan([Place(conn.address)] * count, conn.address, follow_where=True)

    def start(self, ports: list[JobPort], spec: JobSpec) -> None:
        o = spec.options
        conn: _Conn = o["conn"]
        retries: int = o["retries"]
        group = _Group(f"{conn.topic}-g{ports[0].job_id}")
        for port in ports:
            leaf = _Leaf(conn, group, port, retries)
            port.data = leaf
            group.leaves.append(leaf)
        try:
            conn.submit(group, f"{self.token}-{next(self._specs)}", o["blob"], o["items"], o["resources"])
        except Exception as exc:
            for leaf in group.leaves:
                conn.fail(leaf, WorkerError(f"psjobs could not submit its task to the scheduler at {conn.address} "
                                            f"({type(exc).__name__}: {exc}); start it again"), exc)

    def stop(self, port: JobPort, grace: float) -> None:
        leaf = port.data
        if isinstance(leaf, _Leaf):
            if not port.finished:
                leaf.conn.request_stop(leaf, grace)  # it ends through its port: stop_job waits for that
            else:  # Stopped at once (it was NotStarted): its task must never run after stop_job returns
                leaf.conn.stop_unseen(leaf, grace)

    def forget(self, port: JobPort) -> None:
        leaf = port.data
        if isinstance(leaf, _Leaf):
            leaf.conn.forget(leaf)

    def close(self) -> None:
        with self.lock:
            conns = [*self.conns.values(), *self.retired]
            self.conns.clear()
            self.retired.clear()
        for conn in conns:
            conn.close()


# --- helpers --------------------------------------------------------------------------------------

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
