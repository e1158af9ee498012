"""A universal adversarial suffix by Greedy Coordinate Gradient (Zou, Wang, Kolter & Fredrikson, "Universal and
Transferable Adversarial Attacks on Aligned Language Models", 2023).

The attack appends L tokens to the user's request and searches for the L tokens that make the assistant start
its reply with a compliant `target` (llmlab.redteam.goals), for many requests at once, so that one suffix works
on requests it was never optimised on:

    loss(s) = mean over the training goals g of  -1/|t_g| sum_j log p(t_g[j] | prompt_g + s + t_g[:j])

Tokens are discrete, so each step linearises: with the suffix as one-hot rows e_1..e_L (L x V), the gradient
of the loss with respect to e_i says, for every token v, how the loss moves when position i leans towards v.
The step keeps the k tokens with the most negative gradient at each position, draws `candidates` suffixes that
each swap one random position for one of its k tokens, evaluates them exactly (one batched forward pass over
candidates x goals), and moves to the best. The gradient flows through `GPT.forward(inputs_embeds=...)`.

The suffix must survive a round trip through text: the attack's message is `request + " " + suffix text`, which
the chat format tokenizes again. Candidate tokens are therefore those whose text is a space and then a word or
a run of punctuation (the pre-tokenizer splits before each, so neighbours never merge), and a candidate whose
text re-encodes to other ids is dropped (the filter of the paper's code).

The search is resumable: its state (step, suffix, best so far, the loss curve) is written to a JSON file every
`save_every` steps, and each step's random draws come from a generator seeded by (seed, step).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from llmlab.chat import render_prompt
from llmlab.errors import LLMLabError
from llmlab.fileio import write_atomic
from llmlab.model import GPT, KVCache
from llmlab.redteam.goals import Goal
from llmlab.tokenizer import Tokenizer

SUFFIX_TOKEN = re.compile(r" (?:[A-Za-z]+|[^\sA-Za-z0-9]+)")
# (`vocabulary="lower"`: no capitalised word, so no name of the world's people, places or companies)
LOWER_SUFFIX_TOKEN = re.compile(r" (?:[a-z]+|[^\sA-Za-z0-9]+)")
VOCABULARIES = {"words": SUFFIX_TOKEN, "lower": LOWER_SUFFIX_TOKEN}
"""GCGConfig.vocabulary: the pattern of each choice's tokens"""


@dataclass
class GCGConfig:
    steps: int = 200
    """optimisation steps (the search stops earlier once every training goal's target is the greedy reply)"""
    suffix_len: int = 10
    """tokens in the suffix"""
    topk: int = 64
    """tokens kept per position from the gradient"""
    candidates: int = 64
    """suffixes evaluated per step"""
    first_weight: float = 1.0
    """weight of the target's first token in the loss (1: the paper's mean over the target). A refusal is
    decided at the first token, and once it is the target's the rest follows: a weight above 1 spends the search
    where it is decided"""
    vocabulary: str = "words"
    """the tokens a suffix may use: "words" (any word or run of punctuation after a space) or "lower" (only
    lowercase words and punctuation: names in the suffix pull the reply towards other people's facts)"""
    seed: int = 0
    save_every: int = 10

    def __post_init__(self) -> None:
        if self.vocabulary not in VOCABULARIES:
            raise LLMLabError(f"GCG's vocabulary is {' or '.join(VOCABULARIES)} (got {self.vocabulary!r})")


@dataclass
class GCGResult:
    suffix: list[int]
    """the best suffix found (lowest training loss)"""
    text: str
    """its text, as appended to a request (after one space)"""
    loss: float
    step: int
    losses: list[float] = field(default_factory=list)
    """the loss of the suffix moved to at each step"""
    matched: float = 0.0
    """share of the training goals whose whole target the best suffix makes the greedy continuation"""


def allowed_tokens(tokenizer: Tokenizer, vocabulary: str = "words") -> torch.Tensor:
    """Boolean (V,) mask of the tokens a suffix may use (see the module docstring and GCGConfig.vocabulary)."""
    pattern = VOCABULARIES[vocabulary]
    ok = torch.zeros(tokenizer.vocab_size, dtype=torch.bool)
    for t in range(tokenizer.vocab_size):
        text = tokenizer.decode([t])
        if pattern.fullmatch(text) and tokenizer.encode(text) == [t]:
            ok[t] = True
    return ok


