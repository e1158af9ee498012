"""Answering from more text than the context holds, by paging: the passages a retriever found are put after
the question one at a time (llmlab.world.reading's format: `question\n[file#index] text`), each read in its
own row of one batch, and the answer is that of the best-ranked passage whose reading answers, citing
it (the assistant says NOT_IN_PASSAGE for one that does not hold the answer). When none does: NOT_IN_FILES.

The cpu preset's context holds one 12-word passage and a question; paging k passages costs k prompts, read
together. The same reader serves knowledge files, a document far longer than the context (needle in a
haystack) and a conversation's memory (llmlab.assistants.memory).

    read_many(engine, tokenizer, [(question, passages), ...])  -> [Reading, ...]
    greedy_replies(engine, tokenizer, prompts)                   -> the assistant's words for each prompt
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from llmlab.assistants.chunks import Chunk
from llmlab.chat import final_answer, render_prompt, reply_stop_ids
from llmlab.engine import Engine, SamplingParams
from llmlab.tokenizer import Tokenizer
from llmlab.world.reading import NOT_IN_FILES, NOT_IN_PASSAGE, reading_prompt


@dataclass
class Reading:
    answer: str
    """the reply (with its citation), or NOT_IN_FILES"""
    chunk: Chunk | None
    """the passage the answer came from"""
    read: int
    """passages read (prompts generated)"""
    prompt_tokens: int = 0
    """tokens of the prompts read"""

    @property
    def citation(self) -> dict:
        """{"file", "passage", "text"} of the passage answered from (an answer that has one)."""
        return {"file": self.chunk.file, "passage": self.chunk.index, "text": self.chunk.text}


def _found(reply: str, chunk: Chunk) -> bool:
    """Whether a reading answered: it cites the passage it read (a reply without the citation, such as a tool
    call or small talk, is no reading of it)."""
    return f"[{chunk.cite}]" in reply and NOT_IN_PASSAGE.rstrip(".") not in reply


def prompts_for(tokenizer: Tokenizer, question: str, passages: Sequence[Chunk], context_len: int,
                reply_room: int) -> list[tuple[Chunk, list[int]]]:
    """(passage, prompt ids) for every passage whose prompt leaves `reply_room` tokens of the context."""
    out = []
    for chunk in passages:
        ids = render_prompt(tokenizer, reading_prompt(chunk, question))
        if len(ids) + reply_room <= context_len:
            out.append((chunk, ids))
    return out


def read_many(engine: Engine, tokenizer: Tokenizer, questions: Sequence[tuple[str, Sequence[Chunk]]],
              max_new_tokens: int = 32, batch_size: int = 32) -> list[Reading]:
    """For each (question, its passages best first): the Reading (see the module docstring). Greedy; every
    passage of every question in batches of `batch_size` prompts."""
    T = engine.model.config.context_len
    room = min(max_new_tokens, 24)
    jobs = [(q, chunk, ids) for q, (question, passages) in enumerate(questions)
            for chunk, ids in prompts_for(tokenizer, question, passages, T, room)]
    replies = greedy_replies(engine, tokenizer, [ids for _, _, ids in jobs], max_new_tokens, batch_size)
    out = [Reading(NOT_IN_FILES, None, 0) for _ in questions]
    for (q, chunk, ids), reply in zip(jobs, replies):
        out[q].read += 1
        out[q].prompt_tokens += len(ids)
        if out[q].chunk is None and _found(reply, chunk):
            out[q].answer, out[q].chunk = reply.strip(), chunk
    return out


def greedy_replies(engine: Engine, tokenizer: Tokenizer, prompts: Sequence[list[int]], max_new_tokens: int = 32,
                   batch_size: int = 32) -> list[str]:
    """The assistant's own words (no tools run) greedily generated for each prompt, in batches."""
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    stop = reply_stop_ids(tokenizer)
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        out += [final_answer(tokenizer, ids) for ids in engine.generate(prompts[start:start + batch_size], params,
                                                                          stop_ids=stop)]
    return out
