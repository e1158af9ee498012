"""Escapes the python tool's sandbox must stop: each written as an attacker would, each followed by a look at
the host, not only at the error.

After every attack `Host.assert_untouched` checks that the secret file (a file of the host's, which this
process can read) is unchanged and its content appears nowhere in the output, nor does the secret that this
process holds in its environment (the stand-in for the server's API key); that nothing was written outside
(markers in the host's folder, the checkout, the temporary directory and the home directory); that this
process and another process of the same user (a stand-in for the server's workers) are alive at their
priority; that no line of the host's /etc/passwd came back; and that no `llmlab-sandbox-*` folder was left.
Each program gets those paths and pids as variables (SECRET_FILE, HOST_DIR, MARKERS, PARENT, VICTIM).
"""

from __future__ import annotations

import json
import os
import platform
import secrets
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from llmlab.tools.result import ToolResult
from llmlab.tools.sandbox import WORKDIR, SandboxUnavailable, check_sandbox, run_python

REPO = Path(__file__).resolve().parents[1]


def _sandbox_missing() -> str:
    try:
        check_sandbox()
    except SandboxUnavailable as e:
        return str(e)
    return ""


SANDBOX_MISSING = _sandbox_missing()
pytestmark = pytest.mark.skipif(bool(SANDBOX_MISSING), reason=f"the python tool's sandbox cannot run here: "
                                                                 f"{SANDBOX_MISSING}")
PASSWD = Path("/etc/passwd").read_text().splitlines()[0] if Path("/etc/passwd").exists() else "root:x:0:0"


def _sandbox_folders() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("llmlab-sandbox-*"))


def _priority(pid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, pid)


@dataclass
class Host:
    """What an attack must leave as it was."""

    folder: Path
    secret: str
    victim: subprocess.Popen
    markers: list[Path]
    priorities: dict[int, int]
    folders: set[Path]

    @property
    def secret_file(self) -> Path:
        return self.folder / "secret.txt"

    def attack(self, code: str, timeout_s: float = 2) -> ToolResult:
        """Run `code` in the sandbox with the host's paths and pids as variables; check the host."""
        values = {"SECRET_FILE": str(self.secret_file), "HOST_DIR": str(self.folder), "PARENT": os.getpid(),
                  "VICTIM": self.victim.pid, "MARKERS": [str(m) for m in self.markers]}
        prelude = "".join(f"{name} = {value!r}\n" for name, value in values.items())
        result = run_python(prelude + code, timeout_s=timeout_s)
        self.assert_untouched(result)
        return result

    def assert_untouched(self, result: ToolResult) -> None:
        assert self.secret not in result.text, result.text
        assert PASSWD not in result.text, result.text
        assert sorted(p.name for p in self.folder.iterdir()) == ["secret.txt"]
        assert self.secret_file.read_text() == self.secret
        assert not [m for m in self.markers if os.path.lexists(m)]
        assert self.victim.poll() is None, "the other process was killed"
        assert {pid: _priority(pid) for pid in self.priorities} == self.priorities
        assert _sandbox_folders() <= self.folders


@pytest.fixture(scope="module")
def victim():
    process = subprocess.Popen(["sleep", "600"])
    yield process
    process.kill()
    process.wait()


@pytest.fixture
def host(tmp_path, monkeypatch, victim):
    token = secrets.token_hex(8)
    secret = f"s3cr3t-{token}"
    (tmp_path / "secret.txt").write_text(secret)
    monkeypatch.setenv("LLMLAB_TEST_SECRET", secret)
    markers = [tmp_path / "escaped"] + [Path(d) / f"llmlab-escaped-{token}"
                                        for d in (REPO, tempfile.gettempdir(), Path.home())]
    yield Host(tmp_path, secret, victim, markers, {pid: _priority(pid) for pid in (os.getpid(), victim.pid)},
               _sandbox_folders())
    for marker in markers[1:]:  # only there if a test failed
        if marker.exists():
            marker.unlink()


# ---- the escape that broke the audit-hook sandbox (issue 18) ----------------------------------------------

