"""B1: time-to-loss on Tiny Shakespeare, character level (protocol in ../shared/docs/BENCHMARKS.md).

Trains llmlab's GPT (RoPE, SwiGLU, QK-norm, Muon + AdamW, warmdown schedule) on the first 90% of the characters
and evaluates the loss in nats per character over the whole last 10%. Prints the whole-process wall time (from
the process's start, interpreter and imports and data preparation included) at which the val loss first reaches
1.886, the loss reached within 123 s, and the reference figures beside them.

Where the crossing lies: a whole-split evaluation costs about a tenth of the run, so evaluating every second
would slow training down and blur the clock it measures. Instead the weights are copied (a few MB, under a
millisecond) every few steps during training, with the process age at that moment, and evaluated after training:
the final weights first, then a bisection over the copies finds the first one at or below 1.886 whose
predecessor is above it (the val loss falls with training; a bisection needs about 7 evaluations). At most
`--snapshots` copies are kept: when full, every other one goes and the interval doubles, so the crossing is
resolved to within 1/64 to 1/128 of the run (about 1% of a 200-step run, 3% of a 123 s one); its bracket is
printed. The time reported for the crossing copy is the protocol's whole-process wall time of a run that stops
training there and evaluates once: the process age when training reached it plus the time of its evaluation.
Evaluations made only to locate the crossing are not part of it (the time they took is printed too).

The reference is nanoGPT's CPU quick-start measured on the reference machine (val loss 1.886 after 123 s). Its
code is not part of this project, so it is not re-run here; this script measures the machine's fp32 matmul peak
in the same run instead, so that a result on a slower or busier machine can be read against the reference
machine's 150 GFLOP/s.

    python bench/b1_shakespeare.py                                      # time to 1.886
    python bench/b1_shakespeare.py --budget_s 123 --context 96 --muon_lr 0.04   # best loss within 123 s
    python bench/b1_shakespeare.py --data path/to/tinyshakespeare.txt   # the data elsewhere

Exit codes: 0 done, 3 skipped because the data file is missing (one line says where to get it; bench/run_all.py
reports the benchmark as skipped), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
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
DATA_SOURCE = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SKIPPED = 3  # exit code: an input is missing (bench/run_all.py reads it)


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


class Snapshots:
    """Copies of the weights taken during training, each with its step and the process age when training reached
    it. At most `limit`: when one more is taken, every other one goes and the interval between copies doubles."""

    def __init__(self, limit: int):
        self.limit, self.every = limit, 1
        self.items: list[dict] = []  # {"step", "trained_s", "weights"}

    def offer(self, step: int, model: GPT) -> None:
        if step % self.every:
            return
        weights = [p.detach().clone() for p in model.parameters()]
        self.items.append({"step": step, "trained_s": process_age(), "weights": weights})
        if len(self.items) > self.limit:
            self.items, self.every = self.items[::2], self.every * 2


def evaluate(model: GPT, val: torch.Tensor, T: int, point: dict) -> dict:
    """The val loss of a snapshot (or of the model as it is when `point` has no weights), timed. "seconds" is the
    whole-process wall time of a run that stops training at the point and evaluates once."""
    if "weights" in point:
        with torch.no_grad():
            for p, w in zip(model.parameters(), point["weights"]):
                p.copy_(w)
    t0 = time.perf_counter()
    loss = val_loss(model, val, T)
    eval_s = time.perf_counter() - t0
    record = {"step": point["step"], "trained_s": round(point["trained_s"], 2), "eval_s": round(eval_s, 2),
              "seconds": round(point["trained_s"] + eval_s, 2), "val_loss": round(loss, 4)}
    print(f"step {record['step']:5d}  trained at {record['trained_s']:6.1f} s  val loss {loss:.4f}  "
          f"(evaluated in {eval_s:.1f} s)", flush=True)
    return record


def first_crossing(model: GPT, val: torch.Tensor, T: int, points: list[dict], last: dict,
                   history: list[dict]) -> tuple[dict | None, dict | None]:
    """(the first evaluated point at or below the reference loss, the point evaluated just before it and above,
    or None): bisection over `points` (snapshots in training order) ending with `last`, already evaluated."""
    if last["val_loss"] > REFERENCE_LOSS:
        return None, None
    below, above = last, None
    lo, hi = -1, len(points)  # points[lo] above the target (lo = -1: none known), points[hi] (or last) at or below
    while hi - lo > 1:
        mid = (lo + hi) // 2
        record = evaluate(model, val, T, points[mid])
        history.append(record)
        if record["val_loss"] <= REFERENCE_LOSS:
            hi, below = mid, record
        else:
            lo, above = mid, record
    return below, above


def read_text(path: Path) -> str:
    """The data file's text, or exit with SKIPPED and one line saying where to get it."""
    if not path.is_file():
        print(f"B1 skipped: no Tiny Shakespeare at {path}: download {DATA_SOURCE} (char-rnn's "
              f"data/tinyshakespeare/input.txt, 1.1 MB) and pass --data PATH", file=sys.stderr)
        sys.exit(SKIPPED)
    return path.read_text(encoding="utf-8")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DATA,
                   help="Tiny Shakespeare as one text file (default: the shared copy, ../shared/data/ beside the "
                        f"repository; it is {DATA_SOURCE})")
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
    p.add_argument("--snapshots", type=int, default=128,
                   help="weight copies kept to locate the crossing (the resolution is 1/snapshots to 2/snapshots "
                        "of the run); 0: evaluate the final weights only")
    p.add_argument("--budget_s", type=float, default=0.0,
                   help="if > 0: train until this process age (final evaluation included), the schedule by wall time")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=str, default="", help="also write the results to this file")
    args = p.parse_args()
    text = read_text(args.data)
    configure_torch()

    torch.manual_seed(args.seed)
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

    t_train = process_age()
    eval_cost = 0.0
    if args.budget_s > 0:  # the final evaluation must fit in the budget too: time one on 1/8 of the split
        t0 = time.perf_counter()
        val_loss(model, val[: len(val) // 8], T)
        eval_cost = 8 * (time.perf_counter() - t0)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    snapshots = Snapshots(min(args.snapshots, max(8, 2**30 // weight_bytes)))  # at most about 1 GiB of copies
    step, shown = 0, process_age()
    while True:
        if args.budget_s > 0:  # schedule by wall time: progress is the fraction of the budget used
            progress = (process_age() - t_train) / (args.budget_s - eval_cost - t_train)
        else:
            progress = step / args.steps
        if progress >= 1.0:
            break
        if args.snapshots > 0:
            snapshots.offer(step, model)
        set_schedule(optimizers, lr_multiplier(int(progress * 10_000), 10_000, 0, args.warmdown, 0.0), muon_momentum(step))
        starts = torch.randint(0, len(train) - T - 1, (args.batch,), generator=gen)
        rows = torch.stack([train[s:s + T + 1] for s in starts.tolist()])
        loss, _ = train_step(model, optimizers, [(rows[:, :-1], rows[:, 1:])], grad_clip=0.0, autocast=nullcontext())
        step += 1
        if process_age() - shown >= 10:
            shown = process_age()
            print(f"step {step:5d}  {shown:6.1f} s  train loss {loss:.4f}", flush=True)

    final = evaluate(model, val, T, {"step": step, "trained_s": process_age()})
    history = [final]
    t_search = time.perf_counter()
    crossing, before = first_crossing(model, val, T, snapshots.items, final, history)
    search_s = time.perf_counter() - t_search
    within = [r["val_loss"] for r in history if r["seconds"] <= REFERENCE_SECONDS]
    loss_at_ref = min(within) if within else None
    reached_at = crossing["seconds"] if crossing else None

    peak = measure_peak_flops(torch.device("cpu"))
    result = {
        "seconds_to_1.886": reached_at,
        "speedup_vs_nanogpt": REFERENCE_SECONDS / reached_at if reached_at else None,
        "val_loss_at_crossing": crossing["val_loss"] if crossing else None,
        "crossing_resolution_s": round(crossing["trained_s"] - before["trained_s"], 2) if before else None,
        "best_val_loss_within_123s": loss_at_ref,
        "final_val_loss": final["val_loss"],
        "search_eval_s": round(search_s, 1),
        "reference": {"nanogpt_seconds_to_1.886": REFERENCE_SECONDS, "target_seconds": 60, "aim_seconds": 40,
                      "target_loss_within_123s": 1.70},
        "peak_gflops_measured": round(peak / 1e9, 1),
        "peak_gflops_reference_machine": 150,
        "history": sorted(history, key=lambda r: r["step"]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    if crossing is None:
        reached = "never"
    else:
        reached = (f"{reached_at:.1f} s at step {crossing['step']} (val loss {crossing['val_loss']:.4f}; trained "
                   f"{crossing['trained_s']:.1f} s + one evaluation {crossing['eval_s']:.1f} s; nanoGPT: "
                   f"{REFERENCE_SECONDS:.0f} s -> {REFERENCE_SECONDS / reached_at:.2f}x)")
        reached += (f"\n  bracket: step {before['step']} (trained at {before['trained_s']:.1f} s) was above, "
                    f"val loss {before['val_loss']:.4f}: resolved to {crossing['trained_s'] - before['trained_s']:.1f} s"
                    if before else "\n  bracket: no earlier snapshot to bracket it")
    print(f"\nreached val loss {REFERENCE_LOSS} at: {reached}"
          f"\n  (whole-process wall time of a run that stops there and evaluates once; the {len(history) - 1} "
          f"evaluations that located the crossing took {search_s:.1f} s more after training)"
          f"\nbest val loss within {REFERENCE_SECONDS:.0f} s: "
          + (f"{loss_at_ref:.4f} (target <= 1.70)" if loss_at_ref is not None else "none evaluated")
          + f"\nfp32 matmul peak measured now: {peak / 1e9:.0f} GFLOP/s (reference machine: 150)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
