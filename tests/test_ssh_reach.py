"""Reaching a computer: what a computer name and configure_ssh accept up front, which key files a
login uses (as OpenSSH's ssh picks them), and that the next step a refusal suggests works when pasted.

Against the tests' real sshd (tests/sshd.py) on loopback; ``ssh -o BatchMode=yes`` runs beside
psjobs where the point is to behave as OpenSSH does."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest

import psjobs

asyncssh = pytest.importorskip("asyncssh")

from . import sshd as sshd_helper  # noqa: E402 - after the importorskip

pytestmark = pytest.mark.ssh


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[sshd_helper.LoopbackSSHD]:
    if sshd_helper.find_sshd() is None:
        pytest.skip("no sshd (apt-get install openssh-server)")
    srv = sshd_helper.LoopbackSSHD(tmp_path_factory.mktemp("sshd")).start()
    try:
        yield srv
    finally:
        srv.stop()


# --- computer names and options: refused before any job exists -------------------------------------

@pytest.mark.parametrize("name", ["web1:99999", "web1:0", "web1:65536", "web1:00000", "root@[::1]:70000"])
def test_a_port_out_of_range_is_refused_before_any_job(session: psjobs.Session, name: str) -> None:
    with pytest.raises(ValueError, match="1 to 65535") as info:
        session.invoke_command("true", computer_name=["web2", name])
    assert repr(name) in str(info.value)
    assert session.get_job() == []


@pytest.mark.parametrize("name", ["web1\0", "web1\n", "we\tb1", "web1\x7f", "root\x1b@web1", "web1:\u0662\u0662"])
def test_control_characters_and_foreign_digits_are_refused_before_any_job(session: psjobs.Session,
                                                                         name: str) -> None:
    with pytest.raises(ValueError, match="invoke_command") as info:
        session.invoke_command("true", computer_name=name)
    assert repr(name) in str(info.value)
    assert session.get_job() == []


@pytest.mark.parametrize("name", ["web1:1", "web1:65535", "admin@10.0.0.1:2222", "[::1]:22", "[fe80::1%eth0]"])
def test_names_at_the_edges_are_accepted(name: str) -> None:
    from psjobs.backends.ssh._backend import check_computers

    assert check_computers([name]) == [name]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 0, -1])
def test_connect_timeout_must_be_finite_seconds(session: psjobs.Session, value: Any) -> None:
    before = psjobs.configure_ssh(session)
    with pytest.raises(ValueError, match="connect_timeout"):
        psjobs.configure_ssh(session, connect_timeout=value)
    assert psjobs.configure_ssh(session) == before  # nothing changed
    assert psjobs.configure_ssh(session, connect_timeout=2.5).connect_timeout == 2.5
    assert psjobs.configure_ssh(session, connect_timeout=None).connect_timeout is None