HOOK_ESCAPE = '''
import os


class Grab:
    """Compared with a mappingproxy, it is handed the dict behind the proxy, and empties it."""

    def __eq__(self, other):
        if isinstance(other, dict):
            other.clear()
        return False

    __hash__ = object.__hash__


cleared = []
try:
    open("/etc/passwd")  # refused: the traceback runs through the guard's own frame
except BaseException as e:
    tb = e.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        while frame is not None:
            for name, value in list(frame.f_locals.items()):
                if type(value).__name__ == "mappingproxy" and "os.system" in value:
                    value == Grab()
                    cleared.append(name)
            frame = frame.f_back
        tb = tb.tb_next
print("deny tables cleared:", cleared)
status = os.system(f"cat /etc/passwd > {MARKERS[0]}; cat /etc/passwd {SECRET_FILE}; env")
print("os.system returned", status)
'''


def test_the_audit_hook_escape_reaches_no_shell(host):
    result = host.attack(HOOK_ESCAPE)
    assert "deny tables cleared: []" in result.text  # no guard inside the process to disarm
    status = int(result.text.split("os.system returned ")[1])
    assert status != 0  # no shell was started


# ---- files ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("code", [
    "print(open(PATH).read())",
    "import os\nprint(os.read(os.open(PATH, os.O_RDONLY), 10000))",
    "import pathlib\nprint(pathlib.Path(PATH).read_text())",
    "import io\nprint(io.open_code(PATH).read())",
    "print(open('../../../../../../..' + PATH).read())",
    "print(open('/proc/self/root' + PATH).read())",
    "print(open('/proc/1/root' + PATH).read())",
    "import os\nos.symlink(PATH, 'link')\nprint(open('link').read())",
    "import os\nos.link(PATH, 'hard')\nprint(open('hard').read())",
    "import os\nos.chdir(os.path.dirname(PATH))\nprint(open(os.path.basename(PATH)).read())",
    "import linecache\nprint(''.join(linecache.getlines(PATH)) or 1/0)",
])
@pytest.mark.parametrize("path", ["secret", "/etc/passwd"])
def test_host_files_cannot_be_read(host, code, path):
    path = str(host.secret_file) if path == "secret" else path
    assert not host.attack(f"PATH = {path!r}\n" + code).ok


def test_the_host_cannot_be_listed(host):
    """The sandbox's root holds only the read-only binds: no /etc, /work or /home; the home directory, when
    the interpreter lives there, shows only the interpreter's path."""
    top = host.attack("import json, os\nprint(json.dumps(os.listdir('/')))")
    assert top.ok and not {"etc", "work", "home", "sys", "boot"} & set(json.loads(top.text))
    for code in (f"import os\nprint(os.listdir({str(REPO)!r}))", f"import os\nprint(os.listdir({str(host.folder)!r}))",
                 f"import glob\nprint(glob.glob({str(REPO / '*')!r}) or 1/0)"):
        result = host.attack(code)
        assert not result.ok and "pyproject.toml" not in result.text
    home = Path.home()
    inside = host.attack(f"import json, os\nhome = {str(home)!r}\n"
                         f"print(json.dumps(os.listdir(home) if os.path.isdir(home) else []))")
    interpreter = Path(os.path.realpath(sys._base_executable))
    allowed = {interpreter.relative_to(home).parts[0]} if interpreter.is_relative_to(home) else set()
    assert inside.ok and set(json.loads(inside.text)) <= allowed


@pytest.mark.parametrize("write", [
    "open(M, 'w').write('x')",
    "os.close(os.open(M, os.O_WRONLY | os.O_CREAT))",
    "open('here.txt', 'w').write('x')\nos.rename('here.txt', M)",
    "open('here.txt', 'w').write('x')\nshutil.copy('here.txt', M)",
    "os.mkdir(M)",
    "os.mkfifo(M)",
    "os.symlink('/tmp', M)",
    "open('here.txt', 'w').write('x')\nos.link('here.txt', M)",
    "os.symlink(os.path.dirname(M), 'out')\nopen('out/' + os.path.basename(M), 'w')",
])
def test_nothing_can_be_written_outside(host, write):
    """Each way of writing, tried on every marker (the host's folder, the checkout, the temporary and the home
    directories): each attempt fails, but for a marker right in /tmp, which lands in the sandbox's own /tmp
    (the host's copy of the path stays absent: `attack` checks it)."""
    body = textwrap.indent(write, " " * 8)
    code = (f"import os, shutil\nfailed = 0\nfor M in MARKERS:\n    try:\n{body}\n    except OSError:\n"
            f"        failed += 1\n    for leftover in ('here.txt', 'out'):\n        if os.path.lexists(leftover):\n"
            f"            os.remove(leftover)\nprint(failed)")
    assert host.attack(code).text == f"{len([m for m in host.markers if str(m.parent) != WORKDIR])}\n"


