"""Tools: the calculator against Python's own arithmetic, the sandbox against escapes, search on a tiny world.

The escape suite asserts that the forbidden effect did not happen (no marker file, no file content in the
output, no connection accepted), not only that an error was reported.
"""

import dis
import operator
import socket
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmlab import world
from llmlab.tools import MAX_OUTPUT_CHARS, TRUNCATION_MARKER, run_tool
from llmlab.tools.calculator import MAX_DIGITS, calculate
from llmlab.tools.sandbox import _BOOTSTRAP, run_python
from llmlab.tools.search import load_index

REPO = Path(__file__).resolve().parents[1]
big = st.integers(min_value=-(10**300), max_value=10**300)


# ---- calculator --------------------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(big, big, st.sampled_from(["+", "-", "*"]))
def test_calculator_matches_python_on_big_integers(a, b, op):
    expected = {"+": a + b, "-": a - b, "*": a * b}[op]
    assert calculate(f"{a} {op} ({b})") == str(expected)


@settings(max_examples=200, deadline=None)
@given(big, big.filter(lambda b: b != 0), st.sampled_from(["//", "%"]))
def test_calculator_floors_like_python(a, b, op):
    expected = a // b if op == "//" else a % b
    assert calculate(f"({a}){op}({b})") == str(expected)


def _decimal(n: int, scale: int) -> str:
    sign, digits = ("-" if n < 0 else ""), str(abs(n)).rjust(scale + 1, "0")
    return f"{sign}{digits[:-scale]}.{digits[-scale:]}" if scale else f"{sign}{digits}"


@settings(max_examples=200, deadline=None)
@given(st.integers(-(10**30), 10**30), st.integers(0, 12), st.integers(-(10**30), 10**30), st.integers(0, 12),
       st.sampled_from(["+", "-", "*", "/"]))
def test_calculator_is_exact_on_decimals(n, scale, m, other_scale, op):
    a, b = _decimal(n, scale), _decimal(m, other_scale)
    x, y = Fraction(n, 10**scale), Fraction(m, 10**other_scale)
    if op == "/" and y == 0:
        assert calculate(f"{a}/({b})") == "error: division by zero"
        return
    exact = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}[op](x, y)
    text = calculate(f"{a} {op} ({b})")
    if text.startswith("≈"):  # a non-ending decimal: 12 significant digits
        assert op == "/" and abs(Fraction(text[1:]) - exact) <= abs(exact) * Fraction(1, 10**11)
    else:
        assert Fraction(text) == exact


@pytest.mark.parametrize("expr, result", [
    ("2+3*4", "14"), ("(2+3)*4", "20"), ("7-2-1", "4"), ("2*3//4", "1"), ("-2**2", "-4"), ("2**3**2", "512"),
    ("(-2)**3", "-8"), ("--3", "3"), (" 12 * ( 3 + 4 ) ", "84"), ("100/8", "12.5"), ("0.1+0.2", "0.3"),
    ("1/8", "0.125"), ("-7/2", "-3.5"), ("1/3", "≈0.333333333333"), ("2/3", "≈0.666666666667"),
    ("10**20/3", "≈3.33333333333e+19"), ("1/(3*10**12)", "≈3.33333333333e-13"), ("123456*789", "97406784"),
    ("2**0", "1"), ("0**0", "1"), ("6/3", "2"),
])
def test_calculator_examples(expr, result):
    assert calculate(expr) == result


@pytest.mark.parametrize("expr, message", [
    ("", "empty expression"),
    ("1 +* 2", "position 4"),
    ("(1+2", "missing ')'"),
    ("1 2", "expected an operator"),
    ("1,234", "separators"),
    ("2^3", "use ** for powers"),
    ("__import__('os')", "unexpected character '_'"),
    ("1/0", "division by zero"),
    ("5//(3-3)", "division by zero"),
    ("5%0", "division by zero"),
    ("2**-1", "non-negative integer"),
    ("2**0.5", "non-negative integer"),
    ("9**9**9", "too large"),
    ("10**(MAX+1)".replace("MAX", str(MAX_DIGITS)), "too large"),
    ("1" * (MAX_DIGITS + 1), "more than"),
    ("(" * 500 + "1" + ")" * 500, "nested too deeply"),
    ("-" * 500 + "1", "nested too deeply"),
])
def test_calculator_errors_name_the_problem(expr, message):
    t0 = time.perf_counter()
    text = calculate(expr)
    assert text.startswith("error: ") and message in text
    assert time.perf_counter() - t0 < 1  # refused before any expensive work


