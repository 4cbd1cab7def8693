"""The core against its peers: start, throughput, streaming, large values, stop, memory.

::

    run(quick) --> one Session (warm fork server) + the peers, measured round by round
       start -> result   psjobs process/thread/command job  vs multiprocessing, executors, Popen,
                         IPython's BackgroundJobManager
       jobs/s            start N, then wait for all N
       streaming         generator items: items/s and first-item latency
       large values      100 MB of bytes, 1,000,000 small dicts  vs a raw pipe copy
       stop              busy loop, `sleep 100 | cat`, busy thread, a job that ignores SIGTERM
       memory            per running process job (USS/RSS), per finished job held by a session
    --> rows (median of interleaved samples), marked with issue 3's targets

Every case reports the median over rounds in which psjobs and its peers take turns.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import math
import multiprocessing as mp
import os
import pickle
import queue
import signal
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import psutil

import psjobs
from bench import _jobs
from bench._harness import Row, failed_row, favour, interleave, metric, now, row, set_target, value_of

MB = 1_000_000


@dataclass
class Sizes:
    rounds: int           # rounds for cheap start -> result cases
    rounds_slow: int      # rounds for cases of a second or so
    fast_calls: int       # samples for the microsecond-scale thread cases
    rates: tuple[int, ...]
    stream_items: int
    big_bytes: int
    big_dicts: int
    mem_jobs: int
    finished_jobs: int
    warmup: int           # rounds thrown away first (imports, caches, a pool's workers)
    rounds_stop: int
    back_to_back: int = 200  # process jobs started back to back (issue 18's case)


FULL = Sizes(rounds=30, rounds_slow=7, fast_calls=400, rates=(1_000, 10_000), stream_items=100_000,
             big_bytes=100 * MB, big_dicts=1_000_000, mem_jobs=8, finished_jobs=100_000, warmup=1,
             rounds_stop=10)
QUICK = Sizes(rounds=2, rounds_slow=1, fast_calls=10, rates=(20,), stream_items=1_000,
              big_bytes=1 * MB, big_dicts=10_000, mem_jobs=2, finished_jobs=200, warmup=0, rounds_stop=1,
              back_to_back=20)

PYTHON_C = os.path.basename(sys.executable) + " -c"


def ms(seconds: float) -> float:
    return seconds * 1000.0


def _fmt_n(n: int) -> str:
    return f"{n:,}"


# --- helpers ----------------------------------------------------------------------------------

def _wait_output(s: psjobs.Session, job: psjobs.Job, want: Any, timeout: float = 30.0) -> None:
    """Block until the job has written `want` (without consuming it)."""
    for _leaf, stream, payload, _t in s.read_entries(job, keep=True, wait=True, timeout=timeout):
        if stream == psjobs.Stream.OUTPUT and payload == want:
            return
    raise RuntimeError(f"{job!r} did not write {want!r} within {timeout}s")


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group."""
    out = []
    for p in psutil.process_iter(["status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(p.pid) == pgid:
                out.append(p.pid)
        except (ProcessLookupError, psutil.Error):
            continue
    return out


def _warm(s: psjobs.Session) -> psjobs.Session:
    """Start the session's fork server now (and favour it with --renice), so no case pays for it."""
    job = s.start_job(_jobs.trivial)
    _wait(s, job)
    s.remove_job(job)
    server = getattr(s._backends.get("process"), "_server", None)
    if server is not None:
        favour(server.proc.pid)
    return s


def _pid(job: psjobs.Job, timeout: float = 10.0) -> int:
    """The pid of a job's worker (it arrives from the fork server a moment after the fork)."""
    leaf = job.child_jobs[0] if job.child_jobs else job
    deadline = time.monotonic() + timeout
    while leaf.pid is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{job!r} has no worker pid after {timeout}s")
        time.sleep(0.0005)
    return leaf.pid


def _wait_children(pid: int, count: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(psutil.Error):
            if len(psutil.Process(pid).children(recursive=True)) >= count:
                return
        time.sleep(0.001)
    raise RuntimeError(f"process {pid} did not get {count} children within {timeout}s")


def _drop(s: psjobs.Session, jobs: psjobs.Job | list[psjobs.Job]) -> None:
    """Remove measured jobs, so that the session stays small from one round to the next."""
    s.remove_job(jobs, force=True)


def _wait(s: psjobs.Session, jobs: psjobs.Job | list[psjobs.Job], timeout: float = 120.0) -> None:
    """wait_job with a deadline: a broken session fails the case instead of hanging the suite."""
    want = 1 if isinstance(jobs, psjobs.Job) else len(jobs)
    if len(s.wait_job(jobs, timeout=timeout)) != want:
        raise RuntimeError(f"jobs did not finish within {timeout}s (is the session's I/O thread alive?)")


def _mp_result(ctx: Any) -> float:
    r, w = ctx.Pipe(duplex=False)
    t = now()
    p = ctx.Process(target=_jobs.send_one, args=(w,))
    p.start()
    w.close()
    got = r.recv()
    p.join()
    dt = now() - t
    r.close()
    assert got == 1
    return ms(dt)


# --- 1. start -> result -----------------------------------------------------------------------

def case_process_start(s: psjobs.Session, z: Sizes) -> list[Row]:
    case = "process job, trivial callable: start -> result"
    ctxs = {m: mp.get_context(m) for m in ("fork", "forkserver", "spawn")}
    rows: list[Row] = []
    lam = lambda: 1  # noqa: E731 - pickled by value, so the worker imports nothing

    def psj(target: Callable[[], int]) -> Callable[[], float]:
        def one() -> float:
            t = now()
            job = s.start_job(target)
            _wait(s, job)
            got = job.receive()
            dt = now() - t
            assert got == [1], got
            _drop(s, job)
            return ms(dt)
        return one

    def python_c() -> float:
        t = now()
        out = subprocess.run([sys.executable, "-c", "print(1)"], capture_output=True, check=True)
        dt = now() - t
        assert int(out.stdout) == 1
        return ms(dt)

    with ProcessPoolExecutor(max_workers=1) as ppe:
        def pool() -> float:
            t = now()
            got = ppe.submit(_jobs.trivial).result()
            dt = now() - t
            assert got == 1
            return ms(dt)

        impls: dict[str, Callable[[], float]] = {
            "psjobs": psj(_jobs.trivial),
            "psjobs (lambda, by value)": psj(lam),
            "mp fork Process + Pipe": lambda: _mp_result(ctxs["fork"]),
            "mp forkserver Process + Pipe": lambda: _mp_result(ctxs["forkserver"]),
            "mp spawn Process + Pipe": lambda: _mp_result(ctxs["spawn"]),
            "ProcessPoolExecutor (warm)": pool,
            f"Popen {PYTHON_C} + read": python_c,
        }
        samples = interleave(impls, z.rounds, warmup=z.warmup)
    notes = {"psjobs": "a function of a module: each worker imports bench/_jobs.py",
             "mp fork Process + Pipe": "includes join(); forks the benchmark process itself"}
    for name, vals in samples.items():
        rows.append(row(case, name, metric(vals), "ms", "lower", note=notes.get(name)))
    # The first job of a program pays for starting a server: psjobs' fork server, or
    # multiprocessing's (measured in a new program each time, since it starts once per program).
    case0 = "process job, first of a program (starts the fork server)"

    def cold() -> float:
        t = now()
        with psjobs.Session() as fresh:
            job = fresh.start_job(_jobs.trivial)
            _wait(fresh, job)
            assert job.receive() == [1]
            dt = now() - t
        return ms(dt)

    def mp_first() -> float:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
        out = subprocess.run([sys.executable, "-c", _MP_FIRST], capture_output=True, text=True, env=env,
                             cwd=root, check=True, timeout=60)
        return float(out.stdout)

    cold_samples = interleave({"psjobs": cold, "mp forkserver Process + Pipe": mp_first},
                              max(1, z.rounds // 4), warmup=0)
    rows.append(row(case0, "psjobs", cold_samples["psjobs"], "ms", "lower",
                    note="a new Session: fork server start + first job (closing it is not timed)"))
    rows.append(row(case0, "mp forkserver Process + Pipe", cold_samples["mp forkserver Process + Pipe"],
                    "ms", "lower", note="a program's first: starts multiprocessing's fork server"))

    # The 15x comes from a forkserver Process measured at 33-40 ms: a program's first
    # (above). Against a warm one, 15x would be below ProcessPoolExecutor's round trip, which
    # starts no process at all. Both ratios are printed; the verdict uses the figure.
    mine = value_of(rows, case, "psjobs")
    fs = value_of(rows, case, "mp forkserver Process + Pipe")
    fs_first = value_of(rows, case0, "mp forkserver Process + Pipe")
    # Issue 18's target: a fresh process per job within 3x a reused pool worker, in the same run.
    # The forkserver ratios of the first wave's target (<= 2 ms, >= 15x) stay in the text.
    pool_ratio = mine / value_of(rows, case, "ProcessPoolExecutor (warm)")
    set_target(rows, case, f"<= 3.0x a warm ProcessPoolExecutor(1) round trip: {pool_ratio:.2f}x "
               f"(first wave: {fs_first / mine:.1f}x mp forkserver's first Process, {fs / mine:.1f}x a warm one)",
               bool(pool_ratio <= 3.0))
    rows += _burst_after_quiet(s, z)
    return rows


def _burst_after_quiet(s: psjobs.Session, z: Sizes) -> list[Row]:
    """Three jobs at once after 150 ms of quiet: two go to the warm spares, the third is forked on
    request and first waits for the kernel to let it into its cgroup (bench/FINDINGS.md, "Born in
    its cgroup"). No target: the figure is there to be seen, against a warm pool's."""
    case = "3 process jobs at once after 150 ms quiet: start -> all results"

    def psj() -> float:
        time.sleep(0.15)  # not timed: the quiet moment the case is about
        t = now()
        jobs = [s.start_job(_jobs.trivial) for _ in range(3)]
        _wait(s, jobs)
        got = [job.receive() for job in jobs]
        dt = now() - t
        assert got == [[1]] * 3, got
        _drop(s, jobs)
        return ms(dt)

    with ProcessPoolExecutor(max_workers=3) as ppe:
        def pool() -> float:
            time.sleep(0.15)
            t = now()
            got = [f.result() for f in [ppe.submit(_jobs.trivial) for _ in range(3)]]
            dt = now() - t
            assert got == [1] * 3
            return ms(dt)

        samples = interleave({"psjobs": psj, "ProcessPoolExecutor (3 warm workers)": pool}, z.rounds,
                             warmup=z.warmup)
    return [row(case, name, metric(v), "ms", "lower") for name, v in samples.items()]


def case_back_to_back(s: psjobs.Session, z: Sizes) -> list[Row]:
    """Issue 18's throughput case: n trivial process jobs started back to back, then all waited
    for, against n multiprocessing fork Processes started and joined the same way."""
    n = z.back_to_back
    case = f"process jobs, {n} started back to back: jobs/s"
    fork = mp.get_context("fork")

    def psj() -> float:
        t = now()
        jobs = [s.start_job(_jobs.trivial) for _ in range(n)]
        _wait(s, jobs)
        dt = now() - t
        bad = [j for j in jobs if j.state is not psjobs.JobState.COMPLETED]
        _drop(s, jobs)
        if bad:
            raise RuntimeError(f"{len(bad)} of {n} jobs did not complete: {bad[0]!r} {bad[0].reason!r}")
        return n / dt

    samples = interleave({"psjobs": psj, "mp fork Process each": lambda: _mp_fork_rate(fork, n)},
                         max(3, z.rounds_slow), warmup=1)
    rows = [row(case, name, metric(v), "jobs/s", "higher") for name, v in samples.items()]
    ratio = value_of(rows, case, "psjobs") / value_of(rows, case, "mp fork Process each")
    set_target(rows, case, f">= 2x the rate of mp fork Processes: {ratio:.2f}x", bool(ratio >= 2.0))
    return rows


_MP_FIRST = """
import multiprocessing as mp, time
from bench import _jobs
if __name__ == "__main__":
    ctx = mp.get_context("forkserver")
    r, w = ctx.Pipe(duplex=False)
    t = time.perf_counter()
    p = ctx.Process(target=_jobs.send_one, args=(w,))
    p.start()
    w.close()
    assert r.recv() == 1
    p.join()
    print((time.perf_counter() - t) * 1000)
"""


def _ipython_jobs() -> Any:
    """IPython's BackgroundJobManager, or None where it cannot run (IPython 9.x breaks it:
    FormattedTB lost its color_scheme argument): the peer is then left out, not the case."""
    try:
        from IPython.lib.backgroundjobs import BackgroundJobManager

        bjm = BackgroundJobManager()  # type: ignore[no-untyped-call]
        bjm.new(_jobs.trivial).join()  # IPython 9 fails only here, when a job is made
        return bjm
    except Exception as exc:
        print(f"  (IPython's BackgroundJobManager cannot run here, left out: {exc})", file=sys.stderr)
        return None


def case_thread_start(s: psjobs.Session, z: Sizes) -> list[Row]:
    case = "thread job, trivial callable: start -> result"
    bjm = _ipython_jobs()

    def psj() -> float:
        t = now()
        job = s.start_thread_job(_jobs.trivial)
        _wait(s, job)
        got = job.receive()
        dt = now() - t
        assert got == [1]
        _drop(s, job)
        return dt * 1e6

    def ipy() -> float:
        t = now()
        job = bjm.new(_jobs.trivial)
        job.join()
        got = job.result
        dt = now() - t
        assert got == 1
        return dt * 1e6

    with ThreadPoolExecutor(max_workers=5) as tpe:
        def pool() -> float:
            t = now()
            got = tpe.submit(_jobs.trivial).result()
            dt = now() - t
            assert got == 1
            return dt * 1e6

        impls = {"psjobs": psj, "ThreadPoolExecutor": pool}
        if bjm is not None:
            impls["IPython BackgroundJobManager"] = ipy
        samples = interleave(impls, z.fast_calls, warmup=3 * z.warmup)
    rows = [row(case, name, metric(v), "us", "lower") for name, v in samples.items()]
    ratio = value_of(rows, case, "psjobs") / value_of(rows, case, "ThreadPoolExecutor")
    set_target(rows, case, "<= 2.0x ThreadPoolExecutor (issue 18; issue 3 asked 3x)", bool(ratio <= 2.0))
    return rows


def case_command_start(s: psjobs.Session, z: Sizes) -> list[Row]:
    rows: list[Row] = []
    for case, target, shell in (("command job `true` (argv): start -> end", ["true"], False),
                                ("command job `true` (sh -c): start -> end", "true", True)):
        def psj(target: Any = target) -> float:
            t = now()
            job = s.start_job(target)
            _wait(s, job)
            job.receive()
            dt = now() - t
            assert job.state is psjobs.JobState.COMPLETED
            _drop(s, job)
            return ms(dt)

        def bare(shell: bool = shell) -> float:
            t = now()
            p = subprocess.Popen("true" if shell else ["true"], shell=shell)
            p.wait()
            return ms(now() - t)

        def bare_session(shell: bool = shell) -> float:
            t = now()
            p = subprocess.Popen("true" if shell else ["true"], shell=shell, start_new_session=True)
            p.wait()
            return ms(now() - t)

        def run_capture(shell: bool = shell) -> float:
            t = now()
            subprocess.run("true" if shell else ["true"], shell=shell, capture_output=True, check=True)
            return ms(now() - t)

        samples = interleave({"psjobs": psj, "Popen + wait": bare,
                              "Popen(start_new_session) + wait": bare_session,
                              "subprocess.run(capture_output)": run_capture},
                             z.rounds * 3, warmup=2 * z.warmup)
        rows += [row(case, name, metric(v), "ms", "lower") for name, v in samples.items()]
        ratio = value_of(rows, case, "psjobs") / value_of(rows, case, "Popen + wait")
        set_target(rows, case, "<= 1.5x Popen + wait", bool(ratio <= 1.5))
    # After a quiet moment: a command moved into its cgroup then waited for an RCU grace period
    # (5.7 ms more, load 0.3), one born there does not (bench/FINDINGS.md, "Born in its cgroup").
    case = "command job `true` (argv) after 100 ms quiet: start -> end"

    def quiet(measure: Callable[[], float]) -> Callable[[], float]:
        def one() -> float:
            time.sleep(0.1)  # not timed: the quiet moment the case is about
            return measure()
        return one

    # psj and bare of the loop above, on the argv form.
    samples = interleave({"psjobs": quiet(lambda: psj(["true"])), "Popen + wait": quiet(lambda: bare(False))},
                         z.rounds, warmup=z.warmup)
    rows += [row(case, name, metric(v), "ms", "lower") for name, v in samples.items()]
    ratio = value_of(rows, case, "psjobs") / value_of(rows, case, "Popen + wait")
    set_target(rows, case, "<= 1.5x Popen + wait", bool(ratio <= 1.5))
    return rows


# --- 2. jobs per second -----------------------------------------------------------------------

def case_rates(s: psjobs.Session, z: Sizes) -> list[Row]:
    rows: list[Row] = []
    fork = mp.get_context("fork")
    with ThreadPoolExecutor(max_workers=5) as tpe, ProcessPoolExecutor(max_workers=2) as ppe:
        ppe.submit(_jobs.trivial).result()  # warm
        for n in z.rates:
            rounds = 1 if n >= 10_000 else (3 if n >= 1000 else 2)

            def psj(start: Callable[[], psjobs.Job], n: int = n) -> Callable[[], float]:
                def go() -> float:
                    t = now()
                    jobs = [start() for _ in range(n)]
                    _wait(s, jobs, timeout=300)
                    dt = now() - t
                    bad = [j for j in jobs if j.state is not psjobs.JobState.COMPLETED]
                    _drop(s, jobs)
                    if bad:
                        raise RuntimeError(f"{len(bad)} of {n} jobs did not complete: {bad[0]!r} "
                                           f"{bad[0].reason!r}")
                    return n / dt
                return go

            def executor(ex: Any, n: int = n) -> float:
                t = now()
                futs = [ex.submit(_jobs.trivial) for _ in range(n)]
                for f in futs:
                    f.result()
                return n / (now() - t)

            def mp_fork(n: int = n) -> float:
                return _mp_fork_rate(fork, n)

            def popen(n: int = n) -> float:
                t = now()
                procs = [subprocess.Popen(["true"]) for _ in range(n)]
                for p in procs:
                    p.wait()
                return n / (now() - t)

            kinds: list[tuple[str, dict[str, Callable[[], float]]]] = [
                ("thread jobs", {"psjobs": psj(lambda: s.start_thread_job(_jobs.trivial)),
                                 "ThreadPoolExecutor": lambda: executor(tpe)}),
                ("process jobs (callable)", {"psjobs": psj(lambda: s.start_job(_jobs.trivial)),
                                             "ProcessPoolExecutor (2 warm workers)": lambda: executor(ppe),
                                             **({"mp fork Process each": mp_fork} if n <= 1000 else {})}),
                ("command jobs (`true`)", {"psjobs": psj(lambda: s.start_job(["true"])),
                                           "Popen each": popen}),
            ]
            for kind, impls in kinds:
                case = f"jobs/s, {_fmt_n(n)} {kind}: start all, wait all"
                try:
                    samples = interleave(impls, rounds, warmup=0)
                except Exception as exc:
                    rows.append(failed_row(case, "psjobs", "jobs/s", "higher", exc))
                    continue
                rows += [row(case, name, metric(v), "jobs/s", "higher") for name, v in samples.items()]
    return rows


# --- 3. streaming -----------------------------------------------------------------------------

def _mp_fork_rate(fork: Any, n: int) -> float:
    """Jobs/s of n multiprocessing fork Processes started at once, then joined (the peer of two cases)."""
    t = now()
    procs = [fork.Process(target=_jobs.trivial) for _ in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    return n / (now() - t)


def _psj_stream(s: psjobs.Session, start: Callable[[], psjobs.Job], n: int) -> dict[str, float]:
    t = now()
    job = start()
    first = None
    count = 0
    for _leaf, stream, _payload, _t in s.read_entries(job, wait=True, timeout=120):
        if stream == psjobs.Stream.OUTPUT:
            if first is None:
                first = now()
            count += 1
    end = now()
    _drop(s, job)
    if count != n or first is None:
        raise RuntimeError(f"received {count} of {n} items")
    return {"rate": n / (end - t), "first": ms(first - t)}


def _mp_stream(n: int) -> dict[str, float]:
    ctx = mp.get_context("fork")
    r, w = ctx.Pipe(duplex=False)
    t = now()
    p = ctx.Process(target=_jobs.send_items, args=(w, n))
    p.start()
    w.close()
    r.recv()
    first = now()
    for _ in range(n - 1):
        r.recv()
    end = now()
    p.join()
    r.close()
    return {"rate": n / (end - t), "first": ms(first - t)}


def _read_exact(fd: int, n: int) -> bytes:
    chunks = []
    while n:
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            raise EOFError("the writer closed the pipe early")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _raw_stream(n: int) -> dict[str, float]:
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 1 << 20)
    t = now()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(r)
            _jobs.write_batches(w, n)
        finally:
            os._exit(0)
    os.close(w)
    first = None
    count = 0
    while count < n:
        (size,) = struct.unpack("!I", _read_exact(r, 4))
        batch = pickle.loads(_read_exact(r, size))
        if first is None:
            first = now()
        count += len(batch)
    end = now()
    os.close(r)
    os.waitpid(pid, 0)
    assert first is not None
    return {"rate": n / (end - t), "first": ms(first - t)}


def _queue_stream(q: Any, n: int) -> dict[str, float]:
    def produce() -> None:
        put = q.put
        for i in range(n):
            put(i)

    t = now()
    th = threading.Thread(target=produce)
    th.start()
    q.get()
    first = now()
    get = q.get
    for _ in range(n - 1):
        get()
    end = now()
    th.join()
    return {"rate": n / (end - t), "first": ms(first - t)}


def case_streaming(s: psjobs.Session, z: Sizes) -> list[Row]:
    n = z.stream_items
    size = f"{_fmt_n(n)} int items"
    rows: list[Row] = []
    proc = interleave({
        "psjobs": lambda: _psj_stream(s, lambda: s.start_job(_jobs.items, n), n),
        "mp fork Process + Pipe.send per item": lambda: _mp_stream(n),
        "raw fork + pickled batches (1 ms / 1000)": lambda: _raw_stream(n),
    }, z.rounds_slow, warmup=z.warmup)
    thr = interleave({
        "psjobs": lambda: _psj_stream(s, lambda: s.start_thread_job(_jobs.items, n), n),
        "thread + queue.SimpleQueue": lambda: _queue_stream(queue.SimpleQueue(), n),
        "thread + queue.Queue": lambda: _queue_stream(queue.Queue(), n),
    }, z.rounds_slow, warmup=z.warmup)
    for kind, samples in (("process job", proc), ("thread job", thr)):
        rate_case = f"streaming from a {kind}: items/s"
        first_case = f"streaming from a {kind}: first item latency"
        for name, vals in samples.items():
            rows.append(row(rate_case, name, metric(vals, "rate"), "items/s", "higher", size=size))
            rows.append(row(first_case, name, metric(vals, "first"), "ms", "lower", size=size))
    r = value_of(rows, "streaming from a process job: items/s", "psjobs")
    set_target(rows, "streaming from a process job: items/s", ">= 1,000,000 items/s", bool(r >= 1e6))
    f = value_of(rows, "streaming from a process job: first item latency", "psjobs")
    set_target(rows, "streaming from a process job: first item latency", "<= 5 ms", bool(f <= 5.0))
    return rows


# --- 4. large values --------------------------------------------------------------------------

def _raw_copy(make: Callable[[], bytes], size: int | None) -> tuple[float, bytes | bytearray]:
    """Fork a child that makes the bytes and writes them to a pipe with a 1 MiB buffer."""
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 1 << 20)
    t = now()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(r)
            data = make()
            if size is None:
                os.write(w, struct.pack("!Q", len(data)))
            view = memoryview(data)
            while view:
                view = view[os.write(w, view):]
        finally:
            os._exit(0)
    os.close(w)
    if size is None:
        (size,) = struct.unpack("!Q", _read_exact(r, 8))
    buf = bytearray(size)
    view = memoryview(buf)
    pos = 0
    with open(r, "rb", buffering=0, closefd=True) as f:
        while pos < size:
            got = f.readinto(view[pos:])
            if not got:
                raise EOFError("the child closed the pipe early")
            pos += got
    os.waitpid(pid, 0)
    return now() - t, buf


def case_large(s: psjobs.Session, z: Sizes) -> list[Row]:
    rows: list[Row] = []
    fork = mp.get_context("fork")
    nb, nd = z.big_bytes, z.big_dicts

    def psj(fn: Callable[[int], Any], n: int, check: Callable[[Any], bool]) -> Callable[[], float]:
        def go() -> float:
            t = now()
            job = s.start_job(fn, n)
            _wait(s, job)
            got = job.receive()
            dt = now() - t
            ok = len(got) == 1 and check(got[0])
            reason = job.child_jobs[0].reason
            _drop(s, job)
            if not ok:
                raise RuntimeError(f"wrong result ({job.state}, {reason!r})")
            return ms(dt)
        return go

    def mp_pipe(fn: Callable[..., None], n: int, bytes_: bool) -> Callable[[], float]:
        def go() -> float:
            r, w = fork.Pipe(duplex=False)
            t = now()
            p = fork.Process(target=fn, args=(w, n))
            p.start()
            w.close()
            got = r.recv_bytes() if bytes_ else r.recv()
            p.join()
            dt = now() - t
            r.close()
            assert len(got) == n
            return ms(dt)
        return go

    def raw_bytes() -> float:
        dt, buf = _raw_copy(lambda: _jobs.make_bytes(nb), nb)
        assert len(buf) == nb
        return ms(dt)

    def raw_pickled() -> float:
        t = now()
        _, buf = _raw_copy(lambda: pickle.dumps(_jobs.make_dicts(nd), protocol=5), None)
        got = pickle.loads(buf)
        dt = now() - t
        assert len(got) == nd
        return ms(dt)

    case = "large result: bytes from a process job"
    size = f"{nb / MB:g} MB"
    samples = interleave({
        "psjobs": psj(_jobs.make_bytes, nb, lambda v: len(v) == nb),
        "raw pipe copy (fork, 1 MiB pipe buffer)": raw_bytes,
        "mp fork Process + Pipe.send_bytes": mp_pipe(_jobs.send_bytes, nb, True),
    }, z.rounds_slow, warmup=z.warmup)
    rows += [row(case, name, metric(v), "ms", "lower", size=size) for name, v in samples.items()]
    ratio = value_of(rows, case, "psjobs") / value_of(rows, case, "raw pipe copy (fork, 1 MiB pipe buffer)")
    set_target(rows, case, "<= 2x the raw pipe copy", bool(ratio <= 2.0))
    gc.collect()

    case = "large result: list of small dicts from a process job"
    size = f"{_fmt_n(nd)} dicts"
    samples = interleave({
        "psjobs": psj(_jobs.make_dicts, nd, lambda v: len(v) == nd),
        "raw pipe copy of its pickle (+ dumps, loads)": raw_pickled,
        "mp fork Process + Pipe.send": mp_pipe(_jobs.send_dicts, nd, False),
    }, z.rounds_slow, warmup=z.warmup)
    rows += [row(case, name, metric(v), "ms", "lower", size=size) for name, v in samples.items()]
    gc.collect()
    return rows


# --- 5. stop ----------------------------------------------------------------------------------

def case_stop(z: Sizes) -> list[Row]:
    rows: list[Row] = []
    grace = 0.2
    fork = mp.get_context("fork")
    left: dict[str, int] = {}
    with _warm(psjobs.Session(stop_grace=grace)) as s:

        def psj(start: Callable[[], psjobs.Job], ready: Callable[[psjobs.Job], None], key: str,
                process: bool = True) -> Callable[[], float]:
            def go() -> float:
                job = start()
                ready(job)
                pgid = _pid(job) if process else None
                t = now()
                s.stop_job(job)
                dt = now() - t
                if job.state is not psjobs.JobState.STOPPED:
                    raise RuntimeError(f"{job!r} is not Stopped after stop_job")
                if pgid is not None:
                    stray = _group_members(pgid)
                    left[key] = max(left.get(key, 0), len(stray))
                    for pid in stray:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                _drop(s, job)
                return ms(dt)
            return go

        def mp_busy(target: Callable[..., None], stubborn: bool) -> Callable[[], float]:
            def go() -> float:
                r, w = fork.Pipe(duplex=False)
                p = fork.Process(target=target, args=(w,))
                p.start()
                w.close()
                assert r.recv() == "go"
                t = now()
                p.terminate()
                p.join(grace if stubborn else None)
                if p.exitcode is None:
                    p.kill()
                    p.join()
                dt = now() - t
                r.close()
                return ms(dt)
            return go

        def tree_shell(kind: str) -> Callable[[], float]:
            def go() -> float:
                p = subprocess.Popen("sleep 100 | cat", shell=True, start_new_session=True)
                _wait_children(p.pid, 2)
                t = now()
                if kind == "killpg":
                    os.killpg(p.pid, signal.SIGTERM)
                    p.wait()
                    while _group_members(p.pid):
                        time.sleep(0.0005)
                else:
                    p.terminate()
                    p.wait()
                dt = now() - t
                stray = _group_members(p.pid)
                left[kind] = max(left.get(kind, 0), len(stray))
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                return ms(dt)
            return go

        def thread_flag() -> float:
            started, flag = threading.Event(), threading.Event()
            th = threading.Thread(target=_jobs.busy_flag, args=(started, flag))
            th.start()
            started.wait()
            t = now()
            flag.set()
            th.join()
            return ms(now() - t)

        go_ready = lambda job: _wait_output(s, job, "go")  # noqa: E731

        def tree_ready(job: psjobs.Job) -> None:
            _wait_children(_pid(job), 2)

        cases = [
            ("stop: busy process job (pure-Python loop)", "<= 100 ms (ends on SIGTERM)", 100.0, {
                "psjobs": psj(lambda: s.start_job(_jobs.busy), go_ready, "busy"),
                "mp fork Process.terminate + join": mp_busy(_jobs.busy_mp, False)}),
            ("stop: process tree job `sleep 100 | cat`", "<= 100 ms, nothing left", 100.0, {
                "psjobs": psj(lambda: s.start_job("sleep 100 | cat"), tree_ready, "tree"),
                "Popen + killpg + wait for the group": tree_shell("killpg"),
                "Popen.terminate + wait (leader only)": tree_shell("terminate")}),
            ("stop: busy thread job (pure-Python loop)", "<= 100 ms", 100.0, {
                "psjobs": psj(lambda: s.start_thread_job(_jobs.busy), go_ready, "thread", process=False),
                "threading.Event flag (cooperative)": thread_flag}),
            (f"stop: process job ignoring SIGTERM (grace {grace:g} s)",
             f"<= grace + 100 ms = {ms(grace) + 100:g} ms", ms(grace) + 100.0, {
                 "psjobs": psj(lambda: s.start_job(_jobs.stubborn), go_ready, "stubborn"),
                 "mp Process.terminate, join(grace), kill": mp_busy(_jobs.stubborn_mp, True)}),
        ]
        for case, text, limit, impls in cases:
            try:
                samples = interleave(impls, z.rounds_stop, warmup=z.warmup)
            except Exception as exc:
                rows.append(failed_row(case, "psjobs", "ms", "lower", exc))
                continue
            rows += [row(case, name, metric(v), "ms", "lower") for name, v in samples.items()]
            set_target(rows, case, text, bool(value_of(rows, case, "psjobs") <= limit))
    case = "processes left after stopping `sleep 100 | cat`"
    rows.append(row(case, "psjobs", float(left.get("tree", math.nan)), "processes", "lower",
                    note="most seen in one round"))
    rows.append(row(case, "Popen + killpg + wait for the group", float(left.get("killpg", math.nan)),
                    "processes", "lower"))
    rows.append(row(case, "Popen.terminate + wait (leader only)", float(left.get("terminate", math.nan)),
                    "processes", "lower"))
    set_target(rows, case, "0", left.get("tree") == 0)
    case = "processes left after stopping busy and SIGTERM-ignoring process jobs"
    rows.append(row(case, "psjobs", float(max(left.get("busy", 0), left.get("stubborn", 0))), "processes",
                    "lower"))
    set_target(rows, case, "0", left.get("busy") == 0 and left.get("stubborn") == 0)
    return rows


# --- 6. memory --------------------------------------------------------------------------------

def _mem(pid: int) -> tuple[float, float]:
    """(USS, RSS) in MiB of a process and its descendants."""
    p = psutil.Process(pid)
    uss = rss = 0
    for q in [p, *p.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            info = q.memory_full_info()
            uss += info.uss
            rss += info.rss
    return uss / 2**20, rss / 2**20


def case_memory_running(s: psjobs.Session, z: Sizes) -> list[Row]:
    n = z.mem_jobs
    got: dict[str, list[tuple[float, float]]] = {}

    jobs = [s.start_job(_jobs.idle) for _ in range(n)]
    try:
        for job in jobs:
            _wait_output(s, job, "ready")
        got["psjobs"] = [_mem(_pid(job)) for job in jobs]
    finally:
        s.stop_job(jobs)
        _drop(s, jobs)

    for method in ("fork", "forkserver", "spawn"):
        ctx: Any = mp.get_context(method)
        procs: list[Any] = []
        conns: list[Any] = []
        try:
            for _ in range(n):
                r, w = ctx.Pipe(duplex=False)
                p = ctx.Process(target=_jobs.idle_mp, args=(w,))
                p.start()
                w.close()
                procs.append(p)
                conns.append(r)
            for r in conns:
                assert r.recv() == "ready"
            got[f"mp {method} Process"] = [_mem(p.pid) for p in procs if p.pid is not None]
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.join()
            for r in conns:
                r.close()

    code = "import time; print('ready', flush=True); time.sleep(60)"
    procs2 = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE) for _ in range(n)]
    try:
        for p in procs2:
            assert p.stdout is not None and p.stdout.readline().strip() == b"ready"
        got[f"{PYTHON_C} (fresh interpreter)"] = [_mem(p.pid) for p in procs2]
    finally:
        for p in procs2:
            p.kill()
            p.wait()
            if p.stdout is not None:
                p.stdout.close()

    rows: list[Row] = []
    for name, vals in got.items():
        rows.append(row("memory per running process job: USS", name, [u for u, _ in vals], "MiB", "lower",
                        note="sum over the job's processes" if name == "psjobs" else None))
    for name, vals in got.items():
        rows.append(row("memory per running process job: RSS", name, [r for _, r in vals], "MiB", "lower"))

    # The fixed cost: one fork server per session, against multiprocessing's own fork server.
    from multiprocessing import forkserver

    server = s._backends["process"]._server  # type: ignore[attr-defined]
    fs_pid = getattr(forkserver._forkserver, "_forkserver_pid", None)
    case = "fixed cost: the fork server process (one per session): USS"
    if server is not None:
        rows.append(row(case, "psjobs", _mem(server.proc.pid)[0], "MiB", "lower"))
    if fs_pid:
        rows.append(row(case, "mp forkserver server", _mem(fs_pid)[0], "MiB", "lower"))
    return rows


def case_memory_finished(z: Sizes) -> list[Row]:
    n = z.finished_jobs
    size = f"{_fmt_n(n)} jobs"
    rows: list[Row] = []

    def traced(make: Callable[[], Any]) -> tuple[float, Any]:
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        keep = make()
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
        return used, keep

    # tracemalloc slows every allocation down several times: trace a sample of the jobs (memory
    # per job does not depend on how many there are), then fill the session up untraced.
    sample = min(n, 20_000)
    s = psjobs.Session()
    try:
        def fill(count: int) -> None:
            jobs = [s.start_thread_job(_jobs.trivial) for _ in range(count)]
            _wait(s, jobs, timeout=600)

        used, _ = traced(lambda: fill(sample))
        case = "memory per finished job held by the session"
        rows.append(row(case, "psjobs", used / sample, "bytes", "lower", size=f"{_fmt_n(sample)} jobs",
                        note="thread jobs, each holding its one output value; tracemalloc"))
        set_target(rows, case, "< 2 KiB", used / sample < 2048)
        rss0 = psutil.Process().memory_info().rss
        fill(n - sample)
        gc.collect()
        if n - sample >= 10_000:
            rows.append(row("memory per finished job held by the session (RSS growth)", "psjobs",
                            (psutil.Process().memory_info().rss - rss0) / (n - sample), "bytes", "lower",
                            size=f"{_fmt_n(n - sample)} more jobs", note="a cross-check of tracemalloc"))

        def futures() -> list[Future[int]]:
            with ThreadPoolExecutor(max_workers=5) as tpe:
                futs = [tpe.submit(_jobs.trivial) for _ in range(sample)]
                for f in futs:
                    f.result()
            return futs

        used, keep = traced(futures)
        rows.append(row(case, "ThreadPoolExecutor futures kept", used / sample, "bytes", "lower",
                        size=f"{_fmt_n(sample)} jobs"))
        del keep
        m = min(n, 5_000)  # a thread each: slow to make, and the figure is per job

        def ipython() -> Any:
            bjm = _ipython_jobs()
            for _ in range(m):
                bjm.new(_jobs.trivial).join()
            return bjm

        if _ipython_jobs() is not None:
            used, keep = traced(ipython)
            rows.append(row(case, "IPython BackgroundJobManager", used / m, "bytes", "lower",
                            size=f"{_fmt_n(m)} jobs"))
            del keep

        assert len(s.get_job()) == n
        some = s.get_job()[n // 2].id
        samples = interleave({"all": lambda: ms(_timed(s.get_job)),
                              "id": lambda: ms(_timed(lambda: s.get_job(some))),
                              "state": lambda: ms(_timed(lambda: s.get_job(state="Completed")))},
                             5, warmup=1)
        case = "get_job() over the finished jobs"
        rows.append(row(case, "psjobs", metric(samples["all"]), "ms", "lower", size=size))
        set_target(rows, case, "< 100 ms", value_of(rows, case, "psjobs") < 100)
        rows.append(row("get_job(id) over the finished jobs", "psjobs", metric(samples["id"]), "ms", "lower",
                        size=size))
        rows.append(row("get_job(state='Completed') over the finished jobs", "psjobs",
                        metric(samples["state"]), "ms", "lower", size=size))
    finally:
        s.close()
    return rows


def _timed(fn: Callable[[], Any]) -> float:
    t = now()
    fn()
    return now() - t


# --- the area ---------------------------------------------------------------------------------

def run(quick: bool) -> list[Row]:
    z = QUICK if quick else FULL
    rows: list[Row] = []
    s = psjobs.Session()
    try:
        _warm(s)
        # (name of the case a failure is reported under, its unit, which way is better, the section)
        sections: list[tuple[str, str, str, Callable[[], list[Row]]]] = [
            ("process job, trivial callable: start -> result", "ms", "lower",
             lambda: case_process_start(s, z)),
            ("thread job, trivial callable: start -> result", "us", "lower",
             lambda: case_thread_start(s, z)),
            ("command job `true` (argv): start -> end", "ms", "lower", lambda: case_command_start(s, z)),
            ("jobs/s", "jobs/s", "higher", lambda: case_rates(s, z)),
            (f"process jobs, {z.back_to_back} started back to back: jobs/s", "jobs/s", "higher",
             lambda: case_back_to_back(s, z)),
            ("streaming from a process job: items/s", "items/s", "higher", lambda: case_streaming(s, z)),
            ("large result: bytes from a process job", "ms", "lower", lambda: case_large(s, z)),
            ("stop", "ms", "lower", lambda: case_stop(z)),
            ("memory per running process job: USS", "MiB", "lower", lambda: case_memory_running(s, z)),
            ("memory per finished job held by the session", "bytes", "lower",
             lambda: case_memory_finished(z)),
        ]
        for case, unit, better, section in sections:
            t = now()
            try:
                rows += section()
            except Exception as exc:
                rows.append(failed_row(case, "psjobs", unit, better, exc))
            print(f"  [{case.split(':')[0]}: {now() - t:.1f} s]", file=sys.stderr, flush=True)
    finally:
        s.close()
    return rows
