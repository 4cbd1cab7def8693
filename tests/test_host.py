"""The session host: its socket, its protocol under bad input, one host per user, persistence
across SIGKILL, concurrent clients. Each test has a state directory and a host of its own."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

import psjobs
from psjobs import JobState
from psjobs._records import ErrorRecord, InformationRecord, ProgressRecord, Record, Snapshot, Stream
from psjobs.host._client import _BOOT, HEADER, MAGIC, MAX_REQUEST, VERSION, Client, Paths, host_free, pack, read_frame
from psjobs.host._server import HostServer
from psjobs.host._store import encode

from .clitools import gone, host_pid, ok, private_home, run, subprocess_env
from .conftest import wait_until


def lines(n: int, start: int = 1) -> str:
    return "".join(f"{i}\n" for i in range(start, start + n))


def raw(home: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(home / "host.sock"))
    s.settimeout(20)
    return s


def reply(s: socket.socket) -> dict[str, Any]:
    body = read_frame(s, 1 << 30, "the host")
    assert body is not None, "the host closed the connection without a reply"
    return json.loads(body)  # type: ignore[no-any-return]


def closed(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""
    except ConnectionResetError:  # closed with our unread garbage still in its buffer
        return True


def child_pid(job: int) -> int:
    rows = json.loads(ok("get", str(job), "--children", "--json"))
    pid = rows[1]["pid"]
    assert isinstance(pid, int)
    return pid


# --- the socket --------------------------------------------------------------------------------------

def test_only_its_owner_can_open_the_socket(home: Path) -> None:
    ok("get")
    mode = os.stat(home / "host.sock").st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600
    assert stat.S_IMODE(os.stat(home).st_mode) == 0o700
    assert os.stat(home / "host.sock").st_uid == os.getuid()


def test_garbage_gets_an_error_reply_and_the_host_stays_up(home: Path) -> None:
    ok("get")
    pid = host_pid(home)
    cases: list[tuple[bytes, str]] = [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "not a psjobs frame"),
        (HEADER.pack(MAGIC, VERSION, MAX_REQUEST + 1), f"over the {MAX_REQUEST}-byte limit"),
        (HEADER.pack(MAGIC, VERSION, 0xFFFFFFFF), "over the"),
        (HEADER.pack(MAGIC, 99, 2) + b"{}", "protocol version 99"),
        (os.urandom(65536), "not a psjobs frame"),
    ]
    for data, expected in cases:
        with raw(home) as s:
            s.sendall(data)
            answer = reply(s)
            assert answer["ok"] is False and expected in answer["error"]["message"], answer
            assert answer["error"]["exit_code"] == 2
            assert closed(s)  # the framing is lost, so the host closes this connection
    # Broken content in a sound frame: an error reply, and the connection goes on.
    with raw(home) as s:
        for body, expected in [(b"{not json", "not valid JSON"), (b"[1, 2]", "a JSON object"),
                               (b'{"verb": "launch-missiles"}', "unknown verb"),
                               (b'{"verb": "get", "args": {"ids": "1"}}', "wrong type"),
                               (b'{"verb": "receive", "args": {"ids": []}}', "at least one job"),
                               (b"\xff\xfe\x00", "not valid JSON")]:
            s.sendall(HEADER.pack(MAGIC, VERSION, len(body)) + body)
            answer = reply(s)
            assert answer["ok"] is False and expected in answer["error"]["message"], answer
        s.sendall(pack({"verb": "status"}))
        assert reply(s)["result"]["pid"] == pid
    # Half a frame, then nothing: the host drops that client only.
    with raw(home) as s:
        s.sendall(HEADER.pack(MAGIC, VERSION, 100) + b"{")
    with raw(home):
        pass
    assert host_pid(home) == pid
    job = int(ok("start", "-q", "--", "echo still serving").strip())
    assert ok("receive", str(job), "--wait") == "still serving\n"


# --- one host ------------------------------------------------------------------------------------------

def test_a_second_host_refuses_to_start(home: Path) -> None:
    ok("get")
    pid = host_pid(home)
    env = subprocess_env()
    second = subprocess.run([sys.executable, "-c", _BOOT, "--home", str(home)], capture_output=True,
                            text=True, env=env, timeout=30)
    assert second.returncode == 1
    assert "already runs" in second.stderr and str(pid) in second.stderr
    # Started as the command does it (in the background), it gives way to the running host.
    third = subprocess.run([sys.executable, "-c", _BOOT, "--home", str(home), "--daemon"],
                           capture_output=True, text=True, env=env, timeout=30)
    assert third.returncode == 0
    assert host_pid(home) == pid


@pytest.mark.parametrize("damage", ["not a database", "a damaged page"])
def test_a_damaged_database_is_named_with_what_to_do_and_that_works(home: Path, damage: str) -> None:
    db = home / "jobs.db"
    if damage == "not a database":
        home.mkdir(mode=0o700)
        db.write_bytes(b"whatever this was, it is no SQLite file\n" * 200)
        said = "(file is not a database)"
    else:  # a psjobs database whose records pages were overwritten: found when the host loads it
        ok("wait", ok("start", "-q", "--", "seq 1 200000").strip())
        ok("host", "stop")
        data = bytearray(db.read_bytes())
        data[len(data) // 2:len(data) // 2 + 64 * 4096] = b"\xff" * (64 * 4096)
        db.write_bytes(data)
        said = "(database disk image is malformed)"
    code, out, err = run("get")
    assert code == 1 and out == ""
    assert err.startswith(f"psjobs: the psjobs host cannot start: the psjobs database {db} is damaged "
                          f"or is not a psjobs database {said}; move it away"), err
    # What it says to do works: the host starts afresh, and the damaged file is kept.
    advice = err.split("`")[1]
    subprocess.run(["sh", "-c", advice], check=True, timeout=30)
    assert ok("get") == ""
    assert (home / "damaged" / "jobs.db").stat().st_size > 0


def test_the_host_runs_the_psjobs_of_the_command_that_starts_it(tmp_path: Path) -> None:
    # A checkout's command (another psjobs may be installed in site-packages) starts a host of
    # that checkout, not of the installed psjobs: the host and the command are one version.
    checkout = tmp_path / "checkout"
    shutil.copytree(Path(psjobs.__file__).parent, checkout / "psjobs", ignore=shutil.ignore_patterns("__pycache__"))
    (checkout / "psjobs" / "_version.py").write_text('__version__ = "0.0.0+checkout"\n')
    with private_home(tmp_path / "h") as h:
        env = {**os.environ, "PSJOBS_HOME": str(h), "PYTHONPATH": str(checkout)}
        for action in ("start", "status"):
            done = subprocess.run([sys.executable, "-m", "psjobs", "host", action, "--json"], capture_output=True,
                                  text=True, env=env, cwd=tmp_path, timeout=60)
            assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["version"] == "0.0.0+checkout"


def test_the_stale_socket_of_a_dead_host_is_cleaned_up(home: Path) -> None:
    ok("get")
    pid = host_pid(home)
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: host_free(Paths(home)), what="the host to die")
    assert (home / "host.sock").exists()  # left behind
    assert run("host", "status")[0] == 1
    assert ok("get") == ""  # the next command starts a new host
    assert host_pid(home) != pid


def test_status_and_stop_without_a_host(home: Path) -> None:
    code, out, _ = run("host", "status")
    assert code == 1 and "not running" in out
    code, out, _ = run("host", "stop")
    assert code == 0 and "not running" in out
    assert not home.exists() or not (home / "host.sock").exists()


def test_host_stop_stops_running_jobs_and_keeps_them(home: Path) -> None:
    job = int(ok("start", "-q", "--", "echo before; sleep 300").strip())
    wait_until(lambda: ok("receive", str(job), "--keep") == "before\n", what="the first line")
    pid = child_pid(job)
    out = ok("host", "stop")
    assert f"stopped its running jobs: {job}" in out
    assert gone(pid)
    assert run("host", "status")[0] == 1
    row = json.loads(ok("get", str(job), "--json"))[0]  # a new host, the same jobs
    assert row["state"] == "Stopped"
    assert ok("receive", str(job)) == "before\n"


# --- persistence -------------------------------------------------------------------------------------

def test_everything_that_arrived_survives_sigkill(home: Path, tmp_path: Path) -> None:
    done = int(ok("start", "-q", "-n", "finished", "--", "seq 1 20000").strip())
    go = tmp_path / "go"
    running = int(ok("start", "-q", "-n", "running", "--",
                     f"seq 1 300; while [ ! -e {go} ]; do sleep 0.01; done; seq 301 400; sleep 300").strip())
    ok("wait", str(done))
    wait_until(lambda: ok("receive", str(running), "--keep").count("\n") == 300, what="300 lines stored")
    assert ok("receive", str(running)) == lines(300)  # received: the cursor moves past them
    go.touch()
    wait_until(lambda: ok("receive", str(running), "--keep") == lines(100, 301), what="100 more lines")
    orphan = child_pid(running)
    old = host_pid(home)

    os.kill(old, signal.SIGKILL)
    wait_until(lambda: host_free(Paths(home)), what="the host to die")  # its last thread too

    rows = {r["id"]: r for r in json.loads(ok("get", "--json"))}
    assert host_pid(home) != old
    assert rows[done]["state"] == "Completed"
    assert rows[running]["state"] == "Failed"
    assert "host" in rows[running]["reason"] and str(old) in rows[running]["reason"]
    wait_until(lambda: gone(orphan), what="the dead host's job process to be ended")
    assert json.loads(ok("host", "status", "--json"))["records"] == 20000 + 400  # every record, once
    assert ok("receive", str(done)) == lines(20000)
    code, out, err = run("receive", str(running))
    assert out == lines(100, 301)  # the cursor survived too: nothing twice, nothing lost
    assert code == 5 and "HostLostError" in err


def test_records_are_stored_as_they_arrive_and_the_session_answers_from_the_store(tmp_path: Path) -> None:
    paths = Paths(tmp_path / "inproc")
    paths.prepare()
    server = HostServer(paths)
    thread = threading.Thread(target=server.serve, name="test-host")
    thread.start()
    try:
        client = Client(paths)
        go = tmp_path / "go"
        row = client.call("start", command=[f"seq 1 50000; while [ ! -e {go} ]; do sleep 0.01; done"],
                          cwd=str(tmp_path))
        # Stored while the job still runs, without anyone receiving them.
        wait_until(lambda: server.store.count_records() == 50000, what="the records to be stored")
        assert [j.id for j in server.session.get_job()] == [row["id"]]
        go.touch()
        client.call("wait", ids=[str(row["id"])])
        (job,) = server.session.get_job()  # the host's Session is its one job table
        assert job.state is JobState.COMPLETED and job.has_more_data
        got = [v for r in client.stream("receive", ids=[str(row["id"])]) if r["more"]
               for *_, v in r["result"]["records"]]
        assert got == [str(i) for i in range(1, 50001)]
        assert not job.has_more_data
        assert client.call("get", ids=[str(row["id"])])[0]["has_more_data"] is False
    finally:
        client.call("shutdown")
        thread.join(30)
        server.close()


# --- concurrency ---------------------------------------------------------------------------------

def test_ten_clients_at_once_start_one_host_and_lose_nothing(home: Path) -> None:
    # Each client is a process of its own that starts a job and receives it (one interpreter per
    # client, running the command's main twice, keeps this quick on a busy machine).
    script = ("import contextlib, io, sys\n"
              "from psjobs._cli import main\n"
              "buf = io.StringIO()\n"
              "with contextlib.redirect_stdout(buf):\n"
              "    assert main(['start', '-q', '--', 'seq 1 2000']) == 0\n"
              "sys.exit(main(['receive', buf.getvalue().strip(), '--wait']))\n")
    env = subprocess_env()
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(10)]
    results = [p.communicate(timeout=50) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err
        assert out == lines(2000)
    rows = json.loads(ok("get", "--json"))
    assert len(rows) == 10
    assert all(r["state"] == "Completed" and not r["has_more_data"] for r in rows)
    assert json.loads(ok("host", "status", "--json"))["records"] == 10 * 2000


def test_concurrent_receivers_of_one_job_get_each_record_once(home: Path) -> None:
    job = ok("start", "-q", "--", "seq 1 30000").strip()
    got: list[list[int]] = [[] for _ in range(5)]
    errors: list[BaseException] = []

    def receiver(i: int) -> None:
        try:
            for r in Client().stream("receive", ids=[job], wait=True):
                if r["more"]:
                    got[i].extend(int(v) for *_, v in r["result"]["records"])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=receiver, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(50)
    assert not errors
    assert all(g == sorted(g) for g in got)  # each receiver sees production order
    assert sorted(v for g in got for v in g) == list(range(1, 30001))  # each record exactly once


# --- how values are stored ---------------------------------------------------------------------------

class _Opaque:
    def __repr__(self) -> str:
        return "<opaque thing>"


@pytest.mark.parametrize(("stream", "payload", "expected"), [
    (Stream.OUTPUT, "a line", (1, "a line")),
    (Stream.OUTPUT, {"n": [1, 2.5, None, True]}, (1, {"n": [1, 2.5, None, True]})),
    (Stream.OUTPUT, _Opaque(), (0, "<opaque thing>")),
    (Stream.OUTPUT, Snapshot("m.T", "T(1)", {}, "cannot pickle"), (0, "<Snapshot of m.T: T(1)>")),
    (Stream.OUTPUT, "bad \udcff byte", (1, "bad \udcff byte")),
    (Stream.OUTPUT, {"caf\udce9"}, (0, "{'caf\\udce9'}")),  # no JSON: its repr, the byte escaped
    (Stream.WARNING, Record(Stream.WARNING, "careful", 1.0, "web1"), (1, {"message": "careful",
                                                                           "computer_name": "web1"})),
    (Stream.ERROR, ErrorRecord("boom", 1.0, None, ValueError("bad"), "tb"),
     (1, {"message": "boom", "computer_name": None, "exception": "ValueError: bad", "traceback": "tb"})),
    (Stream.PROGRESS, ProgressRecord("copy", "half", 50.0, False, 1.0),
     (1, {"message": "copy - half - 50%", "computer_name": None, "activity": "copy", "status": "half",
          "percent_complete": 50.0, "completed": False})),
    (Stream.INFORMATION, InformationRecord("x", 1.0, None, data=_Opaque()),
     (1, {"message": "x", "computer_name": None, "data": "<opaque thing>"})),
])
def test_values_are_stored_as_json_or_as_readable_text(stream: Stream, payload: Any, expected: Any) -> None:
    flag, data = encode(stream, payload)
    assert (flag, json.loads(data) if flag else data) == expected
    data.encode("utf-8")  # storable as SQLite text, even with undecodable bytes in it


def test_a_client_of_another_protocol_version_is_told_what_to_do(home: Path) -> None:
    ok("get")
    with raw(home) as s:
        body = b'{"verb": "status"}'
        s.sendall(struct.pack("!4sBI", MAGIC, VERSION + 1, len(body)) + body)
        answer = reply(s)
    assert "psjobs host stop" in answer["error"]["message"]


@pytest.mark.timeout(30)
def test_host_requests_behave_as_records() -> None:
    """The protocol's requests and responses (cheap records, not dataclasses, for the command's start-up)
    take arguments by position or name, fill defaults (a fresh list each), compare by value and
    refuse what they do not declare; to_json gives plain data, nested records included."""
    from psjobs.host import _protocol as hp

    a = hp.GetRequest(ids=["1"])
    b = hp.GetRequest(["1"])
    assert a == b and a != hp.GetRequest(ids=["2"]) and a.names == [] and a.names is not b.names
    assert repr(a).startswith("GetRequest(ids=['1'], ")
    with pytest.raises(TypeError, match="unexpected keyword argument 'nope'"):
        hp.GetRequest(nope=1)
    with pytest.raises(TypeError, match="missing required argument: 'command'"):
        hp.StartRequest(cwd="/")
    with pytest.raises(TypeError, match="missing required argument: 'command'"):
        hp.StartRequest()  # by position (the fast path of the wire's messages) as by name
    from psjobs.worker import _wire as wire

    assert wire.Done("fail", None, "tb", 3) == wire.Done(event="fail", traceback="tb", exit_code=3)
    assert (wire.Done("complete").reason, wire.Done("complete").exit_code) == (None, None)
    with pytest.raises(TypeError, match="multiple values"):
        hp.RemoveResult([1], removed=[2])
    with pytest.raises(TypeError):
        hash(a)
    assert hp.decode_request(json.dumps(a.to_json()).encode()) == a
    failure = hp.Failure(id=1, name="Job1", child_id=2, computer_name=None, reason="boom")
    result = hp.ReceiveResult(failures=[failure], timed_out=False, removed=[])
    assert result.to_json() == {"failures": [{"id": 1, "name": "Job1", "child_id": 2, "computer_name": None,
                                              "reason": "boom"}], "timed_out": False, "removed": [],
                                 "pending": []}
