"""Why a cluster job failed, in words: the reasons the dispatcher (_conn.py) gives its jobs.

::

    Future cancelled / lost / erred, no stop asked --> broken_reason --> port.ended(failed)
    scheduler plugin: the task's worker was lost  --> lost_error    --> port.ended(failed)

Each names the job, says it failed and why, and what to do next.
"""

from __future__ import annotations

from typing import Any

from ..._errors import WorkerError
from ...core import JobPort


def broken_reason(port: JobPort, future: Any, address: str, connected: bool,
                  client_closed: bool = False) -> tuple[WorkerError, BaseException | None]:
    """The reason (and its cause) of a job whose task's Future ended without a result.

    ``client_closed``: the Client the caller passed as ``cluster=`` was closed (by its owner:
    psjobs never closes one it did not open), which cancels its Futures while the scheduler and
    the workers stay up. That is no lost connection: the reason says what happened and what to do.
    """
    status = future.status
    cause: BaseException | None = None
    if status == "cancelled" and client_closed:
        return WorkerError(
            f"{port.describe()} failed: the dask Client passed as cluster= was closed while the job ran, and "
            f"psjobs lost its task with it (Dask drops a closed Client's tasks, but one already running on a "
            f"worker would run to its end: psjobs asked the workers at {address} to stop it). Keep that Client "
            f"open until its jobs end, or pass the scheduler's address (cluster={address!r}) to let psjobs "
            f"own its Client; then start the job again"), None
    if status == "cancelled":
        if not connected:
            why = (f"the connection to the Dask scheduler at {address} was lost, and its task with "
                   f"it (the scheduler died, or the network failed)")
        else:
            why = "the cluster cancelled its task (the cluster restarted, or another client cancelled it)"
    elif status == "lost":
        why = "the worker that held its result was lost before psjobs fetched it"
    else:
        try:
            cause = future.exception(timeout=5)
        except Exception as exc:
            cause = exc
        if type(cause).__name__ == "KilledWorker":
            why = f"Dask gave up on its task after the workers running it died ({cause})"
        else:
            why = (f"the cluster could not run its task ({type(cause).__name__}: {cause}); the scheduler "
                   f"and the workers need psjobs installed (pip install 'psjobs[dask]') and the modules "
                   f"the job uses")
    return WorkerError(f"{port.describe()} failed: {why}. Start it again"), cause


def lost_error(port: JobPort, where: str, stimulus: str, retries: int) -> WorkerError:
    if not stimulus or "worker" in stimulus:
        what = (f"the Dask worker {where or 'running it'} was lost (it died or left the cluster) while the "
                f"task ran or was about to run there")
    else:
        what = f"the Dask scheduler took the task back from {where or 'its worker'} ({stimulus})"
    tried = f" (it was already retried {retries} time(s))" if retries else ""
    return WorkerError(f"{port.describe()} failed: {what}{tried}; psjobs does not run it again "
                       f"elsewhere, since that could run your code twice. Start it again, or pass retries=N to "
                       f"start_cluster_job to let Dask re-run it")
