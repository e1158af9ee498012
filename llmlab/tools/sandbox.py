"""The python tool: run a program in a fresh bubblewrap sandbox and return what it printed.

Threat model
------------
The program is written by a language model, or by whoever talks to it, so it is treated as hostile: arbitrary
Python, native code included (`ctypes`, crafted bytecode that crashes the interpreter). Nothing inside the
sandboxed process is trusted: its interpreter, builtins and memory are the attacker's to change, and nothing
here relies on them. (The audit hook this replaces was disarmed from Python in a dozen lines: issue 18.) The
boundary is the operating system: each call runs in a new process under bubblewrap (`bwrap`), in new user, PID,
network, IPC, UTS, cgroup and mount namespaces, as uid and gid 65534 with no capabilities and no_new_privs,
behind a seccomp filter.

Inside the boundary, the program has:
- a root of its own that holds read-only binds of the interpreter, its standard library (the interpreter's own
  site-packages hidden; the project's virtual environment is never bound), the system's shared libraries
  (/usr/lib, /lib*, /usr/lib64: package files, no secrets) and time zones; a fresh /proc of its PID namespace;
  a minimal, read-only /dev (null, zero, urandom, ...); and a tmpfs at /tmp of at most MAX_TMP_MB, its working
  directory, HOME and TMPDIR. The tmpfs dies with the sandbox: no folder is ever made on the host, so none is
  left behind, even when the server is killed mid-call;
- one process, pid 1 of its PID namespace. Threads work; fork, vfork and clone without CLONE_THREAD fail with
  EPERM, so `subprocess`, `os.system` and `multiprocessing` fail (and there is no shell or other program to
  run). One process keeps RLIMIT_AS a bound on all of its memory;
- AF_UNIX sockets, in a network namespace of its own;
- its standard descriptors: stdin, a nameless host file (O_TMPFILE) holding its own code; stdout and stderr,
  one nameless host file that takes at most MAX_FILE_MB, of which the server reads only the start and the end.

Outside the boundary:
- the host's files: the checkout, its runs and checkpoints, /root and /home, /etc, the host's /proc and /sys,
  sockets on disk. Nothing it writes outlives the call;
- other processes: its PID namespace holds only itself, so `kill`, `setpriority` or /proc/PID on the server's
  pid find nothing, and calls on every process (kill(-1), PRIO_USER) reach only the sandbox; ptrace,
  process_vm_readv/writev and the pidfd calls are refused by seccomp as well;
- the network: IP sockets are refused by seccomp, and the empty network namespace would hold without that;
  the host's abstract unix sockets belong to the host's network namespace;
- the environment: the program starts with HOME, TMPDIR and PATH, and bwrap itself with an empty environment,
  so the server's variables (API keys) are in no process of the sandbox;
- the kernel's rarer doors: mounts (the old and the new API), pivot_root, chroot, setns, unshare and clone
  with CLONE_NEW* flags, keyctl, bpf, perf_event_open, userfaultfd, io_uring, modules, kexec, reboot, swap,
  open_by_handle_at, SysV IPC and memfd_create (memory that RLIMIT_AS does not count) fail with EPERM; clone3
  fails with ENOSYS (its flags sit behind a pointer the filter cannot read; glibc falls back to clone); the
  x32 ABI's calls fail with EPERM, and a call through i386's int 0x80 (other numbers) kills the process;
- resources: a bootstrap sets rlimits before the program runs, soft = hard so that they cannot be raised
  again: CPU seconds, address space, file size, open files, tasks (threads) and core dumps (1 byte: no core
  file, and no core_pattern pipe helper, which the kernel would run as host root; a limit of 0 does not stop
  a pipe). A wall-clock timeout SIGKILLs bwrap, and the program dies with it (`--die-with-parent`), as it does
  when the server dies.

Assumed of the host: Linux on x86_64 or aarch64 with seccomp filters and user namespaces; bubblewrap on PATH
(`apt-get install bubblewrap`, or scripts/install-sandbox.sh; tested with 0.8.0; `--size` needs 0.7 or newer,
so Ubuntu 22.04's 0.6.1 is refused); and either root or unprivileged user namespaces
(user.max_user_namespaces > 0; Ubuntu 24.04 also restricts them through AppArmor:
kernel.apparmor_restrict_unprivileged_userns). `check_sandbox` starts one sandbox, checks from inside that the
filter, the uid and the capabilities are as above, and otherwise says what is missing; then the tool refuses
every call. It never falls back to a weaker sandbox.

Not defended, and known limits:
- the kernel: a kernel bug reachable through the system calls left open (files, memory, threads, AF_UNIX
  sockets, /proc) escapes this sandbox, as it would escape a container. Code that may carry a kernel exploit
  belongs in a virtual machine;
- a server run as root: bwrap maps the sandbox's uid 65534 to uid 0 outside (a user namespace maps to its
  creator). The sandbox still has no capabilities and sees only read-only system files, but those files count
  as its own (readable even at mode 0600), a kernel escape would land as root, and RLIMIT_NPROC does not bind
  (the kernel exempts uid 0), so threads are bounded only by the address space. Run the server as an ordinary
  user to make the uid a second wall;
- information: the kernel version, the CPU, system-wide /proc files (meminfo, loadavg, uptime), the paths of
  the binds (the interpreter's prefix) and timing are visible;
- memory outside RLIMIT_AS is bounded but not nil: the tmpfs, pipe and socket buffers, kernel objects;
- a program that exits with code 128 + N is reported as killed by signal N (bwrap reports a signal that way).

Costs: only the standard library can be imported; no subprocesses; no network; no /etc (no user names, hosts
or certificates); Linux only.
"""

