"""The python tool: run a program in a sandboxed child process and return what it printed.

Threat model
------------
The code is written by a language model, or by a user talking to it: code that is careless or naive
(`open("../../secrets")`, a loop that never ends, a list of 10**10 items, 10**8 lines of output), not an
expert attacker. The sandbox has to stop that code from touching anything outside its own working
directory and from taking the machine down. It defends:

- files: the program runs in a fresh temporary directory, deleted afterwards, and may read and write only
  there; elsewhere it may only read Python's standard library (the child's own `sys.path`), so the project
  (/work, the checkout, its runs and checkpoints), the user's home, /etc and /proc are out of reach. It
  cannot change directory, create links, or open a directory outside its own;
- the network: sockets cannot be created (and, where `unshare -n` works without asking, the child also runs
  in an empty network namespace, which holds even against native code);
- other processes: no fork, exec, spawn, `subprocess`, `os.system` or signals to other processes;
- native code: `ctypes`, `_posixsubprocess`, `sqlite3` (whose SQL can open any file) and the interpreter's
  test modules cannot be imported, and extension modules load only from the standard library;
- resources: rlimits on CPU seconds, address space (memory), file size (the captured output included),
  open files and processes, and a wall-clock timeout that kills the child's whole process group, so fork,
  memory and CPU bombs and output floods end in an error, not in a stuck or swapping machine;
- the environment: the child starts with `-I -S` (no site-packages, no PYTHON* variables, no user
  directory) and an environment holding only HOME and TMPDIR, both pointing at its directory.

How: a small bootstrap runs before the program. It sets the rlimits (there rather than in a `preexec_fn`,
which is unsafe in a threaded parent such as the server), and installs a Python audit hook (PEP 578), which
cannot be removed, that refuses the events above ("open", "os.listdir", "socket.__new__", "subprocess.Popen",
"import", ...). The hook reads no module globals and binds every function it calls when it is defined, so
that a program that rebinds `os.path` or builtins does not change its decisions; it also refuses the
interpreter features that could reach into it (tracing, `gc` referrers, assigning a function's code or
defaults).

Not defended: a determined attacker. Audit hooks are not a security boundary: they watch Python-level
events, and any native code, an interpreter bug or a kernel exploit goes around them; that is why native
loading is refused and why the rlimits and the network namespace back the hook up. Metadata stays visible
(`os.stat` of any path, `os.readlink` raise no audit event), and a program can write files of up to
MAX_FILE_MB each into its directory for as long as its time limit lasts. RLIMIT_NPROC does not bind root
(there the hook alone stops forks). For code you do not trust at all, use a container or a virtual machine.

Costs: only the standard library can be imported, and not all of it: `subprocess`, `asyncio` (which imports
it), `multiprocessing` pools, `ctypes` and `sqlite3` fail; a program cannot start threads when the parent
is not root (RLIMIT_NPROC is 0). POSIX only (Linux; macOS untested): the child needs the `resource` module.
"""

from __future__ import annotations

import functools
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile

from llmlab.tools import MAX_OUTPUT_CHARS, TRUNCATION_MARKER, ToolResult, truncate

MAX_FILE_MB = 16  # the largest file the program may write, its captured output included
MAX_OPEN_FILES = 64

