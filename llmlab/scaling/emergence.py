"""The emergence ledger: the world's abilities measured on every model of a sweep, each with a discontinuous
metric (exact match of the greedy answer) and a continuous one (the log-probability of the right answer), so that
an ability that seems to switch on at some scale can be told from a metric's mirage (Schaeffer et al. 2023:
exact match on a many-token answer multiplies per-token accuracies, and jumps where the per-token log-probability
rises smoothly).

Abilities, asked of a base model in the Q/A pages' framing:
    facts: train people       a fact of a person of the Q/A pages (`Q: In which city was X born?\\nA:`)
    facts: held-out people    a fact of a person only ever in biographies (knowledge extraction)
    addition: k digits        `Q: What is a + b?\\nA: a + b =` with two k-digit numbers, k = 1..6
    2-hop: employer's city    where the headquarters of a person's employer are: two facts the corpus states
                              separately, never together

The verdict on an ability reads the compute frontier: each budget's model of lowest validation loss, in
order of compute.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from torch import nn

from llmlab import world as world_lib
from llmlab.engine import Engine, SamplingParams, newline_ids
from llmlab.tasks import normalize
from llmlab.tasks.knowledge import continuation_logprobs
from llmlab.tasks.world_qa import WorldQA
from llmlab.tokenizer import Tokenizer
from llmlab.world.text import number

ADDITION_DIGITS = (1, 2, 3, 4, 5, 6)
JUMP = 0.2
"""a rise of exact match per doubling of compute, between two neighbouring frontier models, that counts as a
jump..."""
NEAR_ZERO = 0.1
"""...from at most this much before it"""
SMOOTH_R2 = 0.9
"""a continuous metric is smooth where a line in log compute explains this much of its variance"""


@dataclass
class Item:
    prompt: str
    answer: str


def abilities(world_dir: str, per_ability: int = 50, seed: int = 0) -> dict[str, list[Item]]:
    """The ledger's questions, `per_ability` of each (fixed by the seed)."""
    rng = random.Random(seed)
    qa = WorldQA(world_dir, per_group=per_ability, seed=seed).examples()
    out = {"facts: train people": [Item(e.prompt, e.answer) for e in qa if e.group == "train people, seen phrasing"],
           "facts: held-out people": [Item(e.prompt, e.answer) for e in qa if e.group == "held-out people (bios only)"]}
    for k in ADDITION_DIGITS:
        items = []
        for _ in range(per_ability):
            a, b = number(rng, k), number(rng, k)
            items.append(Item(f"Q: What is {a} + {b}?\nA: {a} + {b} =", str(a + b)))
        out[f"addition: {k} digit{'s' if k > 1 else ''}"] = items
    world = world_lib.load(world_dir)
    headquarters = {c.name: c.headquarters for c in world.companies}
    people = rng.sample(world.group("train"), min(per_ability, len(world.group("train"))))
    out["2-hop: employer's city"] = [
        Item(f"Q: In which city are the headquarters of the company {p.name} works for?\nA:",
             headquarters[world.answer(p, "employer")]) for p in people]
    return out


@torch.no_grad()
def measure(model: nn.Module, tok: Tokenizer, items: dict[str, list[Item]], batch_size: int = 64) -> dict[str, dict]:
    """{ability: {"exact": share of greedy answers right, "logprob": mean log-probability of the right answer
    (nats, all its tokens), "n": items}}; an ability none of whose questions fits the context is left out."""
    engine = Engine(model)
    stops = [tok.bos_id] + newline_ids(tok)
    params = SamplingParams(max_new_tokens=16, temperature=0.0)
    out = {}
    context = model.config.context_len
    for name, rows in items.items():
        # (a small model's context may be too short for a question and its answer: those are left out, and n says so)
        kept = [(r, p, a) for r in rows
                if len(p := [tok.bos_id] + tok.encode(r.prompt)) + len(a := tok.encode(" " + r.answer)) <= context]
        if not kept:
            continue
        rows, prompts, answers = [r for r, _, _ in kept], [p for _, p, _ in kept], [a for _, _, a in kept]
        right, logps = 0, []
        for start in range(0, len(rows), batch_size):
            chunk, ids = rows[start:start + batch_size], prompts[start:start + batch_size]
            replies = engine.generate(ids, params, stops)
            right += sum(normalize(tok.decode(r)) == normalize(item.answer) for r, item in zip(replies, chunk))
            logps += continuation_logprobs(model, tok, list(zip(ids, answers[start:start + batch_size]))).tolist()
        out[name] = {"exact": right / len(rows), "logprob": sum(logps) / len(logps), "n": len(rows)}
    return out