from __future__ import annotations

import errno
import functools
import math
import os
import platform
import re
import select
import shutil
import signal
import site
import struct
import subprocess
import sys
import sysconfig
import tempfile

from llmlab.errors import LLMLabError
from llmlab.tools.result import MAX_OUTPUT_CHARS, TRUNCATION_MARKER, ToolResult, truncate

MAX_FILE_MB = 16  # the largest file the program may write, its captured output included
MAX_TMP_MB = 64  # all files in its /tmp together
MAX_OPEN_FILES = 64
MAX_TASKS = 64  # threads, the main one included (binds only where the server is not root: see above)
SANDBOX_ID = 65534  # uid and gid inside: "nobody"
WORKDIR = "/tmp"
INSTALL_HINT = "`apt-get install bubblewrap` (Debian, Ubuntu) or `dnf install bubblewrap` (Fedora)"


class SandboxUnavailable(LLMLabError):
    """The python tool cannot run here: bubblewrap is missing or cannot create its namespaces."""


# Runs in the sandbox as `python -I -S -c _BOOTSTRAP CPU_S MEMORY_BYTES FILE_BYTES OPEN_FILES TASKS`, with the
# program on stdin. It is a convenience, not a guard: the program can change anything here, except the limits,
# which are set before it runs and which an unprivileged process cannot raise. It imports traceback and
# linecache only when it has a traceback to print: they cost more than the rest of its start.
_BOOTSTRAP = r'''
import io, os, resource, signal, sys


def limit(kind, soft, hard=None):
    """Set soft and hard limits, never above the inherited hard limit (raising it would fail)."""
    hard = soft if hard is None else hard
    inherited = resource.getrlimit(kind)[1]
    if inherited != resource.RLIM_INFINITY:
        soft, hard = min(soft, inherited), min(hard, inherited)
    resource.setrlimit(kind, (soft, hard))


def print_traceback(e, code):
    """The program's traceback, its lines quoted, without the frames of this bootstrap (file "<string>")."""
    import linecache, traceback

    linecache.cache["<sandbox>"] = (len(code), None, code.splitlines(True), "<sandbox>")
    report = traceback.TracebackException(type(e), e, e.__traceback__)
    todo = [report]
    while todo:
        part = todo.pop()
        if part is not None:
            part.stack = traceback.StackSummary.from_list([f for f in part.stack if f.filename != "<string>"])
            todo += [part.__cause__, part.__context__]
    print("".join(report.format()), end="", file=sys.stderr)


def main():
    cpu_s, memory_bytes, file_bytes, open_files, tasks = (int(a) for a in sys.argv[1:6])
    code = sys.stdin.read()
    sys.stdin = io.StringIO()
    # SIGXCPU at the soft limit, SIGKILL one second later. The program is its PID namespace's pid 1, for which
    # the kernel ignores signals left at their default action: hence a handler
    signal.signal(signal.SIGXCPU, lambda number, frame: os._exit(128 + number))
    limit(resource.RLIMIT_CPU, cpu_s, cpu_s + 1)
    limit(resource.RLIMIT_AS, memory_bytes)
    limit(resource.RLIMIT_FSIZE, file_bytes)
    limit(resource.RLIMIT_NOFILE, open_files)
    limit(resource.RLIMIT_NPROC, tasks)
    limit(resource.RLIMIT_CORE, 1)  # 1 byte: no core file, and the kernel skips a core_pattern pipe
    program = type(sys)("__main__")
    sys.modules["__main__"] = program
    try:
        exec(compile(code, "<sandbox>", "exec"), program.__dict__)
    except SystemExit:
        raise
    except BaseException as e:
        print_traceback(e, code)
        sys.exit(1)


main()
'''


