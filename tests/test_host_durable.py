"""The session host's store under stress: SIGKILL mid-stream, storage failures (a full disk, a
database locked by another process), acknowledged receive, and what it costs to hold many jobs.
Each test has a state directory and a host of its own."""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from psjobs._errors import HostReplyError
from psjobs.host._client import Client, Paths, host_free
from psjobs.host._server import HostServer

from .clitools import gone, host_pid, ok, private_home, run, subprocess_env
from .conftest import wait_until

pytestmark = pytest.mark.timeout(120)


def child_pid(job: int) -> int:
    rows = json.loads(ok("get", str(job), "--children", "--json"))
    pid = rows[1]["pid"]
    assert isinstance(pid, int)
    return pid


def lines(n: int, start: int = 1) -> str:
    return "".join(f"{i}\n" for i in range(start, start + n))


def complete_lines(path: Path) -> list[str]:
    text = path.read_text()
    return text.split("\n")[:-1]  # a last line without its newline was not produced whole


# --- SIGKILL ---------------------------------------------------------------------------------------

def test_sigkill_mid_stream_keeps_all_but_what_was_in_flight(home: Path, tmp_path: Path) -> None:
    produced = tmp_path / "produced"
    job = int(ok("start", "-q", "--", f"seq 1 1000000 | tee {produced}").strip())
    # Killed while the job is producing as fast as the host takes it.
    wait_until(lambda: produced.exists() and produced.stat().st_size > 700_000, timeout=60,
               what="the job to be well under way")
    orphan = child_pid(job)
    old = host_pid(home)
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: host_free(Paths(home)), what="the host to die")
    before = complete_lines(produced)  # tee ends at its next write to the dead host's pipe
    assert len(before) < 1_000_000, "the job ended before the kill: nothing was in flight"

    code, out, err = run("receive", str(job))  # a new host, with what the old one stored
    assert code == 5 and "HostLostError" in err
    stored = out.split("\n")[:-1]
    assert stored == [str(i) for i in range(1, len(stored) + 1)]  # in order, no gap, nothing twice
    assert len(before) - len(stored) <= 20_000, (len(before), len(stored))
    wait_until(lambda: gone(orphan), what="the dead host's job to be ended")


# --- record first, then start ----------------------------------------------------------------------

