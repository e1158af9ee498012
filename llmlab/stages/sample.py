"""`llmlab sample`: complete a prompt with a checkpoint, streaming tokens as they are generated."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from llmlab import checkpoint
from llmlab.engine import Engine, SamplingParams, newline_ids
from llmlab.errors import LLMLabError


@dataclass
class Config:
    checkpoint: str = "runs/cpu/base"
    """checkpoint directory (or a training out_dir: its latest checkpoint)"""
    prompt: str = "Q: Where was"
    """text to complete; `\\n` is read as a newline"""
    num_samples: int = 1
    """completions of the same prompt, sampled as one batch"""
    sampling: SamplingParams = SamplingParams(max_new_tokens=64, temperature=0.8, top_k=50)
    """how tokens are sampled (default: temperature 0.8 among the 50 most likely tokens, 64 tokens, seed 0)"""
    stop_at_newline: bool = False
    """stop a completion at its first newline (handy for `Q: ... A:` prompts)"""

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise LLMLabError(f"sample: num_samples must be positive (got {self.num_samples})")


def main(cfg: Config) -> dict:
    ckpt = checkpoint.load(cfg.checkpoint)
    tokenizer = ckpt.require_tokenizer("sampling text")
    engine = Engine(ckpt.model)
    prompt = cfg.prompt.replace("\\n", "\n")
    ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
    stop_ids = [tokenizer.bos_id] + (newline_ids(tokenizer) if cfg.stop_at_newline else [])
    completions: list[list[int]] = [[] for _ in range(cfg.num_samples)]
    if cfg.num_samples == 1:  # stream to the terminal as tokens arrive
        sys.stdout.write(prompt)
        text_out = tokenizer.stream_decoder()
        for column in engine.stream([ids], cfg.sampling, stop_ids):
            token = column[0]
            if token is None or token in stop_ids:
                break
            completions[0].append(token)
            sys.stdout.write(text_out.push(token))
            sys.stdout.flush()
        sys.stdout.write(text_out.flush() + "\n")
    else:
        completions = engine.generate([ids] * cfg.num_samples, cfg.sampling, stop_ids)
        for i, c in enumerate(completions):
            print(f"--- sample {i + 1}\n{prompt}{tokenizer.decode(c)}")
    return {"completions": [tokenizer.decode(c) for c in completions]}
