"""Conversation loader for fine-tuning: one conversation per row, right-padded, loss on assistant tokens only.

Each conversation is rendered by `llmlab.chat.render_conversation` into ids and a loss mask; a row holds one
conversation (no packing, so no token ever attends to another conversation), inputs are ids[:-1] and
targets ids[1:], with IGNORE_INDEX where the mask is 0 and on the padding. Padding sits at the right end
and causal attention never looks forward, so it changes nothing for the real tokens. Conversations that do
not fit the context are skipped and counted (`skipped`); a malformed one is an error naming its source.

Every rank renders the global batch of B x W fitting conversations and keeps rows r, r+W, ...: the position
(conversations drawn) is then global, and a run resumes exactly on any number of processes.
"""

from __future__ import annotations

import torch

from llmlab.chat import render_conversation
from llmlab.data.sources import Mixture
from llmlab.errors import LLMLabError
from llmlab.tokenizer import Tokenizer
from llmlab.training import IGNORE_INDEX


class ConversationLoader:
    def __init__(self, mixture: Mixture, tokenizer: Tokenizer, batch_size: int, seq_len: int, rank: int = 0,
                 world_size: int = 1):
        self.mixture, self.tokenizer = mixture, tokenizer
        self.B, self.T, self.rank, self.world_size = batch_size, seq_len, rank, world_size
        self.drawn = 0  # conversations taken from the mixture, all ranks counted
        self.skipped = 0  # too long for the context
        self._docs = mixture.documents("train")

    def _render(self, messages, where: str) -> tuple[list[int], list[int]] | None:
        try:
            return render_conversation(self.tokenizer, messages, max_len=self.T + 1)
        except LLMLabError as e:
            if "too long" in str(e):
                return None
            raise LLMLabError(f"{where}: {e}") from None

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (B, L) int64 with L <= T the longest row of this batch."""
        rows, fitting = [], 0
        while fitting < self.B * self.world_size:  # the whole global batch, so that the position is global
            messages = next(self._docs)
            rendered = self._render(messages, f"training conversation {self.drawn}")
            self.drawn += 1
            if rendered is None:
                self.skipped += 1
                continue
            if fitting % self.world_size == self.rank:
                rows.append(rendered)
            fitting += 1
        return collate(rows, self.tokenizer.pad_id)

    def state_dict(self) -> dict:
        return {"drawn": self.drawn, "skipped": self.skipped, "batch_size": self.B, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        self.drawn, self.skipped = state["drawn"], state["skipped"]
        self._docs = self.mixture.documents("train", skip=self.drawn)

    def val_batches(self, max_rows: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first max_rows fitting conversations of the val split, in batches of B (the same every call)."""
        rows = []
        for i, messages in enumerate(self.mixture.documents("val")):
            if len(rows) >= max_rows:
                break
            rendered = self._render(messages, f"validation conversation {i}")
            if rendered is not None:
                rows.append(rendered)
        if not rows:
            raise LLMLabError("no validation conversations fit the context: add some or raise context_len")
        return [collate(rows[i:i + self.B], self.tokenizer.pad_id) for i in range(0, len(rows), self.B)]


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rendered conversations -> right-padded (inputs, targets); targets are IGNORE_INDEX where not trained."""
    L = max(len(ids) for ids, _ in rows) - 1
    inputs = torch.full((len(rows), L), pad_id, dtype=torch.int64)
    targets = torch.full((len(rows), L), IGNORE_INDEX, dtype=torch.int64)
    for r, (ids, mask) in enumerate(rows):
        n = len(ids) - 1
        inputs[r, :n] = torch.tensor(ids[:-1])
        target = torch.tensor(ids[1:])
        trained = torch.tensor(mask[1:], dtype=torch.bool)
        targets[r, :n] = torch.where(trained, target, IGNORE_INDEX)
    return inputs, targets