def check_sandbox() -> str:
    """The path of `bwrap`, once a sandbox has started and run a program on this machine (checked once per
    process); raises SandboxUnavailable saying what is missing and how to fix it."""
    if sys.platform != "linux":
        raise SandboxUnavailable(f"the python tool needs Linux (bubblewrap and seccomp), not {sys.platform}")
    if platform.machine() not in _SYSCALLS:
        raise SandboxUnavailable(f"the python tool's seccomp filter knows x86_64 and aarch64, not "
                                 f"{platform.machine()}")
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxUnavailable(f"the python tool needs bubblewrap (bwrap), which is not installed: {INSTALL_HINT}, "
                                 f"or run scripts/install-sandbox.sh")
    _probe(bwrap)
    return bwrap


# The probe's program checks that the walls it cannot see from outside are up: the seccomp filter, no
# capabilities, no_new_privs, the unprivileged uid.
_PROBE = f"""
import os
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
walls = [status[k].strip() for k in ("Seccomp", "CapEff", "NoNewPrivs")] + [os.getuid(), os.getgid()]
print("sandbox ok" if walls == ["2", "0000000000000000", "1", {SANDBOX_ID}, {SANDBOX_ID}] else walls)
"""


@functools.cache  # only a success is kept: a failed probe raises, and is tried again on the next call
def _probe(bwrap: str) -> None:
    with tempfile.TemporaryFile() as out:
        try:
            returncode, _ = _run(bwrap, _PROBE, out, timeout_s=30, memory_mb=256, cpu_s=30)
        except OSError as e:
            raise SandboxUnavailable(f"bubblewrap ({bwrap}) cannot be run: {e}") from e
        output, _, _ = _read_output(out, MAX_OUTPUT_CHARS)
    if returncode != 0 or output != "sandbox ok\n":
        raise SandboxUnavailable(
            f"bubblewrap cannot start the python tool's sandbox here (exit code {returncode}): {output.strip()!r}. "
            f"It needs user namespaces: run as root, or allow unprivileged ones (sysctl user.max_user_namespaces; "
            f"on Ubuntu 24.04 kernel.apparmor_restrict_unprivileged_userns=0 or an AppArmor profile for bwrap); "
            f"and bubblewrap 0.7 or newer (for --size): {INSTALL_HINT}")


def run_python(code: str, *, timeout_s: float = 5, memory_mb: int = 256,
               max_output: int = MAX_OUTPUT_CHARS) -> ToolResult:
    """Run `code` in a sandbox (see the module docstring); return its stdout and stderr, interleaved and cut to
    `max_output` characters. ok is False when the program failed: then the text starts with "error: " and the
    reason (a timeout, the memory or CPU limit, a signal, an exit code), followed by what it printed (for an
    exception, its traceback); or when the sandbox cannot run here, saying why."""
    try:
        bwrap = check_sandbox()
    except SandboxUnavailable as e:
        return ToolResult(truncate(f"error: {e}", max_output), ok=False)
    cpu_s = math.ceil(timeout_s) + 1  # CPU time backs up the wall clock
    with tempfile.TemporaryFile() as out:  # O_TMPFILE on Linux: a file without a name, gone when closed
        try:
            returncode, timed_out = _run(bwrap, code, out, timeout_s=timeout_s, memory_mb=memory_mb, cpu_s=cpu_s)
        except OSError as e:  # bwrap removed since the probe, no file descriptors left, ...
            text = f"error: the python tool could not start its sandbox: {e}"
            return ToolResult(truncate(text, max_output), ok=False)
        output, tail, size = _read_output(out, max_output)
    killed_by = _killed_by(returncode)
    if timed_out:
        reason = f"timed out after {timeout_s:g} s"
    elif returncode == 0:
        return ToolResult(output, ok=True)
    elif killed_by == signal.SIGXCPU:
        reason = f"CPU time limit of {cpu_s} s exceeded"
    elif killed_by is not None:
        reason = f"killed by signal {killed_by.name}"
    elif size >= MAX_FILE_MB * 2**20:
        reason = f"output limit of {MAX_FILE_MB} MB exceeded"
    elif re.search(r"^MemoryError\b", tail, re.MULTILINE):
        reason = f"memory limit of {memory_mb} MB exceeded"
    else:
        reason = f"exit code {returncode}"
    return ToolResult(truncate(f"error: {reason}" + (f"\n{output}" if output else ""), max_output), ok=False)


