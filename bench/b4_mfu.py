"""B4: training efficiency: tokens/s and model FLOP utilisation of a pretraining step on this machine.

MFU = (FLOPs per token x tokens/s) / peak, with FLOPs per token = 6 x (matmul parameters, LM head included)
+ 12 x layers x context x d_model (BENCHMARKS.md) and the peak measured in the same run (fp32 `mm` of 2048 x 2048,
both cores). The step timed is the one `llmlab pretrain` runs: forward, backward, gradient clipping, AdamW
and Muon (whose Newton-Schulz matmuls are work the formula does not count). Token batches are random: the
data pipeline is not part of this measurement.

    python bench/b4_mfu.py                   # the B2 shape (9.3M parameters) at context 256
    python bench/b4_mfu.py --d_model 192 --n_layer 4 --vocab 2048     # the cpu preset's shape
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from llmlab.model import GPT, GPTConfig
from llmlab.optim import OptimConfig, build_optimizers
from llmlab.training import configure_torch, measure_peak_flops, train_step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--d_model", type=int, default=256)
    p.add_argument("--n_layer", type=int, default=6)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--ffn", type=int, default=768)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--batch", type=int, default=16, help="rows per step")
    p.add_argument("--steps", type=int, default=8, help="timed steps (after 2 warm-up steps)")
    p.add_argument("--repeats", type=int, default=3, help="peak measurements interleaved with the steps")
    p.add_argument("--parts", type=int, default=0,
                   help="parts of each batch on threads of their own (0: two per core, llmlab's default; 1: whole)")
    p.add_argument("--json", type=str, default="")
    args = p.parse_args()
    configure_torch()

    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=args.vocab, n_layer=args.n_layer, d_model=args.d_model, n_head=args.n_head,
                    n_kv_head=args.n_head, ffn_hidden=args.ffn, context_len=args.context, qk_norm=True)
    model = GPT(cfg)
    model.init_weights(seed=0)
    optimizers = build_optimizers(model, OptimConfig())
    flops_per_token = model.flops_per_token(args.context)
    tokens = args.batch * args.context
    print(f"B4: {model.num_params() / 1e6:.1f}M parameters, {flops_per_token / 1e6:.1f} MFLOP/token, "
          f"{args.batch} x {args.context} = {tokens:,} tokens/step, {torch.get_num_threads()} threads")

    def batch():
        ids = torch.randint(0, args.vocab, (args.batch, args.context + 1))
        return ids[:, :-1], ids[:, 1:]

    for _ in range(2):
        train_step(model, optimizers, [batch()], 1.0, nullcontext(), parts=args.parts)
    step_times, peaks = [], []
    per_round = max(1, args.steps // args.repeats)
    for _ in range(args.repeats):
        peaks.append(measure_peak_flops(torch.device("cpu")))
        for _ in range(per_round):
            b = batch()
            t0 = time.perf_counter()
            train_step(model, optimizers, [b], 1.0, nullcontext(), parts=args.parts)
            step_times.append(time.perf_counter() - t0)
    step_s = statistics.median(step_times)
    peak = statistics.median(peaks)
    tok_s = tokens / step_s
    mfu = flops_per_token * tok_s / peak
    print(f"median step {step_s * 1e3:.0f} ms -> {tok_s:,.0f} tokens/s; achieved {flops_per_token * tok_s / 1e9:.1f} GFLOP/s; "
          f"peak {peak / 1e9:.1f} GFLOP/s (median of {len(peaks)})")
    print(f"MFU {100 * mfu:.1f}%  (target >= 40%)")
    if args.json:
        Path(args.json).write_text(json.dumps({"params": model.num_params(), "flops_per_token": flops_per_token,
                                               "tokens_per_s": tok_s, "peak_flops": peak, "mfu": mfu,
                                               "step_seconds": step_times, "args": vars(args)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
