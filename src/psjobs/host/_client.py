"""The command's side of the session host: where it lives, the frames, and the client.

::

    psjobs command --Client.stream(verb, args)--> connect host.sock (start the host if none answers)
                   <--response frames------------ (parts with more=true, then the last one)

    frames and messages: see _protocol (shared with the server)

Kept apart from the host itself (``_server``) so a command imports neither SQLite nor the server.
Before it sends anything, the client checks that the state directory is a real directory of its
own (never a symbolic link, never another user's) and that the process serving the socket runs as
its own uid (SO_PEERCRED): a request carries the whole environment and command line.
"""

from __future__ import annotations

import _socket  # the C module: socket.py builds its enums at import, ~5% of a whole `psjobs get`
import fcntl
import json
import os
import stat
import struct
import sys
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

from .._errors import HostError, HostReplyError, ProtocolError, RequestError
from . import _protocol
from ._protocol import HEADER, MAGIC, MAX_REQUEST, MAX_RESPONSE, REQUESTS, VERSION, Request, pack

__all__ = ["HEADER", "MAGIC", "MAX_REQUEST", "VERSION", "Client", "HostError", "HostReplyError", "Paths",
           "RequestError", "answers", "current_umask", "expand_home", "host_free", "pack", "read_frame", "state_dir"]
_SOCKET_MAX = 107            # sun_path holds 108 bytes with the NUL
# The host runs isolated (`python -I`: no PYTHON* variables, no user site, neither the current
# directory nor the script's on sys.path) from "/", so a `selectors.py` where the user stands is
# never imported into it. What must stay importable is appended, after the standard library: the
# directory psjobs comes from (a checkout) and the absolute PYTHONPATH entries (backends installed there).
# psjobs itself is loaded from the directory this command's psjobs comes from: on sys.path, another
# psjobs (an editable install's .pth in site-packages, before the appended entries) would win, and
# the command would talk to a host of other code than its own.
_ROOT = str(Path(__file__).resolve().parents[2])
_PKG = os.path.join(_ROOT, "psjobs")
_BOOT = (f"import os, sys; sys.path += [p for p in [{_ROOT!r}, *os.environ.get('PYTHONPATH', '').split(os.pathsep)] "
         "if os.path.isabs(p) and p not in sys.path]; "
         "import importlib.util as u; "
         f"s = u.spec_from_file_location('psjobs', {os.path.join(_PKG, '__init__.py')!r}, "
         f"submodule_search_locations=[{_PKG!r}]); "
         "m = sys.modules['psjobs'] = u.module_from_spec(s); s.loader.exec_module(m); "
         "from psjobs.host._server import host_main; sys.exit(host_main(sys.argv[1:]))")


# --- where things are --------------------------------------------------------------------------

def state_dir() -> Path:
    """$PSJOBS_HOME, else $XDG_STATE_HOME/psjobs, else ~/.local/state/psjobs."""
    home = os.environ.get("PSJOBS_HOME")
    if home:
        return expand_home(home, "PSJOBS_HOME is", "set PSJOBS_HOME to a directory of your own, as an absolute path")
    xdg = os.environ.get("XDG_STATE_HOME")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "psjobs"
    return expand_home("~/.local/state/psjobs", "the state directory is by default",
                       "set PSJOBS_HOME (or XDG_STATE_HOME) to a directory of your own, as an absolute path")


def expand_home(text: str, what: str, fix: str) -> Path:
    """``text`` with ``~`` or ``~user`` expanded, made absolute. A ``~`` that names nobody raises
    HostError saying ``what`` ``text`` is and the ``fix`` (pathlib's RuntimeError reached the user
    as a traceback, even under --json)."""
    try:
        return Path(text).expanduser().absolute()
    except RuntimeError:
        tilde = text.split("/", 1)[0]
        why = (f"there is no user {tilde[1:]!r}" if len(tilde) > 1
               else f"HOME is not set and uid {os.getuid()} has no home directory in the user database")
        raise HostError(f"{what} {text!r}, and psjobs cannot tell what {tilde!r} stands for: {why}; {fix}") from None