@pytest.mark.parametrize("path", ["/", "/usr/lib", "/dev", "/dev/shm", "/proc", os.path.dirname(sys.base_prefix)])
def test_the_sandbox_itself_is_read_only_outside_tmp(host, path):
    """Only /tmp, a tmpfs of bounded size, takes writes: bwrap's root and /dev are tmpfs too, which a
    writable bind would let the program fill without limit."""
    result = host.attack(f"open({path!r} + '/x', 'w')")
    assert not result.ok and ("Read-only file system" in result.text or "Permission denied" in result.text
                              or "No such file" in result.text)


def test_host_files_cannot_be_deleted(host):
    host.attack("import os\nos.remove(SECRET_FILE)")
    host.attack("import shutil\nshutil.rmtree(HOST_DIR)")


# ---- the environment ----------------------------------------------------------------------------------------

def test_the_parents_environment_is_nowhere(host):
    code = ("import os, glob, json\nprint(json.dumps(sorted(os.environ.items())))\n"
            "for path in glob.glob('/proc/*/environ') + glob.glob('/proc/*/cmdline'):\n"
            "    try:\n        print(path, open(path, 'rb').read())\n    except OSError as e:\n        print(path, e)")
    result = host.attack(code)
    assert result.ok and "/proc/1/environ" in result.text  # the sandbox's own pid 1 (the program) was read
    assert "LLMLAB_TEST_SECRET" not in result.text
    environment = dict(json.loads(result.text.splitlines()[0]))
    assert environment.keys() <= {"HOME", "TMPDIR", "PATH", "PWD", "LC_CTYPE"}  # PWD: bwrap; LC_CTYPE: Python
    assert environment["HOME"] == environment["TMPDIR"] == "/tmp"


# ---- the network ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("code", [
    "import socket\ns = socket.create_connection(('127.0.0.1', PORT), timeout=1)\ns.sendall(b'escaped')",
    "import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', PORT))",
    "import socket\ns = socket.socket(socket.AF_INET6)\ns.connect(('::1', PORT))",
    "import urllib.request\nurllib.request.urlopen(f'http://127.0.0.1:{PORT}/', timeout=1)",
    "import ctypes, socket\nfd = ctypes.CDLL(None, use_errno=True).socket(2, 1, 0)\nprint(fd, ctypes.get_errno())\n"
    "socket.socket(fileno=fd).connect(('127.0.0.1', PORT))",
    "import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect(ABSTRACT)",
    "import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect(HOST_DIR + '/host.sock')",
])
def test_no_connection_reaches_the_host(host, code):
    """Loopback TCP, an abstract unix socket (which a network namespace keeps apart, not the file system) and a
    unix socket on disk, all listening on the host: nobody connects."""
    abstract = f"\0llmlab-test-{secrets.token_hex(8)}"
    with socket.socket() as tcp, socket.socket(socket.AF_UNIX) as unix, socket.socket(socket.AF_UNIX) as on_disk:
        tcp.bind(("127.0.0.1", 0))
        unix.bind(abstract)
        on_disk.bind(str(host.folder / "host.sock"))
        for server in (tcp, unix, on_disk):
            server.listen()
            server.settimeout(0.05)
        try:
            names = f"PORT = {tcp.getsockname()[1]}\nABSTRACT = {abstract!r}\nHOST_DIR = {str(host.folder)!r}\n"
            result = run_python(names + code, timeout_s=3)
        finally:
            (host.folder / "host.sock").unlink()
        assert not result.ok, result.text
        for server in (tcp, unix, on_disk):
            with pytest.raises(socket.timeout):
                server.accept()  # nobody connected
    host.assert_untouched(result)


