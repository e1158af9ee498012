"""Verify-then-answer for facts: before asserting a fact about a person, recall several of that person's facts
and check how sure the recall is.

A model this small tells a person it read about from a stranger by the name's tokens: a stranger named with one
real person's first name and another's surname passes for known, and the assistant invents a fact. Its recall
tells them apart: after `<name> was born in`, `<name> works for`, ... (openings of the biographies, two per
fact, six facts) a real person's values come with near certainty, a recombined name's are split between the two
people its parts belong to. The confidence of a name is the mean, over the probes, of the probability of the
most likely value of the fact among every value it takes in the world; a name whose confidence falls below a
threshold gets "I don't know who that is." instead of an answer. The threshold is calibrated on names kept
apart from the evaluation: it lets through all but `max_flagged` of known people.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from llmlab.tasks.knowledge import attribute_values, candidate_logprobs
from llmlab.tokenizer import Tokenizer

PROBES: list[tuple[str, str]] = [
    ("birth_city", "{name} was born in"), ("home_city", "{name} lives in"), ("employer", "{name} works for"),
    ("pet", "{name} has a pet"), ("favourite_food", "{name}'s favourite food is"),
    ("university", "{name} studied at the"), ("birth_city", "{name} came into the world in"),
    ("home_city", "{name} has settled in"), ("employer", "{name} is employed by"),
    ("pet", "At home, {name} looks after a pet"), ("favourite_food", "{name} likes"),
    ("university", "{name} graduated from the")]
"""(fact, opening) in the order a budget takes them: the six facts once, then a second opening of each"""
DONT_KNOW = "I don't know who that is."
MAX_FLAGGED = 0.02
"""the share of the known people calibrated on that verify's threshold may leave below it"""
_NAME = re.compile(r"\b([A-Z][a-z]+ [A-Z][a-z]+)\b")


def name_in(text: str) -> str | None:
    """The first two capitalised words in a row (a first name and a surname: questions start with a question
    word followed by a lower-case one, so it is not taken), or None."""
    m = _NAME.search(text)
    return m.group(1) if m else None


class Recall:
    """The probes of a model's recall of people, with the world's values of each fact as the candidates."""

    def __init__(self, model: nn.Module, tok: Tokenizer, world):
        self.model, self.tok, self.world = model, tok, world
        self.candidates = {fact: attribute_values(world, fact) for fact, _ in PROBES}
        self._candidate_tokens = {fact: sum(len(tok.encode(" " + v)) for v in values)
                                  for fact, values in self.candidates.items()}
        self._cache: dict[str, list[tuple[float, int]]] = {}

    @torch.no_grad()
    def probe(self, name: str) -> list[tuple[float, int]]:
        """(probability of the top value, tokens read) of every probe in order, computed once per name."""
        if name not in self._cache:
            out = []
            for fact, opening in PROBES:
                prefix = [self.tok.bos_id] + self.tok.encode(opening.format(name=name))
                values = self.candidates[fact]
                logp = candidate_logprobs(self.model, self.tok, prefix, values)
                read = len(prefix) * len(values) + self._candidate_tokens[fact]
                out.append((float(torch.softmax(logp, 0).max()), read))
            self._cache[name] = out
        return self._cache[name]

    def confidence(self, name: str, probes: int = len(PROBES)) -> tuple[float, int]:
        """(mean probability of the top value over the first `probes` probes, tokens the model read for them)."""
        first = self.probe(name)[:probes]
        return sum(p for p, _ in first) / len(first), sum(r for _, r in first)


def calibration_names(world) -> list[str]:
    """The known people a threshold is calibrated on: every other training and held-out person (the others are
    left for an evaluation)."""
    return [p.name for p in world.group("train")[0::2] + world.group("heldout")[0::2]]


def calibrate(recall: Recall, known: list[str], probes: int, max_flagged: float = MAX_FLAGGED) -> float:
    """The threshold below which at most `max_flagged` of the known names' confidences fall."""
    scores = sorted(recall.confidence(n, probes)[0] for n in known)
    return scores[int(max_flagged * len(scores))]
