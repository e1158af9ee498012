"""What every training stage shares: the loss, a training step with accumulation and clipping, bits per
byte, throughput and MFU, the metrics log, and the progress bar."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F

import torch.nn as nn

from llmlab import dist
from llmlab.model import GPT

IGNORE_INDEX = -100


def configure_torch(threads: int = 0) -> None:
    """Process-wide settings for training on CPU: flush denormal floats to zero (tiny optimizer moments and
    gradients otherwise fall into x86's microcoded slow path: a tiny model trained 150x slower here), and
    the number of threads (0 keeps torch's default of one per core)."""
    torch.set_flush_denormal(True)
    if threads > 0:
        torch.set_num_threads(threads)


def token_losses(model: GPT, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy in nats (B, T); targets equal to IGNORE_INDEX give 0."""
    logits = model(inputs)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="none").view_as(targets)


def train_step(model: nn.Module, optimizers: list[torch.optim.Optimizer], batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
               grad_clip: float, autocast) -> tuple[float, float]:
    """One optimizer step over the micro-batches (gradient accumulation): mean loss over all trained tokens.

    Each micro-batch's summed loss is divided by the number of trained tokens in the whole step, all ranks
    counted, so the gradient is that of the mean over the global batch whatever the split into micro-batches
    and processes (DDP and FSDP2 average gradients over the W ranks, hence the factor W). Gradients are
    synchronised only after the last micro-batch. `model` may be wrapped (llmlab.dist.wrap).
    Returns (mean loss over the global batch, gradient norm before clipping; nan when clipping is off).
    """
    batches = list(batches)
    device = batches[0][0].device
    world = dist.world_size()
    (n_tokens,) = dist.all_reduce_sum([sum(int((t != IGNORE_INDEX).sum()) for _, t in batches)], device)
    total = 0.0
    for i, (inputs, targets) in enumerate(batches):
        with dist.no_sync(model, skip=i < len(batches) - 1):
            with autocast:
                loss = token_losses(model, inputs, targets).sum() * (world / max(n_tokens, 1))
            loss.backward()
        total += loss.item() / world
    (total,) = dist.all_reduce_sum([total], device)
    grad_norm = float("nan")
    if grad_clip > 0:
        grad_norm = float(dist.full_tensor(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)))
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)
    return total, grad_norm


@torch.no_grad()
def evaluate_bpb(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], token_bytes: torch.Tensor,
                 autocast) -> tuple[float, float]:
    """(bits per byte, mean loss in nats per token) over the batches, of all ranks together (each rank passes
    its share: `rank_share`).

    Bits per byte = total nats / (ln 2 x total UTF-8 bytes of the target tokens): unlike the loss per token
    it does not depend on the tokenizer, so runs with different vocabularies compare. Targets with zero
    bytes (special tokens such as <|bos|>) are left out of both sums.
    """
    was_training = model.training
    model.eval()
    nats, n_bytes, n_tokens = 0.0, 0, 0
    device = next(model.parameters()).device
    token_bytes = token_bytes.to(device=device, dtype=torch.int64)
    for inputs, targets in batches:
        inputs, targets = inputs.to(device), targets.to(device)
        with autocast:
            losses = token_losses(model, inputs, targets)
        nbytes = token_bytes[targets.clamp(min=0)] * (targets != IGNORE_INDEX)
        counted = nbytes > 0
        nats += float(losses[counted].sum())
        n_bytes += int(nbytes.sum())
        n_tokens += int(counted.sum())
    nats, n_bytes, n_tokens = dist.all_reduce_sum([nats, n_bytes, n_tokens], device)
    model.train(was_training)
    if n_bytes == 0:
        return float("nan"), float("nan")
    return nats / (math.log(2) * n_bytes), nats / n_tokens


def rank_share(batches: list[tuple[torch.Tensor, torch.Tensor]], rank: int,
               world_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's batches for an evaluation: batches rank, rank + W, ..., padded with batches whose targets
    are all ignored so that every rank runs the same number of forward passes (FSDP2 all-gathers weights in
    each one, and a rank that stopped early would leave the others waiting)."""
    mine = batches[rank::world_size]
    rounds = -(-len(batches) // world_size)
    inputs, targets = batches[0]
    mine += [(inputs, torch.full_like(targets, IGNORE_INDEX))] * (rounds - len(mine))
    return mine


def measure_peak_flops(device: torch.device, size: int = 2048, reps: int = 5) -> float:
    """Measured matmul FLOP/s of this machine in the training dtype (fp32 on CPU, bf16 on CUDA; an `mm` of
    size x size, the best of `reps`): the denominator of MFU, as BENCHMARKS.md prescribes for CPUs, which
    have no datasheet peak. On GPUs it lands near the datasheet's dense bf16 figure."""
    if device.type == "cuda":
        size = max(size, 8192)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


class MetricsLog:
    """Append-only JSONL of a run's metrics; on resume, lines past the resumed step are dropped."""

    def __init__(self, path: str | Path, resume_step: int | None = None, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step is not None and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line)
                except json.JSONDecodeError:
                    break  # a line cut by a kill: everything after it is gone too
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, **row) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

