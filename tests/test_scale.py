"""A session serves 1,000 process jobs alive at the same time (issue 3: one I/O loop, not a
thread per job), and leaves nothing behind."""

from __future__ import annotations

import socket

import psutil

import psjobs

from .conftest import wait_until

N = 1000


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_thousand_process_jobs_alive_at_once(session: psjobs.Session, tmp_path: object) -> None:
    path = str(tmp_path / "rendezvous.sock")  # type: ignore[operator]

    # Defined here, not at module level, so cloudpickle sends it by value: a worker must not
    # import this test module (and pytest with it) a thousand times.
    def rendezvous(path: str, i: int) -> int:
        import socket

        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.connect(path)
            c.sendall(i.to_bytes(4, "big"))
            if c.recv(1) != b"g":
                raise RuntimeError("the test went away")
        return i

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        server.listen(N)
        server.settimeout(30)
        jobs = [session.start_job(rendezvous, path, i, name=f"scale{i}") for i in range(N)]
        conns: list[socket.socket] = []
        try:
            # Every job checks in and then waits for us: all N workers are alive together.
            seen = set()
            while len(conns) < N:
                conn, _ = server.accept()
                conns.append(conn)
                seen.add(int.from_bytes(conn.recv(4), "big"))
            assert seen == set(range(N))
            workers = [p for p in psutil.Process().children(recursive=True) if _alive(p.pid)]
            assert len(workers) >= N  # the N workers (and the fork server)
            wait_until(lambda: all(j.child_jobs[0].pid for j in jobs), 10, "every worker's pid")
            assert {j.state for j in jobs} == {psjobs.JobState.RUNNING}
            pids = {j.child_jobs[0].pid for j in jobs}
            assert len(pids) == N  # one process per job
        finally:
            for conn in conns:
                conn.sendall(b"g")
                conn.close()

    assert len(session.wait_job(jobs, timeout=40)) == N
    assert sorted(session.receive_job(jobs)) == list(range(N))
    assert {j.state for j in jobs} == {psjobs.JobState.COMPLETED}

    def gone() -> bool:
        # A job ends at its worker's last word; the worker itself exits a moment later.
        return not any(_alive(p) for p in pids if p is not None)

    wait_until(gone, 10, "every worker process to exit")
