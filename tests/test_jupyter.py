"""The extension in a real Jupyter kernel, checked by the messages the kernel sends (issue 17).

::

    jupyter_client KernelManager --execute_request--> ipykernel (this Python, psjobs loaded)
        <-- iopub: stream, display_data (with a display_id), update_display_data, error, status
        <-- stdin: input_request (when the request allows stdin)

Each numbered finding of issue 17 is one test here: progress drawn live during a wait, a prompt
answered through the kernel, status lines in the starting cell (nothing in later cells), the ids
the user sees, the user's traceback with its source, ``%%bg``, quiet errors.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

pytest.importorskip("jupyter_client")
pytest.importorskip("ipykernel")

from jupyter_client.manager import KernelManager

from .clitools import subprocess_env

pytestmark = [pytest.mark.timeout(120), pytest.mark.leaves_processes]  # a module kernel


@dataclass
class Reply:
    """What the kernel sent for one execute_request, in order."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    started: float = 0.0

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m["msg_type"] == kind]

    @property
    def stdout(self) -> str:
        return "".join(m["content"]["text"] for m in self.of("stream") if m["content"]["name"] == "stdout")

    @property
    def stderr(self) -> str:
        return "".join(m["content"]["text"] for m in self.of("stream") if m["content"]["name"] == "stderr")

    @property
    def result(self) -> str | None:
        found = self.of("execute_result")
        return found[-1]["content"]["data"]["text/plain"] if found else None

    def texts(self) -> list[str]:
        """Every display's and update's plain text, in order."""
        return [m["content"]["data"].get("text/plain", "") for m in self.messages
                if m["msg_type"] in ("display_data", "update_display_data")]


class Kernel:
    def __init__(self) -> None:
        # ipykernel's own spec runs the kernel with this interpreter (sys.executable)
        self.km = KernelManager(kernel_name="python3")
        self.km.start_kernel(env=subprocess_env(), cwd="/tmp")
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)
        self.stray: list[dict[str, Any]] = []  # iopub messages that belong to no request of ours

    def run(self, code: str, *, allow_stdin: bool = False, answer: str | None = None,
            timeout: float = 60, interrupt_after: float | None = None) -> Reply:
        reply = Reply(started=time.monotonic())
        msg_id = self.kc.execute(code, allow_stdin=allow_stdin)
        deadline = time.monotonic() + timeout
        interrupted = False
        while time.monotonic() < deadline:
            if interrupt_after is not None and not interrupted and time.monotonic() - reply.started > interrupt_after:
                self.km.interrupt_kernel()
                interrupted = True
            if allow_stdin:
                try:
                    ask = self.kc.get_stdin_msg(timeout=0.01)
                except queue.Empty:
                    pass
                else:
                    reply.prompts.append(ask["content"]["prompt"])
                    self.kc.input(answer if answer is not None else "")
            try:
                msg = self.kc.get_iopub_msg(timeout=0.05)
            except queue.Empty:
                continue
            msg["received"] = time.monotonic()
            if msg["parent_header"].get("msg_id") != msg_id:
                self.stray.append(msg)
                continue
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                return reply
            reply.messages.append(msg)
        raise AssertionError(f"no answer to {code!r} in {timeout}s: {reply.messages}")

    def idle_messages(self, seconds: float) -> list[dict[str, Any]]:
        """What the kernel sends while no cell runs, for ``seconds``."""
        got: list[dict[str, Any]] = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                got.append(self.kc.get_iopub_msg(timeout=0.05))
            except queue.Empty:
                pass
        return got

    def close(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=False)


@pytest.fixture(scope="module")
def kernel() -> Iterator[Kernel]:
    k = Kernel()
    try:
        r = k.run("%load_ext psjobs\nimport psjobs, time")
        assert not r.of("error"), r.messages
        yield k
    finally:
        k.run("psjobs.remove_job(psjobs.get_job(), force=True)")
        k.close()


def no_error(r: Reply) -> Reply:
    assert not r.of("error"), [m["content"] for m in r.of("error")]
    return r


# 1. progress ------------------------------------------------------------------------------------

