"""Conversation loader for fine-tuning: one conversation per row, right-padded, loss on assistant tokens only.

Each conversation is rendered by `llmlab.chat.render_conversation` into ids and a loss mask; a row holds one
conversation (no packing, so no token ever attends to another conversation), inputs are ids[:-1] and
targets ids[1:], with IGNORE_INDEX where the mask is 0 and on the padding. Padding sits at the right end
and causal attention never looks forward, so it changes nothing for the real tokens. Conversations that do
not fit the context are skipped and counted (`skipped`); a malformed one is an error naming its source.

Replay: with a `replay` mixture of pretraining documents, a `replay_frac` share of the rows (every 1/frac-th
row, on a fixed schedule) is a pretraining document, `<|bos|>` + its tokens cut to the context, trained on every
token. Fine-tuning for many steps on conversations about some facts wears away facts it never rehearses (on the
cpu preset, 1,500 steps took held-out people's birth cities, ranked by likelihood after "<name> was born in",
from 98% to 40%); rereading a little of the pretraining data keeps them, as mixing pretraining data into
fine-tuning does in the large recipes.

Every rank renders the global batch of B x W fitting rows and keeps rows r, r+W, ...: the position
(conversations drawn, documents replayed, rows made) is then global, and a run resumes exactly on any number of
processes.
"""

from __future__ import annotations

import math

import torch

from llmlab.chat import render_conversation
from llmlab.data.sources import Mixture
from llmlab.errors import LLMLabError
from llmlab.tokenizer import Tokenizer
from llmlab.training import IGNORE_INDEX


class ConversationLoader:
    def __init__(self, mixture: Mixture, tokenizer: Tokenizer, batch_size: int, seq_len: int, rank: int = 0,
                 world_size: int = 1, replay: Mixture | None = None, replay_frac: float = 0.0):
        if not 0.0 <= replay_frac < 1.0:
            raise LLMLabError(f"replay_frac must be in [0, 1), got {replay_frac}")
        if replay_frac > 0 and replay is None:
            raise LLMLabError("replay_frac > 0 needs a replay corpus of pretraining documents")
        self.mixture, self.tokenizer = mixture, tokenizer
        self.B, self.T, self.rank, self.world_size = batch_size, seq_len, rank, world_size
        self.replay, self.replay_frac = replay, replay_frac
        self.drawn = 0  # conversations taken from the mixture, all ranks counted
        self.skipped = 0  # too long for the context
        self.replayed = 0  # pretraining documents taken from the replay mixture
        self.rows = 0  # rows made, all ranks counted
        self._docs = mixture.documents("train")
        self._replay_docs = replay.documents("train") if replay is not None else None

    def _is_replay(self, row: int) -> bool:
        """Row `row` (global count) is a pretraining document: rows frac, 2 frac, ... spread evenly."""
        f = self.replay_frac
        return f > 0 and math.floor((row + 1) * f) > math.floor(row * f)

    def _replay_row(self) -> tuple[list[int], list[int]]:
        text = next(self._replay_docs)
        self.replayed += 1
        ids = ([self.tokenizer.bos_id] + self.tokenizer.encode(text))[: self.T + 1]
        return ids, [1] * len(ids)

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
            if self._is_replay(self.rows):
                rendered = self._replay_row()
            else:
                messages = next(self._docs)
                rendered = self._render(messages, f"training conversation {self.drawn}")
                self.drawn += 1
                if rendered is None:
                    self.skipped += 1
                    continue
            if fitting % self.world_size == self.rank:
                rows.append(rendered)
            fitting += 1
            self.rows += 1
        return collate(rows, self.tokenizer.pad_id)

    def state_dict(self) -> dict:
        return {"drawn": self.drawn, "skipped": self.skipped, "replayed": self.replayed, "rows": self.rows,
                "batch_size": self.B, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        self.drawn, self.skipped = state["drawn"], state["skipped"]
        # checkpoints from before replay existed: every row was a fitting conversation
        self.replayed, self.rows = state.get("replayed", 0), state.get("rows", self.drawn - self.skipped)
        self._docs = self.mixture.documents("train", skip=self.drawn)
        if self.replay is not None:
            self._replay_docs = self.replay.documents("train", skip=self.replayed)

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
