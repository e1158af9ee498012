"""Tools: the calculator against Python's own arithmetic, what the sandboxed python can do and its limits,
search on a tiny world. The sandbox's escape suite is tests/test_sandbox_escapes.py.
"""

import operator
import signal
import struct
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmlab import world
from llmlab.tools import MAX_OUTPUT_CHARS, TRUNCATION_MARKER, run_tool, sandbox
from llmlab.tools.calculator import MAX_DIGITS, calculate
from llmlab.tools.sandbox import run_python
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


# ---- sandbox: what works (the escapes are tests/test_sandbox_escapes.py) ----------------------------------

def _sandbox_missing() -> str:
    try:
        sandbox.check_sandbox()
    except sandbox.SandboxUnavailable as e:
        return str(e)
    return ""


SANDBOX_MISSING = _sandbox_missing()
needs_sandbox = pytest.mark.skipif(bool(SANDBOX_MISSING), reason=f"the python tool's sandbox cannot run here: "
                                                                   f"{SANDBOX_MISSING}")


@needs_sandbox
def test_sandbox_runs_a_benign_program():
    code = ("import math, json, fractions, pathlib, tempfile, shutil, os, threading, zoneinfo\n"
            "print(math.factorial(25))\n"
            "pathlib.Path('data.txt').write_text(json.dumps({'x': 42}))\n"
            "print(json.loads(open('data.txt').read())['x'])\n"
            "os.makedirs('d/e'); shutil.rmtree('d')\n"
            "print(sorted(os.listdir('.')))\n"
            "print(os.getcwd(), tempfile.gettempdir())\n"
            "t = threading.Thread(target=print, args=('from a thread',)); t.start(); t.join()")
    result = run_python(code)
    assert result.ok and result.text.splitlines() == [
        "15511210043330985984000000", "42", "['data.txt']", "/tmp /tmp", "from a thread"]
    assert run_python("import os\nprint(os.listdir('.'))").text == "[]\n"  # each call starts on an empty /tmp


@needs_sandbox
def test_sandbox_reports_exceptions_with_the_programs_own_traceback():
    result = run_python("def f():\n    return 1/0\nf()")
    assert not result.ok and result.text.startswith("error: exit code 1")
    assert 'File "<sandbox>", line 2, in f' in result.text and "ZeroDivisionError" in result.text
    assert "    return 1/0" in result.text  # the line itself is quoted
    assert "<string>" not in result.text  # the bootstrap's frames are not shown


@needs_sandbox
@pytest.mark.parametrize("code", ["while True:\n    pass", "import time\ntime.sleep(60)"])
def test_sandbox_times_out(code):
    t0 = time.perf_counter()
    result = run_python(code, timeout_s=1)
    assert not result.ok and result.text.startswith("error: timed out after 1 s")
    assert time.perf_counter() - t0 < 4


@needs_sandbox
def test_sandbox_reports_the_cpu_limit():
    """Threads can burn CPU seconds faster than the wall clock: RLIMIT_CPU (the timeout rounded up, plus 1 s)
    stops them. Called with a CPU limit below the timeout to see it without waiting."""
    with tempfile.TemporaryFile() as out:
        returncode, timed_out = sandbox._run(sandbox.check_sandbox(), "while True:\n    pass", out, timeout_s=5,
                                             memory_mb=256, cpu_s=1)
    assert not timed_out and sandbox._killed_by(returncode) == signal.SIGXCPU


@needs_sandbox
def test_sandbox_cuts_an_output_flood():
    result = run_python("while True:\n    print('x' * 1000)", timeout_s=2)
    assert not result.ok and result.text.startswith("error: output limit of 16 MB exceeded")
    assert len(result.text) <= MAX_OUTPUT_CHARS and result.text.endswith(TRUNCATION_MARKER)
    big = run_python("print('y' * 10**6)", max_output=100)
    assert big.ok and len(big.text) == 100 and big.text.endswith(TRUNCATION_MARKER)


@needs_sandbox
def test_sandbox_leaves_no_directories():
    before = set(Path(tempfile.gettempdir()).glob("llmlab-sandbox-*"))
    run_python("open('x', 'w').write('x')")
    run_python("while True: pass", timeout_s=0.5)
    assert set(Path(tempfile.gettempdir()).glob("llmlab-sandbox-*")) <= before


def test_python_tool_refuses_without_bubblewrap(monkeypatch):
    """No bwrap on PATH: every call is refused, saying how to install it; never a weaker sandbox."""
    monkeypatch.setattr(sandbox.shutil, "which", lambda name, *args, **kwargs: None)
    with pytest.raises(sandbox.SandboxUnavailable, match="apt-get install bubblewrap"):
        sandbox.check_sandbox()
    for result in (run_python("print(1)"), run_tool("python print(1)")):
        assert not result.ok and result.text.startswith("error: the python tool needs bubblewrap (bwrap)")
        assert "apt-get install bubblewrap" in result.text