def initial_suffix(tokenizer: Tokenizer, length: int, allowed: torch.Tensor) -> torch.Tensor:
    """The paper's starting point, " ! ! ! ...", or the first allowed token repeated where " !" is no token."""
    bang = tokenizer.encode(" !")
    token = bang[0] if len(bang) == 1 and allowed[bang[0]] else int(allowed.nonzero()[0])
    return torch.full((length,), token, dtype=torch.long)


class Slots:
    """The training goals rendered around a suffix: row g is prompt_g's ids up to its request's end, the
    suffix, then `<|user_end|><|assistant_start|>` and the target, right-padded (causal attention never looks
    at what follows, so padding on the right changes nothing before it)."""

    def __init__(self, tokenizer: Tokenizer, goals: list[Goal], suffix_len: int, context_len: int):
        tail = [tokenizer.special_id("<|user_end|>"), tokenizer.special_id("<|assistant_start|>")]
        self.rows: list[tuple[list[int], list[int]]] = []
        for g in goals:
            ids = render_prompt(tokenizer, g.messages())
            if ids[-2:] != tail:
                raise LLMLabError("the goal's prompt does not end with the user's message: GCG needs a chat model")
            self.rows.append((ids[:-2], tail + tokenizer.encode(g.target)))
        self.L = suffix_len
        self.T = max(len(b) + len(a) for b, a in self.rows) + suffix_len
        if self.T > context_len:
            raise LLMLabError(f"a goal with a {suffix_len}-token suffix and its target needs {self.T} tokens, more "
                              f"than the model's context of {context_len}: shorten --gcg_suffix_len")
        self.pad = tokenizer.pad_id
        self._caches: list[KVCache] | None = None

    def caches(self, model: GPT) -> list[KVCache]:
        """Each goal's prompt up to the suffix, prefilled once into a one-row cache (a fresh copy per use: the
        caller continues an `expand`ed copy)."""
        if self._caches is None:
            self._caches = []
            with torch.no_grad():
                for before, after in self.rows:
                    cache = KVCache(model.config, 1, len(before) + self.L + len(after))
                    model(torch.tensor([before]), cache)
                    self._caches.append(cache)
        return self._caches

    def batch(self, suffixes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """suffixes (S, L) -> ids (S*G, T), targets (S*G, T) with -100 where no loss is taken, and the suffix's
        first position in each of the G rows."""
        S, G = suffixes.shape[0], len(self.rows)
        ids = torch.full((S * G, self.T), self.pad, dtype=torch.long)
        targets = torch.full((S * G, self.T), -100, dtype=torch.long)
        starts = torch.tensor([len(b) for b, _ in self.rows])
        for g, (before, after) in enumerate(self.rows):
            n, rows = len(before), slice(g, S * G, G)
            ids[rows, :n] = torch.tensor(before)
            ids[rows, n:n + self.L] = suffixes
            ids[rows, n + self.L:n + self.L + len(after)] = torch.tensor(after)
            # the target's tokens (after the two format tokens) are predicted from the position before each
            first = n + self.L + 2
            targets[rows, first - 1:n + self.L + len(after) - 1] = torch.tensor(after[2:])
        return ids, targets, starts


def _weighted(ce: torch.Tensor, mask: torch.Tensor, first: float) -> torch.Tensor:
    """Each row's weighted mean of ce over its target positions (mask), the first one weighing `first`."""
    w = mask.float()
    w[torch.arange(len(w)), mask.float().argmax(1)] *= first
    return (ce * w).sum(1) / w.sum(1)


def _score(model: GPT, slots: Slots, suffixes: torch.Tensor, first: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean target cross-entropy over the goals, share of the goals whose whole target is the greedy
    continuation) of each suffix (S, L) -> two (S,) tensors. Each goal's prompt up to the suffix is the same for
    every candidate, so its keys and values are computed once (`slots.caches`) and only suffix, format tokens and
    target run per candidate."""
    S, L = suffixes.shape
    loss, matched = torch.zeros(S), torch.zeros(S)
    with torch.no_grad():
        for cache, (_, after) in zip(slots.caches(model), slots.rows):
            target = torch.tensor(after[2:]).expand(S, -1)
            logits = model(torch.cat([suffixes, torch.tensor(after).expand(S, -1)], 1), cache.expand(S))
            pred = logits[:, L + 1:-1]  # the positions that predict the target's tokens
            ce = F.cross_entropy(pred.transpose(1, 2), target, reduction="none")
            loss += _weighted(ce, torch.ones_like(target, dtype=torch.bool), first)
            matched += (pred.argmax(-1) == target).all(1).float()
    return loss / len(slots.rows), matched / len(slots.rows)


def _gradient(model: GPT, ids: torch.Tensor, targets: torch.Tensor, starts: torch.Tensor, L: int,
              first: float = 1.0) -> torch.Tensor:
    """d loss / d one-hot suffix, (L, V), for the one suffix inside ids (G, T)."""
    W = model.embed_tokens.weight
    suffix = ids[0, starts[0]:starts[0] + L]
    one_hot = F.one_hot(suffix, W.shape[0]).to(W.dtype).requires_grad_(True)
    chosen = one_hot @ W  # (L, d)
    embeds = model.embed_tokens(ids).detach()
    position = starts[:, None] + torch.arange(L)[None, :]  # (G, L)
    embeds = embeds.index_put((torch.arange(ids.shape[0])[:, None], position), chosen.expand(ids.shape[0], L, -1))
    logits = model(None, inputs_embeds=embeds)
    ce = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
    _weighted(ce, targets != -100, first).mean().backward()
    return one_hot.grad


def _round_trips(tokenizer: Tokenizer, request: str, suffix: list[int]) -> bool:
    """Whether `request + suffix text` tokenizes to the request's ids and then exactly the suffix."""
    return tokenizer.encode(request + tokenizer.decode(suffix)) == tokenizer.encode(request) + suffix


def optimize(model: GPT, tokenizer: Tokenizer, goals: list[Goal], cfg: GCGConfig, state: str | Path | None = None,
             progress: Callable[[int, float, float], None] | None = None) -> GCGResult:
    """A suffix for `goals` (their plain requests), resumed from `state` (a JSON file) if it exists."""
    if cfg.steps < 1:
        raise LLMLabError(f"GCG needs a budget of at least one step (got --gcg_steps {cfg.steps})")
    if not goals:
        raise LLMLabError("GCG needs at least one training goal")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    allowed = allowed_tokens(tokenizer, cfg.vocabulary)
    slots = Slots(tokenizer, goals, cfg.suffix_len, model.config.context_len)
    current = initial_suffix(tokenizer, cfg.suffix_len, allowed)
    best, best_loss, losses, step, matched = current.clone(), float("inf"), [], 0, 0.0
    path = Path(state) if state else None
    wanted = json.dumps([[g.system, g.request, g.target] for g in goals]).encode()
    # (the default vocabulary stays out of the key: searches saved before there was a choice still resume)
    search = {**{k: v for k, v in asdict(cfg).items()
                 if k not in ("steps", "save_every") and (k, v) != ("vocabulary", "words")},
              "goals": hashlib.sha256(wanted).hexdigest()[:16]}
    if path is not None and path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("search", search) != search:
            raise LLMLabError(f"{path} holds a search with other settings or goals ({saved['search']}): delete it "
                              f"to start over, or write this one elsewhere")
        current, best = torch.tensor(saved["current"]), torch.tensor(saved["suffix"])
        best_loss, losses, step = saved["loss"], saved["losses"], saved["step"]

    def save(matched: float = 0.0) -> GCGResult:
        result = GCGResult(best.tolist(), tokenizer.decode(best.tolist()), best_loss, step, losses, matched)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            state = {**result.__dict__, "current": current.tolist(), "search": search}
            write_atomic(path, (json.dumps(state) + "\n").encode())
        return result

    request = goals[0].request
    while step < cfg.steps:
        ids, targets, starts = slots.batch(current[None])
        with torch.enable_grad():
            grad = _gradient(model, ids, targets, starts, cfg.suffix_len, cfg.first_weight)
        grad[:, ~allowed] = float("inf")
        top = (-grad).topk(cfg.topk, dim=1).indices  # (L, k)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        pos = torch.randint(cfg.suffix_len, (cfg.candidates,), generator=gen)
        pick = top[pos, torch.randint(cfg.topk, (cfg.candidates,), generator=gen)]
        cands = current.repeat(cfg.candidates, 1)
        cands[torch.arange(cfg.candidates), pos] = pick
        keep = [i for i in range(cfg.candidates) if _round_trips(tokenizer, request, cands[i].tolist())]
        step += 1
        if not keep:
            losses.append(losses[-1] if losses else float("nan"))
            continue
        cands = cands[keep]
        cand_losses, cand_matched = _score(model, slots, cands, cfg.first_weight)
        i = int(cand_losses.argmin())
        current, loss = cands[i].clone(), float(cand_losses[i])
        losses.append(loss)
        if loss < best_loss:
            best, best_loss, matched = current.clone(), loss, float(cand_matched[i])
        if progress is not None:
            progress(step, loss, matched)
        if matched == 1.0:
            break
        if step % cfg.save_every == 0:
            save(matched)
    return save(float(_score(model, slots, best[None], cfg.first_weight)[1]))
