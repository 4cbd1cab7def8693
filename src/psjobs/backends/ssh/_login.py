"""What a login to a computer uses, and what to tell the user when it fails.

::

    parse_computer("admin@web1:2222") --> ("admin", "web1", 2222)
    load_keys(resolved, options) --> Keys: the key files read (in a worker thread: a passphrase's
        KDF takes a while), as OpenSSH's ssh reads them: a file it cannot read, or that holds no
        key, is skipped with a warning that names it (the child's warning stream); an encrypted key
        without a passphrase is skipped quietly (ssh -o BatchMode=yes); the rest are used
    login_hint(...) --> what to do after a refused login: the skipped files first
    ssh_command(computer, options) --> "ssh -F cfg -p 2222 admin@web1 true": the check a failure
        message suggests, the same computer as psjobs tried, in a form OpenSSH's ssh parses
"""

from __future__ import annotations

import dataclasses
import os
import shlex
from typing import Any

import asyncssh

from ._backend import SSHOptions
from ._config import Resolved, home

# The identity files ssh -G lists when the config names none: ssh passes over a missing one
# without a word, and so does psjobs (a missing file the config or configure_ssh names is news).
_DEFAULT_KEYS = ("id_rsa", "id_ecdsa", "id_ecdsa_sk", "id_ed25519", "id_ed25519_sk", "id_xmss", "id_dsa")


class _AgentOnly(list[Any]):
    """No key file, but the agent still: asyncssh reads an empty client_keys as "its own default
    files" and None as "no agent either"; a true empty list is neither (asyncssh 2.24)."""

    def __bool__(self) -> bool:
        return True


@dataclasses.dataclass
class Keys:
    """The key files of one login, read."""

    pairs: list[Any]                  # asyncssh.SSHKeyPair, in the order the files came
    given: bool                       # from configure_ssh(client_keys=...), not the ssh config
    agent: str                        # the agent's socket ("" for none)
    agent_identities: list[str] | None = None  # IdentitiesOnly: the agent keys that may be offered
    locked: list[str] = dataclasses.field(default_factory=list)   # encrypted, no passphrase
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (file, why)

    def warnings(self, computer: str) -> list[str]:
        where = ("psjobs.configure_ssh(client_keys=...)" if self.given
                 else "IdentityFile in the ssh config")
        fix = ("give the right path with psjobs.configure_ssh(client_keys=[...])" if self.given
               else "correct or remove that IdentityFile line")
        return [f"{computer}: the key file {f} named by {where} was skipped, as ssh skips it: {why}; {fix}"
                for f, why in self.skipped]

    def client_keys(self) -> Any:
        """asyncssh.connect's client_keys."""
        if self.pairs:
            return self.pairs
        if self.agent_identities is not None and not self.agent_identities:
            return None  # IdentitiesOnly and no identity: OpenSSH offers no agent key either
        return _AgentOnly()


def load_keys(r: Resolved, options: SSHOptions) -> Keys:
    """Read the key files of a login to ``r``: those configure_ssh named, else the config's."""
    agent = r.identity_agent or "SSH_AUTH_SOCK"
    if agent == "SSH_AUTH_SOCK" or agent.startswith("$"):
        agent = os.environ.get(agent.lstrip("$"), "")
    given = options.client_keys is not None
    files = options.client_keys if options.client_keys is not None else r.identity_files
    defaults = {os.path.join(home(), ".ssh", name) for name in _DEFAULT_KEYS}
    keys = Keys([], given, agent)
    loaded = []
    for f in files:
        try:
            pairs = asyncssh.load_keypairs(f, options.passphrase)
        except OSError as exc:
            if given or f not in defaults or not isinstance(exc, FileNotFoundError):
                keys.skipped.append((f, exc.strerror or str(exc)))
            continue
        except asyncssh.KeyEncryptionError:
            keys.skipped.append((f, "the passphrase given to configure_ssh does not decrypt it"))
            continue
        except (asyncssh.KeyImportError, ValueError) as exc:
            if options.passphrase is None and str(exc).startswith("Passphrase"):  # asyncssh's only sign
                keys.locked.append(f)  # ssh -o BatchMode=yes skips it quietly; login_hint names it
            elif not _public_key(f):  # a public key names an agent key (IdentitiesOnly): no news
                keys.skipped.append((f, f"it holds no private key ssh can use ({exc})"))
            continue
        keys.pairs += pairs
        loaded.append(f)
    if r.identities_only and not given:  # of the agent's keys, only those named by IdentityFile
        keys.agent_identities = [f + ".pub" if os.path.isfile(f + ".pub") else f for f in files
                                 if os.path.isfile(f + ".pub") or f in loaded or _public_key(f)]
    return keys


