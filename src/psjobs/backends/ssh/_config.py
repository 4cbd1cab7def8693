"""What a computer name means, as OpenSSH's own ``ssh -G`` resolves it.

::

    resolve("admin@web1:2222", options)
        ssh -G [-F config] [-l admin] [-p 2222] -- web1     (OpenSSH reads its config: Host and Match
            blocks, Match exec with %h, Include, the system ssh_config when no -F is given)
        --> Resolved(hostname, port, user, identity files, known_hosts files, StrictHostKeyChecking,
                     CheckHostIP, HashKnownHosts, HostKeyAlias, ConnectTimeout, ProxyCommand, ...)
        tokens (%h %p %r %n %d %u %l %L %i %C %%) and ~ expanded where OpenSSH expands them
    without an ``ssh`` command: asyncssh's reader (which knows fewer options: see docs/remote.md)

Asking OpenSSH itself is the one way to read a config exactly as ``ssh`` does (Match exec, token
expansion, option defaults of the installed version); it costs one short process (~6 ms measured
with ``time ssh -G x``) per new connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
import pwd
import re
import shutil
import socket
import tempfile
from typing import TYPE_CHECKING, Any

import asyncssh

from ._known_hosts import STRICT

if TYPE_CHECKING:
    from ._backend import SSHOptions

_RESOLVE_TIMEOUT = 30.0  # seconds for ssh -G: a Match exec may run a slow command, never forever


@dataclasses.dataclass(frozen=True)
class Resolved:
    """The options of one computer, after the config has spoken."""

    name: str                       # the host part of the computer name, as given
    hostname: str
    port: int
    user: str
    identity_files: tuple[str, ...] = ()
    certificate_files: tuple[str, ...] = ()
    identities_only: bool = False
    identity_agent: str | None = None
    user_known_hosts: tuple[str, ...] = ()
    global_known_hosts: tuple[str, ...] = ()
    strict: str = "ask"
    check_host_ip: bool = False
    hash_known_hosts: bool = False
    host_key_alias: str | None = None
    connect_timeout: float | None = None
    proxy_command: str | None = None
    proxy_jump: str | None = None
    server_alive_interval: int = 0
    server_alive_count: int = 3
    host_key_algorithms: tuple[str, ...] = ()   # empty: asyncssh's defaults
    by: str = "ssh -G"


def home() -> str:
    """What ~ means: $HOME, as everywhere in Python (OpenSSH takes the password database's home,
    the same directory unless HOME was changed, as a test or a sandbox does)."""
    return os.path.expanduser("~")


def _configs(options: SSHOptions) -> tuple[str, ...] | None:
    """The config files to read; None: ssh's own choice (~/.ssh/config, then /etc/ssh/ssh_config)."""
    if options.config is not None:
        return options.config
    try:
        pw_home = pwd.getpwuid(os.getuid()).pw_dir
    except KeyError:
        pw_home = None
    if pw_home is not None and os.path.realpath(pw_home) == os.path.realpath(home()):
        return None
    # HOME points elsewhere: read that home's config, as psjobs always has, then the system's
    return tuple(p for p in (os.path.join(home(), ".ssh", "config"), "/etc/ssh/ssh_config")
                 if os.path.isfile(p))


def expand(value: str, tokens: dict[str, str], *, tilde: bool = True) -> str:
    """OpenSSH's percent_expand (+ tilde_expand_filename): unknown tokens stay as written."""
    if tilde and (value == "~" or value.startswith("~/")):
        value = home() + value[1:]
    return re.sub(r"%(.)", lambda m: tokens.get(m.group(1), m.group(0)), value)


def tokens(r: Resolved) -> dict[str, str]:
    local = socket.gethostname()
    user = pwd.getpwuid(os.getuid()).pw_name if hasattr(os, "getuid") else ""
    return {"%": "%", "h": r.hostname, "p": str(r.port), "r": r.user, "n": r.name, "d": home(),
            "u": user, "i": str(os.getuid()), "l": local, "L": local.split(".")[0],
            "k": r.host_key_alias or r.name,
            "C": hashlib.sha1(f"{local}{r.hostname}{r.port}{r.user}".encode()).hexdigest()}


def proxy_argv(r: Resolved) -> list[str] | None:
    """ProxyCommand as OpenSSH runs it: tokens expanded, then ``$SHELL -c "exec ..."`` (so that
    ``~`` and ``$HOME`` are the shell's to expand)."""
    if not r.proxy_command or r.proxy_command.lower() == "none":
        return None
    command = expand(r.proxy_command, {k: v for k, v in tokens(r).items() if k in "%hnpr"}, tilde=False)
    return [os.environ.get("SHELL") or "/bin/sh", "-c", f"exec {command}"]


def _files(value: str | None) -> tuple[str, ...]:
    if not value:
        return ()
    return tuple(f for f in value.split() if f.lower() != "none")


