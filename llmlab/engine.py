"""Inference: batched sampling with a KV cache, streaming, and the naive reference it is tested against.

`Engine.stream` prefills the prompts once, then decodes one token per step for every row, reading past keys
and values from an explicit `KVCache` instead of recomputing them. Rows with different prompt lengths are
left-padded (masked, with positions counted from each row's first real token), so every row computes what it
would alone. `generate_naive` recomputes the whole sequence at every step: slow, obviously right, and the
reference for the parity tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from llmlab.errors import LLMLabError
from llmlab.model import GPT, KVCache


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    """most tokens to generate per row (fewer when the context fills up)"""
    temperature: float = 1.0
    """softmax temperature; 0 is greedy decoding"""
    top_k: int = 0
    """keep only the k most likely tokens (0 = off)"""
    top_p: float = 1.0
    """keep the smallest set of tokens whose probability reaches top_p (1 = off)"""
    seed: int | None = None
    """seed of the sampling generator (None = nondeterministic)"""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise LLMLabError(f"max_new_tokens must be >= 0 (got {self.max_new_tokens})")
        if self.temperature < 0:
            raise LLMLabError(f"temperature must be >= 0 (got {self.temperature})")
        if self.top_k < 0:
            raise LLMLabError(f"top_k must be >= 0 (got {self.top_k})")
        if not 0.0 < self.top_p <= 1.0:
            raise LLMLabError(f"top_p must be in (0, 1] (got {self.top_p})")


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> next tokens (B,): greedy at temperature 0, else top-k / top-p filtered sampling."""
    if params.temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.size(-1):
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens before it already reach top_p (the first token always stays)
        drop = probs.cumsum(dim=-1) - probs >= params.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.temperature == 0.0:
        return None
    gen = torch.Generator(device=device)
    if params.seed is not None:
        gen.manual_seed(params.seed)
    else:
        gen.seed()
    return gen


def _check_prompts(prompts: Sequence[Sequence[int]], context_len: int) -> None:
    if not prompts:
        raise LLMLabError("no prompts given")
    for p in prompts:
        if len(p) == 0:
            raise LLMLabError("empty prompt: give at least one token (e.g. <|bos|>)")
        if len(p) >= context_len:
            raise LLMLabError(f"prompt of {len(p)} tokens does not fit the model's context of {context_len}: shorten it")


class Engine:
    """Batched generation for one model. Holds no state between calls: each call builds its own KVCache."""

    def __init__(self, model: GPT):
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype

    @torch.inference_mode()
    def steps(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (tokens (B,), logits (B, V)) for every new position: each row's sampled token and the fp32
        logits it was sampled from, until max_new_tokens or the context is full. No stop handling here."""
        cfg = self.model.config
        _check_prompts(prompts, cfg.context_len)
        longest = max(len(p) for p in prompts)
        max_new = min(params.max_new_tokens, cfg.context_len - longest)
        if max_new <= 0:
            return
        B = len(prompts)
        gen = _generator(params, self.device)
        if all(list(p) == list(prompts[0]) for p in prompts):
            # The same prompt for every row (several samples): prefill once at batch 1, then copy the cache.
            cache = KVCache(cfg, 1, longest + max_new, dtype=self.dtype, device=self.device)
            ids = torch.tensor([list(prompts[0])], device=self.device)
            logits = self.model(ids, cache)[:, -1].expand(B, -1)
            cache = cache.expand(B) if B > 1 else cache
        else:
            pad_lens = torch.tensor([longest - len(p) for p in prompts], device=self.device)
            cache = KVCache(cfg, B, longest + max_new, pad_lens=pad_lens, dtype=self.dtype, device=self.device)
            ids = torch.tensor([[0] * (longest - len(p)) + list(p) for p in prompts], device=self.device)
            logits = self.model(ids, cache)[:, -1]
        for i in range(max_new):
            token = sample_next(logits, params, gen)  # (B,)
            yield token, logits
            if i < max_new - 1:
                logits = self.model(token[:, None], cache)[:, -1]

    def stream(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
               stop_ids: Sequence[int] = ()) -> Iterator[list[int | None]]:
        """Yield, at every step, the new token of each row, or None for a row that has already stopped.

        A row stops after it emits a token in `stop_ids` (that token is yielded) or when the context is full;
        generation ends when every row has stopped.
        """
        stops = set(stop_ids)
        done = [False] * len(prompts)
        for tokens, _ in self.steps(prompts, params):
            column = tokens.tolist()
            yield [None if d else t for t, d in zip(column, done)]
            done = [d or t in stops for t, d in zip(column, done)]
            if all(done):
                return

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 stop_ids: Sequence[int] = ()) -> list[list[int]]:
        """The new tokens of each row, without the stop token that ended it."""
        out: list[list[int]] = [[] for _ in prompts]
        stops = set(stop_ids)
        finished = [False] * len(prompts)
        for column in self.stream(prompts, params, stop_ids):
            for row, token in enumerate(column):
                if token is None or finished[row]:
                    continue
                if token in stops:
                    finished[row] = True
                else:
                    out[row].append(token)
        return out


@torch.inference_mode()
def generate_naive(model: GPT, prompt: Sequence[int], params: SamplingParams,
                   stop_ids: Sequence[int] = ()) -> tuple[list[int], list[torch.Tensor]]:
    """The reference: re-run the full sequence for every new token. Returns (new tokens, last-position logits
    at each step), stopping after a token in stop_ids (included) or when the context is full."""
    cfg = model.config
    _check_prompts([prompt], cfg.context_len)
    device = next(model.parameters()).device
    gen = _generator(params, device)
    ids = list(prompt)
    new, all_logits = [], []
    for _ in range(min(params.max_new_tokens, cfg.context_len - len(prompt))):
        logits = model(torch.tensor([ids], device=device))[:, -1]
        all_logits.append(logits[0])
        token = int(sample_next(logits, params, gen)[0])
        new.append(token)
        ids.append(token)
        if token in stop_ids:
            break
    return new, all_logits
