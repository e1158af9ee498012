"""`reasoning_effort` on /v1/chat/completions: a System 2 answer (llmlab.think) instead of one sampled pass.

    low     a budget of 4     a question naming a person: that many probes of the model's recall of the person
    medium  a budget of 16    first (at most 12; "I don't know who that is." for a name it cannot recall with
    high    a budget of 64    confidence); any other question: that many sampled replies, tools run in each, and
                              the most common answer (self-consistency)

The thinking runs in the scheduler's thread between decode steps (`Scheduler.call`), so other requests wait
while one request thinks: a single-user laptop server's trade. The verify threshold is calibrated on first use
from the world's people (half the training and held-out people, 2% let through below it). The response reports
the compute in `usage.completion_tokens_details.reasoning_tokens` (tokens sampled while thinking) and an
extension field `reasoning`: strategy, budget, tokens processed, FLOPs and the candidates weighed.
"""

from __future__ import annotations

import threading

from llmlab.engine import Engine
from llmlab.model import GPT
from llmlab.think.strategies import Answer, Thinker

EFFORTS = {"low": 4, "medium": 16, "high": 64}


class Reasoner:
    """The served model's Thinker, made on first use (inside the scheduler thread, where the model may run)."""

    def __init__(self, tok, world: str, recall: str, run_tool, max_new_tokens: int):
        self.tok, self.world, self.recall, self.run_tool = tok, world, recall, run_tool
        self.max_new_tokens = max_new_tokens
        self._thinker: Thinker | None = None
        self._lock = threading.Lock()

    def answer(self, model: GPT, messages: list[dict], effort: str, seed: int) -> tuple[Answer, str, int]:
        """(the answer, the strategy, the budget) for `messages` at `effort` (Thinker.respond)."""
        with self._lock:
            if self._thinker is None:
                self._thinker = Thinker(Engine(model), self.tok, temperature=1.0, max_new_tokens=self.max_new_tokens,
                                        seed=seed, run_tool=self.run_tool, world=self.world, recall=self.recall)
            return self._thinker.respond(messages, EFFORTS[effort], seed)
