/* Start a command straight into a cgroup of its own, from the session's process.
 *
 *     spawn(paths, argv, envp, stdin, stdout, stderr, cwd, umask, cgroup_dir, how) -> (pid, 0, 0, born_in)
 *
 *     session --clone3(CLONE_VM | CLONE_VFORK | CLONE_INTO_CGROUP), on a stack of its own-->
 *         child, born in the job's cgroup (shares our memory until it execs; every signal blocked):
 *         setsid, stdio onto fd 0/1/2, every other descriptor closed, cwd, umask,
 *         handlers back to default, our signal mask back, execve of each path in turn
 *     where clone3 cannot (not x86-64, a kernel before 5.7, a seccomp filter that refuses it):
 *     session --vfork--> the same child, which first writes "0" to the cgroup's cgroup.procs
 *         (it moves itself: born in the session's cgroup, it is in the job's before the command
 *         runs a single instruction)
 *     a failed step: its errno and which step in `failure` (shared memory), _exit(127)
 *         -> (-1, errno, step, born_in): the caller raises it in Popen's words (_direct.py)
 *
 * Why born in the cgroup: a move takes the kernel's cgroup_threadgroup_rwsem for writing, and the
 * first move after an idle moment waits for an RCU grace period: a command started 100 ms after
 * the last took 7.4 ms to reach its exec this way, 0.32 ms born in its cgroup (load 0.3; see
 * bench/FINDINGS.md, "Born in its cgroup"). A child born there takes that lock only
 * for reading, as every fork does.
 *
 * Why not posix_spawn or subprocess: neither can put the child in a cgroup before it runs
 * (glibc 2.41's posix_spawn can, with clone3's CLONE_INTO_CGROUP; not here), so commands went
 * through the fork server, which stepped into each job's cgroup around its spawn: one more process
 * hop each way (bench/FINDINGS.md, "A command's start, split in two").
 *
 * Only async-signal-safe calls run in the child: it shares the parent's memory, so it writes
 * nothing but `failure` and its own frames (on its own stack, or below the parent's after vfork),
 * and never returns.
 */
#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef SYS_close_range
#define SYS_close_range 436
#endif
#ifndef SYS_clone3
#define SYS_clone3 435
#endif

