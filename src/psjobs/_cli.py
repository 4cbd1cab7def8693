"""The ``psjobs`` command: the job verbs for the shell, a thin adapter over the session host.

::

    argv --argparse--> one function per command --Client.call/stream--> session host
                              |                                           (runs the verbs)
                              +--> the Get-Job table, records, or --json, on stdout/stderr

Exit statuses are decided in one place (``main``), from the ``exit_code`` of the error classes.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import sys
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any, NoReturn, cast

from ._cli_output import _iso, _Ordered, _print_jobs, keep_bytes, printable
from ._errors import (
    HostError,
    HostReplyError,
    JobFailedError,
    JobNotFinishedError,
    JobNotFoundError,
    MissingDependencyError,
    PsJobsError,
    UsageError,
    WaitTimeoutError,
    missing_dependency,
)
from ._records import Record, Stream
from .core._pshost import Host
from .host._client import Client, current_umask, host_free
from .host._delivered import Delivery
from .host._protocol import (
    GetRequest,
    GroupRequest,
    InvokeRequest,
    ReceiveRequest,
    RemoveRequest,
    RestartRequest,
    ResumeRequest,
    ShutdownRequest,
    StartRequest,
    StatusRequest,
    StopRequest,
    SuspendRequest,
    WaitRequest,
)
from .host._text import json_safe
from .host._words import in_words

EXIT_CODES = {
    0: "success",
    1: "another error (the session host cannot start or be reached, ...)",
    UsageError.exit_code: "usage: a bad option or argument",
    JobNotFoundError.exit_code: "not found: an id or name matches no job",
    JobNotFinishedError.exit_code: "not finished: remove a running job without --force",
    JobFailedError.exit_code: "failed job: receive or wait met a job that failed",
    WaitTimeoutError.exit_code: "timeout: wait --timeout ran out; the jobs go on",
}

# Each verb PowerShell has a cmdlet for (restart, group, host, shell and tour have none).
ALIASES = {"start": "Start-Job", "get": "Get-Job", "receive": "Receive-Job", "wait": "Wait-Job",
           "stop": "Stop-Job", "remove": "Remove-Job", "suspend": "Suspend-Job", "resume": "Resume-Job",
           "invoke": "Invoke-Command"}


def cmd_start(client: Client, a: argparse.Namespace) -> int:
    if not a.command:
        raise UsageError("start: give the command after `--`, e.g. psjobs start -- make test")
    cwd = os.path.abspath(a.directory) if a.directory else os.getcwd()
    after = [x.strip() for x in ",".join(a.after or []).split(",") if x.strip()]
    row = client.call(StartRequest(command=a.command, name=a.name, thread=a.thread, cwd=cwd,
                                   env=None if a.thread else dict(os.environ), group=a.group, after=after,
                                   delay=a.delay, retries=a.retries, umask=current_umask()))
    return _show_new(row, a)


def cmd_invoke(client: Client, a: argparse.Namespace) -> int:
    if not a.command:
        raise UsageError("invoke: give the command after `--`, e.g. psjobs invoke -c web1,web2 -- uptime")
    computers = [c.strip() for c in ",".join(a.computer).split(",") if c.strip()]
    if not computers:
        raise UsageError("invoke: name at least one computer with -c HOST[,HOST...]")
    after = [x.strip() for x in ",".join(a.after or []).split(",") if x.strip()]
    row = client.call(InvokeRequest(command=a.command, computers=computers, throttle=a.throttle, name=a.name,
                                    group=a.group, after=after, delay=a.delay, retries=a.retries))
    return _show_new(row, a)


def _show_new(row: dict[str, Any], a: argparse.Namespace) -> int:
    if a.quiet:
        print(row["id"])
    else:
        _print_jobs(row, a.json)
    return 0


def _selected(a: argparse.Namespace) -> None:
    if not a.ids and not a.names:
        raise UsageError(f"{a.cmd}: name at least one job: an id, a name, or --name NAME")


def cmd_get(client: Client, a: argparse.Namespace) -> int:
    rows = client.call(GetRequest(ids=a.ids, state=a.state, newest=a.newest, children=a.children,
                                  names=a.names, commands=a.command or [], child_state=a.child_state,
                                  has_more_data=a.has_more_data))
    _print_jobs(rows, a.json)
    return 0


def cmd_receive(client: Client, a: argparse.Namespace) -> int:
    _selected(a)
    ordered = _Ordered()
    delivery = Delivery(sys.stdout, track=not a.keep)  # the host consumes what the reader took (_delivered)
    out = ordered.stream(delivery.out)
    host = Host(stdout=out, stderr=ordered.stream(sys.stderr))
    result: dict[str, Any] = {}
    tops: dict[str, list[Any]] = {}  # leaf id -> [its top-level job's id, its computer]
    several = False  # several computers answer: output lines get a [computer] prefix
    request = ReceiveRequest(ids=a.ids, keep=a.keep, wait=a.wait, timeout=a.timeout, auto_remove=a.auto_remove,
                             names=a.names, ack=not a.keep)
    for response in _acked(client.stream(request), None if a.keep else delivery):
        if response.get("more"):
            if "jobs" in response["result"]:
                tops = response["result"]["jobs"]
                several = len({c for _, c in tops.values() if c and c != "localhost"}) > 1
            for _, job, stream, t, is_json, value in response["result"]["records"]:
                top, where = tops.get(str(job), [job, None])
                if a.json:  # "id" is the job the user named, as on the failure lines
                    item = {"id": top, "child_id": job, "computer_name": where,
                            "stream": Stream(stream).name.title(), "time": _iso(t)}
                    if stream == Stream.OUTPUT:
                        item["value"] = json_safe(value)
                    else:
                        item.update(json_safe(value if is_json else {"message": value}))
                    out.write(json.dumps(item) + "\n")
                elif stream == Stream.OUTPUT:
                    prefix = f"[{where}] " if several and where else ""
                    out.write(prefix + ((value if isinstance(value, str) else json.dumps(value)) + "\n"
                              if is_json else value + "\n"))
                else:
                    fields = value if is_json else {"message": value}
                    message = str(fields.get("message", ""))
                    record = Record(Stream(stream), message, t, fields.get("computer_name"))
                    host.write_record(cast(Any, None), record)
                delivery.mark()
        else:
            result = response["result"]
    if delivery.broken:
        raise BrokenPipeError  # the reader went away; what it did not take stays to be received
    err = ordered.stream(sys.stderr)
    for f in result.get("failures", ()):
        if a.json:
            out.write(json.dumps({"id": f["id"], "child_id": f["child_id"], "computer_name": f["computer_name"],
                                  "stream": "Failure", "reason": f["reason"]}) + "\n")
        else:
            where = f["computer_name"]
            prefix = f"[{where}] " if where and where != "localhost" else ""
            err.write(printable(f"{prefix}Job {f['id']} {f['name']!r} failed: {f['reason']}") + "\n")
    delivery.out.flush()
    sys.stdout.flush()
    if result.get("failures"):
        return JobFailedError.exit_code
    if result.get("timed_out"):
        ids = _ids(result.get("pending") or [])
        raise WaitTimeoutError(f"receive: timed out{_after(a.timeout)}; {_still_going(result.get('pending') or [])}; "
                               f"receive the rest with `psjobs receive {ids} --wait`, or stop them with "
                               f"`psjobs stop {ids}`")
    return 0


def _after(timeout: float | None) -> str:
    return "" if timeout is None else f" after {timeout:g}s"


def _ids(rows: list[dict[str, Any]]) -> str:
    return " ".join(str(r["id"]) for r in rows)


def _still_going(rows: list[dict[str, Any]]) -> str:
    """The jobs a timeout left going, as the messages name them (the first five)."""
    more = f" and {len(rows) - 5} more" if len(rows) > 5 else ""
    return "still going: " + ", ".join(f"Job {r['id']} {r['name']!r} ({r['state']})" for r in rows[:5]) + more


def _acked(responses: Generator[dict[str, Any], int | None, None],
           delivery: Delivery | None) -> Iterator[dict[str, Any]]:
    """The host's responses; with a ``delivery``, each part is answered with what it delivered."""
    with contextlib.closing(responses):
        response = next(responses)
        while True:
            yield response
            if not response.get("more"):
                return
            response = responses.send(None if delivery is None else delivery.settle())


