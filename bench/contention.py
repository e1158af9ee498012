"""How much slower training and evaluation run when another process keeps one core busy (a laptop always has
something else running), for each threading setting: torch's default, OpenMP's passive wait policy, and one
thread.

Each setting runs in a fresh process (OpenMP reads its environment once, when torch loads), first on a quiet
machine, then beside a busy process (a pure-Python loop, one core). The work: steps of the B4 pretraining
step on a small model and greedy batched decoding of the same model (the shape of `llmlab eval`). Prints the
median seconds per unit of work and the slowdown, busy over quiet, per setting.

    python bench/contention.py [--steps 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

WORK = r'''
import json, sys, time, torch
from llmlab.engine import Engine, SamplingParams
from llmlab.model import GPT, GPTConfig
from llmlab.optim import OptimConfig, build_optimizers
from llmlab.training import configure_torch, train_step
from contextlib import nullcontext

threads, steps = int(sys.argv[1]), int(sys.argv[2])
configure_torch(threads)
torch.manual_seed(0)
cfg = GPTConfig(vocab_size=4096, n_layer=4, d_model=128, n_head=2, n_kv_head=2, context_len=128, qk_norm=True)
model = GPT(cfg)
model.init_weights(seed=0)
opts = build_optimizers(model, OptimConfig())
ids = torch.randint(0, cfg.vocab_size, (32, cfg.context_len + 1))
train_step(model, opts, [(ids[:, :-1], ids[:, 1:])], 1.0, nullcontext())  # warm-up
t0 = time.perf_counter()
for _ in range(steps):
    train_step(model, opts, [(ids[:, :-1], ids[:, 1:])], 1.0, nullcontext())
train_s = (time.perf_counter() - t0) / steps
engine = Engine(model.eval())
prompts = [ids[i, :20].tolist() for i in range(32)]
params = SamplingParams(max_new_tokens=16, temperature=0.0)
engine.generate(prompts, params)
t0 = time.perf_counter()
for _ in range(max(steps // 4, 1)):
    engine.generate(prompts, params)
decode_s = (time.perf_counter() - t0) / max(steps // 4, 1)
print(json.dumps({"train_step_s": train_s, "decode_batch_s": decode_s, "threads": torch.get_num_threads()}))
'''

BUSY = "while True: pass"

SETTINGS = {
    "default (torch's threads, OpenMP's default wait)": ({}, 0),
    "OMP_WAIT_POLICY=PASSIVE": ({"OMP_WAIT_POLICY": "PASSIVE"}, 0),
    "one thread": ({}, 1),
}


def run_work(env_extra: dict, threads: int, steps: int) -> dict:
    env = {**os.environ, **env_extra}
    out = subprocess.run([sys.executable, "-c", WORK, str(threads), str(steps)], env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="training steps per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per setting and condition")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated names of SETTINGS")
    args = parser.parse_args()
    print(f"cores: {os.cpu_count()}; {args.repeats} runs of {args.steps} training steps per cell; medians\n")
    rows = []
    for name in args.settings.split(","):
        env_extra, threads = SETTINGS[name]
        quiet, busy = [], []
        for _ in range(args.repeats):
            quiet.append(run_work(env_extra, threads, args.steps))
            hog = subprocess.Popen([sys.executable, "-c", BUSY])
            try:
                time.sleep(0.5)
                busy.append(run_work(env_extra, threads, args.steps))
            finally:
                hog.kill()
                hog.wait()
        row = {"setting": name}
        for key in ("train_step_s", "decode_batch_s"):
            q = statistics.median(r[key] for r in quiet)
            b = statistics.median(r[key] for r in busy)
            row[key] = (q, b, b / q)
        rows.append(row)
        print(f"{name}:\n  train step  quiet {row['train_step_s'][0] * 1e3:7.1f} ms  busy {row['train_step_s'][1] * 1e3:7.1f} ms"
              f"  slowdown {row['train_step_s'][2]:.2f}x\n  decode      quiet {row['decode_batch_s'][0] * 1e3:7.1f} ms"
              f"  busy {row['decode_batch_s'][1] * 1e3:7.1f} ms  slowdown {row['decode_batch_s'][2]:.2f}x", flush=True)
    base = rows[0]
    for row in rows[1:]:
        print(f"{row['setting']} vs default, quiet: train {row['train_step_s'][0] / base['train_step_s'][0]:.2f}x time, "
              f"decode {row['decode_batch_s'][0] / base['decode_batch_s'][0]:.2f}x time")


if __name__ == "__main__":
    main()