def _from_ssh_g(name: str, text: str) -> Resolved:
    single: dict[str, str] = {}
    multi: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        single.setdefault(key, value)
        multi.setdefault(key, []).append(value)

    def number(key: str, default: int) -> int:
        try:
            return int(single.get(key, default))
        except ValueError:
            return default

    timeout = single.get("connecttimeout", "none")
    agent = single.get("identityagent")
    base = Resolved(name=name, hostname=single.get("hostname", name), port=number("port", 22),
                    user=single.get("user", ""))
    t = tokens(base)
    return dataclasses.replace(
        base,
        identity_files=tuple(expand(f, t) for f in multi.get("identityfile", [])),
        certificate_files=tuple(expand(f, t) for f in multi.get("certificatefile", [])),
        identities_only=single.get("identitiesonly") in ("yes", "true"),
        identity_agent=None if agent in (None, "none") else expand(agent or "", t),
        user_known_hosts=_files(single.get("userknownhostsfile")),
        global_known_hosts=_files(single.get("globalknownhostsfile")),
        strict=STRICT.get(single.get("stricthostkeychecking", "ask"), "ask"),
        check_host_ip=single.get("checkhostip") in ("yes", "true"),
        hash_known_hosts=single.get("hashknownhosts") in ("yes", "true"),
        host_key_alias=single.get("hostkeyalias"),
        connect_timeout=float(timeout) if timeout.isdigit() and int(timeout) > 0 else None,
        proxy_command=single.get("proxycommand"),
        proxy_jump=single.get("proxyjump"),
        server_alive_interval=number("serveraliveinterval", 0),
        server_alive_count=number("serveralivecountmax", 3),
        host_key_algorithms=tuple(a for a in single.get("hostkeyalgorithms", "").split(",") if a))


async def resolve(name: str, user: str | None, port: int | None, options: SSHOptions) -> Resolved:
    """The options of computer ``name`` (the host part of a computer name) as OpenSSH sees them.

    Raises ValueError when the config is unusable (ssh -G's own message)."""
    ssh = shutil.which("ssh")
    if ssh is None:
        return await _by_asyncssh(name, user, port, options)
    argv = [ssh, "-G"]
    cleanup: str | None = None
    configs = _configs(options)
    if configs is not None:
        if not configs:
            argv += ["-F", os.devnull]
        elif len(configs) == 1:
            argv += ["-F", configs[0]]
        else:  # ssh takes one -F: a file that includes them all, in order
            fd, cleanup = tempfile.mkstemp(prefix="psjobs-ssh-config-")
            with os.fdopen(fd, "w") as f:
                f.write("".join(f'Include "{os.path.abspath(c)}"\n' for c in configs))
            argv += ["-F", cleanup]
    if user is not None:
        argv += ["-l", user]
    if port is not None:
        argv += ["-p", str(port)]
    argv += ["--", name]
    try:
        proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), _RESOLVE_TIMEOUT)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
    finally:
        if cleanup is not None:
            os.unlink(cleanup)
    if proc.returncode != 0:
        lines = [ln for ln in err.decode(errors="replace").splitlines() if "Pseudo-terminal" not in ln]
        raise ValueError(f"ssh -G rejects the config: {'; '.join(lines) or 'exit status ' + str(proc.returncode)}")
    return _from_ssh_g(name, out.decode(errors="replace"))


async def _by_asyncssh(name: str, user: str | None, port: int | None, options: SSHOptions) -> Resolved:
    """Without the ssh command: asyncssh's config reader, OpenSSH's defaults for what it lacks."""
    kwargs: dict[str, Any] = {}
    if options.config is not None:
        kwargs["config"] = list(options.config) or None
    if user is not None:
        kwargs["username"] = user
    if port is not None:
        kwargs["port"] = port
    o = await asyncssh.SSHClientConnectionOptions.construct(None, host=name, **kwargs)
    h = home()
    files = o.config.get("UserKnownHostsFile") or [f"{h}/.ssh/known_hosts", f"{h}/.ssh/known_hosts2"]
    system = o.config.get("GlobalKnownHostsFile") or ["/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2"]
    proxy = o.config.get("ProxyCommand")
    timeout = o.config.get("ConnectTimeout")
    base = Resolved(name=name, hostname=str(o.host), port=int(o.port), user=str(o.username), by="asyncssh")
    t = tokens(base)
    return dataclasses.replace(
        base, user_known_hosts=_files(" ".join(expand(str(f), t) for f in files)),
        global_known_hosts=_files(" ".join(expand(str(f), t) for f in system)),
        identity_files=tuple(expand(str(f), t) for f in o.config.get("IdentityFile", ())),
        certificate_files=tuple(expand(str(f), t) for f in o.config.get("CertificateFile", ())),
        identities_only=bool(o.config.get("IdentitiesOnly")),
        host_key_alias=o.config.get("HostKeyAlias"),
        connect_timeout=float(timeout) if timeout else None,
        proxy_command=proxy if isinstance(proxy, str) else None,
        proxy_jump=o.config.get("ProxyJump"),
        server_alive_interval=int(o.config.get("ServerAliveInterval") or 0),
        server_alive_count=int(o.config.get("ServerAliveCountMax") or 3))