def cmd_wait(client: Client, a: argparse.Namespace) -> int:
    _selected(a)
    result = client.call(WaitRequest(ids=a.ids, any=a.any, timeout=a.timeout, names=a.names))
    done, pending = result["done"], result["pending"]
    if not done and pending:
        raise WaitTimeoutError(f"wait: timed out{_after(a.timeout)}; {_still_going(pending)}; wait again, "
                               f"or stop them with `psjobs stop {_ids(pending)}`")
    _print_jobs(done, a.json)
    failed = [r for r in done if r["state"] == "Failed"]
    for r in failed if not a.json else ():
        print(printable(f"Job {r['id']} {r['name']!r} failed: {r['reason']}"), file=sys.stderr)
    return JobFailedError.exit_code if failed else 0


def cmd_stop(client: Client, a: argparse.Namespace) -> int:
    _selected(a)
    _print_jobs(client.call(StopRequest(ids=a.ids, names=a.names)), a.json)
    return 0


def cmd_remove(client: Client, a: argparse.Namespace) -> int:
    if not a.ids and not a.names and a.state is None:
        raise UsageError("remove: name the jobs (ids, names, '*', --name NAME) or give --state, "
                         "e.g. psjobs remove --state Completed")
    result = client.call(RemoveRequest(ids=a.ids, force=a.force, names=a.names, state=a.state))
    if a.json:
        print(json.dumps(result))
    return 0


