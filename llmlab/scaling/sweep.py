"""IsoFLOP sweeps: a grid of compute budgets x model sizes, each cell a normal pretraining run in its own
directory (`llmlab.stages.pretrain.main`, the shared loop), so a sweep resumes, shards and parallelises the way
single runs do.

Sizes come from one knob, the depth (as nanochat's `--depth`): `depth` blocks of width `aspect x depth`, heads of
`head_dim`. N counts the parameters that compute per token: all but the input embedding (the untied LM head
included); a run of budget C trains on D = C / (6 N) tokens, rounded to whole optimizer steps, and records its
own C = 6 N D. Every run has its own full schedule (warmup, warmdown to zero at its last step), as Chinchilla
matched each cosine to its run's length rather than reading points off one long run.

A run is finished when its checkpoint is at its planned step; a killed sweep (or a killed run: the loop resumes
it) continues where it stopped. `jobs` runs cells in parallel processes; `shard=i/n` runs every n-th cell only,
so that n machines sharing the run directory (or copying their cells back) split one sweep.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from llmlab import checkpoint
from llmlab.errors import LLMLabError
from llmlab.model import GPT, GPTConfig
from llmlab.stages import pretrain


def shape(base: GPTConfig, depth: int, aspect: int, head_dim: int, vocab_size: int) -> GPTConfig:
    """The model of one size: `depth` blocks of width aspect x depth, full (not grouped) heads of head_dim, the
    sweep's vocabulary."""
    width = aspect * depth
    if width % head_dim:
        raise LLMLabError(f"scale: width {width} (aspect {aspect} x depth {depth}) is not a multiple of --head_dim {head_dim}")
    heads = width // head_dim
    return dataclasses.replace(base, n_layer=depth, d_model=width, n_head=heads, n_kv_head=heads, head_dim=0, ffn_hidden=0,
                               vocab_size=vocab_size)


def compute_params(model: GPTConfig) -> int:
    """N: the parameters that compute per token (all but the input embedding), counted on the meta device."""
    with torch.device("meta"):
        return GPT(model).num_params(embedding=False)


@dataclass
class Cell:
    """One run of the sweep."""

    name: str
    budget: float
    """the budget C (FLOPs, 6ND) the cell belongs to"""
    depth: int
    params: int
    """N"""
    steps: int
    tokens: int
    """D = steps x tokens per step"""
    config: pretrain.Config

    @property
    def flops(self) -> float:
        return 6.0 * self.params * self.tokens

    @property
    def out_dir(self) -> Path:
        return Path(self.config.out_dir)


def cell_name(budget: float, depth: int) -> str:
    return f"C{budget:.3g}-d{depth}".replace("e+", "e")