# ---- other processes ------------------------------------------------------------------------------------

@pytest.mark.parametrize("code", [
    "import os\nos.kill(PARENT, 9)",
    "import os\nos.kill(VICTIM, 9)",
    "import os\nos.killpg(os.getpgid(PARENT), 9)",
    "import os, signal\nsignal.pidfd_send_signal(os.pidfd_open(PARENT), signal.SIGKILL)",
    "import os, signal\nsignal.pidfd_send_signal(os.pidfd_open(VICTIM), signal.SIGKILL)",
    "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nassert libc.kill(PARENT, 9) == 0, ctypes.get_errno()",
    "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
    "assert libc.ptrace(16, PARENT, 0, 0) == 0, ctypes.get_errno()",  # PTRACE_ATTACH
    "import os\nos.setpriority(os.PRIO_PROCESS, PARENT, 19)",
    "import os\nos.setpriority(os.PRIO_PROCESS, VICTIM, 19)",
    "print(open(f'/proc/{PARENT}/environ').read())",
    "print(open(f'/proc/{PARENT}/mem', 'rb').read(1))",
])
def test_other_processes_are_out_of_reach(host, code):
    assert not host.attack(code).ok


@pytest.mark.parametrize("code", [
    "import os, signal\nos.kill(-1, signal.SIGKILL)",  # every process it may signal: only its own
    "import os\nos.setpriority(os.PRIO_USER, os.getuid(), 19)",  # every process of its uid: only its own
    "import os\nos.setpriority(os.PRIO_PGRP, 0, 19)",
])
def test_calls_on_every_process_reach_only_the_sandbox(host, code):
    host.attack(code)  # may succeed: the host must not notice


@pytest.mark.parametrize("code", [
    "import subprocess\nsubprocess.run(['touch', MARKERS[0]])",
    "import os\nprint(os.system('touch ' + MARKERS[0]))\nassert 0",
    "import os\nos.posix_spawn('/usr/bin/touch', ['touch', MARKERS[0]], {})",
    "import os\nos.execv('/usr/bin/touch', ['touch', MARKERS[0]])",
    "import os\nif os.fork() == 0:\n    os.execv('/usr/bin/touch', ['touch', MARKERS[0]])",
    "import multiprocessing\np = multiprocessing.Process(target=print)\np.start()\np.join()",
    "import pty\npty.spawn(['touch', MARKERS[0]])",
    "import ctypes\nassert ctypes.CDLL(None).system(('touch ' + MARKERS[0]).encode()) == 0",
])
def test_no_process_can_be_started(host, code):
    assert not host.attack(code).ok


def test_a_fork_bomb_ends_at_once(host):
    t0 = time.perf_counter()
    result = host.attack("import os\nwhile True:\n    os.fork()")
    assert not result.ok and "PermissionError" in result.text and time.perf_counter() - t0 < 2


def test_a_thread_bomb_is_bounded(host):
    """Threads are allowed; RLIMIT_NPROC stops them where the server is not root, the address space where it
    is (the kernel exempts root's user namespaces from RLIMIT_NPROC)."""
    code = ("import threading, time\nthreading.stack_size(32768)\nn = 0\ntry:\n    while True:\n"
            "        threading.Thread(target=time.sleep, args=(5,), daemon=True).start()\n        n += 1\n"
            "except RuntimeError:\n    print(n)")
    result = host.attack(code, timeout_s=5)
    assert result.ok and int(result.text) < 2000


# ---- resources ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("code, error", [
    ("x = bytearray(2 * 1024**3)", "memory limit of 256 MB exceeded"),
    ("chunks = []\nwhile True:\n    chunks.append(bytearray(10**7))", "memory limit of 256 MB exceeded"),
    ("n = 0\nwhile True:\n    open(f'f{n}', 'wb').write(bytes(8 * 2**20))\n    n += 1", "No space left on device"),
    ("import os\nos.memfd_create('m')", "Operation not permitted"),
    ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nassert libc.shmget(0, 2**30, 0o1600) >= 0, "
     "ctypes.get_errno()", "AssertionError: 1"),  # EPERM: SysV memory lies outside RLIMIT_AS
])
def test_memory_bombs_end_in_an_error(host, code, error):
    result = host.attack(code)
    assert not result.ok and error in result.text


