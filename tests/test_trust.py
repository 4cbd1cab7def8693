"""The session host and its client trust no one else: probed with a planted module, a second local
user's socket and connections, a symlinked state directory, oversized and deeply nested requests,
a 16,000-`[` selector, control characters in names, `--json` errors and names that look like ids.

The tests that need a second user create one (``psjobs-probe``) and run processes as it; they are
skipped, saying why, when the tests do not run as root."""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import pwd
import random
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

import psjobs
from psjobs.core._select import _translate
from psjobs.host._client import _BOOT, HEADER, MAGIC, MAX_REQUEST, VERSION, pack, read_frame
from psjobs.host._protocol import MAX_SELECTOR

from .clitools import host_pid, ok, private_home, run, subprocess_env

OTHER = "psjobs-probe"


@pytest.fixture(scope="module")
def other() -> pwd.struct_passwd:
    """A second local user (created once if missing; creating and becoming a user needs root)."""
    if os.getuid() != 0:
        pytest.skip("needs root: the test creates a second local user and runs processes as it")
    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(OTHER)
        done = subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", OTHER],
                              capture_output=True, text=True, timeout=30)
        if done.returncode not in (0, 9) and time.monotonic() > deadline:  # 9: created meanwhile
            pytest.skip(f"cannot create the user {OTHER}: {done.stderr.strip()}")
        time.sleep(0.1)  # /etc/passwd is locked by another useradd: try again


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory of ours that the second user can reach (pytest's own tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="psjobs-trust-"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def as_user(user: pwd.struct_passwd, code: str, *args: str) -> subprocess.Popen[str]:
    """``python3 -c code args...`` (the system's: the other user may not reach ours) as ``user``,
    from "/", its stdout a pipe."""
    python = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
    if python is None:
        pytest.skip("no system python3 for the second user to run")
    return subprocess.Popen([python, "-I", "-c", code, *args], user=user.pw_uid, group=user.pw_gid,
                            extra_groups=[], cwd="/", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# --- the host starts isolated ----------------------------------------------------------------------

def test_a_module_in_the_users_directory_is_never_imported_by_the_host(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    planted = tmp_path / "project"
    planted.mkdir()
    marker = tmp_path / "imported"
    # Modules the host imports at start (selectors first of all), each leaving a mark if it runs.
    for module in ("selectors", "sqlite3", "signal", "threading", "fcntl", "json"):
        (planted / f"{module}.py").write_text(f"open({str(marker)!r}, 'a').write({module!r} + ' ')\n")
    monkeypatch.chdir(planted)
    with private_home(tmp_path / "h") as h:
        # The command as a user types it (the console script), from that directory.
        script = Path(sys.executable).with_name("psjobs")
        done = subprocess.run([str(script), "start", "-q", "--", "pwd"], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        job = done.stdout.strip()
        assert ok("receive", job, "--wait") == f"{planted}\n"  # the job itself runs where it was started
        assert psutil.Process(host_pid(h)).cwd() == "/"        # the host holds no directory of the user's
    assert not marker.exists(), f"the host imported the planted {marker.read_text()}"
    # On the PYTHONPATH the directory is still searched, but after the standard library.
    monkeypatch.setenv("PYTHONPATH", str(planted))
    with private_home(tmp_path / "h2"):
        ok("host", "start")
    assert not marker.exists(), f"the host imported the planted {marker.read_text()}"


def test_the_host_runs_the_psjobs_the_command_comes_from(tmp_path: Path) -> None:
    # A second copy of psjobs (a checkout beside an installed psjobs): its host must run its own code,
    # not whichever psjobs sys.path finds first (an editable install's .pth comes before it).
    copy = tmp_path / "checkout"
    shutil.copytree(Path(psjobs.__file__).parent, copy / "psjobs", ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "psjobs" / "_version.py").write_text('__version__ = "0.0.0+copy"\n')
    boot = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(copy)!r}); "
                           "from psjobs.host._client import _BOOT; print(_BOOT)"],
                          capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    with private_home(tmp_path / "h") as h:
        done = subprocess.run([sys.executable, "-I", "-c", boot, "--home", str(h), "--daemon"], cwd="/",
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert json.loads(ok("host", "status", "--json"))["version"] == "0.0.0+copy"


# --- the client trusts only its own directory and its own host -----------------------------------------

def test_a_socket_planted_by_another_user_receives_nothing(other: pwd.struct_passwd, shared: Path) -> None:
    state = shared / "state"
    state.mkdir(mode=0o777)
    os.chmod(state, 0o777)  # ours, but (for a while) anyone may create files in it
    # The other user listens where the host's socket goes, ready to send forged output.
    server = as_user(other, """
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1]); s.listen(1)
import os; os.chmod(sys.argv[1], 0o777)
print("ready", flush=True)
s.settimeout(30)
conn, _ = s.accept()
conn.settimeout(30)
got = b""
try:
    conn.sendall(b'PSJH\\x01\\x00\\x00\\x00\\x2a{"ok": true, "more": false, "result": null}')
    while chunk := conn.recv(65536):
        got += chunk
except OSError:  # the client hung up at once
    pass
print(len(got), flush=True)
""", str(state / "host.sock"))
    with server:
        try:
            assert server.stdout is not None
            assert server.stdout.readline().strip() == "ready"
            with private_home(state):
                code, out, err = run("start", "-q", "--", "echo my secret command line")
            assert code == 1 and out == ""
            assert f"is served by uid {other.pw_uid}, not by you" in err and "sent it nothing" in err, err
            assert server.stdout.readline().strip() == "0"  # not a byte: no environment, no command line
            assert server.wait(timeout=30) == 0
        finally:
            if server.poll() is None:
                server.kill()
    assert not (state / "host.lock").exists()  # and no host of ours was started beside it
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700  # the client made its directory private again


def test_another_users_state_directory_is_refused(other: pwd.struct_passwd, shared: Path) -> None:
    state = shared / "theirs"
    state.mkdir(mode=0o700)
    os.chown(state, other.pw_uid, other.pw_gid)
    with private_home(state):
        code, _, err = run("get")
    assert code == 1 and f"belongs to uid {other.pw_uid}, not to you" in err, err
    assert os.listdir(state) == []


def test_a_symlinked_state_directory_is_refused_and_its_target_left_alone(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    os.chmod(real, 0o755)
    link = tmp_path / "link"
    link.symlink_to(real)
    with private_home(link):
        code, _, err = run("get")
        assert code == 1 and f"{link} is a symbolic link (to {real}), which psjobs does not follow" in err, err
        code, _, err = run("host", "start")
        assert code == 1 and "symbolic link" in err
    # The host itself, started by hand on the link, refuses too.
    done = subprocess.run([sys.executable, "-I", "-c", _BOOT, "--home", str(link)], capture_output=True,
                          text=True, timeout=60, cwd="/", env=subprocess_env())
    assert done.returncode == 1 and "symbolic link" in done.stderr, done.stderr
    assert stat.S_IMODE(os.stat(real).st_mode) == 0o755  # never chmodded through the link
    assert os.listdir(real) == []
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with private_home(dangling):
        code, _, err = run("get")
    assert code == 1 and "symbolic link" in err and not (tmp_path / "nowhere").exists()


# --- refusals get their reply -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["host.lock", "host.log", "jobs.db", "jobs.db-wal", "jobs.db-shm"])
def test_a_symbolic_link_planted_in_the_state_directory_is_refused_and_its_target_left_alone(
        tmp_path: Path, name: str) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    with private_home(tmp_path / "h") as h:
        h.mkdir(mode=0o777)  # ours, but (for a while) anyone could plant a link in it
        (h / name).symlink_to(victim)
        code, out, err = run("start", "-q", "--", "true")
        assert code == 1 and out == ""
        assert f"the psjobs file {h / name} is a symbolic link (to {victim}), which psjobs does not follow" in err
        assert f"`mv {h / name} {h / name}.suspect`" in err and err.startswith("psjobs: the psjobs host cannot"), err
        assert victim.read_text() == "precious\n"  # not truncated, not written, not a database
        (h / name).unlink()
        job = ok("start", "-q", "--", "echo fine").strip()  # once it is gone, the host starts
        assert ok("receive", job, "--wait") == "fine\n"
    assert victim.read_text() == "precious\n"


def test_a_fifo_or_another_users_file_in_the_state_directory_is_refused(tmp_path: Path) -> None:
    with private_home(tmp_path / "h") as h:
        h.mkdir(mode=0o700)
        os.mkfifo(h / "host.log")  # a writer's open would wait for a reader forever
        code, _, err = run("get")
        assert code == 1 and f"{h / 'host.log'} is not a regular file" in err, err
        (h / "host.log").unlink()
        if os.getuid() == 0:  # only root can give a file away
            (h / "jobs.db").touch()
            os.chown(h / "jobs.db", 4242, 4242)
            code, _, err = run("get")
            assert code == 1 and f"{h / 'jobs.db'} belongs to uid 4242, not to you" in err, err
            (h / "jobs.db").unlink()
        assert ok("get") == ""


def test_a_refused_peer_gets_the_error_reply_not_a_reset(other: pwd.struct_passwd, shared: Path) -> None:
    state = shared / "state"
    with private_home(state):
        ok("host", "start")
        # Opened up on purpose, so the other user can reach the socket at all.
        os.chmod(state, 0o755)
        os.chmod(state / "host.sock", 0o777)
        peer = as_user(other, """
import json, os, socket, struct, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.settimeout(30)
body = json.dumps({"verb": "start", "args": {"command": ["true"], "cwd": "/", "env": {"X": "x" * 900000}}})
s.sendall(b"PSJH" + struct.pack("!BI", 1, len(body)) + body.encode())
head = s.recv(9, socket.MSG_WAITALL)
print(s.recv(struct.unpack("!I", head[5:])[0], socket.MSG_WAITALL).decode())
""", str(state / "host.sock"))
        with peer:
            out, err = peer.communicate(timeout=30)
        assert peer.returncode == 0, err
        answer = json.loads(out)
        assert answer["ok"] is False and "serves uid 0 only" in answer["error"]["message"], answer
        assert ok("get") == ""  # nothing was started, and the host still serves its owner


def test_an_oversized_request_gets_the_error_reply(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ok("host", "start")
    # A raw client that sends the whole oversized frame: it is read and dropped, the reply arrives.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(home / "host.sock"))
        s.settimeout(30)
        s.sendall(HEADER.pack(MAGIC, VERSION, MAX_REQUEST + 1) + b" " * (MAX_REQUEST + 1))
        body = read_frame(s, 1 << 20, "the host")
        assert body is not None
        answer = json.loads(body)
        assert answer["ok"] is False and f"over the {MAX_REQUEST}-byte limit" in answer["error"]["message"]
    # The command never sends one: it says so before it connects.
    ok("host", "stop")
    monkeypatch.setenv("PSJOBS_TEST_BIG", "x" * (MAX_REQUEST + 10))
    code, _, err = run("start", "--", "true")
    assert code == 2 and "over the host's" in err and "this shell's environment" in err, err
    assert not (home / "host.sock").exists()


def test_deeply_nested_json_gets_a_clear_error_and_the_connection_goes_on(home: Path) -> None:
    pid = (ok("host", "start"), host_pid(home))[1]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(home / "host.sock"))
        s.settimeout(30)
        for body in [b'{"verb": "get", "args": {"ids": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}",
                     b"[" * 500_000, b'{"a":' * 20 + b"1" + b"}" * 20,
                     b"[" * 17 + b'"' + b'\\"' * 300_000]:  # an unterminated string of escaped quotes
            began = time.monotonic()
            s.sendall(pack(body.decode()))
            reply = read_frame(s, 1 << 20, "the host")
            assert reply is not None
            answer = json.loads(reply)
            assert answer["ok"] is False and answer["error"]["exit_code"] == 2
            assert "nests deeper than 16 levels" in answer["error"]["message"], answer
            assert "RecursionError" not in answer["error"]["message"]
            assert time.monotonic() - began < 3.0  # the depth is measured in linear time
        # Brackets inside strings are text, not nesting.
        s.sendall(pack({"verb": "get", "args": {"ids": ["[" * 100]}}))
        reply = read_frame(s, 1 << 20, "the host")
        assert reply is not None and json.loads(reply)["ok"] is True
    assert host_pid(home) == pid


# --- selectors --------------------------------------------------------------------------------------

def test_a_16000_bracket_selector_is_answered_quickly(home: Path) -> None:
    ok("start", "-q", "-n", "build1", "--", "true")
    # The host bounds a selector's length; up to the bound, the matcher is linear.
    for selector in ["[" * 16_000, "*a" * 8_000, "x" * (MAX_SELECTOR + 1)]:
        began = time.monotonic()
        code, out, err = run("get", selector)
        assert code == 2 and out == "" and f"a job selector is at most {MAX_SELECTOR} characters" in err, err
        assert time.monotonic() - began < 3.0  # was 7 s of host CPU (quadratic) for the first one
    for selector in ["[" * MAX_SELECTOR, "[!" * (MAX_SELECTOR // 2), "a*[" * (MAX_SELECTOR // 3),
                     "*a" * (MAX_SELECTOR // 2), "[" * (MAX_SELECTOR - 1) + "]"]:
        began = time.monotonic()
        code, out, err = run("get", selector)
        assert (code, out) == (0, ""), err
        assert time.monotonic() - began < 3.0
    code, _, err = run("get", "--name", "n" * (MAX_SELECTOR + 1))
    assert code == 2 and "at most" in err
    # The library has no bound, but the same linear matcher.
    with psjobs.Session() as session:
        began = time.monotonic()
        assert session.get_job(name="[" * 16_000) == []
        assert time.monotonic() - began < 3.0


def test_the_linear_wildcard_matcher_keeps_fnmatch_semantics() -> None:
    rng = random.Random(14)
    for _ in range(50_000):
        text = "".join(rng.choice("[]!-*?ab^\\") for _ in range(rng.randint(0, 10)))
        assert _translate(text) == fnmatch.translate(text), text


def test_names_that_look_like_ids_or_wildcards_are_selected_literally_with_name(home: Path) -> None:
    jobs = {name: int(ok("start", "-q", "-n", name, "--", f"echo {name}").strip())
            for name in ["5", "build[1]", "build1", "a*"]}
    assert int(ok("start", "-q", "-n", "five", "--", "true").strip()) > 5  # an id 5 exists besides

    def ids(*args: str) -> list[int]:
        return [r["id"] for r in json.loads(ok("get", "--json", *args))]

    assert ids("5") == [5] != [jobs["5"]]                       # a bare 5 is the id
    assert ids("--name", "5") == [jobs["5"]]                    # --name 5 is the name
    assert ids("build[1]") == [jobs["build[1]"], jobs["build1"]]  # the wildcard, and the name as written
    assert ids("--name", "build[1]") == [jobs["build[1]"]]
    assert ids("--name", "a*") == [jobs["a*"]]
    assert ids("--name", "5", "--name", "a*") == sorted([jobs["5"], jobs["a*"]])
    code, _, err = run("get", "--name", "b*")  # taken literally, so it must exist
    assert code == 3 and "cannot find a job named 'b*'" in err and "psjobs get" in err
    ok("wait", "--name", "build[1]", "--name", "5")
    assert ok("receive", "--name", "build[1]") == "build[1]\n"
    assert json.loads(ok("stop", "--json", "--name", "a*"))[0]["id"] == jobs["a*"]
    assert json.loads(ok("remove", "--json", "--name", "5")) == {"removed": [jobs["5"]]}
    code, _, err = run("receive")
    assert code == 2 and "an id, a name, or --name NAME" in err
    for verb in ("get", "receive", "wait", "stop", "remove"):
        assert "--name NAME" in run(verb, "--help")[1]
    docs = (Path(__file__).resolve().parent.parent / "docs" / "cli.md").read_text()
    assert "--name 'build[1]'" in docs and '{"error": {"type"' in docs


# --- what the command prints ----------------------------------------------------------------------------

def test_control_characters_are_escaped_in_tables_and_messages_but_not_in_output(home: Path) -> None:
    name = "\x1b[31mred\x1b[0m\u202e"
    job = ok("start", "-q", "-n", name, "--", "printf '\\033[1mbold\\n'; exit 3").strip()
    table = ok("get", "--name", name)
    assert "\x1b" not in table and "\u202e" not in table
    assert "\\x1b[31mred\\x1b[0m\\u202e" in table
    code, out, err = run("wait", job)
    assert code == 5 and "\x1b" not in out + err
    code, out, err = run("receive", job)
    assert code == 5 and "\x1b" not in err and "\\x1b[31mred" in err
    assert out == "\x1b[1mbold\n"  # the job's own output is passed on as it is
    code, _, err = run("stop", "\x1b[2J*")
    assert code == 0 and "\x1b" not in err


def test_json_errors_are_json_objects_on_stdout(home: Path) -> None:
    code, out, err = run("get", "--json", "nobody-has-this-name")
    assert code == 3 and err == ""
    error = json.loads(out)["error"]
    assert error["type"] == "JobNotFoundError" and error["exit_code"] == 3
    assert "cannot find a job named 'nobody-has-this-name'" in error["message"]
    for args in (["get", "--json", "--newest", "many"], ["wait", "--json"], ["receive", "--json", "--bogus"]):
        code, out, err = run(*args)
        assert code == 2, args
        assert json.loads(out)["error"]["type"] == "UsageError" and json.loads(out)["error"]["exit_code"] == 2
    code, out, err = run("wait", "--json", "--timeout", "0", str(int(ok("start", "-q", "--", "sleep 30"))))
    assert code == 6 and json.loads(out)["error"]["type"] == "WaitTimeoutError"
    # Without --json, the messages stay as they were.
    code, out, err = run("get", "--newest", "many")
    assert code == 2 and out == "" and "usage: psjobs get" in err and "psjobs get: error: argument --newest" in err
