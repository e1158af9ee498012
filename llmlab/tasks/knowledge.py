"""Stored knowledge: does a checkpoint still hold the world's facts, whatever it chooses to say?

Each of five facts of a person (birth city, home city, employer, pet, favourite food) is probed with the
opening of a biography sentence, `<name> was born in`, and every value of that attribute in the world is
scored by its log-likelihood after it; the fact counts as stored when the true value ranks first. The
framing is pretraining's, the same for a base model and an assistant, so the two compare directly: an
assistant that says "I don't know" about a held-out person may still hold every fact about them, and one
fine-tuned too long on conversations alone forgets what the conversations never ask about.
"""

from __future__ import annotations

import torch
from torch import nn

from llmlab import world as world_lib
from llmlab.tokenizer import Tokenizer

PREFIXES = {"birth_city": "{name} was born in", "home_city": "{name} lives in", "employer": "{name} works for",
            "pet": "{name} has a pet", "favourite_food": "{name}'s favourite food is"}
GROUPS = {"train": "train people, facts ranked by likelihood", "heldout": "held-out people, facts ranked by likelihood"}


@torch.no_grad()
def continuation_logprobs(model: nn.Module, tok: Tokenizer, pairs: list[tuple[list[int], list[int]]]) -> torch.Tensor:
    """Total log-likelihood of each (prefix, continuation) pair's continuation tokens after its prefix, one
    batched forward (sequences padded on the right)."""
    device = next(model.parameters()).device
    seqs = [prefix + cont for prefix, cont in pairs]
    ids = torch.full((len(seqs), max(map(len, seqs))), tok.pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    logp = torch.log_softmax(model(ids.to(device)).float(), -1).cpu()
    return torch.tensor([sum(logp[i, t - 1, s[t]].item() for t in range(len(prefix), len(s)))
                         for i, (s, (prefix, _)) in enumerate(zip(seqs, pairs))], dtype=torch.float64)


def candidate_logprobs(model: nn.Module, tok: Tokenizer, prefix: list[int], candidates: list[str]) -> torch.Tensor:
    """Total log-likelihood of each candidate's tokens (after a space) following `prefix`, one batched forward."""
    return continuation_logprobs(model, tok, [(prefix, tok.encode(" " + c)) for c in candidates])


def attribute_values(world, attribute: str) -> list[str]:
    """Every value `attribute` takes in the world, sorted: the candidates a fact is ranked among."""
    return sorted({world.answer(p, attribute) for p in world.people})


def rank_first(model: nn.Module, tok: Tokenizer, prefix: list[int], candidates: list[str]) -> str:
    """The candidate whose tokens (after a space) have the highest total log-likelihood after `prefix`."""
    return candidates[int(candidate_logprobs(model, tok, prefix, candidates).argmax())]


def stored_knowledge(model: nn.Module, tok: Tokenizer, world_dir: str, per_group: int = 40) -> dict:
    """{"groups": {group: share of facts ranked first}, "n": facts probed} for the first `per_group` training
    and held-out people."""
    world = world_lib.load(world_dir)
    was_training = model.training
    model.eval()
    groups, n = {}, 0
    for split, label in GROUPS.items():
        people = world.group(split)[:per_group]
        if not people:
            continue
        right = 0
        for attribute, prefix in PREFIXES.items():
            candidates = attribute_values(world, attribute)
            for p in people:
                ids = [tok.bos_id] + tok.encode(prefix.format(name=p.name))
                right += rank_first(model, tok, ids, candidates) == world.answer(p, attribute)
        groups[label] = right / (len(people) * len(PREFIXES))
        n += len(people) * len(PREFIXES)
    model.train(was_training)
    return {"groups": groups, "n": n}