def test_a_start_that_cannot_be_recorded_does_not_run(home: Path, tmp_path: Path) -> None:
    ok("get")  # the host and its database exist
    marker = tmp_path / "ran"
    other = sqlite3.connect(home / "jobs.db", timeout=10, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another process's write lock, held
        code, _, err = run("start", "--", f"touch {marker}")
        assert code == 1
        assert "could not be recorded" in err and "not started" in err and "locked" in err
        assert json.loads(ok("get", "--json")) == []
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert not marker.exists()
    job = ok("start", "-q", "--", f"touch {marker}").strip()  # the lock is gone: it runs, once
    ok("wait", job)
    assert marker.exists()
    assert len(json.loads(ok("get", "--json"))) == 1


# --- the files ---------------------------------------------------------------------------------------

def test_database_files_are_private_and_space_comes_back_after_remove(home: Path) -> None:
    job = ok("start", "-q", "--", "yes 'a line of some length, to take some room on disk' | head -n 300000").strip()
    ok("wait", job)
    for name in ("jobs.db", "jobs.db-wal", "jobs.db-shm"):
        assert stat.S_IMODE(os.stat(home / name).st_mode) == 0o600, name
    db = home / "jobs.db"
    wait_until(lambda: json.loads(ok("host", "status", "--json"))["records"] == 300_000, what="stored")

    def size() -> int:
        return sum(os.stat(p).st_size for p in (db, home / "jobs.db-wal") if p.exists())

    ok("host", "stop")  # a checkpoint: the records are in jobs.db itself
    full = os.stat(db).st_size
    assert full > 10_000_000
    ok("remove", job)
    assert size() < full / 4, (size(), full)


# --- acknowledged receive --------------------------------------------------------------------------

def _psjobs(home: Path) -> str:
    return f"PSJOBS_HOME={shlex.quote(str(home))} {shlex.quote(sys.executable)} -m psjobs"


def test_receive_into_a_reader_that_takes_one_line_consumes_only_that_line(home: Path) -> None:
    job = ok("start", "-q", "--", "seq 1 5000").strip()
    ok("wait", job)
    # `read` takes a pipe's bytes one at a time: exactly one line leaves the pipe, the rest is
    # thrown away with it when the shell exits.
    shown = subprocess.run(["sh", "-c", f"{_psjobs(home)} receive {job} | {{ read -r line; echo \"$line\"; }}"],
                           capture_output=True, text=True, env=subprocess_env(), timeout=60)
    assert shown.stdout == "1\n", shown.stderr
    assert ok("receive", job) == lines(4999, 2)  # everything the reader did not take, once


def test_receive_piped_to_head_consumes_nothing_head_did_not_read(home: Path) -> None:
    text = "x" * 90  # 100-byte lines: head reads a few KiB of them, the pipe holds 64 KiB more
    job = ok("start", "-q", "--", f"for i in $(seq 1 20000); do echo \"$i {text}\"; done").strip()
    ok("wait", job, "--timeout", "60")
    shown = subprocess.run(["sh", "-c", f"{_psjobs(home)} receive {job} | head -n 1"],
                           capture_output=True, text=True, env=subprocess_env(), timeout=60)
    assert shown.stdout == f"1 {text}\n", shown.stderr
    rest = ok("receive", job).splitlines()
    first = int(rest[0].split()[0])
    assert first <= 400, f"head took at most a few KiB, yet {first - 1} lines were consumed"
    assert rest == [f"{i} {text}" for i in range(first, 20001)]


def test_an_acknowledged_receive_into_a_file_or_a_reader_consumes_everything(home: Path, tmp_path: Path) -> None:
    job = ok("start", "-q", "--", "seq 1 100000").strip()
    ok("wait", job)
    out = tmp_path / "out"
    subprocess.run(["sh", "-c", f"{_psjobs(home)} receive {job} | cat > {out}"], check=True,
                   env=subprocess_env(), timeout=60)
    assert out.read_text() == lines(100000)
    assert ok("receive", job) == ""
    assert json.loads(ok("get", job, "--json"))[0]["has_more_data"] is False


# --- text that is not UTF-8 ------------------------------------------------------------------------

def test_undecodable_bytes_in_commands_names_and_directories_survive_a_restart(home: Path, tmp_path: Path) -> None:
    # What a shell passes for `cat $'caf\xe9.txt'`, `-n $'\xff'` and `cd $'d\xff'`: undecodable bytes,
    # which Python holds as lone surrogates, and which SQLite text refuses.
    odd = tmp_path / "d\udcff"
    odd.mkdir()
    first = ok("start", "-q", "-n", "ok1", "--", "echo before").strip()
    cat = ok("start", "-q", "--", "cat", "caf\udce9.txt").strip()
    named = ok("start", "-q", "-n", "\udcff", "--", "echo named").strip()
    where = ok("start", "-q", "-C", str(odd), "--", "pwd").strip()
    # A lone surrogate no shell can send, only a raw request's JSON ("\ud800").
    raw = str(Client(Paths(home)).call("start", command=["echo raw"], name="\ud800", cwd=str(tmp_path),
                                       env=dict(os.environ))["id"])
    later = ok("start", "-q", "-n", "ok2", "--", "echo after").strip()
    assert ok("receive", later, "--wait") == "after\n"  # the jobs before it hold nothing up
    assert _status()["storage_problem"] is None
    assert run("wait", first, cat, named, where, raw)[0] == 5  # cat failed: no such file
    before = json.loads(ok("get", "--json"))

    ok("host", "stop")
    code, out, err = run("get", "--json")  # a new host, with what the old one stored
    assert code == 0 and err == ""
    restored = json.loads(out)
    keys = ("id", "name", "command", "cwd", "state", "reason")
    assert [{k: r[k] for k in keys} for r in restored] == [{k: r[k] for k in keys} for r in before]
    by_id = {str(r["id"]): r for r in restored}
    assert by_id[cat]["command"] == shlex.join(["cat", "caf\udce9.txt"]) and by_id[cat]["state"] == "Failed"
    assert by_id[named]["name"] == "\udcff" and by_id[raw]["name"] == "\ud800"
    assert by_id[where]["cwd"] == str(odd)
    assert ok("receive", first) == "before\n" and ok("receive", raw) == "raw\n"
    code, _, err = run("receive", cat)
    assert code == 5 and "No such file" in err
    assert ok("receive", later) == ""  # received before the restart, once


def test_what_sqlite_refuses_is_given_up_alone_and_loudly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # No request reaches these any more; they stand for a value a later change lets through: SQLite
    # stores NaN as NULL (a record's time is NOT NULL) and takes no integer over 64 bits.
    paths = Paths(tmp_path / "inproc")
    paths.prepare()

    def serving() -> tuple[HostServer, threading.Thread, Client]:
        server = HostServer(paths)
        thread = threading.Thread(target=server.serve, name="test-host")
        thread.start()
        return server, thread, Client(paths)

    def received(client: Client, job_id: int) -> list[object]:
        return [v for r in client.stream("receive", ids=[str(job_id)], keep=True, wait=True, timeout=60)
                if r["more"] for *_, v in r["result"]["records"]]

    server, thread, client = serving()
    try:
        job = client.call("start", command=["echo first"], cwd=str(tmp_path), thread=True)["id"]
        client.call("wait", ids=[str(job)], timeout=60)
        with server.session._lock:  # as a job's reader adds them
            server.writer.journals[job].extend([(0, "a", 1.0), (0, "b", math.nan), (0, "c", 2.0)])
        server.writer.put(("cwd", job, 1 << 70))
        later = client.call("start", command=["echo later"], cwd=str(tmp_path), thread=True)["id"]
        assert received(client, later) == ["later"]  # nothing held up behind them
        stand_in = "<a record psjobs could not store: IntegrityError: NOT NULL constraint failed: records.time>"
        assert received(client, job) == ["first", "a", stand_in, "c"]  # in its place: no position moved
        assert client.call("status")["storage_problem"] is None
        told = capsys.readouterr().err  # the host's log (here: stderr) and the next client's warning
        assert told.count(f"of job {job} could not be stored (IntegrityError") == 2
        assert told.count(f"Job {job} 'Job{job}' (Completed) shows no working directory") == 2
        assert "OverflowError" in told and "Traceback" in told and "please report it" in told
    finally:
        client.call("shutdown")
        thread.join(30)
        server.close()
    server, thread, client = serving()  # what was stored, after a restart
    try:
        assert received(client, job) == ["first", "a", stand_in, "c"]
        assert received(client, later) == ["later"]
    finally:
        client.call("shutdown")
        thread.join(30)
        server.close()


# --- storage failures --------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs as the state directory, with its own host (root only: it mounts)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs as the state directory (a disk that fills up)")
    where = tmp_path / "small"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(where)], check=True,
                   timeout=30)
    try:
        with private_home(where / "h") as h:
            yield h
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False, timeout=30)