def test_calculator_never_evaluates_python():
    source = (REPO / "llmlab" / "tools" / "calculator.py").read_text()
    assert "eval(" not in source and "exec(" not in source and "literal_eval" not in source


# ---- sandbox: what works ------------------------------------------------------------------------------------

def test_sandbox_runs_a_benign_program():
    code = ("import math, json, fractions, pathlib, tempfile, shutil, os\n"
            "print(math.factorial(25))\n"
            "pathlib.Path('data.txt').write_text(json.dumps({'x': 42}))\n"
            "print(json.loads(open('data.txt').read())['x'])\n"
            "os.makedirs('d/e'); shutil.rmtree('d')\n"
            "print(sorted(os.listdir('.')))\n"
            "print(os.getcwd())")
    result = run_python(code)
    lines = result.text.splitlines()
    assert result.ok and lines[:3] == ["15511210043330985984000000", "42", "['data.txt']"]
    assert not Path(lines[3]).exists()  # the sandbox directory is deleted afterwards


def test_sandbox_reports_exceptions_with_the_programs_own_traceback():
    result = run_python("def f():\n    return 1/0\nf()")
    assert not result.ok and result.text.startswith("error: exit code 1")
    assert 'File "<sandbox>", line 2, in f' in result.text and "ZeroDivisionError" in result.text
    assert "<string>" not in result.text  # the bootstrap's frames are not shown


def test_sandbox_environment_is_empty(monkeypatch):
    monkeypatch.setenv("LLMLAB_TEST_SECRET", "s3cr3t-value")
    result = run_python("import os\nprint(sorted(os.environ))")
    assert result.ok and "LLMLAB_TEST_SECRET" not in result.text and "s3cr3t" not in result.text


# ---- sandbox: escapes ---------------------------------------------------------------------------------------

def _denied(code: str, **kwargs) -> str:
    result = run_python(code, timeout_s=kwargs.pop("timeout_s", 2), **kwargs)
    assert not result.ok and result.text.startswith("error: "), result.text
    return result.text


@pytest.mark.parametrize("code", [
    "print(open({path!r}).read())",
    "import os\nprint(os.read(os.open({path!r}, os.O_RDONLY), 10000))",
    "import pathlib\nprint(pathlib.Path({path!r}).read_text())",
    "import io\nprint(io.open_code({path!r}).read())",
    "print(open('../../../../../../..' + {path!r}).read())",
    "print(open('/proc/self/root' + {path!r}).read())",
    "import os\nos.symlink({path!r}, 'link')\nprint(open('link').read())",
    "import os\nos.chdir(os.path.dirname({path!r}))\nprint(open(os.path.basename({path!r})).read())",
    "import linecache\nprint(''.join(linecache.getlines({path!r})) or 1/0)",
    "import posixpath, builtins\nposixpath.realpath = lambda p, **k: p\nbuiltins.type = lambda x: str\n"
    "print(open({path!r}).read())",
])
@pytest.mark.parametrize("path, content", [(str(REPO / "pyproject.toml"), "[project]"), ("/etc/passwd", "root:")])
def test_sandbox_cannot_read_outside(code, path, content):
    assert content in Path(path).read_text()  # the file is there and readable by this process
    assert content not in _denied(code.format(path=path))


def test_sandbox_cannot_list_the_project():
    assert "pyproject.toml" not in _denied(f"import os\nprint(os.listdir({str(REPO)!r}))")
    assert "pyproject.toml" not in _denied(f"import glob\nprint(glob.glob({str(REPO / '*')!r}) or 1/0)")
    up = "import os\nprint([e.name for e in os.scandir('/proc/self/cwd/../../..')] or 1/0)"
    assert "pyproject.toml" not in _denied(up)