def _run(bwrap: str, code: str, out, *, timeout_s: float, memory_mb: int, cpu_s: int) -> tuple[int, bool]:
    """Run `code` in a sandbox writing its output to the file `out`; (bwrap's exit code, whether it timed out)."""
    seccomp, seccomp_write = os.pipe()  # bwrap reads the filter from a descriptor
    try:
        with open(seccomp_write, "wb") as pipe:
            pipe.write(_seccomp_program(platform.machine()))  # a few hundred bytes: fits the pipe's buffer
        command = [bwrap, *_bwrap_options(), "--seccomp", str(seccomp), "--",
                   _interpreter(), "-I", "-S", "-B", "-u", "-X", "utf8", "-c", _BOOTSTRAP, str(cpu_s),
                   str(memory_mb * 2**20), str(MAX_FILE_MB * 2**20), str(MAX_OPEN_FILES), str(MAX_TASKS)]
        with tempfile.TemporaryFile() as program:  # a file, not a pipe: writing it cannot block
            program.write(code.encode("utf-8", "replace"))
            program.seek(0)
            # env={}: nothing of the server's environment enters the sandbox's processes, bwrap's included
            child = subprocess.Popen(command, stdin=program, stdout=out, stderr=subprocess.STDOUT, env={},
                                     pass_fds=(seccomp,), start_new_session=True)
    finally:
        os.close(seccomp)
    if _wait(child, timeout_s):
        return child.returncode, False
    # bwrap leads its own process group (unreaped, so its pid cannot have been reused); the program, pid 1 of its
    # namespace, is killed as bwrap dies (--die-with-parent)
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    return child.returncode, True


def _wait(child: subprocess.Popen, timeout_s: float) -> bool:
    """Wait for `child` to end, at most `timeout_s`; whether it ended. Through a pidfd, which wakes up as the
    child exits (Popen.wait with a timeout polls, with sleeps of up to 50 ms)."""
    try:
        pidfd = os.pidfd_open(child.pid)
    except OSError:  # Linux before 5.3
        try:
            child.wait(timeout_s)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        poll = select.poll()  # not select.select, which fails on descriptors past 1023 (a busy server's)
        poll.register(pidfd, select.POLLIN)
        ended = bool(poll.poll(timeout_s * 1000))
    finally:
        os.close(pidfd)
    if ended:
        child.wait()
    return ended


def _killed_by(returncode: int) -> signal.Signals | None:
    """The signal that ended the program: bwrap exits with 128 + N when signal N killed it (and is itself
    reported as -N when killed)."""
    number = -returncode if returncode < 0 else returncode - 128
    return signal.Signals(number) if number in _SIGNALS else None


_SIGNALS = frozenset(s.value for s in signal.Signals)


