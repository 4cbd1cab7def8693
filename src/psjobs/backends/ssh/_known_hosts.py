"""Host keys judged as OpenSSH 9.2's ``check_host_key`` (sshconnect.c) judges them.

::

    known_hosts files (user's, then the system's) --load()--> [Entry(marker, patterns, key, file, line)]
    HostKeyCheck(resolved config, psjobs' accept-new) .judge(offered key, peer address)
        --> Verdict(accept, status, name, lines to record)
    Pool (_conn.py) refuses the connection on accept=False, and appends Verdict.lines to the first
        user file after the login succeeded (record())

asyncssh's own matcher differs from OpenSSH where it matters (it trusts an entry written for the
peer's address when the name has none, with or without HostKeyAlias; it reads no system file), so
psjobs hands asyncssh an empty trust list and decides here, with asyncssh's key classes only.
What OpenSSH does and this module mirrors:

* the name looked up is ``HostKeyAlias`` if set (without a port), else the resolved host name,
  as ``[host]:port`` off port 22; a new name off port 22 is also tried without the port;
* the address (``CheckHostIP``) is checked only when asked, and never for loopback, a proxy
  command, or a name that is the address itself;
* ``@revoked`` wins over everything; ``@cert-authority`` lines vouch for certificates only;
* ``StrictHostKeyChecking``: ``yes`` and ``ask`` (no terminal: no) refuse new keys, ``accept-new``
  records them, ``no`` records them and also connects through a changed or revoked key (with
  password login disabled, as OpenSSH does); nothing is recorded without a user file.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import fnmatch
import hashlib
import hmac
import ipaddress
import os
from collections.abc import Iterable, Sequence

import asyncssh
from asyncssh.public_key import (
    get_certificate_algs,
    get_default_certificate_algs,
    get_default_public_key_algs,
    get_public_key_algs,
)

OK, NEW, CHANGED, REVOKED = "ok", "new", "changed", "revoked"
# StrictHostKeyChecking, as ``ssh -G`` prints it ("true"/"false" for yes/no)
STRICT = {"yes": "yes", "true": "yes", "ask": "ask", "accept-new": "accept-new", "no": "no",
          "false": "no", "off": "no"}
_BAD_NAME = set("@?*#[]|'\"\\")  # OpenSSH never records a name holding one of these


@dataclasses.dataclass(frozen=True)
class Entry:
    marker: str  # "", "revoked" or "cert-authority"
    patterns: str
    key: asyncssh.SSHKey
    file: str
    line: int

    def matches(self, name: str) -> bool:
        """OpenSSH's match_hostname: a hashed name, or patterns with * ? and !negation."""
        name = name.lower()
        if self.patterns.startswith("|1|"):
            try:
                _, _, salt, digest = self.patterns.split("|", 3)
                mac = hmac.new(base64.b64decode(salt), name.encode(), hashlib.sha1).digest()
                return hmac.compare_digest(mac, base64.b64decode(digest))
            except (ValueError, TypeError):
                return False
        found = False
        for pattern in self.patterns.lower().split(","):
            negated = pattern.startswith("!")
            # OpenSSH's wildcards are * and ? only; [ is literal (it brackets a port)
            escaped = pattern.lstrip("!").replace("[", "[[]")
            if fnmatch.fnmatchcase(name, escaped):
                if negated:
                    return False
                found = True
        return found


def load(files: Iterable[str]) -> list[Entry]:
    """Every usable line of ``files``; a missing or unreadable file and a bad line are skipped, as
    OpenSSH skips them."""
    entries: list[Entry] = []
    for path in files:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        for number, raw in enumerate(lines, 1):
            fields = raw.split()
            if not fields or fields[0].startswith("#"):
                continue
            marker = ""
            if fields[0].startswith("@"):
                marker = fields.pop(0)[1:]
                if marker not in ("revoked", "cert-authority"):
                    continue
            if len(fields) < 3:
                continue
            try:
                key = asyncssh.import_public_key(f"{fields[1]} {fields[2]}")
            except (asyncssh.KeyImportError, ValueError):
                continue
            entries.append(Entry(marker, fields[0], key, path, number))
    return entries


def host_port(host: str, port: int) -> str:
    """OpenSSH's put_host_port: ``host`` on port 22 (or 0), else ``[host]:port``."""
    return host if port in (0, 22) else f"[{host}]:{port}"


def status(entries: Sequence[Entry], name: str, key: asyncssh.SSHKey, *, ca: bool = False) -> str:
    """OpenSSH's check_key_in_hostkeys for one name: ok, new, changed or revoked."""
    mine = [e for e in entries if e.matches(name)]
    result = NEW
    want = "cert-authority" if ca else ""
    for e in mine:
        if e.marker != want:
            continue
        if e.key == key:
            result = OK
            break
        result = CHANGED
    if any(e.marker == "revoked" and e.key == key for e in mine):
        result = REVOKED
    return result


def _is_loopback(addr: str | None) -> bool:
    if not addr:
        return False
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(addr.split("%")[0]).is_loopback
    return False


@dataclasses.dataclass(frozen=True)
class Verdict:
    accept: bool
    status: str          # ok, new, changed, revoked; "ip-changed" when only the address's key differs
    name: str            # the name looked up in known_hosts (alias or [host]:port)
    lines: tuple[str, ...] = ()   # to append to the first user file once the login succeeds
    unsafe: bool = False  # accepted through a changed or revoked key (StrictHostKeyChecking no)


