"""The job magics: %bg (what `` &`` runs), %jobs, %receive, %wait, %stop, %suspend, %resume, %remove.

::

    %bg [--thread|--process] [--name N] EXPR | !COMMAND   (the cell's frame as local scope)
        EXPR --> lambda compiled over the namespace --> psjobs.start_job   (process: names copied)
                                                   --> psjobs.start_thread_job (thread: shared)
        !COMMAND --$name/{expr} expanded as IPython's ! does--> a command job
        --> the Job is the value of the line; the extension watches it to announce its end
    %jobs/%receive/%wait/... words --ids, names (wildcards), variables--> the psjobs verb
        psjobs errors, ValueError, TypeError --> IPython UsageError (one line, no traceback)
"""

from __future__ import annotations

import fnmatch
import io
import re
import shlex
import sys
import types
from typing import TYPE_CHECKING, Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class, needs_local_scope, no_var_expand

import psjobs
from psjobs._errors import PsJobsError
from psjobs.core._format import JobList
from psjobs.core._job import Job

from ._cell import names_used, register, runner_for
from ._kernel import user_traceback

if TYPE_CHECKING:
    from . import _Extension

# --- capture by value ------------------------------------------------------------------------

def _code_names(code: types.CodeType) -> list[str]:
    names: list[str] = list(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names.extend(_code_names(const))
    return list(dict.fromkeys(names))


#: IPython's own names in the user namespace (_, __, ___, _i, _ii, _i3, _3, _ih, _oh, _dh) and
#: dunders: the shell's history and the module's, not the user's data. A %%bg cell does not get
#: copies of them; a user name that starts with "_" (_scale) is copied as any other.
_IPYTHON_OWN = re.compile(r"_+|_i{1,3}|_i?\d+|_[iod]h|__\w+__")


def _used_globals(fn: types.FunctionType) -> list[tuple[str, Any]]:
    """The names the expression uses that its namespace holds, with their values."""
    # (others are builtins, attribute names, or names the job will look up itself)
    return [(name, fn.__globals__[name]) for name in _code_names(fn.__code__) if name in fn.__globals__]


def _unpicklable(fn: types.FunctionType) -> list[tuple[str, Any, BaseException | str]]:
    """The names the expression uses whose values cannot be sent to another process."""
    import cloudpickle

    bad: list[tuple[str, Any, BaseException | str]] = []
    for name, value in _used_globals(fn):
        try:
            cloudpickle.dumps(value)
        except Exception as exc:
            bad.append((name, value, exc))
    return bad


_OPEN_FILE = "an open file, which another process cannot share"


def _is_open_file(value: Any) -> bool:
    return isinstance(value, io.IOBase) and not value.closed


def _cannot_copy(text: str, bad: list[tuple[str, Any, BaseException | str]], fix: str) -> str:
    """The one line that says which names a process job cannot get copies of, and what to do."""
    what = ", ".join(f"{n!r} (a {type(v).__module__}.{type(v).__qualname__}: {e})" for n, v, e in bad)
    names = " and ".join(repr(n) for n, _, _ in bad)
    return (f"{text} &: cannot copy {what} into the job's process, so no job was started. A process "
            f"job gets a copy of every name it uses; {fix.format(names=names)}, or run it as a thread "
            f"job, which shares the namespace: %bg --thread {text}  (or %config PsJobs.kind = 'thread')")


def _compile_expression(text: str, namespace: dict[str, Any]) -> types.FunctionType:
    """A function of no arguments that evaluates ``text`` over ``namespace`` (its globals)."""
    source = f"lambda: ({text}\n)"
    code = compile(source, register(source, "&"), "eval")  # a traceback shows the line
    fn = eval(code, namespace)
    fn.__qualname__ = text.strip()  # the job's command is the expression's text
    return fn  # type: ignore[no-any-return]


def _expand(shell: Any, command: str, namespace: dict[str, Any]) -> str:
    """Expand $name and {expr} in a command as IPython's !command does."""
    from IPython.utils.text import DollarFormatter

    try:
        return str(DollarFormatter().vformat(command, args=[], kwargs=namespace))
    except Exception:
        return command  # as IPython: a command that does not expand runs as typed


# --- the magics ----------------------------------------------------------------------------

_OPTIONS_HELP = "options: --thread, --process, --name NAME, and -- to end them"


def _parse_bg(line: str) -> tuple[str | None, str | None, str]:
    """``[--thread|--process] [--name NAME] [--] rest``: (kind, name, rest).

    The options are read as the other magics read theirs (shell words: ``--name "my job"``); the
    rest is the expression or !command exactly as typed, quotes and all.
    """
    kind: str | None = None
    name: str | None = None
    rest = line.strip()
    while rest.startswith("--"):
        word, after = [*rest.split(None, 1), ""][:2]
        if word == "--":
            return kind, name, after.strip()  # what follows is the expression, even "--x"
        if word in ("--thread", "--process"):
            kind = word[2:]
        elif word == "--name":
            name, after = _first_word(after)
            if not name:
                raise UsageError(f"%bg: --name needs a job name ({_OPTIONS_HELP})")
        else:
            raise UsageError(f"%bg: unknown option {word}; {_OPTIONS_HELP}")
        rest = after.strip()
    return kind, name, rest


def _first_word(text: str) -> tuple[str | None, str]:
    """The first shell word of ``text`` (quotes taken off) and the text after it, untouched."""
    stream = io.StringIO(text)
    lexer = shlex.shlex(stream, posix=True)
    lexer.whitespace_split = True
    lexer.commenters = ""  # '#' in a name is part of it; the expression after it is not ours
    try:
        word = lexer.get_token()
    except ValueError as exc:
        raise UsageError(f"%bg: cannot read the job name in {text.strip()!r}: {exc}") from None
    return word, stream.read()  # the lexer stops right after the word (and one blank)


@magics_class
class JobMagics(Magics):
    """%bg, %jobs, %receive, %wait, %stop, %remove: the job verbs as magics."""

    def __init__(self, shell: Any, extension: _Extension) -> None:
        super().__init__(shell)  # type: ignore[no-untyped-call]
        self.ext = extension

    # %bg is what a line ending in " &" becomes; it is also usable as is.
    @line_magic  # type: ignore[untyped-decorator]
    @needs_local_scope  # type: ignore[untyped-decorator]
    @no_var_expand  # type: ignore[untyped-decorator]
    def bg(self, line: str, local_ns: dict[str, Any] | None = None) -> Job:
        """Start EXPR (or !COMMAND) as a job and return the job.

        Usage: ``%bg [--thread | --process] [--name NAME] [--] EXPR`` or ``%bg [--name NAME] !COMMAND``
        (``--`` ends the options, for an expression that starts with ``--``).
        A line ending in `` &`` runs ``%bg`` with the kind set by ``%config PsJobs.kind``.
        A process job gets copies of the names EXPR uses (each must be picklable); a thread job
        shares the namespace. Example: ``%bg --thread sum(range(10**7))``
        """
        __tracebackhide__ = True
        kind, name, text = _parse_bg(line)
        if not text:
            raise UsageError(f"%bg: give an expression or a !command to run as a job ({_OPTIONS_HELP})")
        kind = kind or self.ext.config.kind
        namespace = self._namespace(local_ns)
        start = psjobs.start_thread_job if kind == "thread" else psjobs.start_job
        if text.startswith("!"):
            command = _expand(self.shell, text[1:].strip(), namespace)
            if not command:
                raise UsageError("%bg: the !command is empty; give a command line such as !make all")
            job = start(command, name=name)
        else:
            fn = _compile_expression(text, namespace)
            if kind == "thread":
                job = start(fn, name=name)
            else:
                job = self._start_process(fn, text, name)
        self.ext.started(job)
        return job

    @cell_magic("bg")  # type: ignore[untyped-decorator]
    def bg_cell(self, line: str, cell: str) -> Job:
        """Run the whole cell as one job and return the job (the cell's value is the job).

        Usage: ``%%bg [--thread | --process] [--name NAME] [-c HOST[,HOST...]]`` over a cell.
        The job's output is what the cell's last line evaluates to (as a cell's Out), plus what it
        writes with psjobs.write_output; print goes to its information stream. A process job gets
        copies of the names the cell uses; a thread job shares the namespace; ``-c`` runs the cell
        on those computers over SSH (psjobs.invoke_command), one child job per computer.
        """
        return self._bg_cell(line, cell)

    def _namespace(self, local_ns: dict[str, Any] | None) -> dict[str, Any]:
        assert self.shell is not None  # magics run only in a shell
        user = self.shell.user_global_ns
        if local_ns is None or local_ns is user:
            return user  # type: ignore[no-any-return]
        merged = dict(user)
        merged.update(local_ns)  # a line inside a function sees its locals, as Python would
        return merged

    @staticmethod
    def _start_process(fn: types.FunctionType, text: str, name: str | None) -> Job:
        __tracebackhide__ = True
        files: list[tuple[str, Any, BaseException | str]] = [
            (n, v, _OPEN_FILE) for n, v in _used_globals(fn) if _is_open_file(v)]
        if files:
            # cloudpickle would copy a text file opened for reading (a snapshot of it): refused, as
            # an open file is everywhere else, rather than a job reading a copy of the user's file
            raise UsageError(_cannot_copy(text, files, "open the file in the job instead")) from None
        try:
            return psjobs.start_job(fn, name=name)
        except TypeError as exc:
            bad = _unpicklable(fn)
            if not bad:
                raise
            # One line, as IPython's own usage errors (%tb shows the pickling error behind it).
            raise UsageError(_cannot_copy(text, bad, "make {names} picklable")
                             ) from (exc.__cause__ or exc)  # the pickling error itself, not start_job's wording of it

    @line_magic  # type: ignore[untyped-decorator]
    @needs_local_scope  # type: ignore[untyped-decorator]
    def jobs(self, line: str, local_ns: dict[str, Any] | None = None) -> JobList:
        """The Get-Job table of the session's jobs, or of the jobs named.

        Usage: ``%jobs [--state STATE] [--children] [ID | NAME | VARIABLE ...]``.
        Example: ``%jobs --state Running``
        """
        words = _split(line)
        state = _take_option(words, "--state", "%jobs")
        children = _take_flag(words, "--children")
        self._no_other_options(words, "%jobs", "--state STATE, --children")
        with _as_usage("%jobs"):
            if words:
                jobs = psjobs.get_job(self._select(words, local_ns, "%jobs"), state=state,
                                      include_child_jobs=children)
            else:
                jobs = psjobs.get_job(state=state, include_child_jobs=children)
        self.ext.seen(jobs)  # as a shell's `jobs`: a Done shown here is not announced again
        return JobList(jobs)

    @line_magic  # type: ignore[untyped-decorator]
    @needs_local_scope  # type: ignore[untyped-decorator]
    def receive(self, line: str, local_ns: dict[str, Any] | None = None) -> list[Any]:
        """The output of jobs not yet received (Receive-Job).

        Usage: ``%receive ID... [--keep] [--wait] [--timeout S]``; ID is a job id, a job name
        (wildcards allowed) or a variable holding a job. Example: ``%receive total --wait``
        """
        words = _split(line)
        keep = _take_flag(words, "--keep")
        wait = _take_flag(words, "--wait")
        timeout = _take_seconds(words, "%receive")
        self._no_other_options(words, "%receive", "--keep, --wait, --timeout S")
        jobs = self._select(self._need(words, "%receive"), local_ns, "%receive")
        try:
            with _as_usage("%receive"):
                out = psjobs.receive_job(jobs, keep=keep, wait=wait or timeout is not None, timeout=timeout)
        except KeyboardInterrupt:
            print("%receive: interrupted; the jobs go on, and what was not shown is kept for the next "
                  "%receive", file=sys.stderr)
            return None  # type: ignore[return-value]
        if not self.ext.in_kernel:  # a kernel's front end shows the traceback with the failure
            self._show_tracebacks(jobs)
        # The jobs themselves, not the words: a job received by its name is seen as well.
        self.ext.seen(psjobs.get_job(jobs) if jobs else [])
        return out

    @line_magic  # type: ignore[untyped-decorator]
    @needs_local_scope  # type: ignore[untyped-decorator]
    def wait(self, line: str, local_ns: dict[str, Any] | None = None) -> JobList | None:
        """Wait until the jobs are done and show them (Wait-Job); Ctrl+C stops waiting, not the jobs.

        Usage: ``%wait ID... [--any] [--timeout S]``. Example: ``%wait 3 4 --timeout 10``
        """
        words = _split(line)
        any_ = _take_flag(words, "--any")
        timeout = _take_seconds(words, "%wait")
        self._no_other_options(words, "%wait", "--any, --timeout S")
        jobs = self._select(self._need(words, "%wait"), local_ns, "%wait")
        try:
            with _as_usage("%wait"):
                done = psjobs.wait_job(jobs, any=any_, timeout=timeout, show_progress=self.ext.in_kernel)
        except KeyboardInterrupt:
            print("%wait: interrupted; the jobs go on (see %jobs)", file=sys.stderr)
            return None
        if not done and timeout is not None:
            print(f"%wait: timed out after {timeout:g}s; the jobs go on (see %jobs)", file=sys.stderr)
            return None
        self._show_tracebacks(done)
        self.ext.seen(done)
        return JobList(done)

    @line_magic  # type: ignore[untyped-decorator]
    @needs_local_scope  # type: ignore[untyped-decorator]
    def stop(self, line: str, local_ns: dict[str, Any] | None = None) -> None:
        """Stop jobs for real (Stop-Job). Usage: ``%stop ID...``. Example: ``%stop 3``"""
        words = _split(line)
        self._no_other_options(words, "%stop", "none")
        jobs = self._select(self._need(words, "%stop"), local_ns, "%stop")
        with _as_usage("%stop"):
            stopped = psjobs.stop_job(jobs, pass_thru=True)
        self.ext.seen(stopped)  # the user stopped them: no notice that they stopped

    @line_magic  # type: ignore[untyped-decorator]
    @needs_local_scope  # type: ignore[untyped-decorator]
    def suspend(self, line: str, local_ns: dict[str, Any] | None = None) -> Any:
        """Pause process jobs (SIGSTOP to their process group). Usage: ``%suspend ID...``.

        Example: ``%suspend 3``
        """
        words = _split(line)
        self._no_other_options(words, "%suspend", "none")
        jobs = self._select(self._need(words, "%suspend"), local_ns, "%suspend")
        with _as_usage("%suspend"):
            return psjobs.suspend_job(jobs)

    @line_magic  # type: ignore[untyped-decorator]
    @needs_local_scope  # type: ignore[untyped-decorator]
    def resume(self, line: str, local_ns: dict[str, Any] | None = None) -> Any:
        """Let suspended jobs run on (SIGCONT). Usage: ``%resume ID...``. Example: ``%resume 3``"""
        words = _split(line)
        self._no_other_options(words, "%resume", "none")
        jobs = self._select(self._need(words, "%resume"), local_ns, "%resume")
        with _as_usage("%resume"):
            return psjobs.resume_job(jobs)

    @line_magic  # type: ignore[untyped-decorator]
    @needs_local_scope  # type: ignore[untyped-decorator]
    def remove(self, line: str, local_ns: dict[str, Any] | None = None) -> None:
        """Drop finished jobs and their data (Remove-Job); --force stops running ones first.

        Usage: ``%remove ID... [--force]``. Example: ``%remove * --force``
        """
        words = _split(line)
        force = _take_flag(words, "--force")
        self._no_other_options(words, "%remove", "--force")
        jobs = self._select(self._need(words, "%remove"), local_ns, "%remove")
        with _as_usage("%remove"):
            psjobs.remove_job(jobs, force=force)
        self.ext.forget(jobs)

    # --- helpers ---------------------------------------------------------------------------
    def _show_tracebacks(self, jobs: list[Any]) -> None:
        """The failed jobs' own tracebacks (psjobs' frames left out), after the table or output."""
        for job in psjobs.get_job(jobs) if jobs else []:
            for leaf in [job, *job.child_jobs]:
                reason = leaf.job_state_info.reason if leaf.state is psjobs.JobState.FAILED else None
                if reason is not None and (leaf.child_jobs == [] or leaf is not job):
                    trace = user_traceback(reason)
                    if "\n" in trace:
                        print(trace, file=sys.stderr)

    def _bg_cell(self, line: str, cell: str) -> Job:
        __tracebackhide__ = True
        words = _split(line)
        kind = "thread" if _take_flag(words, "--thread") else None
        if _take_flag(words, "--process"):
            kind = "process"
        name = _take_option(words, "--name", "%%bg")
        hosts = _take_option(words, "-c", "%%bg")
        self._no_other_options(words, "%%bg", "--thread, --process, --name NAME, -c HOST[,HOST]")
        if words:
            raise UsageError(f"%%bg: unexpected {' '.join(words)!r}; the code goes in the cell below the "
                             f"%%bg line (options: --thread, --process, --name NAME, -c HOST[,HOST])")
        if not cell.strip():
            raise UsageError("%%bg: the cell is empty; write the code to run below the %%bg line")
        assert self.shell is not None
        filename = register(cell)
        try:
            used = names_used(cell, filename)
        except SyntaxError as exc:
            raise UsageError(f"%%bg: the cell is not valid Python: {exc}") from None
        user = self.shell.user_ns
        job: Job
        with _as_usage("%%bg"):
            if hosts:
                computers = [h for h in hosts.split(",") if h]
                captured = self._copies(user, used, "%%bg -c")
                job = psjobs.invoke_command(runner_for(cell), cell, filename, captured, computer_name=computers,
                                            job_name=name)
            elif (kind or self.ext.config.kind) == "thread":
                job = psjobs.start_thread_job(runner_for(cell), cell, filename, user, name=name)
            else:
                captured = self._copies(user, used, "%%bg")
                job = psjobs.start_job(runner_for(cell), cell, filename, captured, name=name)
        self.ext.started(job)
        return job

    @staticmethod
    def _copies(user: dict[str, Any], used: set[str], magic: str) -> dict[str, Any]:
        """The values of the names the cell uses, each checked to travel to another process."""
        import cloudpickle

        captured: dict[str, Any] = {}
        bad: list[str] = []
        for name in sorted(used):
            if name in user and not _IPYTHON_OWN.fullmatch(name):
                if _is_open_file(user[name]):  # cloudpickle would copy a file open for reading
                    bad.append(f"{name!r} (a {type(user[name]).__qualname__}: {_OPEN_FILE})")
                    continue
                try:
                    cloudpickle.dumps(user[name])
                except Exception as exc:
                    bad.append(f"{name!r} (a {type(user[name]).__qualname__}: {exc})")
                    continue
                captured[name] = user[name]
        if bad:
            raise UsageError(f"{magic}: cannot copy {', '.join(bad)} into the job's process, so no job "
                             f"was started; make them picklable (a file: open it in the job), or use "
                             f"%%bg --thread, which shares the namespace")
        return captured

    @staticmethod
    def _need(words: list[str], magic: str) -> list[str]:
        if not words:
            raise UsageError(f"{magic}: name the jobs: an id, a name (wildcards allowed) or a variable "
                             f"holding a job, e.g. {magic} 3; %jobs lists them")
        return words

    @staticmethod
    def _no_other_options(words: list[str], magic: str, known: str) -> None:
        for word in words:
            if word.startswith("--"):
                raise UsageError(f"{magic}: unknown option {word}; options: {known}")

    def _select(self, words: list[str], local_ns: dict[str, Any] | None, magic: str) -> list[Any]:
        """Ids, job names (wildcards over top-level jobs) and variables holding jobs; a wildcard that
        matches no job is a usage error, as an id or a name that matches none is."""
        namespace = dict(self.shell.user_ns) if self.shell is not None else {}
        if local_ns:
            namespace.update(local_ns)
        out: list[Any] = []
        for word in words:
            if word.isdigit():
                out.append(int(word))
                continue
            value = namespace.get(word) if word.isidentifier() else None
            if isinstance(value, Job):
                out.append(value)
            elif isinstance(value, (list, tuple)) and value and all(isinstance(v, Job) for v in value):
                out.extend(value)
            elif any(c in word for c in "*?["):
                # Top-level jobs only: "%remove *" must not try to remove child jobs on their own.
                matched = [j for j in psjobs.get_job() if fnmatch.fnmatchcase(j.name.lower(), word.lower())]
                if not matched:
                    raise UsageError(f"{magic}: no job has a name that matches {word!r}; %jobs lists them")
                out.extend(matched)
            else:
                out.append(word)
        return out


def _split(line: str) -> list[str]:
    try:
        return shlex.split(line, comments=True)  # "%stop 3  # the slow one" works as it reads
    except ValueError as exc:
        raise UsageError(f"cannot read the arguments {line!r}: {exc}") from None


def _take_flag(words: list[str], flag: str) -> bool:
    if flag in words:
        while flag in words:
            words.remove(flag)
        return True
    return False


def _take_option(words: list[str], option: str, magic: str) -> str | None:
    if option not in words:
        return None
    i = words.index(option)
    if i + 1 >= len(words):
        raise UsageError(f"{magic}: {option} needs a value")
    value = words[i + 1]
    del words[i:i + 2]
    return value


def _take_seconds(words: list[str], magic: str) -> float | None:
    text = _take_option(words, "--timeout", magic)
    if text is None:
        return None
    try:
        seconds = float(text)
    except ValueError:
        raise UsageError(f"{magic}: --timeout takes seconds, such as 2.5, not {text!r}") from None
    if seconds < 0:
        raise UsageError(f"{magic}: --timeout takes seconds >= 0, not {text}")
    return seconds


class _as_usage:
    """Turn psjobs' own errors into IPython usage errors: one line, no traceback to read."""

    def __init__(self, magic: str) -> None:
        self.magic = magic

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc is not None and isinstance(exc, (PsJobsError, ValueError, TypeError)):
            raise UsageError(f"{self.magic}: {exc}") from exc
