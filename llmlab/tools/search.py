"""The search tool: BM25 retrieval over the world's encyclopedia, through `bm25s`.

BM25 (Robertson & Zaragoza, "The Probabilistic Relevance Framework: BM25 and Beyond", 2009) scores a passage
by the query words it contains, weighting rare words up and long passages down; the world's names are
invented and rare, so a name in the query finds its entry.

The passages are one encyclopedia entry per country, city and company of the world, rendered from
world.json by the functions that write the encyclopedia documents of the pretraining corpus
(llmlab.world.text), with a seed of their own. The corpus file itself (pretrain/train.jsonl) holds every
entry twice, in two paraphrases, so indexing it would fill the top k with one fact said twice.

`load_index(world_dir)` builds an index once per world directory and keeps it (rebuilt when world.json
changes); `SearchIndex.search(query, k)` returns the top k passages as plain text, one per line.
"""

from __future__ import annotations

import functools
import random
from pathlib import Path

from llmlab.errors import LLMLabError
from llmlab.tools.result import truncate
from llmlab.world import World, load
from llmlab.world.text import city_entry, company_entry, country_entry

MAX_PASSAGE_CHARS = 500


def _tokenize(texts: list[str]) -> list[list[str]]:
    import bm25s  # deferred: bm25s pulls in numpy and scipy, slow to import, and most tool calls never search

    # every word, one character long included: "line 7", "week 2" and "floor 4" are told apart by their digit
    return bm25s.tokenize(texts, stopwords="en", token_pattern=r"(?u)\b\w+\b", return_ids=False, show_progress=False)


class SearchIndex:
    """BM25 over a list of passages."""

    def __init__(self, passages: list[str]):
        if not passages:
            raise LLMLabError("a search index needs at least one passage")
        import bm25s  # deferred: as in _tokenize

        self.passages = passages
        self._bm25 = bm25s.BM25()
        self._bm25.index(_tokenize(passages), show_progress=False)

    @classmethod
    def from_world(cls, world_dir: str | Path) -> SearchIndex:
        """One passage per country, city and company of the world at `world_dir` (see the module docstring)."""
        return cls(cls.from_world_passages(load(world_dir)))

    @staticmethod
    def from_world_passages(world: World) -> list[str]:
        """The passages of `from_world`: one encyclopedia entry per country, city and company."""
        rng = random.Random(f"{world.seed}-search")
        capitals = {c.capital for c in world.countries}
        cities_of = {c.name: [x.name for x in world.cities if x.country == c.name] for c in world.countries}
        passages = [country_entry(rng, c, cities_of[c.name]) for c in world.countries]
        passages += [city_entry(rng, c.name, c.country, c.name in capitals) for c in world.cities]
        passages += [company_entry(rng, c) for c in world.companies]
        return passages

    def ranked(self, query: str, k: int = 2) -> list[tuple[int, float]]:
        """(passage index, BM25 score) of the passages that share a word with `query`, best first, at most k."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        ids, scores = self._bm25.retrieve(_tokenize([query]), k=min(k, len(self.passages)), show_progress=False)
        return [(i, s) for i, s in zip(ids[0].tolist(), scores[0].tolist()) if s > 0]

    def hits(self, query: str, k: int = 2) -> list[str]:
        """The passages that share a word with `query`, best first, at most k."""
        return [self.passages[i] for i, _ in self.ranked(query, k)]

    def search(self, query: str, k: int = 2) -> str:
        """The tool's answer: the top k passages, one per line, each cut to MAX_PASSAGE_CHARS characters."""
        if not query.strip():
            return "error: empty search query: write what to look for, e.g. `search Zorbaton`"
        hits = self.hits(query, k)
        if not hits:
            return f"no results for {query!r}"
        return "\n".join(truncate(passage, MAX_PASSAGE_CHARS) for passage in hits)


def load_index(world_dir: str | Path) -> SearchIndex:
    """The index of the world at `world_dir`, built on first use and kept until world.json changes."""
    path = Path(world_dir).resolve()
    file = path / "world.json"
    if not file.is_file():
        raise LLMLabError(f"no world at {path}: run `llmlab world --out_dir {path}` first")
    return _cached_index(str(path), file.stat().st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _cached_index(path: str, modified_ns: int) -> SearchIndex:
    """`modified_ns` (of world.json) is only a cache key: a regenerated world gets a fresh index."""
    return SearchIndex.from_world(path)
