"""Adapters served together: batched greedy decoding of one batch whose rows go through different LoRA adapters
(llmlab.lora.AdapterBank), beside the same batch through the base model alone, through one adapter for every
row, and through a model with that adapter merged into its weights (what serving one adapter per process
costs nothing extra for), in one run.

The model is the cpu speedrun's assistant when it exists (else the same shape with random weights); the
adapters are random (r --rank on every linear layer: what they say does not matter here, only what they cost).
Tokens/s = new tokens of the batch / wall time of `Engine.generate` (prefill included), medians of --rounds
after a warm-up.

    python bench/adapters.py [--checkpoint runs/cpu/sft] [--rows 16] [--adapters 4] [--rank 16] [--rounds 5]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from llmlab import checkpoint
from llmlab.engine import Engine, SamplingParams
from llmlab.lora import ALL_LINEAR, AdapterBank, add_lora, load_adapter, lora_modules, merge_lora, save_adapter
from llmlab.model import GPT, GPTConfig
from llmlab.training import configure_torch


def random_adapters(base: GPT, n: int, rank: int, out: Path) -> list[Path]:
    paths = []
    for i in range(n):
        adapted = copy.deepcopy(base)
        add_lora(adapted, r=rank, alpha=2.0 * rank, targets=ALL_LINEAR, seed=i)
        for m in lora_modules(adapted).values():
            m.lora_B.weight.data.normal_(0, 0.02, generator=torch.Generator().manual_seed(i))
        paths.append(save_adapter(adapted, out / f"adapter-{i}"))
    return paths


def rate(engine: Engine, prompts: list[list[int]], params: SamplingParams, rounds: int, bank: AdapterBank | None = None,
         rows: list[int] | int | None = None) -> float:
    rates = []
    for i in range(rounds + 1):
        t0 = time.perf_counter()
        if bank is None or rows is None:
            out = engine.generate(prompts, params)
        else:
            with bank.use(rows):
                out = engine.generate(prompts, params)
        if i:  # the first is a warm-up
            rates.append(sum(map(len, out)) / (time.perf_counter() - t0))
    return statistics.median(rates)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="runs/cpu/sft")
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--new_tokens", type=int, default=48)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", default="")
    args = p.parse_args()
    configure_torch()
    if checkpoint.has_checkpoint(args.checkpoint):
        model, source = checkpoint.load(args.checkpoint).model, args.checkpoint
    else:
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=2736, n_layer=4, d_model=128, n_head=2, n_kv_head=2, context_len=128,
                              qk_norm=True))
        model.init_weights()
        source = "random weights, the cpu preset's shape"
    model.eval()
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, model.config.vocab_size, (24,), generator=gen).tolist() for _ in range(args.rows)]
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = random_adapters(model, args.adapters, args.rank, Path(tmp))
        base_rate = rate(Engine(model), prompts, params, args.rounds)
        merged = merge_lora(load_adapter(copy.deepcopy(model), paths[0]))
        merged_rate = rate(Engine(merged), prompts, params, args.rounds)
        banked = copy.deepcopy(model)
        bank = AdapterBank(banked)
        for path in paths:
            bank.add(path)
        engine = Engine(banked)
        one_rate = rate(engine, prompts, params, args.rounds, bank, 1)
        mixed = [1 + row % args.adapters for row in range(args.rows)]
        mixed_rate = rate(engine, prompts, params, args.rounds, bank, mixed)
        base_in_bank = rate(engine, prompts, params, args.rounds, bank, 0)
    result = {"base": base_rate, "merged": merged_rate, "bank_base_rows": base_in_bank, "bank_one_adapter": one_rate,
              "bank_mixed": mixed_rate, "rows": args.rows, "adapters": args.adapters, "rank": args.rank}
    print(f"adapters on {source} ({model.num_params() / 1e6:.2f}M parameters): {args.rows} rows, {args.new_tokens} new "
          f"tokens each, {args.adapters} adapters of rank {args.rank} on every linear layer, {torch.get_num_threads()} "
          f"threads; greedy tokens/s, medians of {args.rounds}:")
    for name, key in (("base model alone", "base"), ("one adapter merged into the weights", "merged"),
                      ("bank, every row the base", "bank_base_rows"), ("bank, every row one adapter", "bank_one_adapter"),
                      (f"bank, rows across {args.adapters} adapters", "bank_mixed")):
        print(f"  {name:38} {result[key]:8.0f} tokens/s ({result[key] / base_rate:.2f}x the base)")
    if args.json:
        Path(args.json).write_text(json.dumps({**result, "args": vars(args)}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
