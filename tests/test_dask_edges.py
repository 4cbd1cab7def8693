"""Cluster jobs at their edges, on the real clusters of test_dask: a stop that comes right after
the start (the task may already run), a Client closed under its jobs, an address that is none.
"""

from __future__ import annotations

import sys

import pytest

import psjobs

from . import test_dask as base
from .test_dask import square

distributed = pytest.importorskip("distributed")
cloudpickle = pytest.importorskip("cloudpickle")

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the command-line workers cannot import us

pytestmark = pytest.mark.dask

# test_dask's fixtures (module-scoped: this module gets clusters of its own, closed at its end)
local_client, cli_address, cluster, session = base.local_client, base.cli_address, base.cluster, base.session


def test_a_malformed_address_is_a_value_error_before_any_job(session: psjobs.Session) -> None:
    """API.md 7: a bad argument raises TypeError or ValueError before a job exists; an address
    Dask cannot read is one (it was a WorkerError, "cannot reach the Dask scheduler")."""
    for address, why in [("notanaddress", "missing port"), ("http://127.0.0.1:1", "unknown address scheme"),
                         ("tcp://127.0.0.1:notaport", "invalid literal"), ("tcp://127.0.0.1:0", "out of range")]:
        with pytest.raises(ValueError, match=why) as info:
            session.start_job(square, 1, cluster=address)
        assert repr(address) in str(info.value) and "tcp://10.0.0.5:8786" in str(info.value)
        assert not isinstance(info.value, psjobs.WorkerError)
    # A well-formed address nobody listens on is still the scheduler's problem, not the argument's.
    with pytest.raises(psjobs.WorkerError, match="cannot reach the Dask scheduler"):
        session.start_job(square, 1, cluster="tcp://127.0.0.1:1")
    assert session.get_job() == []
