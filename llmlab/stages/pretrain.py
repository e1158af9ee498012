"""`llmlab pretrain`: train a GPT from scratch by next-token prediction on a corpus.

The data is a packed stream of documents (llmlab.data.PackedLoader), the model a freshly initialised GPT, the
loss next-token cross-entropy on every token; the shared loop (llmlab.training.fit) does the rest: resume,
schedules, evaluation in bits per byte, metrics, atomic checkpoints. A run killed at any point (even SIGKILL)
resumes from its last checkpoint and, on CPU, ends with weights bit-identical to an uninterrupted run.

The same code runs on one process or many (`torchrun --nproc_per_node=N -m llmlab pretrain`, DDP or FSDP2;
see llmlab.dist): batch_size is per process, and a checkpoint resumes on any number of processes that keeps
batch_size x processes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from llmlab import checkpoint
from llmlab.data import Mixture, PackedLoader, parse_corpus
from llmlab.data.shards import ShardLoader, is_shard_dir
from llmlab.model import GPT, GPTConfig
from llmlab.tokenizer import Tokenizer
from llmlab.training import TrainConfig, bpb_evaluator, fit, setup


@dataclass
class Config(TrainConfig):
    corpus: str = "runs/cpu/world"
    """corpus spec: a world dir, a text file or folder, a .jsonl/.parquet with a `text` column, or hf:NAME[:CONFIG]; mix with `A*0.8,B*0.2`;
    or the folder of `llmlab tokenize`'s shards"""
    tokenizer: str = "runs/cpu/tokenizer"
    """tokenizer.json, or the directory holding it"""
    model: GPTConfig = field(default_factory=GPTConfig)
    """model shape (vocab_size is taken from the tokenizer)"""


def main(cfg: Config) -> dict:
    info = setup(cfg)

    # ---- data: documents packed into rows of context_len tokens -----------------------------------------
    tokenizer = Tokenizer.load(checkpoint.resolve_tokenizer(cfg.tokenizer))
    T = cfg.model.context_len
    if is_shard_dir(cfg.corpus):  # written by `llmlab tokenize`: the same rows, read from memory-mapped files
        loader = ShardLoader(cfg.corpus, tokenizer, cfg.batch_size, T, cfg.seed, info.rank, info.world_size)
        val_loader = ShardLoader(cfg.corpus, tokenizer, cfg.batch_size, T, cfg.seed, split="val")
    else:
        sources = parse_corpus(cfg.corpus)
        loader = PackedLoader(Mixture(sources, seed=cfg.seed), tokenizer, cfg.batch_size, T,
                              rank=info.rank, world_size=info.world_size)
        val_loader = PackedLoader(Mixture(sources, seed=cfg.seed), tokenizer, cfg.batch_size, T, split="val")
    val_batches = val_loader.val_batches(cfg.eval_rows)  # now: a split too short for one row fails before training

    # ---- model: a fresh GPT whose vocabulary is the tokenizer's ---------------------------------------------
    net = GPT(dataclasses.replace(cfg.model, vocab_size=tokenizer.vocab_size))
    net.init_weights(seed=cfg.seed)

    # ---- loss: next-token cross-entropy on every token (the loop's default) ---------------------------------
    metrics = fit(cfg, info, net, loader, evaluate=bpb_evaluator(val_batches, torch.as_tensor(tokenizer.token_bytes()), info),
                  meta={"stage": "pretrain"}, tokenizer_path=cfg.tokenizer)
    if info.is_main:
        print(f"pretrain: step {metrics['step']}, val bpb {metrics['val_bpb']:.4f}, {metrics['tok_per_s']:,.0f} "
              f"tokens/s, MFU {100 * metrics['mfu']:.1f}% -> {checkpoint.resolve(cfg.out_dir)}")
    return metrics