def current_umask() -> int:
    """This process's umask, which a start sends so the job gets it. Read from /proc, not with
    os.umask's set-and-put-back: for that moment a file another thread creates would get mode 0."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)  # no /proc (or a kernel before 4.7): the dance, with a strict mask meanwhile
    os.umask(mask)
    return mask


class Paths:
    def __init__(self, home: Path | None = None) -> None:
        self.home = home or state_dir()
        self.socket = self.home / "host.sock"
        self.database = self.home / "jobs.db"
        self.lock = self.home / "host.lock"
        self.log = self.home / "host.log"

    def prepare(self) -> None:
        """Make the directory (0700), refuse one that is not safely ours (see ``check``), and check
        that the socket path fits."""
        if not self.check():
            self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.check()
        if len(os.fsencode(self.socket)) > _SOCKET_MAX:
            raise HostError(f"the socket path {self.socket} is longer than a unix socket allows "
                            f"({_SOCKET_MAX} bytes); set PSJOBS_HOME to a shorter directory")

    def check(self) -> bool:
        """False when the directory does not exist yet. Refuses (HostError) a symbolic link, a
        non-directory and another user's directory: whoever controls those could put a socket of
        theirs where the host's should be. Makes a directory of ours private (0700) if it is not."""
        try:
            # O_NOFOLLOW: the mode is changed on the directory that was checked, never on a link's target.
            fd = os.open(self.home, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        except OSError as exc:
            if os.path.islink(self.home):
                raise HostError(f"the psjobs state directory {self.home} is a symbolic link (to "
                                f"{os.readlink(self.home)}), which psjobs does not follow: set PSJOBS_HOME "
                                f"to a real directory of your own") from None
            raise HostError(f"the psjobs state directory {self.home} cannot be used ({exc.strerror}); set "
                            f"PSJOBS_HOME to a directory of your own") from None
        try:
            st = os.fstat(fd)
            if st.st_uid != os.getuid():
                raise HostError(f"the psjobs state directory {self.home} belongs to uid {st.st_uid}, not to "
                                f"you (uid {os.getuid()}); set PSJOBS_HOME to a directory of your own")
            if st.st_mode & 0o077:
                os.fchmod(fd, 0o700)
        finally:
            os.close(fd)
        return True


def open_private(path: Path | str, flags: int) -> int:
    """Open (made 0600 if new) a file of the state directory for the host: never through a symbolic
    link, and only a regular file of this user's. One planted there (while the directory was open to
    others, or by another program) would have the host truncate or append to its target: host.lock
    gets the host's pid, host.log its messages, jobs.db every job's output."""
    try:
        # O_NONBLOCK: a planted FIFO fails (ENXIO) instead of holding the host's start forever.
        fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        check_private(path)  # a symbolic link (ELOOP), a directory, another user's: said so
        raise HostError(f"the psjobs file {path} cannot be opened ({exc.strerror}); remove it or make it "
                        f"yours and writable, then run the command again") from None
    try:
        _refuse_foreign(path, os.fstat(fd))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_private(path: Path | str) -> None:
    """Refuse (HostError) a file of the state directory that is not a regular file of this user's,
    for the files the host does not open itself (SQLite's jobs.db-wal and jobs.db-shm); a missing
    one is fine."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    _refuse_foreign(path, st)


def _refuse_foreign(path: Path | str, st: os.stat_result) -> None:
    if stat.S_ISLNK(st.st_mode):
        what = f"is a symbolic link (to {os.readlink(path)}), which psjobs does not follow"
    elif not stat.S_ISREG(st.st_mode):
        what = "is not a regular file"
    elif st.st_uid != os.getuid():
        what = f"belongs to uid {st.st_uid}, not to you (uid {os.getuid()})"
    else:
        return
    raise HostError(f"the psjobs file {path} {what}, so the psjobs host does not use it; psjobs never "
                    f"makes such a file: find out who put it there, move it away (`mv {path} {path}.suspect`) "
                    f"and run the command again")


class _Socket(_socket.socket):
    """A socket of the C module that a ``with`` block closes (all the command used of socket.py)."""

    def __enter__(self) -> _Socket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def unix_socket() -> _Socket:
    return _Socket(_socket.AF_UNIX, _socket.SOCK_STREAM)


def peer_uid(sock: _socket.socket) -> int:
    """The uid of the process at the other end of a connected unix socket (SO_PEERCRED)."""
    return int(struct.unpack("3i", sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12))[1])


# --- frames ----------------------------------------------------------------------------------------

def read_frame(sock: _socket.socket, cap: int, who: str) -> bytes | None:
    """One frame's body (see _protocol); a broken frame raises RequestError."""
    try:
        return _protocol.read_frame(sock, cap, who)
    except ProtocolError as exc:
        raise RequestError(str(exc)) from None


def answers(paths: Paths) -> bool:
    with unix_socket() as s:
        try:
            s.connect(str(paths.socket))
            return True
        except OSError:
            return False


def host_free(paths: Paths) -> bool:
    """True when no host holds the lock (none runs, or the last one has ended)."""
    try:
        fd = os.open(paths.lock, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


# --- the client ------------------------------------------------------------------------------------

class Client:
    """The command's side: connect (starting the host on first use), send a request, read replies."""

    def __init__(self, paths: Paths | None = None, words: Callable[[str, str], str] | None = None) -> None:
        self.paths = paths or Paths()
        self.words = words  # (verb, warning) -> the warning as this face says it; None: as it came

    def connect(self, start: bool = True) -> _Socket:
        sock = self._try_connect()
        if sock is not None:
            return sock
        if not start:
            raise HostError(f"no psjobs host runs for {self.paths.home}")
        self.start_host()
        deadline = time.monotonic() + 15.0
        while True:
            sock = self._try_connect()
            if sock is not None:
                return sock
            if time.monotonic() > deadline:
                raise HostError(f"the psjobs host for {self.paths.home} started but does not answer on "
                                f"{self.paths.socket}; see {self.paths.log}")
            time.sleep(0.02)  # another host holds the lock and is about to listen

    def _try_connect(self) -> _Socket | None:
        if not self.paths.check():
            return None
        sock = unix_socket()
        try:
            sock.connect(str(self.paths.socket))
            uid = peer_uid(sock)
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            return None
        except OSError as exc:
            sock.close()
            raise HostError(f"cannot reach the psjobs host on {self.paths.socket}: {exc}") from exc
        if uid != os.getuid():  # checked before anything (the environment, the command) is sent
            sock.close()
            raise HostError(f"the socket {self.paths.socket} is served by uid {uid}, not by you (uid "
                            f"{os.getuid()}), so psjobs sent it nothing; find out who put it there, remove "
                            f"it, and run the command again (or set PSJOBS_HOME to another directory)")
        return sock

    def start_host(self) -> None:
        """Start a host in the background and return once it listens (or another one does)."""
        import subprocess

        self.paths.prepare()
        done = subprocess.run([sys.executable, "-I", "-c", _BOOT, "--home", str(self.paths.home), "--daemon"],
                              cwd="/", stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              timeout=60)
        if done.returncode != 0:
            raise HostError(done.stderr.decode(errors="replace").strip()
                            or f"the psjobs host could not start; see {self.paths.log}")

    def stream(self, verb: str | Request, start: bool = True,
               **args: Any) -> Generator[dict[str, Any], int | None, None]:
        """Send one request (typed, or a verb and its arguments); yield each response (parts first,
        the final one last). For a receive with ``ack``, ``send(n)`` answers each part: n of its
        records were delivered."""
        request = verb if isinstance(verb, Request) else REQUESTS[verb](**args)
        verb = request.verb
        frame = pack(request.to_json())
        if len(frame) - HEADER.size > MAX_REQUEST:
            carries = " (it carries this shell's environment: unset large variables)" if verb == "start" else ""
            raise RequestError(f"the `{verb}` request is {len(frame) - HEADER.size} bytes, over the host's "
                               f"{MAX_REQUEST}-byte limit{carries}; nothing was sent")
        with self.connect(start) as sock:
            try:
                try:
                    sock.sendall(frame)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the host refused the request before reading it all: its reply says why
                yield from self._responses(sock, verb)
            except ConnectionError as exc:  # also a host that died while it had us in its backlog
                raise HostError(f"the psjobs host closed the connection during `{verb}` (it stopped or "
                                f"crashed; see {self.paths.log}); run the command again") from exc

    def _responses(self, sock: _socket.socket, verb: str) -> Generator[dict[str, Any], int | None, None]:
        while True:
            body = read_frame(sock, MAX_RESPONSE, "the host")
            if body is None:
                raise ConnectionResetError("end of stream before the last response")
            response = json.loads(body)
            for text in response.get("warnings") or ():
                print(f"WARNING: {text if self.words is None else self.words(verb, text)}", file=sys.stderr)
            if not response.get("ok"):
                err = response.get("error") or {}
                raise HostReplyError(str(err.get("message", "the host refused the request")),
                                     str(err.get("type", "HostError")), int(err.get("exit_code", 1)))
            delivered = yield response
            if delivered is not None:  # an acknowledged receive: send() tells what was delivered
                sock.sendall(pack(_protocol.ack_frame(delivered)))
            if not response.get("more"):
                return

    def call(self, verb: str | Request, start: bool = True, **args: Any) -> Any:
        result = None
        for response in self.stream(verb, start, **args):
            result = response.get("result")
        return result
