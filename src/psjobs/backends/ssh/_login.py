"""What a login to a computer uses, and what to tell the user when it fails.

::

    parse_computer("admin@web1:2222") --> ("admin", "web1", 2222)
    ssh_command(computer, options) --> "ssh -F cfg -p 2222 admin@web1 true": the check a failure
        message suggests, the same computer as psjobs tried, in a form OpenSSH's ssh parses
"""

from __future__ import annotations

import os
import shlex

from ._backend import SSHOptions


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