def cmd_suspend(client: Client, a: argparse.Namespace) -> int:
    _print_jobs(client.call(SuspendRequest(ids=a.ids)), a.json)
    return 0


def cmd_resume(client: Client, a: argparse.Namespace) -> int:
    _print_jobs(client.call(ResumeRequest(ids=a.ids)), a.json)
    return 0


def cmd_restart(client: Client, a: argparse.Namespace) -> int:
    rows = client.call(RestartRequest(ids=a.ids))
    if a.quiet:
        print("\n".join(str(r["id"]) for r in rows))
    else:
        _print_jobs(rows, a.json)
    return 0


def cmd_group(client: Client, a: argparse.Namespace) -> int:
    groups = client.call(GroupRequest(action=a.action, name=a.name, parallel=a.parallel))["groups"]
    if a.json:
        print(json.dumps(groups, indent=2))
    elif a.action == "list":
        lines = [f"{'Group':<16} {'Parallel':>8} {'Running':>7} {'Waiting':>7}  Status"]
        lines += [f"{g['name']:<16} {g['parallel']:>8} {g['running']:>7} {g['waiting']:>7}  "
                  f"{'Paused' if g['paused'] else 'Running'}" for g in groups]
        print("\n".join(lines))
    return 0


def cmd_host(client: Client, a: argparse.Namespace) -> int:
    if a.action == "start":
        client.connect(start=True).close()
    if a.action == "stop":
        try:
            result = client.call(ShutdownRequest(), start=False)
        except HostError:
            print(f"psjobs host: not running ({client.paths.home})")
            return 0
        _wait_free(client)
        if a.json:
            print(json.dumps(result))
        else:
            stopped = result["stopped"]
            extra = f"; stopped its running jobs: {', '.join(map(str, stopped))}" if stopped else ""
            print(f"psjobs host: stopped{extra}")
        return 0
    try:
        status = client.call(StatusRequest(), start=False)
    except HostError:
        if a.json:
            print(json.dumps({"running": False, "home": str(client.paths.home)}))
        else:
            print(f"psjobs host: not running ({client.paths.home})")
        return 1
    if a.json:
        print(json.dumps({"running": True, **status}, indent=2))
    else:
        print(f"psjobs host: running, pid {status['pid']}, since {status['started']}\n"
              f"  jobs: {status['jobs']} ({status['running_jobs']} running), records: {status['records']}\n"
              f"  socket: {status['socket']}\n  database: {status['database']}\n  log: {status['log']}")
        if status.get("storage_problem"):
            print(f"  storage: FAILING: {status['storage_problem']} (retrying; records dropped: "
                  f"{status.get('records_dropped', 0)})")
    return 0


