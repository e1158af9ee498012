"""A conversation's memory: what the user said, kept beyond the context window and paged back in when asked.

The context window is the model's RAM and this is its disk. Every message the user sends is stored as an
entry; none is lost when the oldest turns no longer fit the context. Before a reply, the entries that best
match the user's new message (BM25) are paged in one at a time as `[memory#i] You said: ...` and read
(llmlab.assistants.reader, the format fine-tuning's reading conversations teach): if one holds the answer, it
is the reply, cited; if none does, the model answers the conversation that fits the context as it always has.

The user sees every entry and can edit or forget one (`llmlab chat`: /memory, /remember TEXT, /edit N TEXT,
/forget N); `save` writes the entries as JSON, atomically, so a memory outlives the session.

    memory = Memory(); memory.add("My locker number is 4821.")
    recall(engine, tokenizer, memory, "What is my locker number?")  -> Reading ("4821 [memory#0]") or None
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from llmlab.assistants.chunks import Chunk, sentences
from llmlab.assistants.reader import Reading, read_many
from llmlab.assistants.retrieval import BM25
from llmlab.engine import Engine
from llmlab.errors import LLMLabError
from llmlab.fileio import write_atomic
from llmlab.tokenizer import Tokenizer
from llmlab.world.reading import memory_passage

PAGE_IN = 3
"""entries paged in (read) per question"""


@dataclass
class Memory:
    entries: list[str | None] = field(default_factory=list)
    """what the user said, by entry number (None: forgotten; numbers are never reused)"""

    def add(self, text: str) -> int:
        self.entries.append(" ".join(text.split()))
        return len(self.entries) - 1

    def _check(self, i: int) -> None:
        if not 0 <= i < len(self.entries) or self.entries[i] is None:
            raise LLMLabError(f"memory has no entry {i}: see /memory for the entries it holds")

    def edit(self, i: int, text: str) -> None:
        self._check(i)
        self.entries[i] = " ".join(text.split())

    def forget(self, i: int) -> None:
        self._check(i)
        self.entries[i] = None

    def passages(self) -> list[Chunk]:
        return [memory_passage(i, text) for i, text in enumerate(self.entries) if text]

    def search(self, query: str, k: int = PAGE_IN) -> list[Chunk]:
        """The k entries that best match `query` (BM25), best first. Neither the query itself (the message just
        sent) nor a question is searched: a question holds no fact to answer from, and one much like the
        question asked ("What does Anna do?" for "What does Ben do?") only invites an answer from it."""
        asked = " ".join(query.split())
        kept = [c for c in self.passages() if self.entries[c.index] != asked and not is_question(self.entries[c.index])]
        if not kept or not asked:
            return []
        return [kept[i] for i in BM25([c.text for c in kept]).rank(query, k)]

    def save(self, path: str | Path) -> None:
        write_atomic(path, (json.dumps({"entries": self.entries}, indent=1) + "\n").encode())

    @classmethod
    def load(cls, path: str | Path) -> Memory:
        path = Path(path)
        if not path.exists():
            return cls()
        try:
            entries = json.loads(path.read_text())["entries"]
            if not all(e is None or isinstance(e, str) for e in entries):
                raise TypeError("an entry is neither text nor null")
        except (ValueError, KeyError, TypeError) as e:
            raise LLMLabError(f"{path} is not a memory file ({e}): move it away to start a new memory") from None
        return cls(entries)


def is_question(text: str) -> bool:
    """Whether every sentence of `text` is a question."""
    return all(s.endswith("?") for s in sentences(text)) if text.strip() else False


def recall(engine: Engine, tokenizer: Tokenizer, memory: Memory, question: str, k: int = PAGE_IN) -> Reading | None:
    """The answer to `question` from the memory's best-matching entries, or None when none holds it."""
    found = memory.search(question, k)
    if not found:
        return None
    reading = read_many(engine, tokenizer, [(question, found)])[0]
    return reading if reading.chunk is not None else None
