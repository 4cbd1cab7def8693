"""``python -m bench.host_memory``: the session host's RSS while one job prints 1 GB that nobody
receives, then while the command receives all of it (issue 12: both under +64 MiB).

::

    private host (PSJOBS_HOME in a temporary directory) <-- psjobs start -- 'head -c 1 GiB | fold'
         |  RSS sampled every 0.2 s until the job is Completed
         +--> psjobs receive --> counted here, RSS sampled while it sends; then the host stops
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import psutil


def main() -> int:
    home = tempfile.mkdtemp(prefix="psjobs-hostmem-")
    env = dict(os.environ, PSJOBS_HOME=home)

    def ps(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "psjobs", *args], env=env, capture_output=True, text=True)

    ps("get")  # starts the host
    host = psutil.Process(int(json.loads(ps("host", "status", "--json").stdout)["pid"]))
    try:
        before = peak = host.memory_info().rss
        job = ps("start", "-q", "--", "head -c 1073741824 /dev/zero | tr '\\0' x | fold -w 100").stdout.strip()
        t0 = time.time()
        while json.loads(ps("get", job, "--json").stdout)[0]["state"] != "Completed":
            peak = max(peak, host.memory_info().rss)
            time.sleep(0.2)
        print(f"load {os.getloadavg()[0]:.2f}: host RSS {before >> 20} MiB before, +{(peak - before) >> 20} MiB "
              f"while 1 GB was printed and nobody received it ({time.time() - t0:.1f} s)")
        before = peak = host.memory_info().rss
        reader = subprocess.Popen([sys.executable, "-m", "psjobs", "receive", job], env=env, stdout=subprocess.PIPE)
        assert reader.stdout is not None
        lines = size = 0
        for line in reader.stdout:
            lines += 1
            size += len(line)
            if lines % 200_000 == 0:
                peak = max(peak, host.memory_info().rss)
        reader.wait()
        print(f"received {lines:,} lines, {size:,} bytes; host +{(peak - before) >> 20} MiB while sending")
    finally:
        ps("host", "stop")
    return 0


if __name__ == "__main__":
    sys.exit(main())