def _wait_free(client: Client, timeout: float = 30.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not host_free(client.paths):  # the host releases its lock as it exits
        if time.monotonic() > deadline:
            raise HostError(f"the psjobs host did not end within {timeout:g}s; see {client.paths.log}")
        time.sleep(0.01)


def cmd_shell(client: Client, a: argparse.Namespace) -> int:
    try:
        start_shell = importlib.import_module("psjobs.ipython").start_shell
        result = start_shell(list(a.args))  # it imports IPython itself
    except (ImportError, AttributeError) as exc:
        # psjobs.ipython raises MissingDependencyError itself; anything else (a broken install) gets
        # the same advice, with what failed in it.
        missing = exc if isinstance(exc, MissingDependencyError) else missing_dependency(
            "psjobs shell", "ipython", exc if isinstance(exc, ImportError) else None)
        print(f"psjobs shell: {missing}", file=sys.stderr)
        return UsageError.exit_code
    return result if isinstance(result, int) else 0


def cmd_tour(client: Client, a: argparse.Namespace) -> int:
    from ._tour import run_tour

    return run_tour(main)


# --- the parser --------------------------------------------------------------------------------------

def _exit_codes_text() -> str:
    return "exit status:\n" + "\n".join(f"  {code}  {text}" for code, text in EXIT_CODES.items())


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog="psjobs", formatter_class=fmt,
        description="PowerShell-style background jobs for the shell. Jobs run in a per-user session "
                    "host that starts on first use and keeps every job and record on disk, so they "
                    "outlive the shell that started them.",
        epilog=_exit_codes_text() + "\n\nExample:\n  psjobs start -n build -- make -j4 && psjobs get")
    parser.add_argument("--version", action="version", version=f"psjobs {_version()}")
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND")
    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true", help="print JSON for scripts instead of text")

    def add(name: str, func: Callable[[Client, argparse.Namespace], int], help: str, example: str,
            details: str = "") -> argparse.ArgumentParser:
        aliases = [ALIASES[name]] if name in ALIASES else []
        p = sub.add_parser(name, aliases=aliases, parents=[common], help=help, formatter_class=fmt,
                           description=help + (f"\n\n{details}" if details else ""),
                           epilog=f"Example:\n  {example}")
        p.set_defaults(func=func)
        return p

    p = add("start", cmd_start, "Start a command as a background job and print its row.",
            "psjobs start -n backup -- rsync -a src/ /mnt/backup/",
            "One argument after `--` is a shell command line (run by /bin/sh -c); several are an argv,\n"
            "run without a shell. The job gets this shell's environment, directory and umask.")
    p.add_argument("-n", "--name", help="the job's name (default JobN)")
    p.add_argument("--thread", action="store_true",
                   help="run it as a ThreadJob in the host's process (its environment is the host's; "
                        "its directory and umask are this shell's)")
    p.add_argument("-C", "--directory", metavar="DIR", help="working directory (default: the current one)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the new job's id")
    _add_scheduling(p)
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD...")

    p = add("get", cmd_get, "List jobs as the Get-Job table (all top-level jobs by default).",
            "psjobs get --state Running",
            "IDs, names (wildcards allowed: 'build*') and instance ids select jobs; --name NAME selects\n"
            "the job named NAME as it is written (a name like '5' or 'build[1]').")
    p.add_argument("ids", nargs="*", metavar="ID|NAME")
    _name_option(p)
    p.add_argument("--state", help="only jobs in this state (Running, Completed, Failed, Stopped, ...)")
    p.add_argument("--newest", type=int, metavar="N",
                   help="only the N most recently finished (running jobs count as the newest)")
    p.add_argument("--children", action="store_true", help="list the child jobs too")
    p.add_argument("--command", action="append", metavar="TEXT",
                   help="only jobs whose command matches (case-insensitive, wildcards allowed: '*make*')")
    p.add_argument("--child-state", metavar="STATE", help="the child jobs in this state (with their parents)")
    p.add_argument("--has-more-data", action=argparse.BooleanOptionalAction, default=None,
                   help="only jobs with (or, --no-has-more-data, without) records not received yet")

    p = add("receive", cmd_receive, "Write what jobs produced and was not received yet.",
            "psjobs receive 1 > results.txt",
            "Output goes to stdout, errors and warnings to stderr, in the order they were produced.\n"
            "Receiving consumes the records unless --keep; a failed job's reason is shown every time.")
    p.add_argument("ids", nargs="*", metavar="ID|NAME")
    _name_option(p)
    p.add_argument("--keep", action="store_true", help="leave the records to be received again")
    p.add_argument("--wait", action="store_true", help="follow the jobs until they finish")
    p.add_argument("--timeout", type=_seconds, metavar="S", help="with --wait: give up after S seconds (inf: no limit)")
    p.add_argument("--auto-remove", action="store_true", help="with --wait: remove the jobs afterwards")

    p = add("wait", cmd_wait, "Wait until jobs are finished (or one of them, with --any).",
            "psjobs wait 3 --timeout 60 && psjobs receive 3")
    p.add_argument("ids", nargs="*", metavar="ID|NAME")
    _name_option(p)
    p.add_argument("--any", action="store_true", help="return when the first of them finishes")
    p.add_argument("--timeout", type=_seconds, metavar="S",
                   help="give up after S seconds (exit status 6; inf: no limit)")

    p = add("stop", cmd_stop, "Stop jobs for real (their whole process group) and show them.",
            "psjobs stop backup")
    p.add_argument("ids", nargs="*", metavar="ID|NAME")
    _name_option(p)

    p = add("remove", cmd_remove, "Remove finished jobs and all their records.", "psjobs remove 1 2 3",
            "A job that is still running is refused (exit status 4) unless --force, which stops it first.\n"
            "Wildcards match top-level jobs only: `psjobs remove '*'` removes every (finished) job.")
    p.add_argument("ids", nargs="*", metavar="ID|NAME")
    _name_option(p)
    p.add_argument("-f", "--force", action="store_true", help="stop running jobs first")
    p.add_argument("--state", help="remove the jobs in this state (all of them, or those named)")

    p = add("suspend", cmd_suspend, "Pause running jobs (SIGSTOP to their process group): Suspended.",
            "psjobs suspend backup")
    p.add_argument("ids", nargs="+", metavar="ID|NAME")
    p = add("resume", cmd_resume, "Let suspended jobs run on (SIGCONT).", "psjobs resume backup")
    p.add_argument("ids", nargs="+", metavar="ID|NAME")

    p = add("restart", cmd_restart, "Start a finished job again: a new job with its command and options.",
            "psjobs restart 3",
            "The new job gets a new id; the old one stays as it was. Its group, delay and retries are\n"
            "kept, not --after (those jobs have run).")
    p.add_argument("ids", nargs="+", metavar="ID|NAME")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the new jobs' ids")

    p = add("group", cmd_group, "Make, change, pause, resume or list the groups that queue jobs.",
            "psjobs group add build --parallel 2 && psjobs start -g build -- make",
            "At most --parallel jobs of a group run at once; the others wait NotStarted. A paused\n"
            "group starts none of its waiting jobs (running ones go on) until it is resumed.")
    p.add_argument("action", choices=("add", "set", "pause", "resume", "list"))
    p.add_argument("name", nargs="?", help="the group (not for list)")
    p.add_argument("-p", "--parallel", type=int, metavar="N", help="how many of its jobs run at once (default 1)")

    p = add("invoke", cmd_invoke, "Run a command on computers over SSH as one RemoteJob.",
            "psjobs invoke -c web1,web2 -- uptime")
    p.add_argument("-c", "--computer", action="append", required=True, metavar="HOST[,HOST...]")
    p.add_argument("--throttle", type=int, default=32, metavar="N", help="at most N computers at once")
    p.add_argument("-n", "--name", help="the job's name")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the new job's id")
    _add_scheduling(p)
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD...")

    p = add("host", cmd_host, "Show, start or stop the session host that runs the jobs.",
            "psjobs host status",
            "The host starts by itself on first use. `stop` stops its running jobs (their records\n"
            "are kept). `status` exits with 1 when no host runs.")
    p.add_argument("action", choices=("status", "stop", "start"))

    p = add("shell", cmd_shell, "Open IPython with psjobs loaded.", "psjobs shell")
    p.add_argument("args", nargs=argparse.REMAINDER)

    add("tour", cmd_tour, "A one-minute tour: real commands against a temporary host.", "psjobs tour")
    return parser