static char **
to_strings(PyObject *seq, const char *what)
{
    /* A NULL-terminated array of the bytes objects in seq (borrowed buffers); NULL and an error. */
    PyObject *fast = PySequence_Fast(seq, what);
    if (fast == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    char **out = PyMem_Calloc((size_t)n + 1, sizeof(char *));
    if (out == NULL) {
        Py_DECREF(fast);
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(fast, i);
        if (!PyBytes_Check(item)) {
            PyErr_Format(PyExc_TypeError, "%s: bytes expected", what);
            PyMem_Free(out);
            Py_DECREF(fast);
            return NULL;
        }
        out[i] = PyBytes_AS_STRING(item);
    }
    Py_DECREF(fast);  /* the items stay alive: the caller holds seq */
    return out;
}

static int
above_stdio(int fd)
{
    /* fd, or a copy of it at 3 or above when it is 0, 1 or 2 (so no dup2 below clobbers it). */
    return fd < 3 ? fcntl(fd, F_DUPFD_CLOEXEC, 3) : fd;
}

enum { STEP_CGROUP = 1, STEP_STDIO, STEP_CWD, STEP_EXEC };

struct child_args {
    const char *cwd;
    char **paths, **argv, **envp;  /* paths: the files to try in turn, as Popen's child does */
    int in_fd, out_fd, err_fd, mask, cgroup_fd;
    const sigset_t *old;
    volatile int *failure;  /* [errno, step, ran]: the parent reads it once the child has exec'd or exited */
};

static void child(const struct child_args *a);

#if defined(__linux__) && defined(__x86_64__)
#define HAVE_CLONE_INTO 1

/* clone3's arguments as the kernel reads them (linux/sched.h's struct clone_args, which older
 * headers lack or have without `cgroup`). */
struct clone3_args {
    uint64_t flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls, set_tid,
        set_tid_size, cgroup;
};
#define INTO_CGROUP 0x200000000ULL  /* CLONE_INTO_CGROUP, Linux >= 5.7 */
#define CHILD_STACK (64 * 1024)     /* child() and the libc calls it makes need a few KiB */

/* clone3 as vfork, but born in a cgroup: the child starts on its own stack (no libc wrapper can
 * return there), so this calls child(a) from assembly; the parent gets the pid or -errno once the
 * child has exec'd or exited. The child's registers are the parent's, except rax (0) and the two
 * that the syscall instruction clobbers, so fn and a ride in r12 and r13. */
static long
clone3_into(struct clone3_args *cl, const struct child_args *a)
{
    long ret;
    register void (*fn)(const struct child_args *) __asm__("r12") = child;
    register const struct child_args *arg __asm__("r13") = a;
    __asm__ volatile(
        "syscall\n\t"
        "test %%rax, %%rax\n\t"
        "jnz 1f\n\t"
        "xor %%ebp, %%ebp\n\t"  /* the child: an outermost frame on its own stack */
        "mov %%r13, %%rdi\n\t"
        "call *%%r12\n\t"       /* never returns */
        "hlt\n\t"
        "1:\n\t"
        : "=a"(ret)
        : "0"((long)SYS_clone3), "D"(cl), "S"(sizeof *cl), "r"(fn), "r"(arg)
        : "rcx", "r11", "memory");
    return ret;
}

/* Set once clone3 proved unusable here (a kernel before 5.7, a seccomp filter): vfork from then on. */
static volatile int clone3_refused = 0;
#endif

/* The child's whole life, on a stack of its own (clone3) or in a frame below the parent's (vfork:
 * the parent's frame, suspended, is left as it was): it never returns. */
static void __attribute__((noinline, noreturn, used))
child(const struct child_args *a)
{
    a->failure[2] = 1;  /* it ran: a child the kernel killed at birth never gets here (see cspawn_spawn) */
    int step = STEP_CGROUP;
    if (a->cgroup_fd >= 0 && write(a->cgroup_fd, "0", 1) != 1)
        goto fail;
    step = STEP_STDIO;
    int fd0 = above_stdio(a->in_fd), fd1 = above_stdio(a->out_fd), fd2 = above_stdio(a->err_fd);
    if (fd0 < 0 || fd1 < 0 || fd2 < 0 || setsid() < 0)
        goto fail;
    if (dup2(fd0, 0) < 0 || dup2(fd1, 1) < 0 || dup2(fd2, 2) < 0)
        goto fail;
    if (syscall(SYS_close_range, 3U, ~0U, 0U) < 0) {
        long top = sysconf(_SC_OPEN_MAX);  /* Linux < 5.9 */
        for (long fd = 3; fd < top; fd++)
            close((int)fd);
    }
    step = STEP_CWD;
    if (a->cwd != NULL && chdir(a->cwd) < 0)
        goto fail;
    if (a->mask >= 0)
        umask((mode_t)a->mask);
    /* A handler of ours must not run in the child once signals are unblocked; an ignored signal
     * stays ignored across exec, except those Popen(restore_signals=True) restores. */
    for (int sig = 1; sig < NSIG; sig++) {
        struct sigaction sa;
        if (sigaction(sig, NULL, &sa) < 0)
            continue;
        if (sa.sa_handler != SIG_DFL && (sa.sa_handler != SIG_IGN || sig == SIGPIPE || sig == SIGXFSZ)) {
            sa.sa_handler = SIG_DFL;
            sa.sa_flags = 0;
            sigemptyset(&sa.sa_mask);
            sigaction(sig, &sa, NULL);
        }
    }
    sigprocmask(SIG_SETMASK, a->old, NULL);
    step = STEP_EXEC;
    int saved = 0;
    for (char **path = a->paths; *path != NULL; path++) {
        execve(*path, a->argv, a->envp);
        if (errno != ENOENT && errno != ENOTDIR && saved == 0)
            saved = errno;  /* as Popen: the first error that is not "not there" is the one said */
    }
    if (saved != 0)
        errno = saved;
fail:
    a->failure[0] = errno ? errno : EINVAL;
    a->failure[1] = step;
    _exit(127);
}

static PyObject *
cspawn_spawn(PyObject *self, PyObject *args)
{
    struct child_args a;
    PyObject *paths_obj, *argv_obj, *envp_obj, *cwd_obj;
    int cgroup_dir, how;
    if (!PyArg_ParseTuple(args, "OOOiiiOiii", &paths_obj, &argv_obj, &envp_obj, &a.in_fd, &a.out_fd, &a.err_fd,
                          &cwd_obj, &a.mask, &cgroup_dir, &how))
        return NULL;
    if (cwd_obj == Py_None) {
        a.cwd = NULL;
    } else if (PyBytes_Check(cwd_obj)) {
        a.cwd = PyBytes_AS_STRING(cwd_obj);
    } else {
        PyErr_SetString(PyExc_TypeError, "cwd: bytes or None expected");
        return NULL;
    }
    a.paths = to_strings(paths_obj, "paths");
    if (a.paths == NULL)
        return NULL;
    a.argv = to_strings(argv_obj, "argv");
    a.envp = a.argv == NULL ? NULL : to_strings(envp_obj, "env");
    if (a.envp == NULL) {
        PyMem_Free(a.paths);
        PyMem_Free(a.argv);  /* NULL is fine */
        return NULL;
    }
    volatile int failure[3] = {0, 0, 0};
    a.failure = failure;
    a.cgroup_fd = -1;
    sigset_t all, old;
    sigfillset(&all);
    a.old = &old;
    pid_t pid = -1;
    int fork_errno = 0, born_in = 0;
    Py_BEGIN_ALLOW_THREADS
    pthread_sigmask(SIG_SETMASK, &all, &old);
#ifdef HAVE_CLONE_INTO
    if (how == 0 && cgroup_dir >= 0 && !clone3_refused) {
        char *stack = PyMem_RawMalloc(CHILD_STACK);  /* 16-byte aligned, as the stack's top must be */
        if (stack != NULL) {
            struct clone3_args cl;
            memset(&cl, 0, sizeof cl);
            cl.flags = CLONE_VM | CLONE_VFORK | INTO_CGROUP;
            cl.exit_signal = SIGCHLD;
            cl.stack = (uint64_t)(uintptr_t)stack;
            cl.stack_size = CHILD_STACK;
            cl.cgroup = (uint64_t)cgroup_dir;
            long got = clone3_into(&cl, &a);
            PyMem_RawFree(stack);  /* the child is gone from it: exec'd or exited */
            if (got > 0 && failure[2] == 0) {
                /* Killed before it ran a single instruction: Linux 6.18 SIGKILLs a child born in a
                 * cgroup that cgroup.kill once emptied (its kill count differs from the parent's).
                 * Reaped, and started again the other way, which such a cgroup lets in. */
                int status;
                while (waitpid((pid_t)got, &status, 0) < 0 && errno == EINTR)
                    ;
            } else if (got > 0) {
                pid = (pid_t)got;
                born_in = 1;
            } else if (got == -ENOSYS || got == -EPERM || got == -E2BIG || got == -EINVAL) {
                clone3_refused = 1;
            }
            /* Other errors (the cgroup refused us, no memory): the vfork path tries, and says why. */
        }
    }
#endif
    if (!born_in) {
        if (cgroup_dir >= 0) {
            a.cgroup_fd = openat(cgroup_dir, "cgroup.procs", O_WRONLY | O_CLOEXEC);
            if (a.cgroup_fd < 0) {
                failure[0] = errno;
                failure[1] = STEP_CGROUP;
            }
        }
        if (failure[0] == 0) {
            pid = vfork();
            if (pid == 0)
                child(&a);
            if (pid < 0)
                fork_errno = errno;
        }
        if (a.cgroup_fd >= 0)
            close(a.cgroup_fd);
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (pid > 0 && failure[0] != 0) {
        int status;
        while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
            ;
    }
    Py_END_ALLOW_THREADS
    PyMem_Free(a.paths);
    PyMem_Free(a.argv);
    PyMem_Free(a.envp);
    if (failure[0] != 0)
        return Py_BuildValue("(iiii)", -1, failure[0], failure[1], born_in);
    if (pid < 0) {
        errno = fork_errno;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return Py_BuildValue("(iiii)", (int)pid, 0, 0, born_in);
}

static PyMethodDef methods[] = {
    {"spawn", cspawn_spawn, METH_VARARGS,
     "spawn(paths, argv, envp, stdin, stdout, stderr, cwd, umask, cgroup_dir, how) -> (pid, 0, 0, born_in)\n\n"
     "Start the first of paths that execs, in a session of its own, in a cgroup (cgroup_dir: an open directory of\n"
     "cgroup v2, or -1) before it runs, with these descriptors as fd 0, 1, 2 and no other; cwd (bytes) None: ours;\n"
     "umask -1: ours. how 0: born in the cgroup where clone3 can, else moved into it; how 1: always moved.\n"
     "born_in: 1 when it was born there. (-1, errno, step, born_in) when a step failed (1 cgroup, 2 stdio,\n"
     "3 cwd, 4 exec)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "psjobs.backends.process._cspawn",
    "A command started straight into its own cgroup (see _cspawn.c).", -1, methods,
};

PyMODINIT_FUNC
PyInit__cspawn(void)
{
    return PyModule_Create(&module);
}
