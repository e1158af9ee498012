"""`llmlab tokenizer`: train a byte-level BPE tokenizer on a corpus and report its compression."""

from __future__ import annotations

from dataclasses import dataclass

from llmlab.errors import LLMLabError


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


def main(cfg: Config) -> dict:
    raise NotImplementedError
