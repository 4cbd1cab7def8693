"""The session host against what it stores: bench/host.py's cases as an area of ``python -m bench``.

::

    run(quick) --> bench.host.run: two in-process hosts (empty, 10,000 jobs stored) taking turns
               --> rows: `start` per request (issue 18's target: within 1.3x of the empty host's),
                         `receive '*'` over every stored job (every record back)

``python -m bench.host`` runs the same cases alone.
"""

from __future__ import annotations

from typing import Any


def run(quick: bool) -> list[dict[str, Any]]:
    from bench.host import run as host_run

    return host_run(quick)