# Runs in the child as `python -I -S -c _BOOTSTRAP CPU_S MEMORY_BYTES FILE_BYTES OPEN_FILES`, in the sandbox
# directory, with the program on stdin. Every name the hook functions use is a parameter with a default
# bound here, before the program runs (tests/test_tools.py checks that they load no globals).
_BOOTSTRAP = r'''
import io, linecache, os, posix, resource, sys, traceback, types

# Read-only tables: the hook's frame (reachable from a traceback) must hold nothing a program could edit.
DENIED = types.MappingProxyType({
    "os.system": "running shell commands", "os.exec": "starting programs", "os.posix_spawn": "starting programs",
    "os.spawn": "starting processes", "os.fork": "starting processes", "os.forkpty": "starting processes",
    "subprocess.Popen": "starting processes", "pty.spawn": "starting processes",
    "os.kill": "sending signals", "os.killpg": "sending signals", "signal.pthread_kill": "sending signals",
    "os.link": "creating links", "os.symlink": "creating links", "os.chdir": "changing the directory",
    "resource.setrlimit": "changing resource limits", "resource.prlimit": "changing resource limits",
    "sys.settrace": "tracing", "sys.setprofile": "tracing",
    "gc.get_objects": "inspecting the interpreter", "gc.get_referrers": "inspecting the interpreter",
    "gc.get_referents": "inspecting the interpreter",
})
DENIED_PREFIXES = (("socket.", "network access"), ("ctypes.", "native code (ctypes)"))
DENIED_MODULES = frozenset({
    "_ctypes", "_posixsubprocess", "_posixshmem", "_sqlite3", "_dbm", "_gdbm", "_tkinter", "_ssl", "readline",
    "_testcapi", "_testinternalcapi", "_testbuffer", "_testmultiphase", "_testimportmultiple", "_ctypes_test",
    "_xxsubinterpreters", "_xxtestfuzz", "posix",  # a fresh `posix` would bring back mkfifo and mknod
})
# event -> ((index of a path argument, index of its dir_fd argument or None), ...)
WRITES = types.MappingProxyType({
    "os.mkdir": ((0, 2),), "os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.rename": ((0, 2), (1, 3)),
    "os.chmod": ((0, 2),), "os.chown": ((0, 3),), "os.utime": ((0, 3),), "os.truncate": ((0, None),),
    "os.chflags": ((0, None),), "os.setxattr": ((0, None),), "os.removexattr": ((0, None),),
})
READS = types.MappingProxyType({"os.listdir": ((0, None),), "os.scandir": ((0, None),),
                               "os.listxattr": ((0, None),), "os.getxattr": ((0, None),)})
FUNCTION_STATE = frozenset({"__code__", "__defaults__", "__kwdefaults__"})
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def resolve(path, _getcwd=os.getcwd, _lstat=os.lstat, _readlink=os.readlink, _OSError=OSError):
    """The absolute path with symlinks resolved, or "" when there are too many links."""
    if not path.startswith("/"):
        path = _getcwd() + "/" + path
    todo = path.split("/")
    todo.reverse()
    done = []
    links = 0
    while todo:
        part = todo.pop()
        if part == "" or part == ".":
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        here = "/" + "/".join(done) + ("/" if done else "") + part
        try:
            mode = _lstat(here).st_mode
        except _OSError:  # missing (about to be created) or unreadable: taken as it is written
            done.append(part)
            continue
        if (mode & 0o170000) == 0o120000:
            links += 1
            if links > 40:
                return ""
            target = _readlink(here)
            if target.startswith("/"):
                done = []
            more = target.split("/")
            more.reverse()
            todo.extend(more)
            continue
        done.append(part)
    return "/" + "/".join(done)


def check(value, write, directory_ok, sandbox, read_roots, _resolve=resolve, _stat=os.stat, _type=type,
          _str=str, _bytes=bytes, _int=int, _OSError=OSError, _Error=PermissionError):
    """Raise unless the path `value` lies in `sandbox` (None: nowhere), or (reading) under `read_roots`."""
    kind = _type(value)
    if kind is _int:  # an open descriptor: its path was checked when it was opened
        return
    if value is None:
        value = "."
    elif kind is _bytes:
        value = value.decode("utf-8", "surrogateescape")
    elif kind is not _str:
        raise _Error("sandbox: paths must be str or bytes")
    real = _resolve(value)
    if sandbox is not None and (real == sandbox or real.startswith(sandbox + "/")):
        return
    if not write:
        for root in read_roots:
            if real == root or real.startswith(root + "/"):
                if not directory_ok:
                    try:
                        is_directory = (_stat(real).st_mode & 0o170000) == 0o040000
                    except _OSError:
                        is_directory = False
                    if is_directory:
                        raise _Error(f"sandbox: opening the directory {value} is not allowed: use os.listdir")
                return
        raise _Error(f"sandbox: reading {value} is not allowed: only the working directory and Python's "
                     f"standard library can be read")
    raise _Error(f"sandbox: writing {value} is not allowed: write files in the working directory")


def make_hook(sandbox, read_roots):
    """The audit hook; everything it uses is a default argument, bound now."""

    def hook(event, args, _sandbox=sandbox, _roots=read_roots, _check=check, _denied=DENIED,
             _prefixes=DENIED_PREFIXES, _modules=DENIED_MODULES, _writes=WRITES, _reads=READS,
             _function_state=FUNCTION_STATE, _write_flags=WRITE_FLAGS, _type=type, _str=str, _int=int,
             _Error=PermissionError, _ImportError=ImportError):
        if event in _denied:
            raise _Error(f"sandbox: {_denied[event]} is not allowed ({event})")
        for prefix, what in _prefixes:
            if event.startswith(prefix):
                raise _Error(f"sandbox: {what} is not allowed ({event})")
        if event == "open":
            path, mode, flags = args
            write = (_type(flags) is _int and (flags & _write_flags) != 0) or (
                _type(mode) is _str and ("w" in mode or "a" in mode or "x" in mode or "+" in mode))
            _check(path, write, False, _sandbox, _roots)
        elif event == "import":
            name, filename = args[0], args[1]
            if name in _modules:
                raise _ImportError(f"sandbox: module {name} is not available in the sandbox")
            if filename is not None:  # an extension module: native code, only from the standard library
                try:
                    _check(filename, False, False, None, _roots)
                except _Error:
                    raise _ImportError(f"sandbox: native module {name} is not allowed: only the standard "
                                       f"library's load") from None
        elif event in _writes or event in _reads:
            write = event in _writes
            for path_index, dir_fd_index in (_writes[event] if write else _reads[event]):
                dir_fd = args[dir_fd_index] if dir_fd_index is not None else None
                if dir_fd is not None and dir_fd != -1:  # relative to an open directory: a plain name only
                    name = args[path_index]
                    if _type(name) is not _str or "/" in name or name == "." or name == "..":
                        raise _Error(f"sandbox: {event} with dir_fd takes a plain file name")
                    continue
                _check(args[path_index], write, True, _sandbox, _roots)
        elif event == "object.__setattr__" and args[1] in _function_state:
            raise _Error(f"sandbox: assigning {args[1]} is not allowed")

    return hook


def print_traceback(e):
    """The program's traceback, without the frames of this bootstrap (file "<string>") and its hook."""
    report = traceback.TracebackException(type(e), e, e.__traceback__)
    todo = [report]
    while todo:
        part = todo.pop()
        if part is not None:
            part.stack = traceback.StackSummary.from_list([f for f in part.stack if f.filename != "<string>"])
            todo += [part.__cause__, part.__context__]
    print("".join(report.format()), end="", file=sys.stderr)


def main():
    cpu_s, memory_bytes, file_bytes, open_files = (int(a) for a in sys.argv[1:5])
    sandbox = os.getcwd()
    code = sys.stdin.read()
    sys.stdin = io.StringIO()
    limits = ((resource.RLIMIT_CPU, cpu_s, cpu_s + 1), (resource.RLIMIT_AS, memory_bytes, memory_bytes),
              (resource.RLIMIT_FSIZE, file_bytes, file_bytes), (resource.RLIMIT_NOFILE, open_files, open_files),
              (resource.RLIMIT_NPROC, 0, 0), (resource.RLIMIT_CORE, 0, 0))
    for kind, soft, hard in limits:
        resource.setrlimit(kind, (soft, hard))
    for name in ("mkfifo", "mknod"):  # they create files without raising an audit event
        for module in (os, posix):
            if hasattr(module, name):
                delattr(module, name)
    roots = tuple(resolve(p) for p in sys.path if p)
    linecache.cache["<sandbox>"] = (len(code), None, code.splitlines(True), "<sandbox>")
    program = types.ModuleType("__main__")
    sys.modules["__main__"] = program
    sys.addaudithook(make_hook(sandbox, roots))
    try:
        exec(compile(code, "<sandbox>", "exec"), program.__dict__)
    except SystemExit:
        raise
    except BaseException as e:
        print_traceback(e)
        sys.exit(1)


main()
'''


