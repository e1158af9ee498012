"""Text cut into passages for retrieval: whole sentences packed up to a word budget, each passage starting
with the last `overlap` sentences of the one before, so that a fact that spans a boundary is whole in one of
them. A sentence longer than the budget is cut into windows of words that overlap by a quarter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n\s*\n")


@dataclass(frozen=True)
class Chunk:
    file: str
    """the file's name, as a citation shows it"""
    index: int
    """the passage's position in its file, from 0"""
    text: str

    @property
    def cite(self) -> str:
        return f"{self.file}#{self.index}"


def sentences(text: str) -> list[str]:
    return [" ".join(s.split()) for s in SENTENCE_END.split(text) if s.strip()]


def _pieces(sentence: str, max_words: int) -> list[str]:
    words = sentence.split()
    if len(words) <= max_words:
        return [sentence]
    step = max(1, max_words - max_words // 4)
    return [" ".join(words[i:i + max_words]) for i in range(0, len(words) - max_words + step, step)]


def chunk_text(text: str, file: str, max_words: int = 40, overlap: int = 1) -> list[Chunk]:
    """The passages of `text` (see the module docstring)."""
    if max_words < 1 or overlap < 0:
        raise ValueError(f"chunking needs max_words >= 1 and overlap >= 0 (got {max_words}, {overlap})")
    units = [p for s in sentences(text) for p in _pieces(s, max_words)]
    chunks: list[list[str]] = []
    current: list[str] = []
    for unit in units:
        if current and sum(len(u.split()) for u in current + [unit]) > max_words:
            chunks.append(current)
            current = current[-overlap:] if overlap else []
            while current and sum(len(u.split()) for u in current + [unit]) > max_words:
                current = current[1:]
        current.append(unit)
    if current:
        chunks.append(current)
    return [Chunk(file, i, " ".join(c)) for i, c in enumerate(chunks)]