@pytest.mark.parametrize("code", [
    "open({marker!r}, 'w').write('x')",
    "import os\nos.close(os.open({marker!r}, os.O_WRONLY | os.O_CREAT))",
    "import pathlib\npathlib.Path({marker!r}).write_text('x')",
    "open('here.txt', 'w').write('x')\nimport os\nos.rename('here.txt', {marker!r})",
    "import shutil\nopen('here.txt', 'w').write('x')\nshutil.copy('here.txt', {marker!r})",
    "import os\nos.mkdir({marker!r})",
    "import os\nos.mkfifo({marker!r})",
])
def test_sandbox_cannot_write_outside(tmp_path, code):
    marker = tmp_path / "escaped"
    _denied(code.format(marker=str(marker)))
    assert not marker.exists()


def test_sandbox_cannot_delete_outside(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    _denied(f"import os\nos.remove({str(victim)!r})")
    _denied(f"import shutil\nshutil.rmtree({str(tmp_path)!r})")
    assert victim.read_text() == "precious"


@pytest.mark.parametrize("code", [
    "import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\ns.sendall(b'escaped')",
    "import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))",
    "import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))",
    "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=1)",
])
def test_sandbox_has_no_network(code):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.2)
        text = _denied(code.format(port=server.getsockname()[1]))
        with pytest.raises(socket.timeout):
            server.accept()  # nobody connected
    assert "not allowed" in text or "Errno" in text


@pytest.mark.parametrize("code", [
    "import subprocess\nsubprocess.run(['touch', {marker!r}])",
    "import os\nos.system('touch {marker}')",
    "import os\nos.popen('touch {marker}').read()",
    "import os\nos.posix_spawn('/usr/bin/touch', ['touch', {marker!r}], {{}})",
    "import os\nos.execv('/usr/bin/touch', ['touch', {marker!r}])",
    "import os\nif os.fork() == 0:\n    os.execv('/usr/bin/touch', ['touch', {marker!r}])",
    "import multiprocessing\np = multiprocessing.Process(target=print)\np.start()\np.join()",
    "import pty\npty.spawn(['touch', {marker!r}])",
])
def test_sandbox_cannot_start_processes(tmp_path, code):
    marker = tmp_path / "spawned"
    _denied(code.format(marker=str(marker)))
    assert not marker.exists()


def test_sandbox_survives_a_fork_bomb():
    t0 = time.perf_counter()
    assert "starting processes is not allowed" in _denied("import os\nwhile True:\n    os.fork()")
    assert time.perf_counter() - t0 < 5


@pytest.mark.parametrize("code", ["x = bytearray(2 * 1024**3)",
                                  "chunks = []\nwhile True:\n    chunks.append(bytearray(10**7))"])
def test_sandbox_stops_a_memory_bomb(code):
    assert _denied(code, memory_mb=256).startswith("error: memory limit of 256 MB exceeded")


@pytest.mark.parametrize("code", ["while True:\n    pass", "import time\ntime.sleep(60)"])
def test_sandbox_times_out(code):
    t0 = time.perf_counter()
    assert _denied(code, timeout_s=1).startswith("error: timed out after 1 s")
    assert time.perf_counter() - t0 < 4


def test_sandbox_cuts_an_output_flood():
    text = _denied("while True:\n    print('x' * 1000)")
    assert len(text) <= MAX_OUTPUT_CHARS and text.endswith(TRUNCATION_MARKER)
    big = run_python("print('y' * 10**6)", max_output=100)
    assert big.ok and len(big.text) == 100 and big.text.endswith(TRUNCATION_MARKER)


@pytest.mark.parametrize("code", [
    "import ctypes\nctypes.CDLL(None).system(b'touch {marker}')",
    "import _ctypes",
    "import sys\nopen('evil.cpython-311-x86_64-linux-gnu.so', 'wb').write(b'\\x7fELF')\nsys.path.insert(0, '.')\n"
    "import evil",
    "import sqlite3\nsqlite3.connect(':memory:').execute(\"ATTACH DATABASE '{marker}' AS x\")",
])
def test_sandbox_refuses_native_code(tmp_path, code):
    marker = tmp_path / "native"
    text = _denied(code.format(marker=str(marker)))
    assert "not allowed" in text or "not available" in text
    assert not marker.exists()


