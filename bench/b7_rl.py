"""B7: RL throughput beside the engine's: rollout tokens/s and RL steps/s of `llmlab rl`'s loop, and the same
engine's plain batched sampling (B3's measure) on the same model and batch, in one run.

The model is the cpu speedrun's assistant when it exists (else the B3 shape with random weights and made-up
prompts). One RL step = rollouts (a batch of prompts x group replies through the engine, tools run, the reward
computed, the reference's log-probabilities) + one optimizer step of the policy gradient. Rollout tokens/s =
reply tokens / rollout seconds; plain sampling = the same rows' prompts, `generate` with the same settings.
Medians of --rounds steps after a warm-up.

Also the engine's two economies for batches whose replies end at different lengths, on the same rows with the
same tools: sampling them as the engine does (rows that stop leave the batch, tool calls run in a pool while the
batch decodes) against the batch kept whole to its longest reply with each call run in turn (`COMPACT_AT = 0`,
`tool_workers=0`), in the same run.

    python bench/b7_rl.py [--policy runs/cpu/sft] [--rounds 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from llmlab import checkpoint, presets
from llmlab.alignment.losses import PolicyGradientLoss
from llmlab.alignment.rollouts import Rollouts, TaskReward
from llmlab.engine import TOOL_WORKERS, Engine, SamplingParams, generate_with_tools
from llmlab.optim import OptimConfig, build_optimizers
from llmlab.tasks.gold import GoldTask
from llmlab.tools import tool_runner
from llmlab.training import configure_torch, train_step


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", default="runs/cpu/sft")
    p.add_argument("--world", default="runs/cpu/world")
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--group", type=int, default=8, help="replies per prompt")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", default="")
    args = p.parse_args()
    if not checkpoint.has_checkpoint(args.policy):
        print(f"SKIPPED: no assistant at {args.policy}: run `make speedrun` first (or pass --policy)", file=sys.stderr)
        return 3
    configure_torch()
    ckpt = checkpoint.load(args.policy)
    policy, tok = ckpt.model, ckpt.tokenizer
    reference = checkpoint.load_model(args.policy)
    task = GoldTask(args.world, "train", 20)
    preset = presets.cpu().rl  # the speedrun's rollouts: its reply length and temperature
    params = SamplingParams(max_new_tokens=preset.max_new_tokens, temperature=preset.temperature)
    tool = tool_runner(args.world)
    source = Rollouts(policy, reference, tok, list(task.examples()), TaskReward(task, tok), tool, args.prompts,
                      args.group, params)
    optimizers = build_optimizers(policy, OptimConfig(muon_lr=0.002, embed_lr=0.01, head_lr=0.0005, scalar_lr=0.001))
    objective = PolicyGradientLoss(beta=0.05, temperature=params.temperature)
    engine = Engine(policy)
    whole = Engine(policy)
    whole.COMPACT_AT = 0.0
    stop = [tok.special_id("<|assistant_end|>")]
    rollout_rates, step_rates, plain_rates, econ_rates, whole_rates = [], [], [], [], []
    for i in range(args.rounds + 1):
        t0 = time.perf_counter()
        batch = source.next_batch()
        t1 = time.perf_counter()
        train_step(policy, optimizers, [batch], 1.0, torch.autocast("cpu", enabled=False), objective)
        t2 = time.perf_counter()
        tokens = source.stats.reply_tokens * args.prompts * args.group
        prompts = [source.prompts[j] for j in range(args.prompts) for _ in range(args.group)]
        t3 = time.perf_counter()
        out = engine.generate(prompts, dataclasses.replace(params, seed=i), stop)
        plain = sum(map(len, out)) / (time.perf_counter() - t3)
        rates = []
        for eng, workers in ((engine, TOOL_WORKERS), (whole, 0)):
            t4 = time.perf_counter()
            out, _ = generate_with_tools(eng, tok, prompts, dataclasses.replace(params, seed=i), stop, tool,
                                         tool_workers=workers)
            rates.append(sum(map(len, out)) / (time.perf_counter() - t4))
        if i == 0:
            continue  # warm-up
        econ_rates.append(rates[0])
        whole_rates.append(rates[1])
        rollout_rates.append(tokens / (t1 - t0))
        step_rates.append(1 / (t2 - t0))
        plain_rates.append(plain)
    result = {"rollout_tokens_per_s": statistics.median(rollout_rates), "rl_steps_per_s": statistics.median(step_rates),
              "engine_tokens_per_s": statistics.median(plain_rates), "rows": args.prompts * args.group,
              "with_tools_tokens_per_s": statistics.median(econ_rates),
              "with_tools_whole_batch_tokens_per_s": statistics.median(whole_rates)}
    print(f"B7 RL on {args.policy} ({policy.num_params() / 1e6:.2f}M parameters), {result['rows']} rows per step "
          f"({args.prompts} prompts x {args.group}), {torch.get_num_threads()} threads, medians of {args.rounds}:")
    print(f"  rollouts (engine + tools + rewards + reference): {result['rollout_tokens_per_s']:8.0f} reply tokens/s")
    print(f"  plain batched sampling, same rows (B3's measure): {result['engine_tokens_per_s']:8.0f} tokens/s "
          f"(rollouts at {result['rollout_tokens_per_s'] / result['engine_tokens_per_s']:.2f}x)")
    print(f"  RL steps/s (rollouts + one optimizer step):      {result['rl_steps_per_s']:8.2f}")
    econ, kept = result["with_tools_tokens_per_s"], result["with_tools_whole_batch_tokens_per_s"]
    print(f"  sampling the same rows with tools, as the engine does (stopped rows leave, calls in a pool): "
          f"{econ:.0f} tokens/s; batch kept whole, calls in turn: {kept:.0f} tokens/s ({econ / kept:.2f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps({**result, "args": vars(args)}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
