"""B1: time-to-loss on Tiny Shakespeare, character level (protocol in ../shared/docs/BENCHMARKS.md).

Trains llmlab's GPT (RoPE, SwiGLU, QK-norm, Muon + AdamW, warmdown schedule) on the first 90% of the characters
and evaluates the loss in nats per character over the whole last 10% at intervals. Prints the whole-process wall
time (from the process's start, interpreter and imports and data preparation included) at which the val loss
first reaches 1.886, the loss reached within 123 s, and the reference figures beside them.

The reference is nanoGPT's CPU quick-start measured on the reference machine (val loss 1.886 after 123 s). Its
code is not part of this project, so it is not re-run here; this script measures the machine's fp32 matmul peak
in the same run instead, so that a result on a slower or busier machine can be read against the reference
machine's 150 GFLOP/s.

    python bench/b1_shakespeare.py                                      # time to 1.886 (one evaluation, at the end)
    python bench/b1_shakespeare.py --budget_s 123 --context 96 --muon_lr 0.04   # best loss within 123 s
"""

from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from llmlab.model import GPT, GPTConfig
from llmlab.optim import OptimConfig, build_optimizers, lr_multiplier, muon_momentum, set_schedule
from llmlab.training import configure_torch, measure_peak_flops, train_step

REFERENCE_LOSS, REFERENCE_SECONDS = 1.886, 123.0
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"


def process_age() -> float:
    """Seconds since this process started (Linux /proc), so the interpreter start-up counts too."""
    try:
        start_ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        uptime = float(open("/proc/uptime").read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _IMPORT_TIME


_IMPORT_TIME = time.perf_counter()


@torch.no_grad()
def val_loss(model: GPT, val: torch.Tensor, T: int, batch: int = 64) -> float:
    """Mean loss in nats per character over the whole val split, in non-overlapping windows of T characters
    (each window predicts its own next characters; the last partial window is included)."""
    model.eval()
    total, count = 0.0, 0
    starts = list(range(0, len(val) - 1, T))
    for i in range(0, len(starts), batch):
        rows = [val[s:min(s + T + 1, len(val))] for s in starts[i:i + batch]]
        full = [r for r in rows if len(r) == T + 1]
        for group in ([torch.stack(full)] if full else []) + [r[None] for r in rows if len(r) != T + 1]:
            logits = model(group[:, :-1])
            total += F.cross_entropy(logits.flatten(0, 1), group[:, 1:].flatten(), reduction="sum").item()
            count += group[:, 1:].numel()
    model.train()
    return total / count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (the schedule's length)")
    p.add_argument("--batch", type=int, default=16, help="rows per step")
    p.add_argument("--context", type=int, default=64, help="characters per row")
    p.add_argument("--d_model", type=int, default=128)
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_head", type=int, default=2)
    p.add_argument("--muon_lr", type=float, default=0.05)
    p.add_argument("--embed_lr", type=float, default=0.3)
    p.add_argument("--head_lr", type=float, default=0.01)
    p.add_argument("--warmdown", type=float, default=0.5, help="fraction of steps in the final linear decay")
    p.add_argument("--eval_every", type=int, default=100, help="steps between val evaluations")
    p.add_argument("--eval_from", type=int, default=10**9,
                   help="first step evaluated besides the last: a whole-split evaluation costs seconds")
    p.add_argument("--budget_s", type=float, default=0.0,
                   help="if > 0: train until this process age (final evaluation included), the schedule by wall time")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=str, default="", help="also write the results to this file")
    args = p.parse_args()
    configure_torch()

    torch.manual_seed(args.seed)
    text = DATA.read_text(encoding="utf-8")
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([index[c] for c in text], dtype=torch.long)
    n = int(0.9 * len(data))
    train, val = data[:n], data[n:]

    T = args.context
    cfg = GPTConfig(vocab_size=len(chars), n_layer=args.n_layer, d_model=args.d_model, n_head=args.n_head,
                    n_kv_head=args.n_head, context_len=T, qk_norm=True)
    model = GPT(cfg)
    model.init_weights(seed=args.seed)
    optimizers = build_optimizers(model, OptimConfig(muon_lr=args.muon_lr, embed_lr=args.embed_lr,
                                                     head_lr=args.head_lr, scalar_lr=0.02))
    gen = torch.Generator().manual_seed(args.seed)
    print(f"B1 tiny shakespeare: {len(chars)} chars, {len(train):,} train / {len(val):,} val; "
          f"model {model.num_params() / 1e6:.2f}M params; "
          + (f"{args.budget_s:.0f} s budget" if args.budget_s > 0 else f"{args.steps} steps") + f" x {args.batch} x {T}")

    history, reached_at, loss_at_ref = [], None, None
    t_train = process_age()
    eval_cost = 0.0
    if args.budget_s > 0:  # the final evaluation must fit in the budget too: time one on 1/8 of the split
        t0 = time.perf_counter()
        val_loss(model, val[: len(val) // 8], T)
        eval_cost = 8 * (time.perf_counter() - t0)
    step = 0
    while True:
        if args.budget_s > 0:  # schedule by wall time: progress is the fraction of the budget used
            progress = (process_age() - t_train) / (args.budget_s - eval_cost - t_train)
        else:
            progress = step / args.steps
        done = progress >= 1.0
        if done or (step >= args.eval_from and step % args.eval_every == 0):
            loss = val_loss(model, val, T)
            age = process_age()
            history.append({"step": step, "seconds": round(age, 2), "val_loss": round(loss, 4)})
            print(f"step {step:5d}  {age:6.1f} s  val loss {loss:.4f}", flush=True)
            if age <= REFERENCE_SECONDS:
                loss_at_ref = loss if loss_at_ref is None else min(loss, loss_at_ref)
            if reached_at is None and loss <= REFERENCE_LOSS:
                reached_at = age
        if done:
            break
        set_schedule(optimizers, lr_multiplier(int(progress * 10_000), 10_000, 0, args.warmdown, 0.0), muon_momentum(step))
        starts = torch.randint(0, len(train) - T - 1, (args.batch,), generator=gen)
        rows = torch.stack([train[s:s + T + 1] for s in starts.tolist()])
        train_step(model, optimizers, [(rows[:, :-1], rows[:, 1:])], grad_clip=0.0, autocast=nullcontext())
        step += 1

    peak = measure_peak_flops(torch.device("cpu"))
    result = {
        "seconds_to_1.886": reached_at,
        "speedup_vs_nanogpt": REFERENCE_SECONDS / reached_at if reached_at else None,
        "best_val_loss_within_123s": loss_at_ref,
        "reference": {"nanogpt_seconds_to_1.886": REFERENCE_SECONDS, "target_seconds": 60, "aim_seconds": 40,
                      "target_loss_within_123s": 1.70},
        "peak_gflops_measured": round(peak / 1e9, 1),
        "peak_gflops_reference_machine": 150,
        "history": history,
        "args": vars(args),
    }
    print(f"\nreached val loss {REFERENCE_LOSS} at: "
          + (f"{reached_at:.1f} s (nanoGPT: {REFERENCE_SECONDS:.0f} s -> {REFERENCE_SECONDS / reached_at:.2f}x)" if reached_at else "never")
          + f"\nbest val loss within {REFERENCE_SECONDS:.0f} s: "
          + (f"{loss_at_ref:.4f} (target <= 1.70)" if loss_at_ref is not None else "none evaluated")
          + f"\nfp32 matmul peak measured now: {peak / 1e9:.0f} GFLOP/s (reference machine: 150)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