@pytest.mark.parametrize("code", [
    # reaching into the hook through a traceback and editing what it uses
    "try:\n    open('/etc/passwd')\nexcept PermissionError as e:\n    f = e.__traceback__.tb_next.tb_frame\n"
    "    f.f_locals['_check'].__defaults__ = (None,) * 11\nprint(open('/etc/passwd').read())",
    "try:\n    open('/etc/passwd')\nexcept PermissionError as e:\n    f = e.__traceback__.tb_next.tb_frame\n"
    "    f.f_locals['_denied'].clear()\nprint(open('/etc/passwd').read())",
    "import gc\nprint(gc.get_referrers(open))",
    "import sys\nsys.settrace(lambda *a: None)",
    "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))",
    "import os\nos.kill(os.getppid(), 9)",
])
def test_sandbox_cannot_be_disarmed(code):
    assert "root:" not in _denied(code)


def test_sandbox_hook_reads_no_globals():
    """Every name the hook functions use is bound at definition: rebinding a module global cannot change
    their decisions."""
    def functions(code):
        for const in code.co_consts:
            if hasattr(const, "co_code"):
                yield const
                yield from functions(const)

    found = {f.co_name: f for f in functions(compile(_BOOTSTRAP, "<string>", "exec"))}
    for name in ("resolve", "check", "hook"):
        loads = {i.argval for i in dis.get_instructions(found[name])
                 if i.opname in ("LOAD_GLOBAL", "LOAD_NAME", "LOAD_DEREF")}
        assert not loads, f"{name} reads {loads}"


def test_run_tool_dispatches_and_cuts():
    assert run_tool("calculator 123456*789").text == "97406784"
    assert run_tool("python\nx = 6\nprint(x * 7)").text == "42\n"
    assert run_tool("python\n    x = 2\n    print(x)").text == "2\n"  # an indented program is dedented
    long = run_tool("python print('z' * 10000)")
    assert long.ok and len(long.text) == MAX_OUTPUT_CHARS and long.text.endswith(TRUNCATION_MARKER)
    unknown = run_tool("shell ls")
    assert not unknown.ok and unknown.text == "error: unknown tool 'shell' (tools: calculator, python, search)"
    assert not run_tool("calculator 1/0").ok
    assert not run_tool("search anything").ok  # no world given


def test_sandbox_leaves_no_directories():
    before = set(Path(tempfile.gettempdir()).glob("llmlab-sandbox-*"))
    run_python("open('x', 'w').write('x')")
    run_python("while True: pass", timeout_s=0.5)
    assert set(Path(tempfile.gettempdir()).glob("llmlab-sandbox-*")) <= before


# ---- search -------------------------------------------------------------------------------------------------

def test_search_finds_each_city_and_company_first(tiny_world_dir):
    w, index = world.load(tiny_world_dir), load_index(tiny_world_dir)
    for city in w.cities:
        first = index.hits(f"Tell me about {city.name}", k=2)[0]
        c, k = city.name, city.country
        entry = {f"{c} is a city in {k}", f"The city of {c} lies in {k}", f"{c} is located in {k}"}
        assert first.split(". ")[0].rstrip(".") in entry
    for company in w.companies:
        first = index.hits(company.name, k=2)[0]
        assert f"{company.name} was founded in {company.founded}" in first
    assert load_index(tiny_world_dir) is index  # cached per world directory


def test_search_tool_answers_in_plain_text(tiny_world_dir):
    w = world.load(tiny_world_dir)
    country = w.countries[0]
    result = run_tool(f"search currency of {country.name}", world_dir=tiny_world_dir)
    assert result.ok and f"The currency of {country.name} is the {country.currency}." in result.text.splitlines()[0]
    assert len(result.text.splitlines()) == 2
    assert run_tool("search qwertyuiop", world_dir=tiny_world_dir).text == "no results for 'qwertyuiop'"
    assert run_tool("search", world_dir=tiny_world_dir).text.startswith("error: empty search query")
    missing = run_tool("search x", world_dir=str(Path(tiny_world_dir) / "nope"))
    assert not missing.ok and "no world at" in missing.text
