"""`llmlab tokenize`: write a corpus's packed token stream once, as memory-mapped shards (llmlab.data.shards).

Pretraining then reads rows from the shards (`llmlab pretrain --corpus DIR`, DIR the shards' folder) instead of
tokenizing documents in the training process: the same rows in the same order as from the corpus itself, given
the same tokenizer and --seed. Writing resumes after the last complete shard when run again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from tqdm import tqdm

from llmlab import checkpoint
from llmlab.data import Mixture, parse_corpus
from llmlab.data.shards import write_shards
from llmlab.errors import LLMLabError
from llmlab.tokenizer import Tokenizer


@dataclass
class Config:
    corpus: str = "runs/cpu/world"
    """corpus spec: a world dir, a text file or folder, a .jsonl/.parquet with a `text` column, or hf:NAME[:CONFIG]; mix with `A*0.8,B*0.2`"""
    tokenizer: str = "runs/cpu/tokenizer"
    """tokenizer.json, or the directory holding it"""
    out_dir: str = "runs/cpu/shards"
    """where the shards and index.json go"""
    train_tokens: int = 10_000_000
    """train tokens to write (whole documents, so a few more): at least max_steps x batch_size x processes x
    grad_accum x context_len + 1 for the run that reads them"""
    shard_tokens: int = 1 << 26
    """tokens per shard file (a shard ends at the first document end past this)"""
    seed: int = 0
    """the mixture's seed: the pretraining run's --seed (a run with another seed refuses the shards)"""

    def __post_init__(self) -> None:
        for name in ("train_tokens", "shard_tokens"):
            if getattr(self, name) < 1:
                raise LLMLabError(f"--{name} must be positive (got {getattr(self, name)})")


def main(cfg: Config) -> dict:
    t0 = time.perf_counter()
    tokenizer = Tokenizer.load(checkpoint.resolve_tokenizer(cfg.tokenizer))
    mixture = Mixture(parse_corpus(cfg.corpus), seed=cfg.seed)
    with tqdm(desc="tokenize", unit="tok", unit_scale=True, dynamic_ncols=True) as bar:
        index = write_shards(mixture, tokenizer, cfg.out_dir, cfg.train_tokens, cfg.seed, cfg.corpus,
                             cfg.shard_tokens, progress=bar.update)
    splits = index["splits"]
    seconds = time.perf_counter() - t0
    print(f"tokenize: {splits['train']['tokens']:,} train tokens ({splits['train']['docs']:,} documents) and "
          f"{splits['val']['tokens']:,} val tokens in {len(splits['train']['shards']) + len(splits['val']['shards'])} "
          f"shards of {index['dtype']}, {seconds:.1f} s -> {cfg.out_dir}")
    return {"train_tokens": splits["train"]["tokens"], "val_tokens": splits["val"]["tokens"], "seconds": seconds}
