"""What the benchmark jobs run, in psjobs and in the peers alike.

Kept apart from bench_core and light on imports on purpose: a psjobs worker imports the module
of a callable pickled by reference, so a heavy module would be measured instead of psjobs.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from typing import Any


def trivial() -> int:
    return 1


def send_one(conn: Any) -> None:
    conn.send(trivial())
    conn.close()


def items(n: int) -> Iterator[int]:
    yield from range(n)


def send_items(conn: Any, n: int) -> None:
    send = conn.send
    for i in range(n):
        send(i)
    conn.close()


def write_batches(fd: int, n: int, batch: int = 1000, window: float = 0.001) -> None:
    """The ceiling for streaming: pickled batches flushed every `batch` items or `window` s."""
    import pickle
    import struct

    buf: list[int] = []
    first = 0.0
    for i in range(n):
        if not buf:
            first = time.monotonic()
        buf.append(i)
        if len(buf) >= batch or time.monotonic() - first >= window:
            data = pickle.dumps(buf, protocol=5)
            os.write(fd, struct.pack("!I", len(data)) + data)
            buf = []
    if buf:
        data = pickle.dumps(buf, protocol=5)
        os.write(fd, struct.pack("!I", len(data)) + data)
    os.close(fd)


def make_bytes(n: int) -> bytes:
    return b"x" * n


def make_dicts(n: int) -> list[dict[str, Any]]:
    return [{"i": i, "s": "x"} for i in range(n)]


def send_bytes(conn: Any, n: int) -> None:
    conn.send_bytes(make_bytes(n))
    conn.close()


def send_dicts(conn: Any, n: int) -> None:
    conn.send(make_dicts(n))
    conn.close()


def busy() -> None:
    """A pure-Python loop: it sees SIGTERM (or an async exception) at once."""
    import psjobs

    psjobs.write_output("go")
    x = 0
    while True:
        x += 1


def busy_flag(started: Any, flag: Any) -> None:
    started.set()
    x = 0
    while not flag.is_set():
        x += 1


def busy_mp(conn: Any) -> None:
    conn.send("go")
    x = 0
    while True:
        x += 1


def stubborn() -> None:
    """Ignores SIGTERM: only the SIGKILL after the grace period ends it."""
    import psjobs

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    psjobs.write_output("go")
    while True:
        time.sleep(0.01)


def stubborn_mp(conn: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    conn.send("go")
    while True:
        time.sleep(0.01)


def idle(seconds: float = 60.0) -> None:
    import psjobs

    psjobs.write_output("ready")
    time.sleep(seconds)


def idle_mp(conn: Any, seconds: float = 60.0) -> None:
    conn.send("ready")
    time.sleep(seconds)
