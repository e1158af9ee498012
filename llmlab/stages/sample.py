"""`llmlab sample`: complete a prompt with a checkpoint, streaming tokens as they are generated."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from llmlab import checkpoint
from llmlab.engine import Engine, SamplingParams
from llmlab.errors import LLMLabError
from llmlab.tokenizer import Tokenizer


@dataclass
class Config:
    checkpoint: str = "runs/cpu/base"
    """checkpoint directory (or a training out_dir: its latest checkpoint)"""
    prompt: str = "Q: Where was"
    """text to complete; `\\n` is read as a newline"""
    num_samples: int = 1
    """completions of the same prompt, sampled as one batch"""
    max_new_tokens: int = 64
    """most tokens per completion"""
    temperature: float = 0.8
    """0 is greedy"""
    top_k: int = 50
    """keep the k most likely tokens (0 = off)"""
    top_p: float = 1.0
    """nucleus sampling threshold (1 = off)"""
    seed: int = 0
    """sampling seed"""
    stop_at_newline: bool = False
    """stop a completion at its first newline (handy for `Q: ... A:` prompts)"""

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise LLMLabError(f"sample: num_samples must be positive (got {self.num_samples})")


def main(cfg: Config) -> dict:
    model = checkpoint.load_model(cfg.checkpoint)
    tokenizer = Tokenizer.load(checkpoint.resolve(cfg.checkpoint))
    engine = Engine(model)
    prompt = cfg.prompt.replace("\\n", "\n")
    ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
    params = SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, cfg.seed)
    stop_ids = [tokenizer.bos_id] + (newline_ids(tokenizer) if cfg.stop_at_newline else [])
    completions: list[list[int]] = [[] for _ in range(cfg.num_samples)]
    if cfg.num_samples == 1:  # stream to the terminal as tokens arrive
        sys.stdout.write(prompt)
        text_out = tokenizer.stream_decoder()
        for column in engine.stream([ids], params, stop_ids):
            token = column[0]
            if token is None or token in stop_ids:
                break
            completions[0].append(token)
            sys.stdout.write(text_out.push(token))
            sys.stdout.flush()
        sys.stdout.write(text_out.flush() + "\n")
    else:
        completions = engine.generate([ids] * cfg.num_samples, params, stop_ids)
        for i, c in enumerate(completions):
            print(f"--- sample {i + 1}\n{prompt}{tokenizer.decode(c)}")
    return {"completions": [tokenizer.decode(c) for c in completions]}


def newline_ids(tokenizer: Tokenizer) -> list[int]:
    """Every token whose text contains a newline (a completion ends at the first of them)."""
    return [i for i in range(tokenizer.vocab_size) if "\n" in tokenizer.decode([i])]
