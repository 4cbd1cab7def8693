"""invoke_command: one RemoteJob, one child job per computer, run over SSH.

::

    Session.invoke_command(target, computer_name=[a, b, c], throttle_limit=N)
        SSHBackend.prepare: checks (TypeError/ValueError, no job yet), a callable is pickled now
        SSHBackend.plan: one leaf per computer --> the Session makes the parent RemoteJob (Running,
            location "a, b, c"), children a, b, c (NotStarted) and their ports
        SSHBackend.start(ports): at most N children of this call run at once, in the given order
    SSHBackend (this module, no asyncssh import) --> psjobs.backends.ssh._engine.Engine (asyncssh, one loop thread):
        one connection per computer for the whole session, one channel per child job
        records --> port.records(...) with .computer_name; the end --> port.ended(outcome, tail)

``import psjobs`` stays light: asyncssh is imported only when the first remote job starts.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shlex
import threading
import unicodedata
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ..._errors import missing_dependency
from ...core import CALL, Backend, JobPort, Place, Plan, Session

if TYPE_CHECKING:
    from ...core import JobSpec
    from ._engine import Engine

DEFAULT_THROTTLE = 32  # PowerShell's Invoke-Command default; 0 means this too
ACCEPT_NEW_ENV = "PSJOBS_SSH_ACCEPT_NEW_HOST_KEYS"


# --- options ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SSHOptions:
    """How a session reaches computers over SSH (see ``configure_ssh``).

    ``None`` means "as OpenSSH would": ``~/.ssh/config``, the keys it names, the agent,
    ``~/.ssh/known_hosts``. Secrets (``password``, ``passphrase``) never appear in a repr.
    """

    config: tuple[str, ...] | None = None
    known_hosts: tuple[str, ...] | None = None
    client_keys: tuple[str, ...] | None = None
    username: str | None = None
    port: int | None = None
    accept_new_host_keys: bool | None = None
    python: str = "python3"
    connect_timeout: float | None = None  # None: the config's ConnectTimeout, else 15 s
    password: str | None = dataclasses.field(default=None, repr=False, compare=False)
    passphrase: str | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def accepts_new_host_keys(self) -> bool:
        """The option, else the environment variable PSJOBS_SSH_ACCEPT_NEW_HOST_KEYS=1."""
        if self.accept_new_host_keys is not None:
            return self.accept_new_host_keys
        return os.environ.get(ACCEPT_NEW_ENV, "").strip().lower() in ("1", "yes", "true", "on")


_options: weakref.WeakKeyDictionary[Session, SSHOptions] = weakref.WeakKeyDictionary()
_UNSET: Any = object()


def ssh_options(session: Session) -> SSHOptions:
    """The SSH options of ``session`` (the defaults until configure_ssh changes them)."""
    return _options.get(session) or SSHOptions()


def configure_ssh(session: Session | None = None, *, config: Any = _UNSET, known_hosts: Any = _UNSET,
                  client_keys: Any = _UNSET, username: Any = _UNSET, port: Any = _UNSET,
                  accept_new_host_keys: Any = _UNSET, python: Any = _UNSET, connect_timeout: Any = _UNSET,
                  password: Any = _UNSET, passphrase: Any = _UNSET) -> SSHOptions:
    """Set how ``session`` (default: the default session) reaches computers; return the options.

    Only the options given change. They apply to connections made from then on (a session keeps
    one connection per computer). ``config``, ``known_hosts``, ``client_keys``: a path or a list
    of paths (``config=[]``: no OpenSSH config file at all). ``accept_new_host_keys=True``
    accepts, and records in the known_hosts file, the key of a computer that has no entry yet
    (OpenSSH's ``StrictHostKeyChecking accept-new``) unless the config is stricter for that computer;
    a key that differs from its entry is refused. ``connect_timeout``: seconds, finite and > 0 (``None``: the
    config's ``ConnectTimeout``, else 15). ``python``: the remote interpreter for callables, a command line such as
    ``"/opt/py/bin/python3 -S"``. Example::

        psjobs.configure_ssh(known_hosts="~/.ssh/known_hosts", accept_new_host_keys=True)
    """
    if not isinstance(session, Session):
        raise TypeError(f"configure_ssh: session must be a psjobs.Session, not {type(session).__name__}")
    changes: dict[str, Any] = {}
    if config is not _UNSET:
        changes["config"] = _paths("config", config)
    if known_hosts is not _UNSET:
        changes["known_hosts"] = _paths("known_hosts", known_hosts)
    if client_keys is not _UNSET:
        changes["client_keys"] = _paths("client_keys", client_keys)
    for key, value in (("username", username), ("password", password), ("passphrase", passphrase)):
        if value is not _UNSET:
            if value is not None and (not isinstance(value, str) or not value):
                raise TypeError(f"configure_ssh: {key} must be a non-empty str or None")
            changes[key] = value
    if port is not _UNSET:
        if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536):
            raise ValueError(f"configure_ssh: port must be a port number from 1 to 65535, not {port!r}")
        changes["port"] = port
    if accept_new_host_keys is not _UNSET:
        if accept_new_host_keys is not None and not isinstance(accept_new_host_keys, bool):
            raise TypeError("configure_ssh: accept_new_host_keys must be True, False or None")
        changes["accept_new_host_keys"] = accept_new_host_keys
    if python is not _UNSET:
        if not isinstance(python, str) or not python.strip():
            raise TypeError("configure_ssh: python must name the remote interpreter, e.g. 'python3'")
        try:
            shlex.split(python)
        except ValueError as exc:
            raise ValueError(f"configure_ssh: python={python!r} is not a command line: {exc}") from None
        changes["python"] = python
    if connect_timeout is not _UNSET:
        # nan passed "<= 0" and every job then failed "did not answer within nans"; inf would make
        # a frozen computer's child wait forever (None already means the config's ConnectTimeout).
        if connect_timeout is not None and (isinstance(connect_timeout, bool)
                                            or not isinstance(connect_timeout, (int, float))
                                            or not math.isfinite(connect_timeout) or connect_timeout <= 0):
            raise ValueError(f"configure_ssh: connect_timeout must be a finite number of seconds > 0 "
                             f"(or None: the config's ConnectTimeout, else 15), not {connect_timeout!r}")
        changes["connect_timeout"] = None if connect_timeout is None else float(connect_timeout)
    options = dataclasses.replace(ssh_options(session), **changes)
    _options[session] = options
    return options


def _paths(what: str, value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    items = [value] if isinstance(value, (str, os.PathLike)) else value
    if not isinstance(items, Iterable):
        raise TypeError(f"configure_ssh: {what} must be a path or a list of paths, "
                        f"not {type(value).__name__}")
    out = []
    for item in items:
        if not isinstance(item, (str, os.PathLike)):
            raise TypeError(f"configure_ssh: {what} must be a path or a list of paths, "
                            f"not a list holding {type(item).__name__}")
        out.append(os.path.expanduser(os.fspath(item)))
    return tuple(str(p) for p in out)


# --- the verb --------------------------------------------------------------------------------

# user@host, host:port, [v6]:port; an alias from ~/.ssh/config. No spaces, no leading '-', and no
# "user:password@": a secret in a computer name would show in every record and message. The port
# is ASCII digits ([0-9], not \d: ssh -p reads no other digits), its range checked apart.
_COMPUTER = re.compile(r"^(?:[^@\s:]+@)?(?:\[[0-9A-Fa-f:.%\w]+\]|[^@\s:\[\]]+)(?::(?P<port>[0-9]{1,5}))?$")


def check_computers(value: Any) -> list[str]:
    """The computer names of a call, checked (a str or an iterable of str, in order)."""
    if value is None:
        raise ValueError("invoke_command: computer_name is required; give the computers to run on, "
                         "e.g. computer_name=['web1', 'admin@web2:2222']")
    if isinstance(value, bytes) or not isinstance(value, (str, Iterable)):
        raise TypeError(f"invoke_command: computer_name must be a str or a list of str, "
                        f"not {type(value).__name__}")
    names = [value] if isinstance(value, str) else list(value)
    if not names:
        raise ValueError("invoke_command: computer_name is empty; give at least one computer")
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"invoke_command: computer names must be str, "
                            f"not {type(name).__name__} ({name!r})")
        if any(unicodedata.category(c) == "Cc" for c in name):
            # A NUL reached the child before (ssh -G: "embedded null byte"); a newline would split
            # a config line or a record: a control character names no computer.
            raise ValueError(f"invoke_command: {name!r} holds a control character; a computer name is "
                             f"printable text: host, user@host or host:port")
        match = _COMPUTER.match(name)
        if not name or name.startswith("-") or match is None:
            raise ValueError(f"invoke_command: {name!r} is not a computer name; use host, user@host or "
                             f"host:port (an alias of ~/.ssh/config works too)")
        port = match.group("port")
        if port is not None and not 0 < int(port) < 65536:
            raise ValueError(f"invoke_command: {name!r} names port {int(port)}, which does not exist; a port "
                             f"is a number from 1 to 65535 (or leave it out: the config's Port, else 22)")
    return names


def check_throttle(value: Any) -> int:
    """invoke_command's throttle_limit: how many children of one call run at once (0: the default)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"invoke_command: throttle_limit must be a whole number >= 0 (0 means "
                         f"{DEFAULT_THROTTLE}), not {value!r}")
    return value or DEFAULT_THROTTLE


# --- the backend seam --------------------------------------------------------------------------

class SSHBackend(Backend):
    """The session's door to the SSH engine (which is where asyncssh is imported, on first use)."""

    can_pause = True       # through the remote watchdog
    can_send_input = True  # an ANSWER frame to the remote worker
    # The remote watchdog kills at the end of the grace period; what outlasts that is the far side.
    stuck_stop = ("the remote computer has not confirmed that its processes ended (a stalled connection, or a "
                  "process it cannot kill there); it ends Stopped when it does, or Failed once the connection "
                  "is found dead (keepalive)")

    def __init__(self, session: Session) -> None:
        super().__init__(session)
        self._engine: Engine | None = None
        self._engine_lock = threading.Lock()

    @property
    def engine(self) -> Engine:
        with self._engine_lock:
            if self._engine is not None:
                return self._engine
            try:
                from ._engine import Engine
            except ModuleNotFoundError as exc:
                if exc.name != "asyncssh":
                    raise
                raise missing_dependency("invoke_command (jobs on remote computers over SSH)", "ssh",
                                         exc) from exc
            self._engine = Engine(self.session)
            return self._engine

    def prepare(self, spec: JobSpec) -> None:
        options = spec.options
        options["computers"] = check_computers(options.get("computer_name"))
        options["limit"] = check_throttle(options.get("throttle_limit", DEFAULT_THROTTLE))
        engine = self.engine  # asyncssh is imported here: after the checks, before any job exists
        if spec.kind == CALL:
            engine.pickle_call(spec)

    def plan(self, spec: JobSpec) -> Plan:
        computers: list[str] = spec.options["computers"]
        return Plan([Place(c, c) for c in computers], ", ".join(computers))

    def start(self, ports: list[JobPort], spec: JobSpec) -> None:
        """Start the children of one call, at most ``limit`` at once, in order."""
        self.engine.start(ports, spec, spec.options.get("limit", DEFAULT_THROTTLE))

    def stop(self, port: JobPort, grace: float) -> None:
        self.engine.stop(port, grace)

    def forget(self, port: JobPort) -> None:
        self.engine.forget(port)

    def send_input(self, port: JobPort, text: str) -> None:
        self.engine.send_input(port, text)

    def suspend(self, port: JobPort) -> None:
        self.engine.suspend(port)

    def resume(self, port: JobPort) -> None:
        self.engine.resume(port)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
