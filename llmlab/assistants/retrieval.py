"""Ranking passages for a question, three ways, and how good a ranking is.

    BM25     the words a question shares with a passage, rare words weighted up and long passages down
             (`bm25s`, through llmlab.tools.search.SearchIndex): exact names and numbers find their passage,
             other words for the same thing ("vacation" for "leave") do not
    Dense    cosine similarity of embeddings from an encoder (`encode(texts) -> (n, d)` tensor): other words
             for the same thing can meet, and an exact rare name may blur
    Hybrid   reciprocal rank fusion (Cormack, Clarke & Buettcher 2009): each passage scores the sum over the
             rankings of 1 / (k0 + its rank), k0 = 60; no score scales to calibrate between the two

Metrics are BEIR's (Thakur et al. 2021), with binary relevance: Recall@k, the share of a question's relevant
passages among the top k; nDCG@k, the discounted gain of the relevant passages in the top k over the best
possible. `pack_benchmark` is the world's benchmark: its knowledge packs among distractors.
"""

from __future__ import annotations

import math
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from llmlab.assistants.chunks import Chunk
from llmlab.tools.search import SearchIndex
from llmlab.world.core import World
from llmlab.world.packs import make_packs, pack_chunks

DISTRACTOR_SEED = 1_000_000  # the distractor packs' draws: far above any the embedder trains on

class Retriever(Protocol):
    def rank(self, query: str, k: int) -> list[int]:
        """The indices of the k best passages for `query`, best first (fewer when fewer match)."""
        ...


class BM25:
    def __init__(self, passages: list[str]):
        self.index = SearchIndex(passages)

    def rank(self, query: str, k: int) -> list[int]:
        return [i for i, _ in self.index.ranked(query, k)]


class Dense:
    def __init__(self, passages: list[str], encode: Callable[[list[str]], torch.Tensor]):
        if not passages:
            raise ValueError("a dense index needs at least one passage")
        self.encode = encode
        self.vectors = F.normalize(encode(passages).float(), dim=-1)

    def rank(self, query: str, k: int) -> list[int]:
        q = F.normalize(self.encode([query]).float(), dim=-1)[0]
        return (self.vectors @ q).topk(min(k, len(self.vectors))).indices.tolist()


class Hybrid:
    def __init__(self, *retrievers: Retriever, depth: int = 100, k0: int = 60):
        self.retrievers, self.depth, self.k0 = retrievers, depth, k0

    def rank(self, query: str, k: int) -> list[int]:
        score: dict[int, float] = {}
        for r in self.retrievers:
            for place, i in enumerate(r.rank(query, self.depth)):
                score[i] = score.get(i, 0.0) + 1.0 / (self.k0 + place + 1)
        return sorted(score, key=lambda i: (-score[i], i))[:k]


def recall_at_k(ranked: list[int], relevant: set[int], k: int) -> float:
    return len(set(ranked[:k]) & relevant) / len(relevant) if relevant else 0.0


def ndcg_at_k(ranked: list[int], relevant: set[int], k: int) -> float:
    dcg = sum(1 / math.log2(place + 2) for place, i in enumerate(ranked[:k]) if i in relevant)
    ideal = sum(1 / math.log2(place + 2) for place in range(min(k, len(relevant))))
    return dcg / ideal if ideal else 0.0


def evaluate(retriever: Retriever, questions: list[tuple[str, set[int]]], recall_k: int = 5,
             ndcg_k: int = 10) -> dict[str, float]:
    """Mean Recall@recall_k and nDCG@ndcg_k over (question, relevant passage indices)."""
    if not questions:
        raise ValueError("evaluating a retriever needs questions")
    depth = max(recall_k, ndcg_k)
    ranks = [retriever.rank(q, depth) for q, _ in questions]
    return {f"recall@{recall_k}": sum(recall_at_k(r, rel, recall_k) for r, (_, rel) in zip(ranks, questions)) / len(questions),
            f"ndcg@{ndcg_k}": sum(ndcg_at_k(r, rel, ndcg_k) for r, (_, rel) in zip(ranks, questions)) / len(questions),
            "n": len(questions)}


def pack_benchmark(world: World, max_words: int = 25, distractor_packs: int = 5,
                   phrasing: str = "question") -> tuple[list[Chunk], list[tuple[str, set[int]]]]:
    """The retrieval benchmark of the world's knowledge packs: (passages, [(question, relevant indices)]).
    Passages: every file of the world's packs chunked, among the chunks of `distractor_packs` other draws of
    the same kinds of pack (other companies' handbooks, other towns' timetables: the same sentences with other
    names and values; drawn with seeds no training uses) and the world's encyclopedia. Questions: the world's
    packs' facts in `phrasing` ("question": other words than the files'; "seen": the files' own words); a
    passage is relevant when it holds the fact's sentence."""
    own = make_packs(world)
    passages = [c for pack, facts in own.items() for c in pack_chunks(facts, max_words, f"{pack}/")]
    for draw in range(distractor_packs):
        for pack, facts in make_packs(world, seed=DISTRACTOR_SEED + draw).items():
            passages += pack_chunks(facts, max_words, f"other-{draw}/{pack}/")
    passages += [Chunk("encyclopedia", i, text) for i, text in enumerate(SearchIndex.from_world_passages(world))]
    questions = []
    for facts in own.values():
        for f in facts:
            relevant = {i for i, c in enumerate(passages) if f.sentence in c.text and not c.file.startswith("other-")}
            questions.append((getattr(f, phrasing), relevant))
    return passages, questions
