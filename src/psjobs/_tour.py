"""``psjobs tour``: a short scripted walk through the command, against a throw-away host.

Each step prints its command line, then runs it through the command's own ``main`` so what
follows is the real output. The host lives in a temporary PSJOBS_HOME and is stopped at the end,
so the user's own jobs are never touched.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

Main = Callable[[Sequence[str]], int]

# (what the step shows, the command's arguments, seconds to pause before it)
STEPS: list[tuple[str, list[str], float]] = [
    ("Start jobs: each returns at once with the job's row. One argument is a shell line, several an argv.",
     ["start", "-n", "count", "--", "for i in 1 2 3 4 5 6; do echo line $i; sleep 0.4; done"], 0),
    ("", ["start", "-n", "greet", "--thread", "--", "echo", "hello from a thread job"], 0),
    ("", ["start", "-n", "broken", "--", "echo working...; echo 'disk full' >&2; exit 3"], 0),
    ("", ["start", "-n", "forever", "--", "sleep 600"], 0),
    ("The Get-Job table: every job of this host, whichever shell started it.", ["get"], 0.5),
    ("Wait with a timeout: the job goes on, the exit status says 6 (timeout).",
     ["wait", "count", "--timeout", "0.5"], 0),
    ("Receive what `count` printed so far (a partial result).", ["receive", "count"], 0),
    ("Wait for it to finish, then receive the rest: nothing is received twice.", ["wait", "count"], 0),
    ("", ["receive", "count"], 0),
    ("A failed job: its output, its error, and the reason (exit status 5).", ["receive", "broken"], 0),
    ("", ["get", "broken", "--json"], 0),
    ("Stop a job for real: its whole process group ends.", ["stop", "forever"], 0),
    ("", ["get"], 0),
    ("Remove jobs and their records; a running job would need --force.",
     ["remove", "count", "greet", "broken", "forever"], 0),
    ("", ["get"], 0),
    ("The host that kept all this (here a temporary one; yours lives in ~/.local/state/psjobs).",
     ["host", "status"], 0),
]


def run_tour(main: Main, out: object = None) -> int:
    home = tempfile.mkdtemp(prefix="psjobs-tour-")
    old = os.environ.get("PSJOBS_HOME")
    os.environ["PSJOBS_HOME"] = home
    print(f"# A tour of psjobs, against a temporary host in {home}\n", flush=True)
    try:
        for text, args, pause in STEPS:
            if pause:
                time.sleep(pause)  # let the jobs get somewhere, as a person typing would
            if text:
                print(f"# {text}", flush=True)
            print(f"$ psjobs {shlex.join(args)}", flush=True)
            code = main(args)
            sys.stdout.flush()
            sys.stderr.flush()
            if code:
                print(f"[exit status {code}]", flush=True)
            print(flush=True)
        print("# Remote jobs: `psjobs invoke -c HOST[,HOST...] -- CMD` runs CMD on each computer over SSH\n"
              "# (needs SSH access, so the tour leaves it out).\n"
              "# Next: `psjobs --help`, and docs/cli.md for more examples.")
        return 0
    finally:
        main(["host", "stop"])
        if old is None:
            os.environ.pop("PSJOBS_HOME", None)
        else:
            os.environ["PSJOBS_HOME"] = old
        shutil.rmtree(home, ignore_errors=True)
