"""The seed's walkthrough (PowerShell's about_Jobs), example by example, run live.

``python -m psjobs.tour`` runs every step on this machine and prints its code and real output;
``python -m psjobs.tour --markdown`` writes the same as docs/tour.md. Each step is the psjobs
equivalent of one example of about_Jobs, in the order of that page.
"""

from __future__ import annotations

import ast
import contextlib
import io
import os
import re
import sys
import tempfile
import textwrap
from dataclasses import dataclass


@dataclass
class Step:
    title: str
    powershell: str
    text: str
    code: str
    # What differs from run to run, as (regex, replacement) on what the page shows: the replacement
    # is `...`, which the doc test (tests/doctools.py) reads as any text within a line.
    loose: tuple[tuple[str, str], ...] = ()


# ps pads its PID column to the width of the system's largest pid, and pid 1 is a different program
# from machine to machine.
_PS_LINES = ((r"' +PID COMMAND'", "'...PID COMMAND'"), (r"' +1 [^']*'", "'...1 ...'"))
# A ps job may have ended by the time its row is printed (it lists the processes in milliseconds).
_PS_STATE = (r"(<Job \d+ 'Job\d+' )(?:NotStarted|Running|Completed)", r"\1...")


STEPS = [
    Step("Start a job on the local computer", "Start-Job -ScriptBlock {Get-Process}",
         "`start_job` runs a command line (or a Python callable, or an argv list) in another process "
         "and returns at once with the job object; the prompt is yours again.",
         """
import psjobs
psjobs.start_job("ps -eo pid,comm")
""", (_PS_STATE,)),
    Step("Keep the job object", "$job = Start-Job -ScriptBlock {Get-Process}",
         "Save the job in a variable to manage it with the other verbs.",
         """
job = psjobs.start_job("ps -eo pid,comm")
job
""", (_PS_STATE,)),
    Step("The background operator", "$job = Get-Process &",
         "In IPython, with `%load_ext psjobs`, a line ending in ` &` is a job: `job = !ps -eo pid,comm &` "
         "(see docs/ipython.md). In plain Python the same is `start_job`; a callable works as well as a "
         "command, and runs in a warm worker process that starts in about a millisecond.",
         """
import os

def processes():
    return sorted(int(p) for p in os.listdir("/proc") if p.isdigit())

job = psjobs.start_job(processes)
psjobs.wait_job(job)
len(psjobs.receive_job(job)[0]) > 0
"""),
    Step("Get the session's jobs", "Get-Job",
         "Without arguments, `get_job` returns every job started in the session, as the Get-Job table.",
         """
psjobs.get_job()
""", ((r"(Job[13] +BackgroundJob  )(?:Running  |Completed)", r"\1..."),)),
    Step("Get one job", "$job = Get-Job -Id 1",
         "By id (also by name, with wildcards, by instance id, by state or command).",
         """
first = psjobs.get_job()[0]
job = psjobs.get_job(first.id)[0]
job.id, job.name, job.command
"""),
    Step("Get the results of a job", "Receive-Job -Job $job",
         "`receive_job` returns what the job produced: here each line of `ps` is an item.",
         """
psjobs.wait_job(job)
psjobs.receive_job(job)[:2]
""", _PS_LINES),
    Step("Keep the results in a variable", "$results = Receive-Job -Job $job",
         "Receiving consumes: what was received is not returned again (the job's `output` list keeps "
         "everything).",
         """
results = psjobs.receive_job(job)
results
job.output[:2]
""", _PS_LINES),
    Step("Save the results to a file", "Receive-Job -Job $job > results.txt",
         "Write what is received to a file (from a shell: `psjobs receive 1 > results.txt`).",
         """
job = psjobs.start_job("ps -eo pid,comm")
psjobs.wait_job(job)
with open("results.txt", "w") as f:
    print(*psjobs.receive_job(job), sep="\\n", file=f)
with open("results.txt") as f:
    print(f.readline().split())
"""),
    Step("Get partial results", "Receive-Job -Job $job   # twice, while the job runs",
         "While a job runs, `receive_job` returns what was produced so far; the next call returns only "
         "what came since.",
         """
import pathlib
import time

def printed(job, n):  # waits until the job has printed n lines (or has ended)
    while len(job.output) < n and not job.done():
        time.sleep(0.05)

# Three lines, then the job waits for a file named "more" before the last three.
job = psjobs.start_job("echo line 1; echo line 2; echo line 3; "
                       "until [ -e more ]; do sleep 0.1; done; echo line 4; echo line 5; echo line 6")
printed(job, 3)
print(psjobs.receive_job(job))
pathlib.Path("more").touch()
psjobs.wait_job(job)
print(psjobs.receive_job(job))
"""),
    Step("Keep partial results", "Receive-Job -Job $job -Keep   # twice",
         "`keep=True` reads without consuming: each call returns everything produced so far.",
         """
job = psjobs.start_job("echo line 1; echo line 2; echo line 3; "
                       "until [ -e still-more ]; do sleep 0.1; done; echo line 4; echo line 5; sleep 60")
printed(job, 3)
print(psjobs.receive_job(job, keep=True))
pathlib.Path("still-more").touch()
printed(job, 5)
print(psjobs.receive_job(job, keep=True))
psjobs.stop_job(job)
"""),
    Step("Wait for the results", "Get-Job   # one job still Running",
         "The State column tells which jobs are done; HasMoreData which have results not yet received.",
         """
slow = psjobs.start_job("sleep 2; echo done")
psjobs.get_job()
"""),
    Step("Receive and wait", "Receive-Job -Job $job -Wait",
         "`wait=True` returns once the job is finished, with all its results (and `timeout=` bounds it).",
         """
psjobs.receive_job(slow, wait=True, timeout=30)
"""),
    Step("Wait for a job", "Wait-Job -ID 10",
         "`wait_job` blocks until the jobs are done and returns them.",
         """
job = psjobs.start_job("sleep 0.5")
psjobs.wait_job(job.id)
"""),
    Step("Wait with a timeout", "Wait-Job -ID 10 -Timeout 120",
         "On timeout `wait_job` returns an empty list, and the job goes on in the background.",
         """
job = psjobs.start_job("sleep 30")
print(psjobs.wait_job(job.id, timeout=0.5))
job.state
"""),
    Step("Stop a job", "$job = Start-Job -ScriptBlock {Get-EventLog -Log System}; $job | Stop-Job",
         "`stop_job` ends the whole process tree of the job (SIGTERM, then SIGKILL after a grace period) "
         "and returns once nothing of it is left.",
         """
job = psjobs.start_job("while :; do date; sleep 1; done | cat")
psjobs.stop_job(job)
job.state
"""),
    Step("Remove a job", "Remove-Job -Job $job",
         "`remove_job` drops a finished job and all its data (`force=True` stops a running one first).",
         """
psjobs.remove_job(job)
job in psjobs.get_job()
"""),
    Step("Investigate a failed job", "$job = Start-Job -ScriptBlock {New-Item -Path HKLM:\\Software\\MyCompany}",
         "A job whose command fails ends Failed; its exit status is kept.",
         """
job = psjobs.start_job("mkdir /proc/MyCompany")
psjobs.wait_job(job)
psjobs.get_job(job.id)
"""),
    Step("The reason of the failure", "$job.ChildJobs[0].JobStateInfo.Reason",
         "The reason is on the child job that did the work, as in PowerShell; `receive_job` also reports "
         "it (to stderr) each time it is called.",
         """
print(job.child_jobs[0].job_state_info.reason)
print(job.exit_code, [str(e) for e in job.child_jobs[0].error])
""", ((r"\['mkdir: [^\]]*'\]", "['mkdir: ...']"),)),
]


