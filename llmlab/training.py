"""The one training loop every stage that updates weights runs (`fit`), and what it is made of: the shared
`TrainConfig`, the loss, a training step with accumulation and clipping, bits per byte, throughput and MFU,
the metrics log.

A stage is a data source, a model and a loss, wired in a few lines:

    info = setup(cfg)                                   # torchrun (or one process), threads, seed
    loader = PackedLoader(...)                          # next_batch(), state_dict(), load_state_dict()
    net = GPT(...)                                      # or checkpoint.load_model(base)
    metrics = fit(cfg, info, net, loader, evaluate=..., meta={"stage": "pretrain"}, tokenizer_path=...)

`fit` owns everything between: resuming from `cfg.out_dir` (weights, optimizer state, RNG, data position),
wrapping for DDP/FSDP2, torch.compile, the learning-rate and momentum schedules, evaluation, the metrics log,
the progress bar, atomic checkpoints, and stopping with a clear error when the loss stops being a number. A
killed run resumes from its last checkpoint and, on CPU, ends with weights bit-identical to an uninterrupted
run: the schedule is a function of the step, and everything else is in the checkpoint.
"""

from __future__ import annotations

import copy
import json
import math
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from llmlab import checkpoint, dist
from llmlab import threads as cpu_threads
from llmlab.config import to_dict
from llmlab.errors import LLMLabError
from llmlab.model import GPT
from llmlab.optim import OptimConfig, build_optimizers, lr_multiplier, muon_momentum, set_schedule

IGNORE_INDEX = -100