@dataclasses.dataclass(frozen=True)
class HostKeyCheck:
    """What OpenSSH's check_host_key needs from the resolved config."""

    hostname: str
    port: int
    user_files: tuple[str, ...]
    system_files: tuple[str, ...]
    strict: str = "ask"           # yes, ask, accept-new, no
    check_host_ip: bool = False
    hash_known_hosts: bool = False
    alias: str | None = None
    proxied: bool = False         # ProxyCommand: there is no peer address to check

    @property
    def lookup_name(self) -> str:
        return self.alias if self.alias else host_port(self.hostname, self.port)

    def algorithms(self, wanted: Sequence[str]) -> list[str]:
        """The host key algorithms to offer, as OpenSSH orders them (order_hostkeyalgs): certificates
        only when a @cert-authority line covers the name (OpenSSH falls back from an untrusted
        certificate to its plain key; asyncssh cannot, so it must not be offered one), and the
        key types already recorded for the name first (a new type would read as a changed key)."""
        if not wanted:
            wanted = [a.decode() for a in get_default_certificate_algs() + get_default_public_key_algs()]
        supported = {a.decode() for a in get_public_key_algs() + get_certificate_algs()}
        entries = [e for e in load(self.user_files + self.system_files) if e.matches(self.lookup_name)]
        with_ca = any(e.marker == "cert-authority" for e in entries)
        known = {_key_type(e.key.algorithm.decode()) for e in entries if not e.marker}
        algs = [a for a in wanted if a in supported and (with_ca or "-cert-" not in a)]
        return sorted(algs, key=lambda a: _key_type(a) not in known)

    def revoked(self) -> asyncssh.SSHKnownHosts:
        """What asyncssh is told: only the @revoked keys (it checks a certificate's own key against
        them, which the CA callback never shows); every other decision is judge()'s."""
        entries = load(self.user_files + self.system_files)
        lines = [f"@revoked * {' '.join(e.key.export_public_key().decode().split()[:2])}\n"
                 for e in entries if e.marker == "revoked" and e.matches(self.lookup_name)]
        return asyncssh.import_known_hosts("".join(lines))

    def judge(self, key: asyncssh.SSHKey, addr: str | None, *, ca: bool = False) -> Verdict:
        entries = load(self.user_files + self.system_files)
        return self._judge(entries, key, addr, self.port, clobber=False, ca=ca)

    def _judge(self, entries: list[Entry], key: asyncssh.SSHKey, addr: str | None, port: int, *,
               clobber: bool, ca: bool) -> Verdict:
        used_port = 0 if clobber else port
        host = self.alias if self.alias else host_port(self.hostname, used_port)
        ip = host_port(addr, used_port) if addr and not self.proxied else None
        check_ip = (self.check_host_ip and ip is not None and not _is_loopback(addr)
                    and self.hostname != ip)
        readonly = not self.user_files or bool(_BAD_NAME & set(self.hostname))
        host_status = status(entries, host, key, ca=ca)
        ip_status = status(entries, ip, key) if check_ip and ip and not ca else host_status
        lines: list[str] = []
        unsafe = False
        if host_status == OK:
            if check_ip and ip and ip_status == NEW and not readonly and not ca:
                lines.append(self._line(ip, key))  # OpenSSH adds the address quietly, in any mode
        elif host_status == NEW:
            if not self.alias and port not in (0, 22) and not clobber:
                bare = self._judge(entries, key, addr, port, clobber=True, ca=ca)
                if bare.accept and bare.status == OK:
                    return dataclasses.replace(bare, name=host)
            if readonly or ca or self.strict in ("yes", "ask"):
                return Verdict(False, NEW, host)
            if check_ip and ip_status == NEW and ip:
                if self.hash_known_hosts:
                    lines += [self._line(host, key), self._line(ip, key)]
                else:
                    lines.append(self._line(f"{host},{ip}", key))
            else:
                lines.append(self._line(host, key))
        else:  # changed or revoked: only StrictHostKeyChecking no goes on, and never quietly
            if ca or clobber or self.strict != "no":
                return Verdict(False, host_status, host)
            unsafe = True
        if check_ip and host_status != CHANGED and ip_status == CHANGED and self.strict != "no":
            return Verdict(False, "ip-changed", host)
        return Verdict(True, host_status, host, tuple(lines), unsafe)

    def _line(self, name: str, key: asyncssh.SSHKey) -> str:
        if self.hash_known_hosts:
            salt = os.urandom(20)
            digest = hmac.new(salt, name.lower().encode(), hashlib.sha1).digest()
            name = f"|1|{base64.b64encode(salt).decode()}|{base64.b64encode(digest).decode()}"
        algorithm, blob = key.export_public_key().decode().split()[:2]  # no comment recorded
        return f"{name} {algorithm} {blob}"


def _key_type(algorithm: str) -> str:
    """The key type of a host key algorithm: rsa-sha2-512-cert-v01@openssh.com -> ssh-rsa."""
    algorithm = algorithm.replace("-cert-v01@openssh.com", "")
    return "ssh-rsa" if algorithm.startswith("rsa-sha2-") else algorithm


def record(path: str, lines: Sequence[str]) -> None:
    """Append ``lines`` to the known_hosts file ``path`` (its directory made 0700 if missing)."""
    if not lines:
        return
    directory = os.path.dirname(path)
    if directory and not os.path.isdir(directory):
        os.makedirs(directory, mode=0o700, exist_ok=True)
    with open(path, "a+b") as f:
        lead = b""
        end = f.seek(0, os.SEEK_END)
        if end:
            f.seek(end - 1)
            lead = b"" if f.read(1) == b"\n" else b"\n"  # a hand-edited last line may lack one
        f.write(lead + "".join(line + "\n" for line in lines).encode())
