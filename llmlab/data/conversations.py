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

Length grouping (`group_batches` G > 1): G global batches' rows are rendered together, sorted by length, cut
into G batches and served in a shuffled order, so that a batch pads its rows to a length close to theirs. On the
cpu preset's mix (median 64 tokens, a few near the 128-token context) a batch of 32 drawn at random pads to 118
tokens on average, one of a group of 8 to 69: 40% fewer tokens computed for the same conversations. The order
of the group's batches comes from the position where the group starts, so it is the same on every rank.

Every rank renders the global batch of B x W fitting rows and keeps rows r, r+W, ...: the position
(conversations drawn, documents replayed, rows made) is then global, and a run resumes exactly on any number of
processes (with grouping: at the start of the group, with how many of its batches were served).
"""

from __future__ import annotations

import math
import random

import torch

from llmlab.chat import render_conversation
from llmlab.data.sources import Mixture
from llmlab.errors import LLMLabError
from llmlab.tokenizer import Tokenizer
from llmlab.training import IGNORE_INDEX


class ConversationLoader:
    def __init__(self, mixture: Mixture, tokenizer: Tokenizer, batch_size: int, seq_len: int, rank: int = 0,
                 world_size: int = 1, replay: Mixture | None = None, replay_frac: float = 0.0, group_batches: int = 1):
        if group_batches < 1:
            raise LLMLabError(f"group_batches must be at least 1 (1: no length grouping), got {group_batches}")
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
        self.G = group_batches
        self._group: list[list[tuple[list[int], list[int]]]] = []  # this rank's rows of the group's batches
        self._served = 0  # batches of the group already served
        self._group_start: dict = {}  # the position where the group started

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

    def _position(self) -> dict:
        return {"drawn": self.drawn, "skipped": self.skipped, "replayed": self.replayed, "rows": self.rows}

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (B, L) int64 with L <= T the longest row of this batch."""
        if self.G == 1:
            return collate(self._global_rows(self.B * self.world_size)[self.rank::self.world_size],
                           self.tokenizer.pad_id)
        if self._served == len(self._group):
            self._new_group()
        self._served += 1
        return collate(self._group[self._served - 1], self.tokenizer.pad_id)

    def _new_group(self) -> None:
        """Render the next G global batches' rows, sort them by length, cut them into G batches (each split
        between the ranks) and shuffle the batches' order (seeded by the group's start)."""
        self._group_start = self._position()
        n = self.B * self.world_size
        rows = sorted(self._global_rows(n * self.G), key=lambda r: len(r[0]))
        batches = [rows[i:i + n][self.rank::self.world_size] for i in range(0, len(rows), n)]
        random.Random(self._group_start["rows"]).shuffle(batches)
        self._group, self._served = batches, 0

    def _global_rows(self, count: int) -> list[tuple[list[int], list[int]]]:
        """The next `count` fitting rows of the global batch order (conversations, and replayed documents on
        their schedule)."""
        rows = []
        while len(rows) < count:
            if self._is_replay(self.rows):
                rendered = self._replay_row()
            else:
                messages = next(self._docs)
                rendered = self._render(messages, f"training conversation {self.drawn}")
                self.drawn += 1
                if rendered is None:
                    self.skipped += 1
                    continue
            rows.append(rendered)
            self.rows += 1
        return rows

    def state_dict(self) -> dict:
        """The position: mid-group, the group's start and how many of its batches were served."""
        mid_group = 0 < self._served < len(self._group)
        state = {**(self._group_start if mid_group else self._position()), "batch_size": self.B,
                 "world_size": self.world_size}
        return state | ({"group_batches": self.G, "served": self._served if mid_group else 0} if self.G > 1 else {})

    def load_state_dict(self, state: dict) -> None:
        self.drawn, self.skipped = state["drawn"], state["skipped"]
        # checkpoints from before replay existed: every row was a fitting conversation
        self.replayed, self.rows = state.get("replayed", 0), state.get("rows", self.drawn - self.skipped)
        self._docs = self.mixture.documents("train", skip=self.drawn)
        if self.replay is not None:
            self._replay_docs = self.replay.documents("train", skip=self.replayed)
        self._group, self._served = [], 0
        if state.get("served"):
            if state.get("group_batches") != self.G:
                raise LLMLabError(f"the checkpoint stopped in a group of {state.get('group_batches')} batches; "
                                  f"resume with --group_batches {state.get('group_batches')}")
            self._new_group()
            self._served = state["served"]

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