def _status() -> dict[str, object]:
    return json.loads(ok("host", "status", "--json"))  # type: ignore[no-any-return]


def test_a_full_disk_is_reported_retried_and_survived(small_disk: Path) -> None:
    home = small_disk
    ok("get")  # the host, its database and its log on the small disk
    filler = home.parent / "filler"
    free = os.statvfs(home).f_bavail * os.statvfs(home).f_frsize
    with open(filler, "wb") as f:
        f.write(b"\0" * (free - (1 << 20)))  # 1 MiB left: the records below need ~8
    job = ok("start", "-q", "--", "seq 1 200000").strip()

    wait_until(lambda: _status()["storage_problem"] is not None, timeout=60, what="the disk to fill up")
    code, out, err = run("get", job, "--json")  # every client is told, with what to do
    assert code == 0 and "cannot store records" in err and "full" in err and str(home) in err
    code, out, err = run("host", "status")
    assert code == 0 and "storage: FAILING" in out and "full" in out
    ok("wait", job, "--timeout", "60")  # the host keeps serving; the job ends meanwhile

    filler.unlink()  # space is back
    told: list[str] = []

    def storing() -> bool:
        code, out, err = run("host", "status", "--json")
        told.append(err)
        return code == 0 and json.loads(out)["storage_problem"] is None

    wait_until(storing, timeout=60, what="the host to store again")
    assert any("stores records again" in e for e in told)
    assert json.loads(ok("get", job, "--json"))[0]["state"] == "Completed"
    assert ok("receive", job) == lines(200000)  # kept in memory meanwhile, then stored: all of it
    echo = ok("start", "-q", "--", "echo fine").strip()
    assert ok("receive", echo, "--wait") == "fine\n"
    ok("host", "stop")  # and what it stored after the failure is on disk
    rows = {r["id"]: r for r in json.loads(ok("get", "--json"))}
    assert rows[int(job)]["state"] == "Completed" and rows[int(echo)]["state"] == "Completed"


# --- many jobs ---------------------------------------------------------------------------------------

