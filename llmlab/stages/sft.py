"""`llmlab sft`: supervised fine-tuning of a base checkpoint on conversations, into an assistant.

The data is one conversation per row (llmlab.data.conversations.ConversationLoader), the model the base
checkpoint, the loss the mean over the assistant's tokens only (llmlab.chat: tool outputs, user and system
text are masked); with `replay`, a share of the rows are pretraining documents trained on every token, so that
what the conversations never ask about is not forgotten. The shared loop (llmlab.training.fit) does the rest,
with the same exact resume and torchrun behaviour as pretraining. The recipe's values (learning rates lower
than pretraining's, steps, batch) are in llmlab.presets.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from llmlab import checkpoint
from llmlab.data import Mixture, parse_corpus
from llmlab.data.conversations import ConversationLoader
from llmlab.errors import LLMLabError
from llmlab.lora import add_lora, lora_meta, save_adapter
from llmlab.training import TrainConfig, bpb_evaluator, fit, setup


@dataclass
class Config(TrainConfig):
    base: str = "runs/cpu/base"
    """checkpoint to fine-tune (a directory with `latest`, a step directory or a Hugging Face folder)"""
    data: str = "runs/cpu/world"
    """conversations: a world dir, JSONL/parquet with a `messages` column, or hf:NAME[:CONFIG]; mix with `A*0.8,B*0.2`"""
    replay: str = ""
    """pretraining corpus (same spec as pretraining's --corpus) to reread during fine-tuning, so that facts the
    conversations never ask about are not forgotten; empty = none"""
    replay_frac: float = 0.0
    """share of each batch's rows that are replayed pretraining documents (trained on every token)"""
    group_batches: int = 8
    """batches drawn together and cut by length, so that each pads its rows to a length close to theirs (1 = off;
    llmlab.data.conversations): on the cpu preset 40% fewer tokens per step for the same conversations"""
    lora_r: int = 0
    """train a LoRA adapter of this rank instead of every weight (0: full fine-tuning); the adapter is also
    written in PEFT's format to <out_dir>/adapter (llmlab.lora)"""
    lora_alpha: float = 16.0
    """LoRA's scale numerator: the update is (lora_alpha / lora_r) B A"""
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj"
    """the layers of every block that get an adapter (also gate_proj, up_proj, down_proj)"""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.replay_frac < 1.0:
            raise LLMLabError(f"--replay_frac must be in [0, 1) (got {self.replay_frac})")
        if self.group_batches < 1:
            raise LLMLabError(f"--group_batches must be at least 1 (1: batches drawn at random), got {self.group_batches}")
        if self.lora_r < 0:
            raise LLMLabError(f"--lora_r must be 0 (full fine-tuning) or a rank >= 1 (got {self.lora_r})")
        if self.replay_frac > 0 and not self.replay:
            raise LLMLabError("--replay_frac > 0 needs --replay, a pretraining corpus (e.g. the world dir)")


def main(cfg: Config) -> dict:
    info = setup(cfg)

    # ---- model: the base checkpoint, with its tokenizer --------------------------------------------------
    base = checkpoint.load(cfg.base, info.device)
    net, tokenizer = base.model, base.require_tokenizer("fine-tuning (the chat format's special tokens)")
    T = net.config.context_len
    if cfg.lora_r:
        add_lora(net, cfg.lora_r, cfg.lora_alpha, tuple(t.strip() for t in cfg.lora_targets.split(",") if t.strip()),
                 seed=cfg.seed)

    # ---- data: conversations, and pretraining documents to reread -----------------------------------------
    sources = parse_corpus(cfg.data, column="messages")
    replay = Mixture(parse_corpus(cfg.replay), seed=cfg.seed) if cfg.replay and cfg.replay_frac > 0 else None
    loader = ConversationLoader(Mixture(sources, seed=cfg.seed), tokenizer, cfg.batch_size, T, info.rank, info.world_size,
                                replay=replay, replay_frac=cfg.replay_frac, group_batches=cfg.group_batches)
    val_batches = ConversationLoader(Mixture(sources, seed=cfg.seed), tokenizer, cfg.batch_size, T).val_batches(cfg.eval_rows)
    if info.is_main:
        print(f"sft: from {base.path}; {cfg.batch_size * cfg.grad_accum * info.world_size} conversations per step, "
              f"context {T}" + (f"; {cfg.replay_frac:.1%} of the rows reread pretraining documents of {cfg.replay}"
                                if replay else ""))

    # ---- loss: cross-entropy on the assistant's tokens (the targets the loader did not mask) --------------
    metrics = fit(cfg, info, net, loader, evaluate=bpb_evaluator(val_batches, torch.as_tensor(tokenizer.token_bytes()), info),
                  meta={"stage": "sft", "base": str(base.path), **({"lora": lora_meta(net)} if cfg.lora_r else {})},
                  tokenizer_path=base.path,
                  step_metrics=lambda: {"skipped": loader.skipped})
    if cfg.lora_r and info.is_main:
        adapter = save_adapter(net, Path(cfg.out_dir) / "adapter", base=str(base.path),
                               base_sha256=checkpoint.weights_sha256(base.path))
        size = sum(p.numel() for n, p in net.named_parameters() if "lora_" in n)
        print(f"sft: LoRA adapter of {size:,} parameters ({size / (net.num_params() - size):.1%} of the model) -> {adapter}")
    if info.is_main:
        print(f"sft: step {metrics['step']}, val loss {metrics['val_loss']:.4f} (assistant tokens), {loader.skipped} "
              f"conversations too long skipped, {loader.replayed} pretraining documents reread -> "
              f"{checkpoint.resolve(cfg.out_dir)}")
    return metrics
