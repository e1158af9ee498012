"""Sandbox overhead: the median time of one python tool call, `print(1)`, through the bubblewrap sandbox, beside
the audit-hook sandbox it replaced (issue 18) and a bare `python -I -S` start, in the same run.

The old sandbox is llmlab/tools/sandbox.py as it was at OLD_COMMIT, read with `git show` and imported under
another name: the honest comparison, with no hand-made copy to drift. The calls alternate between the
contenders, so that whatever else the machine is doing weighs on all of them alike.

    python bench/sandbox_overhead.py                          # 50 calls each
    python bench/sandbox_overhead.py --calls 200 --json bench/out/sandbox.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llmlab.tools import sandbox

REPO = Path(__file__).resolve().parents[1]
OLD_COMMIT = "6932ca7254a024e7274d90676a66ccdbbee52e91"  # the last commit of the audit-hook sandbox


def load_old_sandbox(directory: str):
    """The audit-hook sandbox module, from git."""
    source = subprocess.run(["git", "show", f"{OLD_COMMIT}:llmlab/tools/sandbox.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    path = Path(directory) / "old_sandbox.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_sandbox", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bare_python() -> None:
    subprocess.run([sys.executable, "-I", "-S", "-c", "print(1)"], check=True, capture_output=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=50, help="timed calls of each contender (after one warm-up call)")
    p.add_argument("--json", type=str, default="")
    args = p.parse_args()

    sandbox.check_sandbox()  # raises, saying why, where bubblewrap cannot run
    with tempfile.TemporaryDirectory() as directory:
        old = load_old_sandbox(directory)
        contenders = {
            "python -I -S": bare_python,
            "old (audit hook)": lambda: old.run_python("print(1)"),
            "new (bubblewrap)": lambda: sandbox.run_python("print(1)"),
        }
        for name, call in contenders.items():  # warm-up: the probes, the page cache
            result = call()
            assert result is None or result.text == "1\n", (name, result)
        times = {name: [] for name in contenders}
        for _ in range(args.calls):
            for name, call in contenders.items():
                t0 = time.perf_counter()
                call()
                times[name].append(1000 * (time.perf_counter() - t0))

    medians = {name: statistics.median(ms) for name, ms in times.items()}
    for name, ms in times.items():
        print(f"{name:18s} median {medians[name]:6.1f} ms   min {min(ms):6.1f}   max {max(ms):6.1f}   "
              f"({len(ms)} calls)")
    ratio = medians["new (bubblewrap)"] / medians["old (audit hook)"]
    print(f"new / old: {ratio:.2f}x")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"old_ms": medians["old (audit hook)"],
                                               "new_ms": medians["new (bubblewrap)"],
                                               "bare_python_ms": medians["python -I -S"],
                                               "new_over_old": ratio, "calls": args.calls}, indent=2) + "\n")


if __name__ == "__main__":
    main()
