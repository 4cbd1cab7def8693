"""What the IPython extension costs: the & transform on every cell, a line ending in ' &' against
typing psjobs.start_job(...) in the same shell, and the Done check after each cell."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def _shell(tmp: str) -> Any:
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    return InteractiveShell(config=config, ipython_dir=tmp)


def _per_call(fn: Callable[[], object], n: int) -> float:
    """Median of n timed calls, in seconds."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(quick: bool) -> list[dict[str, Any]]:
    import tempfile

    import psjobs
    from psjobs import _api
    from psjobs.ipython import BackgroundOperator

    out: list[dict[str, Any]] = []
    n = 30 if quick else 300
    cell = "\n".join(f"x{i} = f({i}, 'a & b') & mask  # a comment & more" for i in range(40)) + "\n"
    with tempfile.TemporaryDirectory() as tmp:
        ip = _shell(tmp)
        manager = ip.input_transformer_manager
        plain = _per_call(lambda: manager.transform_cell(cell), n)
        ip.run_line_magic("load_ext", "psjobs")
        ip.run_line_magic("config", "PsJobs.announce = False")  # measured, not printed
        loaded = _per_call(lambda: manager.transform_cell(cell), n)
        assert BackgroundOperator in manager.token_transformers
        case = "transform a 40-line cell (no job in it)"
        out += [{"case": case, "impl": "psjobs", "value": loaded * 1e6, "unit": "us", "better": "lower"},
                {"case": case, "impl": "IPython", "value": plain * 1e6, "unit": "us", "better": "lower",
                 "note": "the same shell without the extension"}]

        saved = _api._default
        session = psjobs.Session()
        _api._default = session
        try:
            ip.run_cell("import psjobs")
            jobs = n // 3 or 10
            # Interleaved, so that both meet the fork server's warm spares in the same state.
            amp_times, direct_times = [], []
            for _ in range(jobs):
                amp_times.append(_per_call(lambda: ip.run_cell("j = 2 + 3 &"), 1))
                direct_times.append(_per_call(lambda: ip.run_cell("j = psjobs.start_job(lambda: 2 + 3)"), 1))
            amp, direct = statistics.median(amp_times), statistics.median(direct_times)
            case = "a cell that starts a process job, to the prompt"
            out += [{"case": case, "impl": "psjobs", "value": amp * 1e3, "unit": "ms", "better": "lower",
                     "note": "j = 2 + 3 &"},
                    {"case": case, "impl": "start_job typed", "value": direct * 1e3, "unit": "ms",
                     "better": "lower", "note": "j = psjobs.start_job(lambda: 2 + 3)"}]
            session.wait_job(session.get_job(), timeout=60)
            for _ in range(1000 if not quick else 200):
                session.start_thread_job(lambda: None)
            session.wait_job(session.get_job(), timeout=60)
            ip.run_cell("pass")  # announce what is done, so the next cells measure the check alone
            n_jobs = len(session.get_job())
            check = _per_call(lambda: ip.run_cell("pass"), n)
            ip.run_line_magic("unload_ext", "psjobs")
            bare = _per_call(lambda: ip.run_cell("pass"), n)
            case = f"an empty cell with {n_jobs} finished jobs in the session"
            out += [{"case": case, "impl": "psjobs", "value": check * 1e6, "unit": "us", "better": "lower",
                     "note": "includes the Done check"},
                    {"case": case, "impl": "IPython", "value": bare * 1e6, "unit": "us", "better": "lower",
                     "note": "the same shell without the extension"}]
        finally:
            _api._default = saved
            session.close()
    return out


if __name__ == "__main__":
    for row in run(quick=True):
        print(row)
