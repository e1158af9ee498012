"""B3: batched sampling throughput: tokens/s of the engine for batch sizes 1, 8, 32 and 128.

The B2 model shape (9.3M parameters, random weights); every row samples 128 new tokens (temperature 1,
top-k 50, seeded) after its own 16-token prompt, so rows differ and nothing is shared. Timed: the whole
`generate` call; tokens/s = batch x 128 / seconds, median of the rounds. Both decode paths are measured: the
eager engine (the default) and the compiled decode step (`Engine(model, compile=True)`), in the same run.

    python bench/b3_batched.py
    python bench/b3_batched.py --batches 1 32 --no_compile
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from llmlab.engine import Engine, SamplingParams
from llmlab.model import GPT, GPTConfig
from llmlab.training import configure_torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128])
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--prompt_len", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3, help="timed runs per batch size (after one warm-up run)")
    p.add_argument("--no_compile", action="store_true", help="measure the eager engine only")
    p.add_argument("--json", type=str, default="")
    args = p.parse_args()
    configure_torch()

    cfg = GPTConfig(vocab_size=8192, n_layer=6, d_model=256, n_head=4, n_kv_head=4, ffn_hidden=768,
                    context_len=args.prompt_len + args.new_tokens + 16, qk_norm=True)
    torch.manual_seed(0)
    model = GPT(cfg)
    model.init_weights(seed=0)
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, top_k=50, seed=0)
    engines = {"eager": Engine(model)}
    if not args.no_compile:
        engines["compiled"] = Engine(model, compile=True)
    print(f"B3: {model.num_params() / 1e6:.1f}M parameters, {args.new_tokens} new tokens per row, "
          f"{torch.get_num_threads()} threads")

    gen = torch.Generator().manual_seed(1)
    results: dict[str, dict[int, float]] = {name: {} for name in engines}
    for name, engine in engines.items():
        for batch in args.batches:
            prompts = torch.randint(0, cfg.vocab_size, (batch, args.prompt_len), generator=gen).tolist()
            engine.generate(prompts, params)  # warm-up (and compilation of the batch graph)
            times = []
            for _ in range(args.rounds):
                t0 = time.perf_counter()
                out = engine.generate(prompts, params)
                times.append(time.perf_counter() - t0)
            assert all(len(row) == args.new_tokens for row in out)
            results[name][batch] = batch * args.new_tokens / statistics.median(times)
            print(f"  {name:9} batch {batch:4}: {results[name][batch]:8.0f} tokens/s", flush=True)

    print(f"\n{'batch':>6}" + "".join(f"{name + ' tok/s':>16}{'x batch 1':>11}" for name in engines))
    for batch in args.batches:
        row = f"{batch:6}"
        for name in engines:
            rate = results[name][batch]
            base = results[name].get(1)
            row += f"{rate:16.0f}" + (f"{rate / base:10.1f}x" if base else f"{'-':>11}")
        print(row)
    print("target: batch 32 >= 10x the tokens/s of batch 1")
    if args.json:
        summary = {}
        for name in engines:
            if 1 in results[name] and 32 in results[name]:
                summary[f"{name}_b32_over_b1"] = results[name][32] / results[name][1]
        Path(args.json).write_text(json.dumps({**summary, "tokens_per_s": results, "args": vars(args)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
