"""`llmlab sft`: supervised fine-tuning of a base checkpoint on conversations, into an assistant.

Sections: setup, data, model, optimizer and resume, loop, save. The loss is the mean over assistant tokens
only (llmlab.chat: tool outputs, user and system text are masked), one conversation per row; with `replay`, a
share of the rows are pretraining documents trained on every token, so that what the conversations never ask
about is not forgotten (llmlab.data.conversations). Resume is exact as in pretraining; the same code runs under
torchrun (DDP or FSDP2, llmlab.dist).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from llmlab import checkpoint, dist
from llmlab.config import to_dict
from llmlab.data import Mixture, parse_corpus
from llmlab.errors import LLMLabError
from llmlab.optim import OptimConfig, build_optimizers, lr_multiplier, set_schedule
from llmlab.tokenizer import Tokenizer
from llmlab.training import MetricsLog, configure_torch, evaluate_bpb, rank_share, train_step


@dataclass
class Config:
    base: str = "runs/cpu/base"
    """checkpoint to fine-tune (a directory with `latest`, or a step directory)"""
    data: str = "runs/cpu/world"
    """conversations: a world dir, JSONL/parquet with a `messages` column, or hf:NAME[:CONFIG]; mix with `A*0.8,B*0.2`"""
    out_dir: str = "runs/cpu/sft"
    """where checkpoints and metrics.jsonl are written"""
    replay: str = ""
    """pretraining corpus (same spec as pretraining's --corpus) to reread during fine-tuning, so that facts the
    conversations never ask about are not forgotten; empty = none"""
    replay_frac: float = 0.0
    """share of each batch's rows that are replayed pretraining documents (trained on every token)"""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(muon_lr=0.01, embed_lr=0.05, head_lr=0.002, scalar_lr=0.005))
    """learning rates (lower than pretraining's)"""
    batch_size: int = 16
    """conversations per micro-batch (per process)"""
    grad_accum: int = 1
    """micro-batches per optimizer step"""
    max_steps: int = 300
    """optimizer steps"""
    warmdown_frac: float = 0.5
    """fraction of the run over which the learning rate decays linearly to 0 at the end"""
    grad_clip: float = 1.0
    """clip the global gradient norm to this (0 = off)"""
    eval_every: int = 100
    """steps between validation losses on the val conversations (0 = only at the end)"""
    eval_rows: int = 64
    """validation conversations per evaluation"""
    save_every: int = 100
    """steps between checkpoints (0 = only at the end)"""
    keep_checkpoints: int = 2
    """newest checkpoints kept in out_dir"""
    seed: int = 0
    """data-order seed"""
    threads: int = 0
    """CPU threads for torch (0 = torch's default)"""
    device: str = "auto"
    """cpu, cuda or auto"""
    parallel: str = "ddp"
    """with several processes: ddp or fsdp (see llmlab.dist)"""
    compile: bool = False
    """torch.compile the model for training"""
    resume: bool = True
    """continue from out_dir's latest checkpoint when there is one"""

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum", "max_steps", "eval_rows"):
            if getattr(self, name) < 1:
                raise LLMLabError(f"sft: {name} must be positive (got {getattr(self, name)})")
        if not 0.0 <= self.replay_frac < 1.0:
            raise LLMLabError(f"sft: replay_frac must be in [0, 1) (got {self.replay_frac})")
        if self.replay_frac > 0 and not self.replay:
            raise LLMLabError("sft: replay_frac > 0 needs --replay, a pretraining corpus (e.g. the world dir)")


def main(cfg: Config) -> dict:
    from llmlab.data.conversations import ConversationLoader

    # ---- setup ----------------------------------------------------------------------------------------
    info = dist.init(cfg.device)
    configure_torch(cfg.threads)
    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.out_dir)
    autocast = dist.autocast(info)
    base = checkpoint.resolve(cfg.base)
    tokenizer = Tokenizer.load(base)
    token_bytes = torch.as_tensor(tokenizer.token_bytes())

    # ---- model, optimizer and resume: weights load before wrapping, optimizer state after ---------------
    resuming = cfg.resume and checkpoint.has_checkpoint(out_dir)
    net = checkpoint.load_model(out_dir if resuming else base, info.device).train()
    T = net.config.context_len

    # ---- data -----------------------------------------------------------------------------------------
    sources = parse_corpus(cfg.data, column="messages")
    replay = Mixture(parse_corpus(cfg.replay), seed=cfg.seed) if cfg.replay and cfg.replay_frac > 0 else None
    loader = ConversationLoader(Mixture(sources, seed=cfg.seed), tokenizer, cfg.batch_size, T, info.rank, info.world_size,
                                replay=replay, replay_frac=cfg.replay_frac)
    val_batches = ConversationLoader(Mixture(sources, seed=cfg.seed), tokenizer, cfg.batch_size, T).val_batches(cfg.eval_rows)

    model = dist.wrap(net, info, cfg.parallel)
    optimizers = build_optimizers(net, cfg.optim)
    step = 0
    if resuming:
        state = checkpoint.load_optimizer_state(out_dir, optimizers)
        dist.check_global_batch(state["loader"], cfg.batch_size, info)
        loader.load_state_dict(state["loader"])
        step = state["step"]
        if info.is_main:
            print(f"resuming from {checkpoint.resolve(out_dir)} at step {step}")
    if cfg.compile:
        model = torch.compile(model)
    metrics = MetricsLog(out_dir / "metrics.jsonl", resume_step=step, enabled=info.is_main)
    if info.is_main:
        print(f"sft: {net.num_params():,} parameters from {base}; {cfg.batch_size * cfg.grad_accum * info.world_size} "
              f"conversations per step, context {T}"
              + (f"; {cfg.replay_frac:.1%} of the rows reread pretraining documents of {cfg.replay}" if replay else ""))

    last: dict = {}

    def evaluate() -> dict:
        _, loss = evaluate_bpb(model, rank_share(val_batches, info.rank, info.world_size), token_bytes, autocast)
        row = {"step": step, "val_loss": loss}
        metrics.write(**row)
        return row

    def save() -> None:  # every rank calls it (FSDP2 gathers shards); rank 0 writes
        meta = {"stage": "sft", "base": str(base), "config": to_dict(cfg), "metrics": last}
        state = {"step": step, "tokens_seen": 0, "loader": loader.state_dict()}
        checkpoint.save_checkpoint(out_dir, step, net, tokenizer_path=base, meta=meta, optimizers=optimizers,
                                   trainer_state=state, keep=cfg.keep_checkpoints, write=info.is_main)
        dist.barrier()

    # ---- loop -----------------------------------------------------------------------------------------
    bar = tqdm(total=cfg.max_steps, initial=step, desc="sft", disable=not info.is_main, dynamic_ncols=True)
    t_start = time.perf_counter()
    while step < cfg.max_steps:
        if cfg.eval_every > 0 and step % cfg.eval_every == 0 and step > 0:
            last.update(evaluate())
        set_schedule(optimizers, lr_multiplier(step, cfg.max_steps, 0, cfg.warmdown_frac, 0.0), 0.95)
        batches = [tuple(t.to(info.device) for t in loader.next_batch()) for _ in range(cfg.grad_accum)]
        loss, grad_norm = train_step(model, optimizers, batches, cfg.grad_clip, autocast)
        step += 1
        last.update(step=step, loss=loss)
        metrics.write(step=step, loss=loss, grad_norm=grad_norm, skipped=loader.skipped)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")
        if cfg.save_every > 0 and step % cfg.save_every == 0 and step < cfg.max_steps:
            save()
    bar.close()

    # ---- save -----------------------------------------------------------------------------------------
    last.update(evaluate())
    last.update(seconds=time.perf_counter() - t_start, skipped=loader.skipped)
    save()
    if info.is_main:
        print(f"sft: step {step}, val loss {last['val_loss']:.4f} (assistant tokens), {loader.skipped} conversations "
              f"too long skipped, {loader.replayed} pretraining documents reread -> {checkpoint.resolve(out_dir)}")
    return last