def configure_torch(threads: int = 0) -> None:
    """Process-wide settings for training on CPU: flush denormal floats to zero (tiny optimizer moments and
    gradients otherwise fall into x86's microcoded slow path: a tiny model trained 150x slower here), and
    the number of threads (0: one per free core, following the machine's load: llmlab.threads)."""
    torch.set_flush_denormal(True)
    cpu_threads.from_environment()
    if threads > 0:
        cpu_threads.fix(threads)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device`. From the CPU to a GPU through pinned memory, without the host waiting: a copy from
    pageable memory waits until the GPU has finished the work queued before it (the previous step)."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def token_losses(model: GPT, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy in nats (B, T); targets equal to IGNORE_INDEX give 0."""
    logits = model(inputs)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="none").view_as(targets)


class Objective(Protocol):
    """A loss as the loop needs it: summed over a micro-batch, with the count it is averaged over."""

    def count(self, batch: tuple[torch.Tensor, ...]) -> int:
        """How many items (trained tokens, pairs, ...) of the micro-batch the loss is summed over."""

    def loss_sum(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The loss summed over those items (a scalar with a graph)."""

    # Optional: `split(batch, n)`, the batch cut into at most n batches whose loss sums add up to the whole's
    # (`split_rows`, `split_pairs`). A CPU step then computes the parts on threads of their own
    # (`step_on_device`); an objective without it (one that compares rows across the batch) runs whole.


def split_rows(batch: tuple[torch.Tensor, ...], n: int) -> list[tuple[torch.Tensor, ...]]:
    """The batch's rows in min(n, rows) consecutive parts of nearly equal size, every tensor cut along dim 0."""
    rows = batch[0].size(0)
    n = max(1, min(n, rows))
    bounds = [rows * i // n for i in range(n + 1)]
    return [tuple(t[a:b] for t in batch) for a, b in zip(bounds, bounds[1:])]


def split_pairs(batch: tuple[torch.Tensor, ...], n: int) -> list[tuple[torch.Tensor, ...]]:
    """`split_rows` for a batch of P pairs laid out as the P chosen rows, then the P rejected ones: each part
    keeps that layout, with pair i's two rows together."""
    pairs = batch[0].size(0) // 2
    chosen = split_rows(tuple(t[:pairs] for t in batch), n)
    rejected = split_rows(tuple(t[pairs:] for t in batch), n)
    return [tuple(torch.cat([c, r]) for c, r in zip(cs, rs)) for cs, rs in zip(chosen, rejected)]


class TokenCrossEntropy:
    """Next-token cross-entropy over the targets that are not IGNORE_INDEX: pretraining (every token) and
    fine-tuning (the assistant's tokens) alike. A batch is (inputs, targets), both (B, T)."""

    split = staticmethod(split_rows)

    def count(self, batch: tuple[torch.Tensor, ...]) -> int:
        return int((batch[1] != IGNORE_INDEX).sum())

    def loss_sum(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        inputs, targets = batch
        return token_losses(model, inputs, targets).sum()


def train_step(model: nn.Module, optimizers: list[torch.optim.Optimizer], batches: Iterable[tuple[torch.Tensor, ...]],
               grad_clip: float, autocast, objective: Objective | None = None, parts: int = 0) -> tuple[float, float]:
    """One optimizer step over the micro-batches (gradient accumulation): mean loss over all counted items.

    Each micro-batch's summed loss is divided by the number of items in the whole step, all ranks counted,
    so the gradient is that of the mean over the global batch whatever the split into micro-batches and
    processes (DDP and FSDP2 average gradients over the W ranks, hence the factor W). Gradients are
    synchronised only after the last micro-batch. `model` may be wrapped (llmlab.dist.wrap); the objective
    defaults to token cross-entropy.
    On CPU, in one process, each micro-batch is cut into `parts` parts (0: two per core; 1: whole) that run on
    threads of their own when the objective can be split (`_backward_in_parts`).
    Returns (mean loss over the global batch, gradient norm before clipping; nan when clipping is off).
    """
    loss, grad_norm = step_on_device(model, optimizers, batches, grad_clip, autocast, objective, parts=parts)
    return float(loss), float(grad_norm)


def step_on_device(model: nn.Module, optimizers: list[torch.optim.Optimizer],
                   batches: Iterable[tuple[torch.Tensor, ...]], grad_clip: float, autocast,
                   objective: Objective | None = None, n_items: int | None = None,
                   parts: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`train_step` that leaves its results on the device: (mean loss, gradient norm) as 0-d float64 tensors, so
    that the host never waits for the GPU within a step (`fit` reads them every --log_every steps). `n_items`:
    the micro-batches' item count on this rank when the caller has it (counted on the CPU copies of the
    batches, it needs no wait either); the count is all-reduced over the ranks (one wait there)."""
    objective = objective or TokenCrossEntropy()
    batches = list(batches)
    device = batches[0][0].device
    world = dist.world_size()
    if n_items is None:
        n_items = sum(objective.count(b) for b in batches)
    (n_items,) = dist.all_reduce_sum([n_items], device)
    total = torch.zeros((), dtype=torch.float64, device=device)
    split = getattr(objective, "split", None)
    n_parts = cpu_threads.parts(parts) if split is not None and device.type == "cpu" and world == 1 else 1
    for i, batch in enumerate(batches):
        if n_parts > 1:
            total += _backward_in_parts(model, objective, split(batch, n_parts), world / max(n_items, 1), autocast)
            continue
        with dist.no_sync(model, skip=i < len(batches) - 1):
            with autocast:
                loss = objective.loss_sum(model, batch) * (world / max(n_items, 1))
            loss.backward()
        total += loss.detach().double() / world  # float64, as Python's sum of loss.item() was
    dist.all_reduce_(total)
    grad_norm = torch.full((), float("nan"), dtype=torch.float64, device=device)
    if grad_clip > 0:
        grad_norm = dist.full_tensor(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)).double()
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)
    return total, grad_norm


def _backward_in_parts(model: nn.Module, objective: Objective, parts: list[tuple[torch.Tensor, ...]], scale: float,
                       autocast) -> torch.Tensor:
    """Backward over a micro-batch's parts at once, each on a CPU thread of its own (llmlab.threads.pool), and
    the gradients added into the parameters' .grad; returns the parts' summed loss (float64) times `scale`.

    Operations on two threads wait for each other at every step of the model; parts wait once, at the end, so
    a busy core beside the run costs a share of the machine instead of a wait at every barrier (llmlab.threads).
    The gradients are added in the parts' order, whichever thread finishes first: the same bits for any number
    of threads. The caller makes sure of one process on CPU (DDP and FSDP2 synchronise inside backward)."""
    params = [p for p in model.parameters() if p.requires_grad]

    def run(part: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]:
        with copy.copy(autocast):  # autocast's state is per thread; the object keeps the state it replaced
            loss = objective.loss_sum(model, part) * scale
        return loss.detach().double(), torch.autograd.grad(loss, params, allow_unused=True)

    total = torch.zeros((), dtype=torch.float64)
    for loss, grads in cpu_threads.pool(len(parts)).map(run, parts):
        total += loss
        for p, g in zip(params, grads):
            if g is not None:
                p.grad = g if p.grad is None else p.grad.add_(g)
    return total


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
    gen = torch.Generator(device=device).manual_seed(0)  # its own: measuring must not move the training RNG
    a = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
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



# ------------------------------------------------------------------------------------------ the one loop


_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


@dataclass
class TrainConfig:
    """What every training stage shares; a stage's Config adds its data and model fields to these by
    inheritance. The recipe of each stage (learning rates, steps) is in llmlab.presets."""

    out_dir: str = ""
    """where checkpoints (step-*/ and `latest`) and metrics.jsonl are written (required; the presets set it)"""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """learning rates"""
    batch_size: int = 32
    """rows per micro-batch (per process)"""
    grad_accum: int = 1
    """micro-batches per optimizer step"""
    max_steps: int = 1000
    """optimizer steps in the run"""
    warmup_steps: int = 0
    """linear learning-rate warmup steps"""
    warmdown_frac: float = 0.4
    """fraction of the run over which the learning rate decays linearly at the end"""
    final_lr_frac: float = 0.0
    """learning rate at the last step, as a fraction of the peak"""
    momentum_warmup_steps: int = 300
    """steps over which Muon's momentum rises from 0.85 to 0.95 (0 = 0.95 from the first step)"""
    grad_clip: float = 1.0
    """clip the global gradient norm to this (0 = off)"""
    eval_every: int = 250
    """steps between evaluations on the validation split (0 = only at the end)"""
    eval_rows: int = 64
    """validation rows per evaluation"""
    save_every: int = 250
    """steps between checkpoints (0 = only at the end)"""
    keep_checkpoints: int = 2
    """newest checkpoints kept in out_dir (0 = all)"""
    log_every: int = 1
    """steps between reads of the loss (metrics.jsonl still gets a row per step): on a GPU each read makes the host
    wait for the device, so the presets for GPUs read every few steps; a diverging loss is caught at the next read"""
    seed: int = 0
    """initialisation and data-order seed"""
    threads: int = 0
    """CPU threads for torch (0 = one per core that other processes leave free, following the load)"""
    parts: int = 0
    """on CPU, in one process: parts each micro-batch is cut into, computed on threads of their own (0 = two per
    core, 1 = whole; it changes the order of a sum, so results are bit-identical only at the same count)"""
    device: str = "auto"
    """cpu, cuda, cuda:N, mps or auto"""
    parallel: str = "ddp"
    """with several processes (torchrun): ddp (a replica per rank) or fsdp (FSDP2: parameters, gradients and optimizer state sharded)"""
    compile: bool = False
    """torch.compile the model for training (minutes of compilation; pays off on GPUs and long runs)"""
    resume: bool = True
    """continue from out_dir's latest checkpoint when there is one"""

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> LLMLabError:
            return LLMLabError(f"--{name} must be {rule} (got {getattr(self, name)!r})")

        for name in ("batch_size", "grad_accum", "max_steps", "eval_rows", "log_every"):
            if getattr(self, name) < 1:
                raise bad(name, "positive")
        for name in ("warmup_steps", "momentum_warmup_steps", "eval_every", "save_every", "keep_checkpoints",
                     "threads", "parts", "seed"):
            if getattr(self, name) < 0:
                raise bad(name, ">= 0")
        for name in ("warmdown_frac", "final_lr_frac"):
            if not 0.0 <= getattr(self, name) <= 1.0:  # NaN fails this too
                raise bad(name, "in [0, 1]")
        if not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise bad("grad_clip", "a finite number >= 0")
        if not _DEVICE.fullmatch(self.device):
            raise bad("device", "one of auto, cpu, cuda, cuda:N, mps")
        if self.parallel not in ("ddp", "fsdp"):
            raise bad("parallel", "ddp or fsdp")
        if Path(self.out_dir).is_file():
            raise bad("out_dir", "a directory, not a file")


def setup(cfg: TrainConfig) -> dist.DistInfo:
    """Start a training process: torch.distributed under torchrun (one process otherwise), CPU settings and
    the seed. Call it before building the data (loaders shard by rank)."""
    info = dist.init(cfg.device)
    configure_torch(cfg.threads)
    torch.manual_seed(cfg.seed)
    return info


def bpb_evaluator(val_batches: list[tuple[torch.Tensor, torch.Tensor]], token_bytes: torch.Tensor,
                  info: dist.DistInfo) -> Callable[[nn.Module], dict]:
    """Validation bits per byte and loss per token over fixed batches (each rank takes its share)."""
    batches = rank_share(val_batches, info.rank, info.world_size)
    autocast = dist.autocast(info)

    def evaluate(model: nn.Module) -> dict:
        bpb, loss = evaluate_bpb(model, batches, token_bytes, autocast)
        return {"val_bpb": bpb, "val_loss": loss}

    return evaluate


class BatchSource(Protocol):
    """What `fit` reads training batches from (PackedLoader, ConversationLoader, ...)."""

    def next_batch(self) -> tuple[torch.Tensor, ...]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def fit(cfg: TrainConfig, info: dist.DistInfo, net: GPT, loader: BatchSource, *,
        evaluate: Callable[[nn.Module], dict], meta: dict, tokenizer_path: str | Path | None,
        objective: Objective | None = None, step_metrics: Callable[[], dict] | None = None) -> dict:
    """Train `net` for cfg.max_steps optimizer steps on `loader`'s batches, resuming from cfg.out_dir when it
    holds a checkpoint, and save the result there. Returns the run's metrics (also in the checkpoint's
    llmlab.json): the last loss and evaluation, median tokens/s and MFU, tokens seen, seconds.

    `evaluate(model)` returns the validation metrics (every cfg.eval_every steps and at the end);
    `meta` goes into llmlab.json (at least {"stage": name}); `step_metrics()` adds fields to each row of
    metrics.jsonl; `objective` defaults to token cross-entropy. Weights load before wrapping, optimizer
    state after; every rank calls this (FSDP2 gathers shards to save), rank 0 writes.
    """
    stage = meta["stage"]
    if not cfg.out_dir:
        raise LLMLabError(f"{stage}: --out_dir is required (where the checkpoints go)")
    out_dir = Path(cfg.out_dir)
    if info.is_main:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LLMLabError(f"{stage}: cannot create --out_dir {out_dir} ({e.strerror})") from None
    resuming = cfg.resume and checkpoint.has_checkpoint(out_dir)
    if resuming:
        checkpoint.check_same_shape(out_dir, net.config)
        checkpoint.load_weights(net, out_dir)
    net.to(info.device).train()
    model = dist.wrap(net, info, cfg.parallel)
    optimizers = build_optimizers(net, cfg.optim)
    step, tokens_seen = 0, 0
    if resuming:
        state = checkpoint.load_optimizer_state(out_dir, optimizers)
        dist.check_global_batch(state["loader"], cfg.batch_size, info)
        loader.load_state_dict(state["loader"])
        step, tokens_seen = state["step"], state["tokens_seen"]
        if info.is_main:
            print(f"resuming from {checkpoint.resolve(out_dir)} at step {step}")
    elif checkpoint.has_checkpoint(out_dir) and info.is_main:
        print(f"resume=false: starting over; checkpoints in {out_dir} will be replaced")
    if cfg.compile:
        model = torch.compile(model)
    metrics = MetricsLog(out_dir / "metrics.jsonl", resume_step=step, enabled=info.is_main)
    autocast = dist.autocast(info)
    context_len = net.config.context_len
    flops_per_token = net.flops_per_token(context_len)
    peak = measure_peak_flops(info.device)
    if info.is_main:
        print(f"{stage}: {net.num_params():,} parameters ({net.num_params(embedding=False):,} without the "
              f"embedding), {flops_per_token / 1e6:.1f} MFLOP/token; peak {peak / 1e9:.0f} GFLOP/s"
              + (f"; {info.world_size} processes, {cfg.parallel}" if info.world_size > 1 else ""))

    def lr_mult(at: int) -> float:
        return lr_multiplier(at, cfg.max_steps, cfg.warmup_steps, cfg.warmdown_frac, cfg.final_lr_frac)

    last: dict = {}

    def save() -> None:  # every rank calls it (FSDP2 gathers shards); rank 0 writes
        state = {"step": step, "tokens_seen": tokens_seen, "loader": loader.state_dict()}
        checkpoint.save_checkpoint(out_dir, step, net, tokenizer_path=tokenizer_path,
                                   meta={**meta, "tokens_seen": tokens_seen, "config": to_dict(cfg), "metrics": last},
                                   optimizers=optimizers, trainer_state=state, keep=cfg.keep_checkpoints,
                                   write=info.is_main)
        dist.barrier()

    def run_evaluation() -> None:
        row = {"step": step, **evaluate(model)}
        metrics.write(**row)
        last.update(row)

    bar = tqdm(total=cfg.max_steps, initial=step, desc=stage, disable=not info.is_main, dynamic_ncols=True)
    objective = objective or TokenCrossEntropy()
    pending: list[dict] = []  # the steps since the last metrics row, their loss and norm still on the device

    def flush() -> None:
        """Read the pending steps' losses (the host's one wait for the device), check them, write their rows."""
        if not pending:
            return
        t0 = time.perf_counter()
        values = torch.stack([torch.stack([row.pop("loss"), row.pop("grad_norm")]) for row in pending]).tolist()
        seconds = sum(row.pop("seconds") for row in pending) + time.perf_counter() - t0
        tok_per_s = sum(row.pop("_tokens") for row in pending) / seconds  # over the steps of the row(s)
        mfu = flops_per_token * tok_per_s / (peak * info.world_size)
        for row, (loss, grad_norm) in zip(pending, values):
            if not math.isfinite(loss):
                bar.close()
                kept = checkpoint.resolve(out_dir) if checkpoint.has_checkpoint(out_dir) else "none yet"
                raise LLMLabError(
                    f"{stage}: the training loss became {loss} at step {row['step']}; the learning rates are the "
                    f"likely cause (--optim.muon_lr {cfg.optim.muon_lr}, --optim.embed_lr {cfg.optim.embed_lr}, "
                    f"--optim.head_lr {cfg.optim.head_lr}; try lower ones, or --grad_clip). Nothing was saved from "
                    f"this step on; the last good checkpoint: {kept}")
            metrics.write(step=row["step"], loss=loss, grad_norm=grad_norm, tokens=row["tokens"], tok_per_s=tok_per_s,
                          mfu=mfu, lr_mult=row["lr_mult"], **row["extra"])
        last.update(step=pending[-1]["step"], loss=values[-1][0], tok_per_s=tok_per_s, mfu=mfu)
        bar.set_postfix(loss=f"{values[-1][0]:.3f}", tok_s=f"{tok_per_s:,.0f}", mfu=f"{100 * mfu:.0f}%")
        pending.clear()

    t_start = time.perf_counter()
    while step < cfg.max_steps:
        cpu_threads.adapt()
        if cfg.eval_every > 0 and step % cfg.eval_every == 0 and step > 0:
            flush()
            run_evaluation()
        set_schedule(optimizers, lr_mult(step), muon_momentum(step, cfg.momentum_warmup_steps))
        t0 = time.perf_counter()
        raw = [loader.next_batch() for _ in range(cfg.grad_accum)]
        n_items = sum(objective.count(b) for b in raw)  # on the loader's (CPU) copies: no wait for the device
        batches = [tuple(to_device(t, info.device) for t in b) for b in raw]
        loss, grad_norm = step_on_device(model, optimizers, batches, cfg.grad_clip, autocast, objective, n_items,
                                         parts=1 if cfg.compile else cfg.parts)
        seconds = time.perf_counter() - t0
        step += 1
        step_tokens = sum(b[0].numel() for b in batches) * info.world_size
        tokens_seen += step_tokens
        pending.append(dict(step=step, loss=loss, grad_norm=grad_norm, tokens=tokens_seen, _tokens=step_tokens,
                            seconds=seconds, lr_mult=lr_mult(step - 1),
                            extra=step_metrics() if step_metrics else {}))
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            flush()
        if cfg.save_every > 0 and step % cfg.save_every == 0 and step < cfg.max_steps:
            flush()
            save()
    bar.close()
    elapsed = time.perf_counter() - t_start

    run_evaluation()
    rows = [r for r in read_metrics(out_dir / "metrics.jsonl") if "tok_per_s" in r] if info.is_main else []
    if rows:  # medians over the run, robust to the first steps and to evaluation pauses
        last["tok_per_s"] = statistics.median(r["tok_per_s"] for r in rows)
        last["mfu"] = statistics.median(r["mfu"] for r in rows)
    last.update(tokens_seen=tokens_seen, params=net.num_params(), flops_per_token=flops_per_token,
                peak_flops=peak, seconds=elapsed, **(step_metrics() if step_metrics else {}))
    save()
    return last