@functools.cache
def _network_isolation() -> tuple[str, ...]:
    """The command prefix that runs the child in an empty network namespace, if this machine allows it
    without a password: `unshare -n` (as root, or with CAP_SYS_ADMIN) or `unshare -r -n` (unprivileged
    user namespaces); () where neither works."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    for flags in (("-n",), ("-r", "-n")):
        try:
            works = subprocess.run([unshare, *flags, "true"], capture_output=True, timeout=10).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            works = False
        if works:
            return (unshare, *flags, "--")
    return ()


def _remove_tree(path: str) -> None:
    """Delete the sandbox directory, even where the program made parts of it unreadable."""
    for root, dirs, _ in os.walk(path):
        for d in dirs:  # top-down: a directory is made accessible before os.walk enters it
            try:
                os.chmod(os.path.join(root, d), 0o700)
            except OSError:
                pass
    shutil.rmtree(path, ignore_errors=True)


def run_python(code: str, *, timeout_s: float = 5, memory_mb: int = 256,
               max_output: int = MAX_OUTPUT_CHARS) -> ToolResult:
    """Run `code` in a sandboxed child process (see the module docstring); return its stdout and stderr,
    interleaved and cut to `max_output` characters. ok is False when the program failed: then the text
    starts with "error: " and the reason (a timeout, the memory or CPU limit, an exit code), followed by
    what it printed (for an exception, its traceback)."""
    if os.name != "posix":
        return ToolResult("error: the python tool needs a POSIX system (Linux or macOS)", ok=False)
    cpu_s = math.ceil(timeout_s) + 1  # CPU time backs up the wall clock
    sandbox = os.path.realpath(tempfile.mkdtemp(prefix="llmlab-sandbox-"))
    try:
        with tempfile.TemporaryFile() as out:
            command = [*_network_isolation(), sys.executable, "-I", "-S", "-B", "-u", "-X", "utf8",
                       "-c", _BOOTSTRAP, str(cpu_s), str(memory_mb * 2**20), str(MAX_FILE_MB * 2**20),
                       str(MAX_OPEN_FILES)]
            child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT,
                                     cwd=sandbox, env={"HOME": sandbox, "TMPDIR": sandbox}, start_new_session=True)
            timed_out = False
            try:
                child.communicate(code.encode("utf-8", "replace"), timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                try:
                    os.killpg(child.pid, signal.SIGKILL)  # the child leads its own process group (new session)
                except ProcessLookupError:
                    pass
                child.communicate()
            output, tail, size = _read_output(out, max_output)
    finally:
        _remove_tree(sandbox)
    if timed_out:
        reason = f"timed out after {timeout_s:g} s"
    elif child.returncode == 0:
        return ToolResult(output, ok=True)
    elif child.returncode == -signal.SIGXCPU:
        reason = f"CPU time limit of {cpu_s} s exceeded"
    elif child.returncode < 0:
        reason = f"killed by signal {signal.Signals(-child.returncode).name}"
    elif size >= MAX_FILE_MB * 2**20:
        reason = f"output limit of {MAX_FILE_MB} MB exceeded"
    elif re.search(r"^MemoryError\b", tail, re.MULTILINE):
        reason = f"memory limit of {memory_mb} MB exceeded"
    else:
        reason = f"exit code {child.returncode}"
    return ToolResult(truncate(f"error: {reason}" + (f"\n{output}" if output else ""), max_output), ok=False)


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
