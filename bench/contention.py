"""How much slower training and evaluation run when another process keeps one core busy (a laptop always has
something else running), for each threading setting:

    fixed        one thread per core, whatever the load (torch's default, and llmlab's before llmlab.threads)
    passive      the same with OpenMP's passive wait policy (waiting threads sleep instead of spinning)
    one-thread   one thread, whatever the load
    free-cores   one thread per core that other processes leave free (`--threads 0 --parts 1`: llmlab's
                 default before training steps were cut into parts)
    auto         llmlab's default (`--threads 0 --parts 0`): the thread count of free-cores, and each
                 training micro-batch cut into two parts per core, each on a thread of its own
                 (llmlab.training.step_on_device)

Every setting but auto trains on whole micro-batches, the step as it was before parts.

Each setting runs in a fresh process (OpenMP reads its environment once, when torch loads), first on a quiet
machine, then beside a busy process (a pure-Python loop, one core). The work: steps of the B4 pretraining
step on a small model (the cpu preset's shape) and greedy batched decoding of the same model (the shape of
`llmlab eval`, timed after 1.5 s of decoding, so that the thread count has looked at the load as it does in
any evaluation longer than that). Prints the median seconds per unit of work, the slowdown busy over quiet for
each setting, and each setting's busy time over the quiet time of `fixed` (what a user sees: before, the
fixed row; after, the auto row).

    python bench/contention.py [--steps 10] [--repeats 3] [--settings fixed,auto]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

WORK = r'''
import json, sys, time, torch
from llmlab.engine import Engine, SamplingParams
from llmlab.model import GPT, GPTConfig
from llmlab.optim import OptimConfig, build_optimizers
from llmlab.training import configure_torch, train_step
from llmlab import threads as cpu_threads
from contextlib import nullcontext

threads, parts, steps = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
configure_torch(threads)
torch.manual_seed(0)
cfg = GPTConfig(vocab_size=4096, n_layer=4, d_model=128, n_head=2, n_kv_head=2, context_len=128, qk_norm=True)
model = GPT(cfg)
model.init_weights(seed=0)
opts = build_optimizers(model, OptimConfig())
ids = torch.randint(0, cfg.vocab_size, (32, cfg.context_len + 1))
used = []
for _ in range(2):  # warm-up
    cpu_threads.adapt()  # once per step, as llmlab.training.fit does (the engine does it per token)
    train_step(model, opts, [(ids[:, :-1], ids[:, 1:])], 1.0, nullcontext(), parts=parts)
t0 = time.perf_counter()
for _ in range(steps):
    cpu_threads.adapt()
    used.append(torch.get_num_threads())
    train_step(model, opts, [(ids[:, :-1], ids[:, 1:])], 1.0, nullcontext(), parts=parts)
train_s = (time.perf_counter() - t0) / steps
engine = Engine(model.eval())
prompts = [ids[i, :20].tolist() for i in range(32)]
params = SamplingParams(max_new_tokens=16, temperature=0.0)
t0 = time.perf_counter()
while time.perf_counter() - t0 < 1.5 * cpu_threads.INTERVAL:  # warm-up: the thread count looks at the load
    engine.generate(prompts, params)
t0 = time.perf_counter()
for _ in range(max(steps // 4, 1)):
    engine.generate(prompts, params)
decode_s = (time.perf_counter() - t0) / max(steps // 4, 1)
print(json.dumps({"train_step_s": train_s, "decode_batch_s": decode_s, "train_threads": used,
                  "decode_threads": torch.get_num_threads()}))
'''

BUSY = "while True: pass"

CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
SETTINGS = {  # name: (environment, --threads: 0 adapts to the load, --parts: 1 whole, 0 two parts per core)
    "fixed": ({}, CORES, 1),
    "passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, CORES, 1),
    "one-thread": ({}, 1, 1),
    "free-cores": ({}, 0, 1),
    "auto": ({}, 0, 0),
}


def run_work(env_extra: dict, threads: int, parts: int, steps: int) -> dict:
    env = {**os.environ, **env_extra}
    out = subprocess.run([sys.executable, "-c", WORK, str(threads), str(parts), str(steps)], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="training steps per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per setting and condition")
    parser.add_argument("--json", default="", help="also write the medians to this file")
    parser.add_argument("--settings", default=",".join(SETTINGS),
                        help=f"comma-separated, from {', '.join(SETTINGS)} (the first is the baseline)")
    args = parser.parse_args()
    print(f"cores: {CORES}; {args.repeats} runs of {args.steps} training steps per cell; medians\n")
    rows = []
    for name in args.settings.split(","):
        env_extra, threads, parts = SETTINGS[name]
        quiet, busy = [], []
        for _ in range(args.repeats):
            quiet.append(run_work(env_extra, threads, parts, args.steps))
            hog = subprocess.Popen([sys.executable, "-c", BUSY])
            try:
                time.sleep(0.5)
                busy.append(run_work(env_extra, threads, parts, args.steps))
            finally:
                hog.kill()
                hog.wait()
        row = {"setting": name}
        for key in ("train_step_s", "decode_batch_s"):
            q = statistics.median(r[key] for r in quiet)
            b = statistics.median(r[key] for r in busy)
            row[key] = (q, b, b / q)
        row["threads_busy"] = busy[-1]["train_threads"]  # per measured training step, the last busy run
        rows.append(row)
        print(f"{name}:\n  train step  quiet {row['train_step_s'][0] * 1e3:7.1f} ms  busy {row['train_step_s'][1] * 1e3:7.1f} ms"
              f"  slowdown {row['train_step_s'][2]:.2f}x\n  decode      quiet {row['decode_batch_s'][0] * 1e3:7.1f} ms"
              f"  busy {row['decode_batch_s'][1] * 1e3:7.1f} ms  slowdown {row['decode_batch_s'][2]:.2f}x\n"
              f"  threads of the training steps beside the busy process: {row['threads_busy']}", flush=True)
    base = rows[0]
    print(f"\nagainst {base['setting']} on a quiet machine (busy / quiet {base['setting']}; quiet / quiet {base['setting']}):")
    for row in rows:
        print(f"  {row['setting']:10}  busy: train {row['train_step_s'][1] / base['train_step_s'][0]:.2f}x, "
              f"decode {row['decode_batch_s'][1] / base['decode_batch_s'][0]:.2f}x   quiet: train "
              f"{row['train_step_s'][0] / base['train_step_s'][0]:.2f}x, decode "
              f"{row['decode_batch_s'][0] / base['decode_batch_s'][0]:.2f}x")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"cores": CORES, "steps": args.steps, "repeats": args.repeats,
                                               "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
