"""`llmlab pretrain`: train a GPT from scratch by next-token prediction on a corpus.

Sections: setup, data, model, optimizer, resume, loop, save. A run killed at any point (even SIGKILL) resumes
from its last checkpoint and, on CPU, ends with weights bit-identical to an uninterrupted run: the schedule is
a function of the step, and the data position, optimizer state and RNG are all in the checkpoint.

The same code runs on one process or many (`torchrun --nproc_per_node=N -m llmlab pretrain`, DDP or FSDP2;
see llmlab.dist): batch_size is per process, and a checkpoint resumes on any number of processes that keeps
batch_size x processes.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from llmlab import checkpoint, dist
from llmlab.config import to_dict
from llmlab.data import Mixture, PackedLoader, parse_corpus
from llmlab.errors import LLMLabError
from llmlab.model import GPT, GPTConfig
from llmlab.optim import OptimConfig, build_optimizers, lr_multiplier, muon_momentum, set_schedule
from llmlab.tokenizer import Tokenizer
from llmlab.training import (MetricsLog, configure_torch, evaluate_bpb, measure_peak_flops, rank_share, read_metrics,
                             train_step)


@dataclass
class Config:
    corpus: str = "runs/cpu/world"
    """corpus spec: a world dir, a text file or folder, a .jsonl/.parquet with a `text` column, or hf:NAME[:CONFIG]; mix with `A*0.8,B*0.2`"""
    tokenizer: str = "runs/cpu/tokenizer"
    """tokenizer.json, or the directory holding it"""
    out_dir: str = "runs/cpu/base"
    """where checkpoints (step-*/ and `latest`) and metrics.jsonl are written"""
    model: GPTConfig = field(default_factory=GPTConfig)
    """model shape (vocab_size is taken from the tokenizer)"""
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
    grad_clip: float = 1.0
    """clip the global gradient norm to this (0 = off)"""
    eval_every: int = 250
    """steps between validation bits-per-byte evaluations (0 = only at the end)"""
    eval_rows: int = 64
    """validation rows of context_len tokens per evaluation"""
    save_every: int = 250
    """steps between checkpoints (0 = only at the end)"""
    keep_checkpoints: int = 2
    """newest checkpoints kept in out_dir"""
    seed: int = 0
    """initialisation and data-order seed"""
    threads: int = 0
    """CPU threads for torch (0 = torch's default, one per core)"""
    device: str = "auto"
    """cpu, cuda or auto"""
    parallel: str = "ddp"
    """with several processes (torchrun): ddp (a replica per rank) or fsdp (FSDP2: parameters, gradients and optimizer state sharded)"""
    compile: bool = False
    """torch.compile the model for training (minutes of compilation; pays off on GPUs and long runs)"""
    resume: bool = True
    """continue from out_dir's latest checkpoint when there is one"""

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum", "max_steps", "eval_rows"):
            if getattr(self, name) < 1:
                raise LLMLabError(f"pretrain: {name} must be positive (got {getattr(self, name)})")
        if not 0.0 <= self.warmdown_frac <= 1.0:
            raise LLMLabError(f"pretrain: warmdown_frac must be in [0, 1] (got {self.warmdown_frac})")


def main(cfg: Config) -> dict:
    # ---- setup ----------------------------------------------------------------------------------------
    info = dist.init(cfg.device)
    configure_torch(cfg.threads)
    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.out_dir)
    autocast = dist.autocast(info)

    # ---- data -----------------------------------------------------------------------------------------
    tokenizer = Tokenizer.load(checkpoint.resolve_tokenizer(cfg.tokenizer))
    T = cfg.model.context_len
    sources = parse_corpus(cfg.corpus)
    loader = PackedLoader(Mixture(sources, seed=cfg.seed), tokenizer, cfg.batch_size, T,
                          rank=info.rank, world_size=info.world_size)
    val_loader = PackedLoader(Mixture(sources, seed=cfg.seed), tokenizer, cfg.batch_size, T, split="val")
    val_batches = val_loader.val_batches(cfg.eval_rows)  # now: a split too short for one row fails before training
    token_bytes = torch.as_tensor(tokenizer.token_bytes())

    # ---- model, optimizer and resume: weights load before wrapping, optimizer state after ---------------
    model_cfg = dataclasses.replace(cfg.model, vocab_size=tokenizer.vocab_size)
    net = GPT(model_cfg)
    net.init_weights(seed=cfg.seed)
    resuming = cfg.resume and checkpoint.has_checkpoint(out_dir)
    if resuming:
        checkpoint.check_same_shape(out_dir, model_cfg)
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

    flops_per_token = net.flops_per_token(T)
    peak = measure_peak_flops(info.device)
    tokens_per_step = cfg.batch_size * cfg.grad_accum * T * info.world_size
    if info.is_main:
        print(f"model: {net.num_params():,} parameters ({net.num_params(embedding=False):,} without the embedding), "
              f"{flops_per_token / 1e6:.1f} MFLOP/token; {tokens_per_step:,} tokens/step; peak {peak / 1e9:.0f} GFLOP/s"
              + (f"; {info.world_size} processes, {cfg.parallel}" if info.world_size > 1 else ""))

    def save() -> None:  # every rank calls it (FSDP2 gathers shards); rank 0 writes
        meta = {"stage": "pretrain", "tokens_seen": tokens_seen, "config": to_dict(cfg), "metrics": last}
        state = {"step": step, "tokens_seen": tokens_seen, "loader": loader.state_dict()}
        checkpoint.save_checkpoint(out_dir, step, net, tokenizer_path=cfg.tokenizer, meta=meta, optimizers=optimizers,
                                   trainer_state=state, keep=cfg.keep_checkpoints, write=info.is_main)
        dist.barrier()

    def evaluate() -> dict:
        batches = rank_share(val_batches, info.rank, info.world_size)
        bpb, loss = evaluate_bpb(model, batches, token_bytes, autocast)
        row = {"step": step, "val_bpb": bpb, "val_loss": loss}
        metrics.write(**row)
        return row

    # ---- loop -----------------------------------------------------------------------------------------
    last: dict = {}
    bar = tqdm(total=cfg.max_steps, initial=step, desc="pretrain", disable=not info.is_main, dynamic_ncols=True)
    t_start, steps_timed = time.perf_counter(), 0
    while step < cfg.max_steps:
        if cfg.eval_every > 0 and step % cfg.eval_every == 0 and step > 0:
            last.update(evaluate())
        set_schedule(optimizers, lr_multiplier(step, cfg.max_steps, cfg.warmup_steps, cfg.warmdown_frac, cfg.final_lr_frac),
                     muon_momentum(step))
        t0 = time.perf_counter()
        batches = [tuple(t.to(info.device) for t in loader.next_batch()) for _ in range(cfg.grad_accum)]
        loss, grad_norm = train_step(model, optimizers, batches, cfg.grad_clip, autocast)
        dt = time.perf_counter() - t0
        step += 1
        tokens_seen += tokens_per_step
        steps_timed += 1
        tok_per_s = tokens_per_step / dt
        mfu = flops_per_token * tok_per_s / (peak * info.world_size)
        last.update(step=step, loss=loss, tok_per_s=tok_per_s, mfu=mfu)
        metrics.write(step=step, loss=loss, grad_norm=grad_norm, tokens=tokens_seen, tok_per_s=tok_per_s, mfu=mfu,
                      lr_mult=lr_multiplier(step - 1, cfg.max_steps, cfg.warmup_steps, cfg.warmdown_frac, cfg.final_lr_frac))
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_per_s:,.0f}", mfu=f"{100 * mfu:.0f}%")
        if cfg.save_every > 0 and step % cfg.save_every == 0 and step < cfg.max_steps:
            save()
    bar.close()
    elapsed = time.perf_counter() - t_start

    # ---- save -----------------------------------------------------------------------------------------
    last.update(evaluate())
    rows = [r for r in read_metrics(out_dir / "metrics.jsonl") if "tok_per_s" in r]
    if rows:  # medians over the run, robust to the first steps and to evaluation pauses
        last["tok_per_s"] = statistics.median(r["tok_per_s"] for r in rows)
        last["mfu"] = statistics.median(r["mfu"] for r in rows)
    last.update(tokens_seen=tokens_seen, params=net.num_params(), flops_per_token=flops_per_token,
                peak_flops=peak, seconds=elapsed)
    save()
    dist.barrier()
    if info.is_main:
        print(f"pretrain: step {step}, val bpb {last['val_bpb']:.4f}, {last['tok_per_s']:,.0f} tokens/s, "
              f"MFU {100 * last['mfu']:.1f}% -> {checkpoint.resolve(out_dir)}")
    return last