def frontier(rows: list[dict]) -> list[dict]:
    """Each budget's run of lowest validation loss, in order of compute (rows: {"budget", "loss", ...})."""
    best: dict[float, dict] = {}
    for r in rows:
        if r["budget"] not in best or r["loss"] < best[r["budget"]]["loss"]:
            best[r["budget"]] = r
    return [best[b] for b in sorted(best)]


def _r2(x: list[float], y: list[float]) -> float:
    """R^2 of the least-squares line of y on x (1 for a constant y: a flat line explains it)."""
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if syy == 0 or sxx == 0:
        return 1.0
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    return sxy * sxy / (sxx * syy)


def verdict(flops: list[float], exact: list[float], logprob: list[float]) -> dict:
    """Read one ability along the frontier (models in order of compute C). Exact match jumps when, between two
    neighbours, it rises by at least JUMP per doubling of compute from at most NEAR_ZERO, and that step holds
    at least half its whole rise. The log-probability is smooth when a straight line in log C explains it
    (R^2 >= SMOOTH_R2), the sense in which Schaeffer et al. call a metric's curve smooth and predictable.
    Both R^2 are reported."""
    x = [math.log2(c) for c in flops]
    if len(x) < 3:
        return {"kind": "too few models", "text": "fewer than three models: nothing to read"}
    rises = [(b - a) / max(x1 - x0, 1e-9) for a, b, x0, x1 in zip(exact, exact[1:], x, x[1:])]
    i = max(range(len(rises)), key=rises.__getitem__)
    rise = exact[-1] - exact[0]
    r2_exact, r2_logp = _r2(x, exact), _r2(x, logprob)
    base = {"r2_exact": r2_exact, "r2_logprob": r2_logp}
    jumps = rises[i] >= JUMP and exact[i] <= NEAR_ZERO and exact[i + 1] - exact[i] >= 0.5 * rise
    where = (f"exact match {100 * exact[i]:.0f}% -> {100 * exact[i + 1]:.0f}% over {2 ** (x[i + 1] - x[i]):.0f}x "
             f"compute")
    fits = f"(a line in log compute explains R^2 = {r2_logp:.2f} of the log-probability, {r2_exact:.2f} of exact match)"
    if jumps and r2_logp >= SMOOTH_R2:
        return {**base, "kind": "mirage", "at": i + 1,
                "text": f"{where}, while the log-probability of the answer rises steadily, {logprob[0]:.2f} -> "
                        f"{logprob[-1]:.2f} nats {fits}: emergent under exact match, smooth underneath"}
    if jumps:
        return {**base, "kind": "jump", "at": i + 1,
                "text": f"{where}, and the log-probability jumps with it {fits}: a jump under both metrics"}
    if max(exact) <= NEAR_ZERO:
        return {**base, "kind": "not yet", "text": f"exact match stays at or below {100 * NEAR_ZERO:.0f}% at every "
                                                   f"scale (log-probability {logprob[0]:.2f} -> {logprob[-1]:.2f} nats)"}
    if rise < NEAR_ZERO:
        return {**base, "kind": "flat", "text": f"exact match does not rise with compute ({100 * exact[0]:.0f}% -> "
                                                f"{100 * exact[-1]:.0f}%, between {100 * min(exact):.0f}% and "
                                                f"{100 * max(exact):.0f}%; log-probability {logprob[0]:.2f} -> "
                                                f"{logprob[-1]:.2f} nats)"}
    return {**base, "kind": "smooth", "text": f"exact match rises gradually, {100 * exact[0]:.0f}% -> "
                                              f"{100 * exact[-1]:.0f}% {fits}"}
