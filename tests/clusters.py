"""A real Dask LocalCluster for the tests that need one, bound to 127.0.0.1 (its dashboard too)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import pytest


@contextlib.contextmanager
def local_client(*, n_workers: int, threads_per_worker: int, processes: bool = True,
                 by_value: str | None = None, **options: Any) -> Iterator[Any]:
    """A Client (not the default one) of a new LocalCluster, both closed at the end. ``by_value``:
    a module whose functions travel by value meanwhile, so the workers never import it."""
    distributed = pytest.importorskip("distributed")
    cloudpickle = pytest.importorskip("cloudpickle")
    if by_value is not None:
        cloudpickle.register_pickle_by_value(sys.modules[by_value])
    cluster = distributed.LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker,
                                       processes=processes, host="127.0.0.1", dashboard_address="127.0.0.1:0",
                                       **options)
    client = distributed.Client(cluster, set_as_default=False)
    try:
        yield client
    finally:
        client.close()
        cluster.close()
        if by_value is not None:
            cloudpickle.unregister_pickle_by_value(sys.modules[by_value])