def test_1_progress_is_drawn_live_in_the_waiting_cell(kernel: Kernel) -> None:
    no_error(kernel.run(
        "def steps():\n"
        "    for i in range(10):\n"
        "        psjobs.write_progress('copying', status=f'file {i}', percent_complete=i * 10)\n"
        "        time.sleep(0.2)\n"
        "    return 'copied'\n"
        "p = steps() &"))
    r = no_error(kernel.run("%receive p --wait"))
    shown = r.of("display_data")
    assert shown and shown[0]["content"]["transient"]["display_id"], "no display with an id"
    updates = r.of("update_display_data")
    assert len(updates) >= 3, r.texts()
    # drawn while it waited, not all at the end: the first update comes well before the result
    end = r.of("execute_result")[0]["received"]
    assert end - updates[0]["received"] > 0.8
    assert any("copying" in t and "%" in t for t in r.texts())
    bars = [t for t in r.texts() if "copying" in t]
    assert ": done" in bars[-1]  # the bar is marked done, not left half drawn
    assert r.result == "['copied']"


def test_1_wait_shows_progress_too(kernel: Kernel) -> None:
    no_error(kernel.run("q = steps() &"))
    r = no_error(kernel.run("%wait q"))
    assert r.of("update_display_data") and any("jobs done" in t for t in r.texts())


# 2. prompts -------------------------------------------------------------------------------------

def test_2_a_prompt_is_answered_through_the_kernel(kernel: Kernel) -> None:
    no_error(kernel.run("asker = (lambda: 'hello ' + input('Name? '))() &"))
    r = no_error(kernel.run("%receive asker --wait", allow_stdin=True, answer="Ada"))
    assert len(r.prompts) == 1 and "Name? " in r.prompts[0]
    assert r.result == "['hello Ada']"


def test_2_without_stdin_the_message_says_how(kernel: Kernel) -> None:
    no_error(kernel.run("asker2 = (lambda: 'hi ' + input('Who? '))() &"))
    deadline = time.monotonic() + 30
    while "Blocked" not in (kernel.run("print(asker2.state)").stdout) and time.monotonic() < deadline:
        pass
    r = no_error(kernel.run("%receive asker2", allow_stdin=False))
    assert "send_input" in r.stderr and "Who? " in r.stderr
    no_error(kernel.run("asker2.send_input('Bo'); asker2.wait(20)"))
    assert kernel.run("print(asker2.receive())").stdout.strip() == "['hi Bo']"


# 3. notices in the right cell ------------------------------------------------------------------

def test_3_a_job_ending_while_idle_updates_its_own_cell_and_nothing_else(kernel: Kernel) -> None:
    r = no_error(kernel.run("late = (time.sleep(1.0), 'late')[1] &"))
    lines = [m for m in r.of("display_data") if "Running" in m["content"]["data"].get("text/plain", "")]
    assert lines, r.texts()
    display_id = lines[0]["content"]["transient"]["display_id"]
    idle = kernel.idle_messages(4.0)  # no cell runs: the kernel updates the line by itself
    updates = [m for m in idle if m["msg_type"] == "update_display_data"
               and m["content"]["transient"]["display_id"] == display_id]
    assert updates and "Completed" in updates[-1]["content"]["data"]["text/plain"]
    later = no_error(kernel.run("1 + 1"))
    assert later.stdout == "" and later.stderr == ""  # no notice printed into an unrelated cell


def test_3_prints_stay_in_their_cell_after_a_thread_job(kernel: Kernel) -> None:
    # psjobs wraps sys.stdout for thread jobs; the kernel must still tell it which cell runs
    no_error(kernel.run("tj = psjobs.start_thread_job(lambda: 1); tj.wait(10)"))
    assert kernel.run("print('in this cell')").stdout == "in this cell\n"


# 4. ids -----------------------------------------------------------------------------------------