def _run(step: Step, namespace: dict[str, object]) -> list[tuple[str, str]]:
    """Run a step like a REPL: statement by statement, showing each expression's value."""
    code = textwrap.dedent(step.code).strip("\n")
    lines = code.splitlines()
    shown: list[tuple[str, str]] = []
    for node in ast.parse(code).body:
        source = "\n".join(lines[node.lineno - 1:node.end_lineno])
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            if isinstance(node, ast.Expr):
                value = eval(compile(ast.Expression(node.value), "<tour>", "eval"), namespace)
                if value is not None:
                    print(repr(value))
            else:
                exec(compile(ast.Module([node], []), "<tour>", "exec"), namespace)
        shown.append((source, out.getvalue().rstrip("\n")))
    return shown


def _prompt(source: str) -> str:
    return "\n".join((">>> " if i == 0 else "... ") + line for i, line in enumerate(source.splitlines()))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    markdown = "--markdown" in args
    namespace: dict[str, object] = {"__name__": "__main__"}  # as a new interpreter: each step imports what it uses
    with tempfile.TemporaryDirectory(prefix="psjobs-tour-") as tmp:
        here = os.getcwd()
        os.chdir(tmp)
        try:
            if markdown:
                print(_HEADER)
            for n, step in enumerate(STEPS, 1):
                shown = _run(step, namespace)
                code = textwrap.dedent(step.code).strip("\n")
                output = "\n".join(o for _, o in shown if o)
                if markdown:
                    for pattern, wildcard in step.loose:
                        output = re.sub(pattern, wildcard, output)
                    print(f"## {n}. {step.title}\n\nPowerShell: `{step.powershell}`\n\n{step.text}\n")
                    print(f"```python\n{code}\n```\n")
                    if output:
                        print(f"```output\n{output}\n```\n")
                else:
                    print(f"\n=== {n}. {step.title}    (PowerShell: {step.powershell})")
                    for source, out in shown:
                        print(_prompt(source))
                        if out:
                            print(out)
        finally:
            os.chdir(here)
            import psjobs

            psjobs.remove_job(psjobs.get_job(), force=True)
    if not markdown:
        print("\nThe tour is over: every job it started is stopped and removed.")
    return 0


_HEADER = """# The seed, in Python: about_Jobs with psjobs

<!-- doctest: repl (tests/test_docs.py runs the blocks as a REPL would, and compares what they print
with the page; the page is made by `python -m psjobs.tour --markdown`) -->

Every example of PowerShell's about_Jobs, in the order of that page, with its psjobs equivalent and
the output it prints. Run it yourself with `python -m psjobs.tour`; this page is made by
`python -m psjobs.tour --markdown`, and a test runs every code block of it in a new interpreter, in
order, and compares what each prints with the output under it: the blocks share one Python session,
as if pasted one after the other at the `>>>` prompt. In an output, `...` stands for what differs
from run to run and from machine to machine: the processes `ps` lists and how it pads them, an
error message's wording, and whether a `ps` job has already finished when its row is printed.
"""

if __name__ == "__main__":
    sys.exit(main())
