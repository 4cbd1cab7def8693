"""What runs on the remote computer: the command watchdog and the Python bootstrap.

This module's *source* is sent over the SSH channel and run by the remote ``python3``; it is also
importable here, which lets the session read the constants and the tests check the parts. It
imports only the standard library at the top, since the remote may have nothing else.

Commands (no Python needed remotely)::

    sshd -> login shell -c WATCHDOG   (the login shell leads a process group of its own)
        watcher subshell (ignores TERM) <-- channel stdin: "k TICKS" (a stop), or its end (the
                                            channel closed, the connection dropped), or "q"
            -> /bin/sh STOPPER: kill -TERM -PGID, kill -KILL after TICKS x 50 ms, exit when no
               live process of the group is left (it holds the channel's stdout until then)
        marks on stdout and stderr, then the command, in the login shell itself --> the channel
        the command ends: the EXIT trap ends the watcher; the shell exits with the command's status

The frames are _wire's, with its cap, read and written by _wire itself: the session sends its
source ahead of this module's, so the codec exists on the remote before psjobs does.

Python callables::

    session --stdin--> BOOT0 (python3 -c): compare the Python minor versions first; refuse with a
                       plain-text frame on a mismatch, else read the R_SOURCE frames (_wire, _procs,
                       then this module: boot_sources) and run main()
    main():  --stdout--> MARK + R_INFO (json: Python version, psjobs and cloudpickle found here)
             <--stdin--  R_MODULES (psjobs/cloudpickle when missing or different: code objects
                         compiled by the session, served from memory; nothing is written to disk)
             fork: child = setsid + psjobs.worker._process_worker.serve(pipe from the watchdog, the channel's stdout)
             watchdog (parent, the job's subreaper) relays JOB/ANSWER frames to the child; R_STOP or
             the end of stdin -> TERM to the child's group and every process below the watchdog,
             KILL after the grace period; the child ends by itself -> KILL to what is left of its
             group; when the child is gone -> R_EXIT (json status)

The channel's stdout carries frames only after MARK (what a login shell's start-up files print
before is ignored) and the job's own stdout never reaches it: the worker turns fd 1 and fd 2 into
the information and error streams.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import select
import signal
import sys
import time
from pathlib import Path
from typing import Any

try:
    from . import _procs, _wire
except ImportError:  # run from source on the remote computer: BOOT0 ran _wire's and _procs' first
    _wire = sys.modules["_psjobs_wire"]
    _procs = sys.modules["_psjobs_procs"]

Kind = _wire.Kind

#: Written by the watchdog and the bootstrap before anything psjobs reads, on stdout and stderr.
MARK = b"\x1epsjobs\x1e\n"

# The modules BOOT0 runs from their source, in this order, before main(): (name there, file here).
SOURCES = (("_psjobs_wire", "_wire.py"), ("_psjobs_procs", "_procs.py"), ("__psjobs_boot__", "_remote_boot.py"))

TICK = 0.05  # seconds between the watchdog's checks that the process group is gone

# The command watchdog, run by the login shell itself (any POSIX shell: sh, bash, dash, zsh, ksh):
# WATCHDOG % {"ticks": N, "part": the command, "stopper": STOPPER}. sshd made the login shell the
# leader of a process group of its own (g=$$), and the command runs in it. A watcher subshell
# ignores SIGTERM, reads the channel's stdin and holds the channel's stdout: on "k TICKS" (a stop)
# or the end of stdin (channel closed, connection lost) it runs STOPPER under /bin/sh, which ends
# every process of the group but itself and exits only when none is left, so the channel closes
# only then; on "q" (the session saw the command end) it just leaves. When the command ends, the
# shell's EXIT trap ends the watcher (SIGPIPE, which bash does not report, with stderr closed
# first) and the shell exits with the command's status; no fork is spent on the command itself
# (measured: a subshell and a kill cost ~1.5 ms a command on 2 busy cores). The watcher learns its
# own pid (to spare itself a SIGSTOP) only when asked to suspend: a /bin/sh started for it on every
# command cost ~0.4 ms of a 3-computer fan-out (8.05 -> 7.66 ms). Nothing here writes to the
# channel but the two marks and the command.
WATCHDOG = r"""g=$$; t=%(ticks)d
set +e
exec 3<&0 </dev/null
( trap '' TERM; exec <&3 3<&- 2>/dev/null
  while read -r c n; do case $c in k) break;; q) exit 0;;
    s) m=$(exec /bin/sh -c 'echo $PPID')
       kill -STOP $(ps -A -o pid= -o pgid= | awk -v g=$g -v m=$m '$2==g && $1!=m {print $1}') 2>/dev/null;;
    c) kill -CONT -$g 2>/dev/null;; esac; done
  exec /bin/sh -c '%(stopper)s' psjobs "$g" "${n:-$t}"
) &
w=$!
exec 3<&-
trap 'exec 2>/dev/null; kill -PIPE $w' EXIT
printf '\036psjobs\036\n'; printf '\036psjobs\036\n' >&2
%(part)s
"""

# The stop itself (always /bin/sh): TERM to the group, then KILL after TICKS checks 50 ms apart;
# `l` lists the live processes that are the job's and not this stopper's own (ps, awk, sleep): the
# group's, those below a process of the group (a child that left it with setsid or a double fork,
# found while its parent lives: the stop lists them before the TERM), and those listed before
# (in $e: an escaped child whose parent the TERM ended). Zombies do not count, since an init that
# does not reap would keep them forever.
STOPPER = r"""g=$1; t=$2; m=$$; e=
r=$(ps -o pgid= -p "$g" 2>/dev/null); [ -n "$r" ] && g=$((r))
command -v ps >/dev/null 2>&1 || { kill -TERM -$g; sleep $((t/20+1)); kill -KILL -$g; exit 0; }
l() { ps -A -o pid= -o ppid= -o pgid= -o stat= | awk -v g=$g -v m=$m -v e=" $e " '
  {p[$1]=$2; s[$1]=$3; if ($4!~/^Z/) a[$1]=1}
  END {for (x in a) {f=(s[x]==g || index(e, " " x " ")); q=x
    while (q>1 && q!=m) {if (s[q]==g) f=1; q=p[q]}; if (f && q!=m) print x}}' | tr '\n' ' '; }
e=$(l); kill -TERM -$g; kill -CONT -$g; [ -n "$e" ] && kill -TERM $e && kill -CONT $e; i=0; sleep 0.01
while e=$(l); [ -n "$e" ]; do
  i=$((i+1)); [ $i -eq $t ] && kill -KILL $e; [ $i -gt $((t+40)) ] && break; sleep 0.05
done
"""


def command_line(ticks: int, argv: list[str], shell: bool) -> str:
    """The text given to sshd: the watchdog around a command line (for the login shell) or an argv."""
    import shlex

    if shell:  # argv = [line, $1, $2, ...]: the login shell runs the line, never pasting the arguments
        part = f"set -- {' '.join(shlex.quote(a) for a in argv[1:])}; eval {shlex.quote(argv[0])}"
    else:
        part = " ".join(shlex.quote(a) for a in argv)
    stopper = STOPPER.replace("'", "'\\''")
    return WATCHDOG % {"ticks": ticks, "part": part, "stopper": stopper}


# The first stage, given to `python3 -c`: old-Python-safe syntax, so that any interpreter can say
# which version it is before anything version-specific (pickles, this module) reaches it. Its
# frame header, kinds and cap are _wire's (filled in by boot0).
BOOT0 = r"""import os,sys,struct,types
def r(n):
    b=b""
    while len(b)<n:
        c=os.read(0,n-len(b))
        if not c:
            os._exit(0)
        b+=c
    return b
m=b"\x1epsjobs\x1e\n"
h=struct.Struct(%(header)r)
v=%(remote)s or tuple(sys.version_info[:2])
c=%(client)s
os.write(2,m)
if v!=c:
    t="this computer runs Python %%d.%%d (%%s) and the session Python %%d.%%d"
    t=(t%%(v[0],v[1],sys.executable,c[0],c[1])).encode()
    os.write(1,m+h.pack(len(t),%(refuse)d)+t)
    os._exit(0)
for i in range(%(parts)d):
    n,k=h.unpack(r(h.size))
    if k!=%(source)d or n>%(cap)d:
        os._exit(3)
    a,_,s=r(n).partition(b"\n")
    g=types.ModuleType(a.decode())
    sys.modules[g.__name__]=g
    exec(compile(s,"<psjobs-boot>/"+g.__name__,"exec"),g.__dict__)
g.main(%(params)r,v,m)
"""


def boot0(client: tuple[int, int], params: dict[str, Any], remote: tuple[int, int] | None = None) -> str:
    """The first stage's source with the session's Python version and the job's parameters."""
    return BOOT0 % {"client": repr(tuple(client)), "remote": repr(remote), "params": params,
                    "header": _wire.HEADER.format, "refuse": int(Kind.R_REFUSE), "source": int(Kind.R_SOURCE),
                    "cap": _wire.MAX_FRAME, "parts": len(SOURCES)}


def boot_sources() -> bytes:
    """What the session writes to BOOT0's stdin: one R_SOURCE frame per module of SOURCES."""
    here = Path(__file__).parent
    return b"".join(_wire.frame(Kind.R_SOURCE, name.encode() + b"\n" + (here / file).read_bytes())
                    for name, file in SOURCES)


# What a remote computer without this psjobs receives: worker/ and the bottom layer, under a
# stand-in psjobs/__init__ (the real one imports the core, the backends and the host, ~500 KB
# that a worker never runs). Everything a job's own code may call is there.
BOTTOM = ("_errors", "_records", "_recordclass", "_inside", "_compat")
STAND_IN_INIT = '''"""psjobs as sent to a remote computer: what a job's code and the worker need, nothing else."""

from ._errors import (
    ExitStatusError, JobBlockedError, JobFailedError, JobNotFinishedError, JobNotFoundError,
    JobStateError, JobStopped, ProtocolError, PsJobsError, PsJobsWarning, RemoteError,
    RemoteTraceback, StopTimeoutWarning, WorkerError,
)
from ._inside import (
    job_input, read_host, stop_requested, write_debug, write_error, write_information,
    write_output, write_progress, write_verbose, write_warning,
)
from ._records import (
    ErrorRecord, InformationRecord, OutputRecord, ProgressRecord, Record, Snapshot, Stream,
)

__version__ = %r

for _obj in list(globals().values()):  # as in the real psjobs: objects say they come from psjobs
    if getattr(_obj, "__module__", "").startswith("psjobs."):
        try:
            _obj.__module__ = "psjobs"
        except (AttributeError, TypeError):
            pass
'''


def remote_package(version: str) -> dict[str, list[Any]]:
    """The psjobs modules a remote computer receives (R_MODULES' sources: name -> [source, is_package])."""
    top = Path(__file__).parent.parent
    sources: dict[str, list[Any]] = {"psjobs": [STAND_IN_INIT % version, True]}
    for name in BOTTOM:
        sources[f"psjobs.{name}"] = [(top / f"{name}.py").read_text(encoding="utf-8"), False]
    for path in sorted(Path(__file__).parent.glob("*.py")):
        is_pkg = path.stem == "__init__"
        name = "psjobs.worker" if is_pkg else f"psjobs.worker.{path.stem}"
        sources[name] = [path.read_text(encoding="utf-8"), is_pkg]
    return sources


# --- everything below runs on the remote computer ---------------------------------------------

def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _read_frame(fd: int, reader: Any, pending: list[tuple[int, bytes]]) -> tuple[int, bytes] | None:
    while not pending:
        data = os.read(fd, 65536)
        if not data:
            return None
        pending.extend(reader.feed(data))
    return pending.pop(0)


def probe() -> dict[str, Any]:
    """What this interpreter has: the session sends what is missing or different."""
    info: dict[str, Any] = {"python": list(sys.version_info[:3]), "executable": sys.executable,
                            "implementation": sys.implementation.name,
                            "magic": importlib.util.MAGIC_NUMBER.hex(),
                            "psjobs": None, "wire": None, "cloudpickle": None}
    try:
        import psjobs
        from psjobs.worker import _wire

        info["psjobs"] = getattr(psjobs, "__version__", None)
        info["wire"] = _wire.VERSION
    except Exception:
        pass
    try:
        import cloudpickle

        info["cloudpickle"] = getattr(cloudpickle, "__version__", None)
    except Exception:
        pass
    return info


class MemoryFinder(importlib.abc.MetaPathFinder, importlib.abc.InspectLoader):
    """Imports the modules the session sent, from memory (nothing is written on the remote disk).

    An entry is ``[code, is_package]``: code objects compiled by the session (marshal, when both
    interpreters share the bytecode magic number) or source text compiled here.
    """

    def __init__(self, modules: dict[str, list[Any]]) -> None:
        self.modules = modules

    def find_spec(self, fullname: str, path: Any = None,
                  target: Any = None) -> importlib.machinery.ModuleSpec | None:
        entry = self.modules.get(fullname)
        if entry is None:
            return None
        spec = importlib.util.spec_from_loader(fullname, self, origin=_sent_name(fullname),
                                               is_package=bool(entry[1]))
        return spec

    def get_source(self, fullname: str) -> str | None:
        code = self.modules[fullname][0]
        return code if isinstance(code, str) else None

    def is_package(self, fullname: str) -> bool:
        return bool(self.modules[fullname][1])

    def get_code(self, fullname: str) -> Any:
        code = self.modules[fullname][0]
        if isinstance(code, str):
            return compile(code, _sent_name(fullname), "exec", dont_inherit=True)
        return code

    def exec_module(self, module: Any) -> None:
        module.__file__ = _sent_name(module.__name__)
        exec(self.get_code(module.__name__), module.__dict__)


def _sent_name(fullname: str) -> str:
    return f"<psjobs-sent>/{fullname.replace('.', '/')}.py"


def load_modules(payload: bytes) -> dict[str, list[Any]]:
    """An R_MODULES payload: b"M" + marshal of code objects, or b"J" + json of sources."""
    import marshal

    if payload[:1] == b"M":
        return dict(marshal.loads(payload[1:]))
    return dict(json.loads(payload[1:].decode("utf-8")))


def dump_modules(sources: dict[str, list[Any]], marshalled: bool) -> bytes:
    """The session's side of load_modules (``sources``: name -> [source, is_package])."""
    import marshal

    if not sources:
        return b"J{}"
    if marshalled:
        codes = {name: [compile(src, _sent_name(name), "exec", dont_inherit=True), pkg]
                 for name, (src, pkg) in sources.items()}
        return b"M" + marshal.dumps(codes)
    return b"J" + json.dumps(sources).encode("utf-8")


def install(modules: dict[str, list[Any]]) -> None:
    """Serve ``modules`` first, dropping any version of them imported while probing."""
    tops = {name.split(".")[0] for name in modules}
    for name in list(sys.modules):
        if name.split(".")[0] in tops:
            del sys.modules[name]
    sys.meta_path.insert(0, MemoryFinder(modules))


def _child(rfd: int, wfd_unused: int, params: dict[str, Any]) -> None:
    """The worker: a process group of its own, frames from the watchdog, frames to the channel."""
    status = 70
    try:
        os.setsid()
        os.close(wfd_unused)
        out = os.dup(1)  # the channel's stdout, kept off fd 1 (and not inherited: os.dup)
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.close(null)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        from psjobs.worker._process_worker import serve

        status = serve(rfd, out, computer_name=params.get("computer"), capture_fds=True)
    except BaseException:
        import traceback

        try:
            os.write(2, traceback.format_exc().encode("utf-8", "replace"))
        except OSError:
            pass
    os._exit(status)


class _Watchdog:
    """Relays frames to the worker, and ends its process group on a stop or a closed channel."""

    def __init__(self, pid: int, to_child: int, reader: Any, grace: float) -> None:
        self.pid = pid
        self.to_child = to_child
        self.reader = reader
        self.grace = grace
        self.kill_at: float | None = None
        self.killed = False
        self.status: int | None = None
        self.stdin_open = True

    def stop(self, grace: float) -> None:
        if self.kill_at is not None:
            return
        self.kill_at = time.monotonic() + max(0.0, grace)
        for sig in (signal.SIGTERM, signal.SIGCONT):  # a suspended worker must run to act on TERM
            self.signal_all(sig)

    def signal_all(self, sig: int) -> None:
        """``sig`` to the worker's group and to every live process below this watchdog: what
        left the group (setsid, a double fork) is still below it, as its subreaper (main)."""
        try:
            os.killpg(self.pid, sig)
        except OSError:
            pass
        for pid in _below_me():
            try:
                os.kill(pid, sig)
            except OSError:
                pass

    def on_signal(self, signum: int, frame: Any) -> None:
        self.stop(self.grace)  # sshd or an administrator ends the session: end the job with it

    def relay(self, kind: int, payload: bytes) -> None:
        if kind == Kind.R_PAUSE:
            try:
                os.killpg(self.pid, signal.SIGSTOP if _wire.Pause.decode(payload).pause else signal.SIGCONT)
            except OSError:
                pass
            return
        if kind == Kind.R_STOP:
            grace = _wire.Stop.decode(payload).grace
            self.stop(self.grace if grace is None else grace)
            return
        try:
            _write_all(self.to_child, _wire.frame(kind, payload))
        except OSError:
            pass  # the worker is gone; its exit status tells the rest

    def on_stdin(self) -> None:
        try:
            data = os.read(0, 65536)
        except OSError:
            data = b""
        if not data:
            self.stdin_open = False
            self.stop(self.grace)  # the channel closed: the session went away
            return
        for kind, payload in self.reader.feed(data):
            self.relay(kind, payload)

    def reap(self) -> None:
        if self.kill_at is None:
            self.end_leftovers()
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = self.pid, 0
        if pid == self.pid:
            self.status = status

    def end_leftovers(self) -> None:
        """The worker ended by itself: what it started in its process group and left running ends
        with it (SIGKILL), as a local job's does (the process backend's _kill_leftovers), so that it
        does not run on after the job, and the session, on this computer. Sent before the worker is
        reaped: until then its pid, the group's id, cannot be reused. What left the group (setsid)
        is not ended (see docs/remote.md)."""
        try:
            if os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
                return  # still running
        except (AttributeError, OSError):
            return  # no waitid here: the group is left as it is
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except OSError:
            pass  # nothing of the group is left

    def escalate(self) -> None:
        if self.kill_at is not None and not self.killed and time.monotonic() >= self.kill_at:
            self.killed = True
            self.signal_all(signal.SIGKILL)

    def run(self, pending: list[tuple[int, bytes]]) -> int | None:
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, self.on_signal)
        for kind, payload in pending:
            self.relay(kind, payload)
        try:
            pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            pidfd = -1  # an old kernel: poll the child every 50 ms
        poller = select.poll()
        poller.register(0, select.POLLIN)
        poller.register(wake_r, select.POLLIN)
        if pidfd >= 0:
            poller.register(pidfd, select.POLLIN)
        while self.status is None:
            timeout = 50 if pidfd < 0 or self.kill_at is not None else None
            for fd, _ev in poller.poll(timeout):
                if fd == 0:
                    self.on_stdin()
                    if not self.stdin_open:
                        poller.unregister(0)
                elif fd == wake_r:
                    os.read(wake_r, 512)
            self.reap()
            self.escalate()
        if self.kill_at is not None:
            # A stop: report the end only when nothing of the job is left.
            give_up = max(self.kill_at, time.monotonic()) + 2.0
            while not (_procs.group_gone(self.pid) and not _below_me()) and time.monotonic() < give_up:
                self.escalate()
                _reap_orphans()
                time.sleep(0.005)
        return self.status