def _public_key(path: str) -> bool:
    try:
        asyncssh.read_public_key(path)
    except (OSError, ValueError):
        return False
    return True


def login_hint(computer: str, options: SSHOptions, keys: Keys) -> str:
    """What to do after a refused login: the key files that could not be used first."""
    check = f"({ssh_command(computer, options)})"
    if keys.locked and not keys.agent:
        files = ", ".join(keys.locked)
        return (f"the key {files} is encrypted and was skipped: it needs a passphrase and no ssh-agent "
                f"is running. Load it into an agent (eval $(ssh-agent); ssh-add {keys.locked[0]}) before "
                f"starting psjobs, or give psjobs.configure_ssh(passphrase=...)")
    skipped = "; ".join(f"{f} ({why})" for f, why in keys.skipped)
    if keys.skipped and not keys.pairs:
        fix = ("give existing key files with psjobs.configure_ssh(client_keys=[...])" if keys.given
               else "correct the IdentityFile lines of the ssh config, or name key files with "
                    "psjobs.configure_ssh(client_keys=[...])")
        return f"no key file could be used: {skipped}. {fix[0].upper()}{fix[1:]}, then check with {check}"
    text = f"check the user name and that your key is in its authorized_keys {check}"
    return f"{text}; key files skipped: {skipped}" if skipped else text


def parse_computer(name: str) -> tuple[str | None, str, int | None]:
    """'user@host:port' -> (user, host, port); a bare name may be an alias of ~/.ssh/config."""
    user = None
    rest = name
    if "@" in rest:
        user, rest = rest.rsplit("@", 1)
    port = None
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        if tail.startswith(":"):
            port = int(tail[1:])
    elif rest.count(":") == 1:
        host, _, p = rest.partition(":")
        port = int(p)
    else:
        host = rest
    return user, host, port


def ssh_command(computer: str, options: SSHOptions) -> str:
    """The ``ssh ... true`` line that tries what psjobs tried, to paste into a shell.

    OpenSSH's ssh reads no 'host:port' (it looks up '127.0.0.1:1' as a host name), nor brackets
    around an IPv6 address: the port goes to -p, the brackets go, a user@ stays. The options
    configure_ssh set go along (-F, -i, UserKnownHostsFile, -l, -p) so that ssh reads the same files.
    """
    user, host, port = parse_computer(computer)
    argv = ["ssh"]
    if options.config is not None:
        # ssh takes one -F (the last wins): several files are named by the first, which is what
        # the user most likely wrote; psjobs itself reads them all through an Include
        argv += ["-F", options.config[0] if options.config else os.devnull]
    for key in options.client_keys or ():
        argv += ["-i", key]
    if options.known_hosts is not None:
        argv += ["-o", "UserKnownHostsFile=" + (" ".join(options.known_hosts) or "none")]
    if user is None and options.username is not None:
        argv += ["-l", options.username]
    if port is None:
        port = options.port
    if port is not None:
        argv += ["-p", str(port)]
    argv += [f"{user}@{host}" if user else host, "true"]
    return shlex.join(argv)