@functools.cache
def _interpreter() -> str:
    """The real path of the base interpreter (a virtual environment's python is a link to it, or a copy)."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


@functools.cache
def _bwrap_options() -> tuple[str, ...]:
    """bwrap's options: namespaces, the read-only binds the interpreter needs, /proc, /dev, the tmpfs, the
    environment (the seccomp filter is added per call: its descriptor is used up)."""
    binds = {_interpreter()}
    base = {"base": sys.base_prefix, "platbase": sys.base_exec_prefix, "installed_base": sys.base_prefix,
            "installed_platbase": sys.base_exec_prefix}  # the interpreter's own, not a virtual environment's
    for name in ("stdlib", "platstdlib"):
        binds.add(os.path.realpath(sysconfig.get_path(name, vars=base)))
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        library = os.path.join(sysconfig.get_config_var("LIBDIR") or "", sysconfig.get_config_var("INSTSONAME") or "")
        if os.path.isfile(library):
            binds.add(os.path.realpath(library))
    links = []
    for path in ("/usr/lib", "/usr/lib64", "/usr/lib32", "/lib", "/lib64", "/lib32", "/libx32"):
        if os.path.islink(path):  # merged /usr: /lib -> usr/lib
            links += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            binds.add(path)
    if os.path.isdir("/usr/share/zoneinfo"):  # public data: the zoneinfo module's time zones
        binds.add("/usr/share/zoneinfo")
    if sys.prefix != sys.base_prefix:  # never the virtual environment: it holds the project's packages
        binds = {b for b in binds if not _inside(b, os.path.realpath(sys.prefix))}
    binds = sorted(b for b in binds if not any(_inside(b, other) for other in binds if other != b))
    # --as-pid-1: the program is pid 1 inside. Else bwrap's reaper is, and it outlives bwrap for a moment: an
    # orphan for the host's pid 1 to reap, a zombie per call where that is the server (a container without init)
    options = ["--unshare-all", "--unshare-user", "--uid", str(SANDBOX_ID), "--gid", str(SANDBOX_ID),
               "--hostname", "sandbox", "--die-with-parent", "--new-session", "--as-pid-1"]
    for path in binds:
        options += ["--ro-bind", path, path]
    options += links
    for packages in site.getsitepackages([sys.base_prefix]):  # third-party packages of the interpreter: hidden
        real = os.path.realpath(packages)
        if os.path.isdir(real) and any(_inside(real, b) for b in binds):
            options += ["--tmpfs", real, "--remount-ro", real]
    options += ["--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev",
                "--size", str(MAX_TMP_MB * 2**20), "--tmpfs", WORKDIR,
                "--remount-ro", "/",  # bwrap's root is a tmpfs the sandbox would otherwise own and fill
                "--chdir", WORKDIR, "--clearenv", "--setenv", "HOME", WORKDIR, "--setenv", "TMPDIR", WORKDIR,
                "--setenv", "PATH", "/usr/bin:/bin"]
    return tuple(options)


def _inside(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _read_output(out, max_output: int) -> tuple[str, str, int]:
    """(the first `max_output` characters, truncated; the last few hundred, to find the error; the size in
    bytes) of the captured output; only those bytes are read, however much the program wrote."""
    size = out.seek(0, os.SEEK_END)
    out.seek(0)
    raw = out.read(4 * max_output)  # a character is at most 4 bytes
    head = raw.decode("utf-8", "replace")
    if size > len(raw):  # the start of a longer output: marked as cut even when it fits
        text = head[: max_output - len(TRUNCATION_MARKER)] + TRUNCATION_MARKER
    else:
        text = truncate(head, max_output)
    out.seek(max(size - 512, 0))
    tail = out.read().decode("utf-8", "replace")
    return text, tail, size


# ---- the seccomp filter -------------------------------------------------------------------------------------
# A classic BPF program, written here rather than with libseccomp so that the tool needs no dependency. The
# kernel runs it on every system call over struct seccomp_data {int nr; u32 arch; u64 ip; u64 args[6]}
# (linux/seccomp.h); an instruction is struct sock_filter {u16 code; u8 jt; u8 jf; u32 k} (linux/filter.h),
# jt and jf counting the instructions to skip when the test holds or fails.

# system call -> its number on (x86_64, aarch64), from asm/unistd_64.h and asm-generic/unistd.h; None: absent
_SYSCALLS_BY_NAME = {
    # other processes (invisible in the PID namespace anyway)
    "ptrace": (101, 117), "process_vm_readv": (310, 270), "process_vm_writev": (311, 271),
    "pidfd_open": (434, 434), "pidfd_send_signal": (424, 424), "pidfd_getfd": (438, 438), "kcmp": (312, 272),
    # starting processes: one process per sandbox keeps RLIMIT_AS a bound on all of its memory
    "fork": (57, None), "vfork": (58, None),
    # the sandbox's own walls: mounts and namespaces
    "mount": (165, 40), "umount2": (166, 39), "pivot_root": (155, 41), "chroot": (161, 51),
    "setns": (308, 268), "unshare": (272, 97), "move_mount": (429, 429), "open_tree": (428, 428),
    "fsopen": (430, 430), "fsconfig": (431, 431), "fsmount": (432, 432), "fspick": (433, 433),
    "mount_setattr": (442, 442), "open_by_handle_at": (304, 265), "name_to_handle_at": (303, 264),
    # kernel attack surface no Python program needs
    "bpf": (321, 280), "perf_event_open": (298, 241), "userfaultfd": (323, 282),
    "io_uring_setup": (425, 425), "io_uring_enter": (426, 426), "io_uring_register": (427, 427),
    "keyctl": (250, 219), "add_key": (248, 217), "request_key": (249, 218), "fanotify_init": (300, 262),
    "kexec_load": (246, 104), "kexec_file_load": (320, 294), "init_module": (175, 105),
    "finit_module": (313, 273), "delete_module": (176, 106), "reboot": (169, 142), "swapon": (167, 224),
    "swapoff": (168, 225), "acct": (163, 89), "quotactl": (179, 60), "quotactl_fd": (443, 443),
    "syslog": (103, 116), "lookup_dcookie": (212, 18), "vhangup": (153, 58), "personality": (135, 92),
    "iopl": (172, None), "ioperm": (173, None), "modify_ldt": (154, None), "uselib": (134, None),
    # memory that RLIMIT_AS does not count
    "memfd_create": (319, 279), "memfd_secret": (447, 447), "shmget": (29, 194), "msgget": (68, 186),
    "semget": (64, 190),
    # filtered on their arguments below
    "clone": (56, 220), "clone3": (435, 435), "socket": (41, 198),
}
_ARGUMENT_CHECKED = ("clone", "clone3", "socket")
_SYSCALLS = {machine: {name: numbers[i] for name, numbers in _SYSCALLS_BY_NAME.items() if numbers[i] is not None}
             for i, machine in enumerate(("x86_64", "aarch64"))}
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}  # linux/audit.h
_X32_SYSCALL_BIT = 0x40000000
_CLONE_THREAD = 0x00010000
_CLONE_NEW_NAMESPACES = 0x7E020000  # CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET
_AF_UNIX = 1
_LD_W_ABS, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06
_RET_KILL_PROCESS, _RET_ERRNO, _RET_ALLOW = 0x80000000, 0x00050000, 0x7FFF0000
_NR, _ARCH, _ARG0 = 0, 4, 16  # offsets in struct seccomp_data (args[0]'s low 32 bits: little-endian)


@functools.cache
def _seccomp_program(machine: str) -> bytes:
    """The filter for `machine`, as bwrap's --seccomp reads it: the sock_filter array."""
    numbers = _SYSCALLS[machine]
    program: list = [
        (_LD_W_ABS, 0, 0, _ARCH), (_JEQ, 0, "kill", _AUDIT_ARCH[machine]),  # another ABI: kill
        (_LD_W_ABS, 0, 0, _NR),
    ]
    if machine == "x86_64":
        program.append((_JGE, "eperm", 0, _X32_SYSCALL_BIT))  # the x32 ABI's numbers
    program += [(_JEQ, "eperm", 0, nr) for name, nr in numbers.items() if name not in _ARGUMENT_CHECKED]
    program += [
        (_JEQ, "enosys", 0, numbers["clone3"]),
        (_JEQ, "clone", 0, numbers["clone"]),
        (_JEQ, "socket", 0, numbers["socket"]),
        (_RET, 0, 0, _RET_ALLOW),
        "clone", (_LD_W_ABS, 0, 0, _ARG0), (_JSET, "eperm", 0, _CLONE_NEW_NAMESPACES),  # the flags
        (_JSET, "allow", "eperm", _CLONE_THREAD),  # a thread, not a process
        "socket", (_LD_W_ABS, 0, 0, _ARG0), (_JEQ, "allow", "eperm", _AF_UNIX),  # the address family
        "allow", (_RET, 0, 0, _RET_ALLOW),
        "eperm", (_RET, 0, 0, _RET_ERRNO | errno.EPERM),
        "enosys", (_RET, 0, 0, _RET_ERRNO | errno.ENOSYS),
        "kill", (_RET, 0, 0, _RET_KILL_PROCESS),
    ]
    return _assemble(program)


def _assemble(program: list) -> bytes:
    """Instructions (code, jt, jf, k), where jt and jf may name a label (a string standing before the
    instruction it marks), to the packed sock_filter array."""
    labels, instructions = {}, []
    for item in program:
        if isinstance(item, str):
            labels[item] = len(instructions)
        else:
            instructions.append(item)
    packed = []
    for i, (code, jt, jf, k) in enumerate(instructions):
        jt, jf = (labels[j] - i - 1 if isinstance(j, str) else j for j in (jt, jf))
        packed.append(struct.pack("=HBBI", code, jt, jf, k))  # a jump past 255 instructions fails here
    return b"".join(packed)