def test_python_tool_refuses_where_bwrap_cannot_start(monkeypatch, tmp_path):
    """A bwrap that cannot create its namespaces (here a stand-in that fails as bwrap does without user
    namespaces): refused, with bwrap's own words and what to change."""
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: setting up uid map: Permission denied' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sandbox.shutil, "which", lambda name, *args, **kwargs: str(fake))
    result = run_python("print(1)")
    assert not result.ok and result.text.startswith("error: bubblewrap cannot start the python tool's sandbox")
    assert "setting up uid map: Permission denied" in result.text and "user namespaces" in result.text


def _run_filter(program: bytes, arch: int, nr: int, arg0: int = 0) -> int:
    """What the kernel would return for one system call: a classic-BPF interpreter for the instructions the
    filter uses (load a word, jump if equal / greater or equal / any bit set, return)."""
    data = struct.pack("=iIQ6Q", nr, arch, 0, arg0, 0, 0, 0, 0, 0)  # struct seccomp_data
    instructions = [struct.unpack("=HBBI", program[i:i + 8]) for i in range(0, len(program), 8)]
    pc, a = 0, 0
    while True:
        code, jt, jf, k = instructions[pc]
        if code == 0x20:
            a = struct.unpack_from("=I", data, k)[0]
            pc += 1
        elif code == 0x06:
            return k
        else:
            test = {0x15: a == k, 0x35: a >= k, 0x45: bool(a & k)}[code]
            pc += 1 + (jt if test else jf)


@pytest.mark.parametrize("machine, arch, numbers", [
    ("x86_64", 0xC000003E, {"read": 0, "ptrace": 101, "clone": 56, "clone3": 435, "socket": 41, "fork": 57}),
    ("aarch64", 0xC00000B7, {"read": 63, "ptrace": 117, "clone": 220, "clone3": 435, "socket": 198}),
])
def test_seccomp_filter_decides_as_documented(machine, arch, numbers):
    """Run on both architectures' numbers (only one can run for real here): ordinary calls pass, refused ones
    get EPERM, clone passes for a thread only, socket for AF_UNIX only, clone3 gets ENOSYS, and a call made
    through another ABI kills the process."""
    program = sandbox._seccomp_program(machine)
    allow, eperm, enosys, kill = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38, 0x80000000
    thread = 0x00010000 | 0x00000100 | 0x00000800 | 0x00000200  # CLONE_THREAD | VM | SIGHAND | FS
    assert _run_filter(program, arch, numbers["read"]) == allow
    assert _run_filter(program, arch, numbers["ptrace"]) == eperm
    assert _run_filter(program, arch, numbers["clone"], thread) == allow
    assert _run_filter(program, arch, numbers["clone"], 17) == eperm  # SIGCHLD only: fork
    assert _run_filter(program, arch, numbers["clone"], thread | 0x10000000) == eperm  # CLONE_NEWUSER
    assert _run_filter(program, arch, numbers["clone3"]) == enosys
    assert _run_filter(program, arch, numbers["socket"], 1) == allow  # AF_UNIX
    assert _run_filter(program, arch, numbers["socket"], 2) == eperm  # AF_INET
    assert _run_filter(program, 0x40000003, numbers["read"]) == kill  # i386
    if "fork" in numbers:
        assert _run_filter(program, arch, numbers["fork"]) == eperm
        assert _run_filter(program, arch, 0x40000000 | numbers["read"]) == eperm  # the x32 ABI


def test_tools_package_imports_no_cycle():
    """The tools import their result type from llmlab.tools.result, never from the package that imports them."""
    for name in ("sandbox.py", "search.py", "calculator.py", "result.py"):
        source = (REPO / "llmlab" / "tools" / name).read_text()
        assert "from llmlab.tools import" not in source and "import llmlab.tools\n" not in source


def test_run_tool_dispatches_and_cuts():
    assert run_tool("calculator 123456*789").text == "97406784"
    unknown = run_tool("shell ls")
    assert not unknown.ok and unknown.text == "error: unknown tool 'shell' (tools: calculator, python, search)"
    assert not run_tool("calculator 1/0").ok
    assert not run_tool("search anything").ok  # no world given


@needs_sandbox
def test_run_tool_runs_python_and_cuts():
    assert run_tool("python\nx = 6\nprint(x * 7)").text == "42\n"
    assert run_tool("python\n    x = 2\n    print(x)").text == "2\n"  # an indented program is dedented
    long = run_tool("python print('z' * 10000)")
    assert long.ok and len(long.text) == MAX_OUTPUT_CHARS and long.text.endswith(TRUNCATION_MARKER)


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
