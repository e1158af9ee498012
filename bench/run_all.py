"""Run the benchmarks B1-B4 and B7 (RL throughput; skipped without a cpu speedrun's assistant), each in its own process (B1 times the whole process), one after the other so they
never share the cores, and print a summary. Results go to bench/out/<name>.json. A benchmark whose input is
missing (B1 without Tiny Shakespeare) is reported as skipped, with the reason; the others still run. The exit
code is 1 if one failed.

    python bench/run_all.py            # everything (about 10 minutes on 2 cores)
    python bench/run_all.py b2 b4      # a subset
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"

BENCHES = {
    "b1_fast": ["b1_shakespeare.py"],
    "b1_123s": ["b1_shakespeare.py", "--budget_s", "123", "--context", "96", "--muon_lr", "0.04"],
    "b2": ["b2_decode.py"],
    "b3": ["b3_batched.py"],
    "b4": ["b4_mfu.py"],
    "b7": ["b7_rl.py"],
}


SKIPPED = 3
"""a benchmark's exit code when an input it needs is missing (its last line of stderr says which and where to get it)"""


def run(key: str, script: str, args: list[str]) -> tuple[str, str]:
    """(status, why) of one benchmark run in its own process: "done", "skipped" or "failed"."""
    print(f"== {key}: {script} {' '.join(args)}", flush=True)
    proc = subprocess.run([sys.executable, str(HERE / script), *args, "--json", str(OUT / f"{key}.json")],
                          stderr=subprocess.PIPE, text=True)
    sys.stderr.write(proc.stderr)
    last = (proc.stderr.strip().splitlines() or [""])[-1]
    if proc.returncode == 0:
        return "done", ""
    if proc.returncode == SKIPPED:
        return "skipped", last
    return "failed", f"exit code {proc.returncode}: {last}"


def main() -> None:
    wanted = sys.argv[1:] or list(BENCHES)
    OUT.mkdir(exist_ok=True)
    outcomes = {}
    for name in wanted:
        keys = [k for k in BENCHES if k == name or k.startswith(name + "_")]
        if not keys:
            sys.exit(f"unknown benchmark {name!r}: choose from {', '.join(BENCHES)}")
        for key in keys:
            script, *args = BENCHES[key]
            (OUT / f"{key}.json").unlink(missing_ok=True)  # no stale result passes for this run's
            outcomes[key] = run(key, script, args)
    print("\nresults in", OUT)
    for key, (status, why) in outcomes.items():
        if status != "done":
            print(f"{key}: {status.upper()} ({why})")
            continue
        data = json.loads((OUT / f"{key}.json").read_text())
        keys = [k for k in data if not isinstance(data[k], (list, dict))]
        print(f"{key}: " + ", ".join(f"{k}={data[k]:.3g}" if isinstance(data[k], float) else f"{k}={data[k]}"
                                     for k in keys))
    if any(status == "failed" for status, _ in outcomes.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