def test_receive_star_over_thousands_of_stored_jobs(home: Path) -> None:
    from bench.host import populate

    populate(home, 2500)  # stored by an earlier host: more than SQLite's expression limit allowed
    out = ok("receive", "*")
    assert out.splitlines() == [f"{2 * k + 1}:{i}" for k in range(2500) for i in range(3)]
    assert ok("receive", "*") == ""  # consumed, each once
    rows = json.loads(ok("get", "--json"))
    assert len(rows) == 2500 and not any(r["has_more_data"] for r in rows)
    job = ok("start", "-q", "--", "echo new").strip()
    assert int(job) == 5001  # ids go on after the stored ones
    assert ok("receive", job, "--wait") == "new\n"


def test_a_locked_database_is_retried_and_memory_stays_bounded_meanwhile(tmp_path: Path) -> None:
    paths = Paths(tmp_path / "inproc")
    paths.prepare()
    server = HostServer(paths)
    thread = threading.Thread(target=server.serve, name="test-host")
    thread.start()
    client = Client(paths)
    other = sqlite3.connect(paths.database, timeout=10, isolation_level=None)
    try:
        go = tmp_path / "go"
        job = client.call("start", command=[f"while [ ! -e {go} ]; do sleep 0.01; done; seq 1 50000"],
                          cwd=str(tmp_path))["id"]
        server.writer.FAILING_BYTES = 200_000  # a small bound, so the test need not fill 64 MiB
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        go.touch()
        client.call("wait", ids=[str(job)], timeout=60)  # the host serves while nothing is stored
        wait_until(lambda: server.writer.problem is not None, what="the writer to find the lock")
        status = client.call("status")
        assert "locked" in status["storage_problem"]
        dropped = status["records_dropped"]
        assert 0 < dropped < 50000  # kept what the bound allows, dropped (and counted) the rest
        with pytest.raises(HostReplyError, match="not stored yet"):  # an acknowledged receive (the command's)
            list(client.stream("receive", ids=[str(job)], ack=True))
        other.execute("ROLLBACK")
        wait_until(lambda: client.call("status")["storage_problem"] is None, timeout=30,
                   what="the host to store again")
        got = [int(v) for r in client.stream("receive", ids=[str(job)]) if r["more"]
               for *_, v in r["result"]["records"]]
        assert len(got) == 50000 - dropped and got == sorted(got)
        assert client.call("get", ids=[str(job)])[0]["state"] == "Completed"
    finally:
        other.close()
        client.call("shutdown")
        thread.join(30)
        server.close()


def test_the_host_stays_small_while_a_job_prints_a_lot_and_nobody_receives(home: Path) -> None:
    import psutil

    ok("get")
    host = psutil.Process(host_pid(home))
    before = host.memory_info().rss
    # 120 MB in 1,000-byte lines, then 4 lines of 4 MB: the queue is bounded in bytes too.
    job = ok("start", "-q", "--", "head -c 120000000 /dev/zero | tr '\\0' x | fold -w 1000; echo; "
             "head -c 16000000 /dev/zero | tr '\\0' y | fold -w 4000000; echo").strip()
    peak = before

    def finished() -> bool:
        nonlocal peak
        peak = max(peak, host.memory_info().rss)
        return json.loads(ok("get", job, "--json"))[0]["state"] == "Completed"

    wait_until(finished, timeout=100, what="the job to end")
    assert peak - before < 64 << 20, f"the host grew by {(peak - before) >> 20} MiB"
    before = peak = host.memory_info().rss
    done = threading.Event()

    def sample() -> None:  # the host's size while it sends everything back
        nonlocal peak
        while not done.wait(0.01):
            peak = max(peak, host.memory_info().rss)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        got = ok("receive", job).splitlines()
    finally:
        done.set()
        sampler.join(10)
    assert peak - before < 64 << 20, f"the host grew by {(peak - before) >> 20} MiB while sending"
    # a line longer than a record's cap (1 MiB, worker/_procs.MAX_LINE) comes as 1 MiB pieces
    from psjobs.worker._procs import MAX_LINE

    pieces = ["y" * MAX_LINE] * (4000000 // MAX_LINE) + ["y" * (4000000 % MAX_LINE)]
    assert got[:120000] == ["x" * 1000] * 120000 and got[120000:] == pieces * 4


def test_bench_host_runs_and_receives_every_record(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.host import main

    assert main(["--quick"]) == 0  # no timing is checked here: figures belong to bench/
    out = capsys.readouterr().out
    assert "psjobs start (request)" in out and "receive '*' over 300 stored jobs" in out