def _name_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", action="append", default=[], dest="names", metavar="NAME",
                   help="the job named NAME, as it is written: not an id, no wildcards (repeatable)")


class _ParseError(Exception):
    """A bad option or argument, raised instead of argparse's exit so `--json` can answer in JSON."""

    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(message)
        self.parser = parser


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _ParseError(self, message)


def _add_scheduling(p: argparse.ArgumentParser) -> None:
    """start's and invoke's options for when a job runs (core/_sched)."""
    p.add_argument("-g", "--group", help="run it in this group (see `psjobs group`): it waits for a slot")
    p.add_argument("-a", "--after", action="append", metavar="ID[,ID...]",
                   help="start it once these jobs completed (if one fails or is stopped, it fails unrun)")
    p.add_argument("--delay", type=_delay, metavar="S", help="start it S seconds from now")
    p.add_argument("--retries", type=int, default=0, metavar="N",
                   help="run it again, up to N more times, when it fails (not when it is stopped)")


def _seconds(text: str) -> float | None:
    """A --timeout: seconds >= 0, or inf for no limit (None, as the library takes it)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if math.isnan(value) or value < 0:
        raise argparse.ArgumentTypeError(f"a timeout is >= 0 seconds (or inf: no limit), not {text}")
    return None if math.isinf(value) else value


def _delay(text: str) -> float:
    """A --delay: finite seconds >= 0, in the library's range (not _seconds, a timeout's, where
    inf means no limit: --delay inf started the job at once)."""
    from .core._sched import not_before

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"a delay is finite seconds >= 0 from now, not {text}")
    try:
        not_before("--delay", value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text} seconds would start the job after 9998-12-31; "
                                         f"give a nearer delay") from None
    return value


def _version() -> str:
    from ._version import __version__

    return __version__


def _normalize(argv: list[str]) -> list[str]:
    """Command names and PowerShell aliases in any case: `psjobs get-job` is `psjobs get`."""
    names = {n.lower(): n for n in ALIASES} | {v.lower(): k for k, v in ALIASES.items()}
    names |= {n: n for n in ("host", "shell", "tour", "group", "restart")}
    for i, arg in enumerate(argv):
        if not arg.startswith("-"):
            canonical = names.get(arg.lower())
            if canonical is not None:
                argv = [*argv[:i], canonical, *argv[i + 1:]]
            break
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    """Run the psjobs command; return its exit status (see EXIT_CODES)."""
    args = _normalize(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    try:
        ns, extra = parser.parse_known_args(args)
        if extra and ns.cmd == "shell":
            ns.args = [*extra, *ns.args]  # IPython's own options go through untouched
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except _ParseError as exc:
        if "--json" in args[:args.index("--")] if "--" in args else "--json" in args:
            _print_error("UsageError", f"{exc.parser.prog}: {exc}", UsageError.exit_code)
        else:  # as argparse says it
            exc.parser.print_usage(sys.stderr)
            print(f"{exc.parser.prog}: error: {exc}", file=sys.stderr)
        return UsageError.exit_code
    except SystemExit as exc:  # argparse: --help (0)
        return exc.code if isinstance(exc.code, int) else UsageError.exit_code
    if ns.cmd is None:
        parser.print_help()
        return UsageError.exit_code
    if getattr(ns, "command", None) and ns.command[0] == "--":
        ns.command = ns.command[1:]
    keep_bytes(sys.stdout)  # a job's name, command or output that is not UTF-8: written as it came
    keep_bytes(sys.stderr)
    try:
        code: int = ns.func(Client(words=in_words), ns)  # the host's warnings in the command's words
        return code
    except (PsJobsError, FileNotFoundError, NotADirectoryError) as exc:
        sys.stdout.flush()
        code = int(getattr(exc, "exit_code", UsageError.exit_code))
        if getattr(ns, "json", False):
            _print_error(exc.type_name if isinstance(exc, HostReplyError) else type(exc).__name__, str(exc), code)
        else:
            print(f"psjobs: {printable(str(exc))}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`psjobs receive 1 | head`): say nothing, like other tools.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


def _print_error(type_name: str, message: str, exit_code: int) -> None:
    """An error for scripts (`--json`): one JSON object on stdout, shaped as the host's error replies."""
    print(json.dumps({"error": {"type": type_name, "message": message, "exit_code": exit_code}}))
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