def test_a_crashing_interpreter_is_a_clean_error(host):
    """Crafted bytecode reads a constant far past the end of an empty tuple: the interpreter crashes (SIGSEGV)
    inside the sandbox, and the call reports it."""
    code = ("import dis, types\ndef f():\n    pass\n"
            "resume = bytes([dis.opmap['RESUME'], 0]) if 'RESUME' in dis.opmap else b''\n"
            "bad = resume + bytes([dis.opmap['LOAD_CONST'], 250, dis.opmap['RETURN_VALUE'], 0])\n"
            "print(types.FunctionType(f.__code__.replace(co_code=bad, co_consts=()), {})())")
    result = host.attack(code)
    assert not result.ok and result.text.startswith("error: killed by signal SIG"), result.text


# ---- privileges and the sandbox's own walls ----------------------------------------------------------------

def test_the_program_holds_no_privileges(host):
    code = ("import os\nprint(os.getuid(), os.getgid())\n"
            "print([line.split()[1] for line in open('/proc/self/status')\n"
            "       if line.startswith(('CapEff', 'NoNewPrivs', 'Seccomp:'))])")
    result = host.attack(code)
    assert result.ok and result.text.splitlines() == ["65534 65534", "['0000000000000000', '1', '2']"]


@pytest.mark.parametrize("code", [
    "import os\nos.setuid(0)",
    "import os\nos.chroot('/tmp')",
    "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nassert libc.unshare(0x10000000) == 0, ctypes.get_errno()",
    "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nassert libc.unshare(0x00020000) == 0, ctypes.get_errno()",
    "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
    "assert libc.mount(b'none', b'/tmp', b'tmpfs', 0, None) == 0, ctypes.get_errno()",
    "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
    "assert libc.setns(os.open('/proc/self/ns/mnt', os.O_RDONLY), 0) == 0, ctypes.get_errno()",
    "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
    "assert libc.syscall(425, 8, ctypes.create_string_buffer(120)) >= 0, ctypes.get_errno()",  # io_uring_setup
])
def test_the_walls_cannot_be_moved(host, code):
    assert not host.attack(code).ok


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86_64's other ABIs")
def test_system_calls_of_other_abis_are_refused(host):
    """The filter knows the x86_64 numbers; the same numbers through the x32 ABI or i386's int 0x80 would slip
    past a filter that checked numbers only."""
    x32 = host.attack("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                      "print(libc.syscall(0x40000000 | 39), ctypes.get_errno())")  # x32 getpid
    assert x32.ok and x32.text == "-1 1\n"  # EPERM
    code = ("import ctypes, mmap\npage = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
            "page.write(bytes([0xB8, 20, 0, 0, 0, 0xCD, 0x80, 0xC3]))  # mov eax, 20 (getpid); int 0x80; ret\n"
            "address = ctypes.addressof(ctypes.c_char.from_buffer(page))\n"
            "print(ctypes.CFUNCTYPE(ctypes.c_int)(address)())")
    i386 = host.attack(code)
    assert not i386.ok and i386.text.startswith("error: killed by signal SIGSYS"), i386.text


# ---- the server's death ----------------------------------------------------------------------------------

def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_killing_the_server_mid_call_ends_the_sandbox(host):
    script = ("from llmlab.tools.sandbox import check_sandbox, run_python\ncheck_sandbox()\n"
              "print('ready', flush=True)\nrun_python('import time\\ntime.sleep(60)', timeout_s=60)")
    server = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline() == "ready\n"
        sandbox, deadline = [], time.monotonic() + 10
        while len(sandbox) < 2 and time.monotonic() < deadline:  # bwrap, and the program under it
            sandbox = [p for child in _children(server.pid) for p in (child, *_children(child))]
            time.sleep(0.02)
        assert len(sandbox) >= 2, "the sandbox never started"
    finally:
        server.kill()
        server.wait()
        server.stdout.close()
    deadline = time.monotonic() + 5
    while any(_running(p) for p in sandbox) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not any(_running(p) for p in sandbox)
    host.assert_untouched(ToolResult("", ok=True))