def _below_me() -> list[int]:
    """Live processes below this one (Linux /proc; elsewhere none, and the group kill must do)."""
    stats = _procs.proc_stats() or []
    live = {pid for pid, f in stats if f and f[0] != "Z"}
    return [pid for pid in _procs.descendants(os.getpid()) if pid in live]


def _reap_orphans() -> None:
    """Reap the orphans of the job that came to this subreaper, so that they do not stay zombies."""
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass


def _become_subreaper() -> None:
    """Orphans of the job come to this watchdog instead of init (Linux 3.4+), so its stop finds
    them: prctl(PR_SET_CHILD_SUBREAPER). Standard library only, hence ctypes; elsewhere a no-op."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # 36: PR_SET_CHILD_SUBREAPER
    except Exception:
        pass


def main(params: dict[str, Any], version: tuple[int, int], mark: bytes) -> None:
    """The bootstrap's second stage (the Python minor versions already matched)."""
    info = probe()
    info["python"][:2] = list(version)  # what the first stage saw (a test may pretend)
    _write_all(1, mark + _wire.Info(info).frame())
    reader = _wire.FrameReader()
    pending: list[tuple[int, bytes]] = []
    got = _read_frame(0, reader, pending)
    if got is None or got[0] != Kind.R_MODULES:
        os._exit(0)  # the session went away, or refused this computer
    modules = load_modules(got[1])
    if modules:
        install(modules)
    rfd, wfd = os.pipe()
    _become_subreaper()
    pid = os.fork()
    if pid == 0:
        _child(rfd, wfd, params)
    os.close(rfd)
    status = _Watchdog(pid, wfd, reader, float(params.get("grace", 5.0))).run(pending)
    try:
        _write_all(1, _wire.Exit(status).frame())
    except OSError:
        pass  # the channel is gone
    os._exit(0)
