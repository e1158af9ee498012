"""Run the benchmarks B1-B4, each in its own process (B1 times the whole process), one after the other so they
never share the cores, and print a summary. Results go to bench/out/<name>.json.

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
}


def main() -> None:
    wanted = sys.argv[1:] or list(BENCHES)
    OUT.mkdir(exist_ok=True)
    for name in wanted:
        keys = [k for k in BENCHES if k == name or k.startswith(name + "_")]
        if not keys:
            sys.exit(f"unknown benchmark {name!r}: choose from {', '.join(BENCHES)}")
        for key in keys:
            script, *args = BENCHES[key]
            if not (HERE / script).exists():
                print(f"== {key}: {script} not found, skipped")
                continue
            print(f"== {key}: {script} {' '.join(args)}", flush=True)
            subprocess.run([sys.executable, str(HERE / script), *args, "--json", str(OUT / f"{key}.json")], check=True)
    print("\nresults in", OUT)
    for path in sorted(OUT.glob("*.json")):
        data = json.loads(path.read_text())
        keys = [k for k in data if not isinstance(data[k], (list, dict))]
        print(f"{path.stem}: " + ", ".join(f"{k}={data[k]:.3g}" if isinstance(data[k], float) else f"{k}={data[k]}" for k in keys))


if __name__ == "__main__":
    main()