def plan(base: pretrain.Config, budgets: list[float], depths: list[int], *, aspect: int, head_dim: int,
         vocab_size: int, runs_dir: Path, min_steps: int, per_budget: int = 0,
         tokens_per_param: float = 20.0) -> tuple[list[Cell], list[str]]:
    """The sweep's cells and a note per cell left out. Each budget gets every depth, or with per_budget = k the k
    depths whose N is nearest (in log N) a first guess of the optimum, N = sqrt(C / (6 tokens_per_param)), so
    that the sizes move up with the budget as the optimum does; cells of fewer than min_steps steps are left
    out. A budget that no size can train for min_steps steps is an error naming the budget that would do."""
    tokens_per_step = base.batch_size * base.grad_accum * base.model.context_len
    models = {d: shape(base.model, d, aspect, head_dim, vocab_size) for d in depths}
    sizes = {d: compute_params(m) for d, m in models.items()}
    cells, skipped = [], []
    for budget in budgets:
        kept = 0
        chosen = depths
        if per_budget:
            guess = math.sqrt(budget / (6 * tokens_per_param))
            chosen = sorted(sorted(depths, key=lambda d: abs(math.log(sizes[d] / guess)))[:per_budget])
        for depth in chosen:
            model, n = models[depth], sizes[depth]
            steps = round(budget / (6 * n * tokens_per_step))
            name = cell_name(budget, depth)
            if steps < min_steps:
                skipped.append(f"{name}: {steps} steps < --min_steps {min_steps}")
                continue
            kept += 1
            cfg = dataclasses.replace(
                base, model=model, out_dir=str(runs_dir / name), max_steps=steps, eval_every=steps, save_every=min(steps, 200),
                momentum_warmup_steps=min(base.momentum_warmup_steps, steps // 4), keep_checkpoints=1)
            cells.append(Cell(name, budget, depth, n, steps, steps * tokens_per_step, cfg))
        if kept == 0:
            smallest = min(sizes.values())
            raise LLMLabError(f"scale: budget {budget:.3g} FLOPs is too small for every size (fewer than {min_steps} steps "
                              f"of {tokens_per_step} tokens): the smallest model (N = {smallest:,}) needs at least "
                              f"{6 * smallest * tokens_per_step * min_steps:.2g}")
    return cells, skipped


def finished(cell: Cell) -> bool:
    """Whether the cell's directory holds its finished run; a directory holding a different run is an error."""
    if not checkpoint.has_checkpoint(cell.out_dir):
        return False
    info = checkpoint.read_info(cell.out_dir)
    saved = info.get("config", {})
    if saved.get("model") != dataclasses.asdict(cell.config.model) or saved.get("max_steps") != cell.steps \
            or saved.get("batch_size") != cell.config.batch_size:
        raise LLMLabError(f"scale: {cell.out_dir} holds a run of another plan (its model, steps or batch differ from "
                          f"this sweep's cell {cell.name}): remove it, or sweep into another --run")
    return info["step"] >= cell.steps


def _run_cell(cfg: pretrain.Config, threads: int, device: str) -> None:
    """One cell in a worker process (a fresh interpreter: spawn)."""
    cfg = dataclasses.replace(cfg, threads=threads, device=device)
    pretrain.main(cfg)


def run(cells: list[Cell], *, jobs: int = 1, shard: tuple[int, int] = (0, 1)) -> list[Cell]:
    """Train every unfinished cell of this shard, `jobs` at a time; returns the cells this call trained.
    Workers share the cores (threads = cores // jobs) or, with GPUs, take one each in turn."""
    index, count = shard
    todo = [c for i, c in enumerate(cells) if i % count == index and not finished(c)]
    mine = sum(1 for i in range(len(cells)) if i % count == index)
    print(f"scale: {len(cells)} cells; this shard {mine}, {mine - len(todo)} already finished, {len(todo)} to train")
    if jobs <= 1:
        for k, cell in enumerate(todo):
            print(f"scale: [{k + 1}/{len(todo)}] {cell.name}: N = {cell.params:,}, D = {cell.tokens:,} tokens "
                  f"({cell.steps} steps), C = {cell.flops:.3g}")
            pretrain.main(cell.config)
        return todo
    gpus = torch.cuda.device_count()
    threads = max(1, (os.cpu_count() or 1) // jobs)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = {pool.submit(_run_cell, c.config, threads, f"cuda:{k % gpus}" if gpus else c.config.device): c
                   for k, c in enumerate(todo)}
        for k, future in enumerate(concurrent.futures.as_completed(futures)):
            future.result()
            print(f"scale: [{k + 1}/{len(todo)}] {futures[future].name} finished")
    return todo


def tokenizer_id(ckpt: str | Path) -> str:
    """A short hash of the tokenizer a checkpoint was trained with (runs of different tokenizers do not mix)."""
    return hashlib.sha256((checkpoint.resolve(ckpt) / "tokenizer.json").read_bytes()).hexdigest()[:12]


def results(cells: list[Cell]) -> list[dict]:
    """One row per finished cell: name, budget, depth, params (N), tokens (D), flops (6ND), loss (final
    validation loss, nats per token), tokenizer. Unfinished cells are an error naming them."""
    missing = [c.name for c in cells if not finished(c)]
    if missing:
        raise LLMLabError(f"scale: {len(missing)} cells are not trained yet ({', '.join(missing[:4])}"
                          f"{', ...' if len(missing) > 4 else ''}): run `llmlab scale sweep` (every shard) first")
    rows = []
    for c in cells:
        info = checkpoint.read_info(c.out_dir)
        rows.append({"name": c.name, "budget": c.budget, "depth": c.depth, "params": c.params, "tokens": info["tokens_seen"],
                     "flops": 6.0 * c.params * info["tokens_seen"], "loss": info["metrics"]["val_loss"],
                     "tokenizer": tokenizer_id(c.out_dir), "seconds": info["metrics"].get("seconds")})
    check_one_tokenizer(rows)
    return rows


def check_one_tokenizer(rows: list[dict]) -> None:
    ids = {r["tokenizer"] for r in rows}
    if len(ids) > 1:
        by = {i: [r["name"] for r in rows if r["tokenizer"] == i] for i in ids}
        raise LLMLabError("scale: the runs were trained with different tokenizers, whose losses (nats per token) do not "
                          "compare: " + "; ".join(f"{i}: {', '.join(names[:3])}" for i, names in by.items()))


def write_rows(path: Path, rows: list[dict]) -> None:
    path.write_text(json.dumps(rows, indent=1) + "\n")