def test_4_messages_name_the_job_that_percent_jobs_lists(kernel: Kernel) -> None:
    no_error(kernel.run("bad = (1 / 0) &\nbad.wait(20)"))
    top = int(kernel.run("print(bad.id)").stdout)
    child = int(kernel.run("print(bad.child_jobs[0].id)").stdout)
    r = no_error(kernel.run("%receive bad"))
    assert f"Job {top} " in r.stderr and f"Job {child} " not in r.stderr


# 5. tracebacks ----------------------------------------------------------------------------------

def test_5_a_failure_shows_the_users_traceback_with_its_source(kernel: Kernel) -> None:
    no_error(kernel.run("def parse(text):\n    value = int(text)\n    return value\n"))
    no_error(kernel.run("b = parse('x') &\nb.wait(20)"))
    r = no_error(kernel.run("%receive b"))
    assert "value = int(text)" in r.stderr, r.stderr      # the line, from the cell
    assert "ValueError: invalid literal" in r.stderr
    assert "_runner.py" not in r.stderr and "_process_worker" not in r.stderr  # psjobs' frames hidden
    w = no_error(kernel.run("%wait b"))
    assert "value = int(text)" in w.stderr


# 6. %%bg ----------------------------------------------------------------------------------------

def test_6_a_whole_cell_as_a_job(kernel: Kernel) -> None:
    no_error(kernel.run("base = 10"))
    r = no_error(kernel.run("%%bg --name cellwork\ntotal = 0\nfor i in range(5):\n    total += i\ntotal + base"))
    assert "cellwork" in (r.result or "")
    assert kernel.run("print(psjobs.receive_job('cellwork', wait=True))").stdout.strip() == "[20]"
    t = no_error(kernel.run("%%bg --thread\nshared_result = base * 3\nshared_result"))
    assert t.result
    assert kernel.run("print(psjobs.get_job()[-1].receive(wait=True))").stdout.strip() == "[30]"


def test_6_a_cell_failure_shows_the_cell_line(kernel: Kernel) -> None:
    no_error(kernel.run("%%bg --name cellfail\nx = 1\nraise KeyError('missing')"))
    no_error(kernel.run("psjobs.wait_job('cellfail', timeout=20)"))
    r = no_error(kernel.run("%receive cellfail"))
    assert "raise KeyError('missing')" in r.stderr, r.stderr


def test_6_a_cell_failure_leaves_the_runner_out(kernel: Kernel) -> None:
    # docs/ipython.md: the traceback is the user's, psjobs' frames left out; the runner that
    # executes a %%bg cell is psjobs' too, though it is compiled from a string, not a file.
    no_error(kernel.run("%%bg --name cellfail2\ny = 2\nraise KeyError('absent')"))
    no_error(kernel.run("psjobs.wait_job('cellfail2', timeout=20)"))
    r = no_error(kernel.run("%receive cellfail2"))
    assert "raise KeyError('absent')" in r.stderr, r.stderr
    assert "runner" not in r.stderr and "run_cell" not in r.stderr, r.stderr


# 7. quiet errors --------------------------------------------------------------------------------

def test_7_unpicklable_name_is_one_line(kernel: Kernel) -> None:
    r = kernel.run("import threading; lk = threading.Lock()\nn = len([lk]) &")
    # IPython shows a UsageError as one line on stderr: no chained tracebacks through cloudpickle
    assert not r.of("error")
    assert r.stderr.startswith("UsageError: ") and r.stderr.count("\n") == 1 and "'lk'" in r.stderr
    assert "Traceback" not in r.stderr


def test_7_ctrl_c_in_wait_is_clean(kernel: Kernel) -> None:
    no_error(kernel.run("slow = (time.sleep(30)) &"))
    r = kernel.run("%wait slow", interrupt_after=1.5)
    assert not r.of("error"), [m["content"]["traceback"] for m in r.of("error")]
    assert "interrupted" in r.stderr and "go on" in r.stderr
    no_error(kernel.run("%stop slow"))


def test_7_an_empty_table_says_so(kernel: Kernel) -> None:
    k2 = Kernel()
    try:
        no_error(k2.run("%load_ext psjobs"))
        r = no_error(k2.run("%jobs"))
        assert r.result is not None and "No jobs" in r.result
    finally:
        k2.close()
