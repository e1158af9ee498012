"""`llmlab tokenizer`: train a byte-level BPE tokenizer on a corpus and report its compression."""

from __future__ import annotations

import time
from dataclasses import dataclass
from itertools import islice
from typing import Iterator

from llmlab.chat import write_tokenizer_config
from llmlab.data import Mixture, parse_corpus
from llmlab.errors import LLMLabError
from llmlab.tokenizer import bytes_per_token, train_tokenizer


@dataclass
class Config:
    corpus: str = "runs/cpu/world"
    """corpus spec: a world dir, a text file or folder, a .jsonl/.parquet with a `text` column, or hf:NAME[:CONFIG]; mix with `A*0.8,B*0.2`"""
    out_dir: str = "runs/cpu/tokenizer"
    """where tokenizer.json is written"""
    vocab_size: int = 2048
    """vocabulary size, special tokens and the 256 byte tokens included"""
    max_chars: int = 20_000_000
    """at most this many characters of the training split are used to train the merges"""

    def __post_init__(self) -> None:
        if self.max_chars <= 0:
            raise LLMLabError(f"tokenizer: max_chars must be positive (got {self.max_chars})")


def _take_chars(docs: Iterator[str], budget: int) -> Iterator[str]:
    """Documents until `budget` characters (the last one cut), in pieces the trainer's pre-tokenizer handles well."""
    for doc in docs:
        doc = doc[:budget]
        for i in range(0, len(doc), 100_000):
            yield doc[i:i + 100_000]
        budget -= len(doc)
        if budget <= 0:
            return


def main(cfg: Config) -> dict:
    t0 = time.perf_counter()
    sources = parse_corpus(cfg.corpus)
    total_weight = sum(w for _, w in sources)
    n_chars = 0

    def counted(docs):
        nonlocal n_chars
        for d in docs:
            n_chars += len(d)
            yield d

    # one pass over each source's training text, at most its weight's share of max_chars
    texts = (piece for source, w in sources
             for piece in _take_chars(source.documents("train"), int(cfg.max_chars * w / total_weight)))
    tokenizer = train_tokenizer(counted(texts), cfg.vocab_size)
    if n_chars == 0:
        raise LLMLabError(f"corpus {cfg.corpus} has no training text")
    val = list(islice(_take_chars(Mixture(sources).documents("val"), 2_000_000), 10_000))
    bpt = bytes_per_token(tokenizer, val) if val else float("nan")
    path = tokenizer.save(cfg.out_dir)
    write_tokenizer_config(cfg.out_dir)
    seconds = time.perf_counter() - t0
    print(f"tokenizer: vocab {tokenizer.vocab_size:,} trained on {n_chars:,} characters in {seconds:.1f} s; "
          f"{bpt:.2f} bytes/token on val -> {path}")
    return {"vocab_size": tokenizer.vocab_size, "bytes_per_token": bpt, "train_chars": n_chars, "seconds": seconds}
