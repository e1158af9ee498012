"""Packing loader: documents -> one token stream -> fixed-length rows, resumable at an exact position.

Each document is prefixed with <|bos|> and appended to a single stream; row k is stream[k*T : k*T + T + 1]
(inputs are its first T tokens, targets its last T), so every token is a target exactly once and nothing is
dropped. Ranks share the global row sequence and rank r keeps rows r, r+W, r+2W, ...: the union of the ranks'
batches at a step is exactly the single-process batch of W times the size.

The position is (documents fed into the stream, the stream's unconsumed tail, rows emitted): a restored loader
skips the fed documents without tokenizing them and produces exactly the batches the original would have.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Sequence

import numpy as np
import torch

from llmlab.data.sources import Mixture
from llmlab.errors import LLMLabError
from llmlab.tokenizer import Tokenizer

ENCODE_DOCS, ENCODE_CHARS = 256, 1 << 20  # tokenized per call of the parallel (Rust) batch encoder, whichever first


class _Stream:
    """Rows of T+1 tokens with stride T over the bos-joined documents of a split."""

    def __init__(self, mixture: Mixture, tokenizer: Tokenizer, seq_len: int, split: str, docs_fed: int = 0,
                 tail: list[int] | None = None):
        self.tokenizer, self.T, self.split = tokenizer, seq_len, split
        self.docs = mixture.documents(split, skip=docs_fed) if split == "train" else mixture.documents(split)
        self.docs_fed = docs_fed
        self.buf: list[int] = list(tail or [])
        self.pos = 0  # start of the unconsumed tail in buf (compacted now and then, not on every row)
        self.pending: deque[list[int]] = deque()

    def _feed(self) -> bool:
        if not self.pending:
            texts, chars = [], 0
            for text in self.docs:
                texts.append(text)
                chars += len(text)
                if len(texts) >= ENCODE_DOCS or chars >= ENCODE_CHARS:
                    break
            if not texts:
                return False
            self.pending.extend(self.tokenizer.encode_batch(texts))
        self.buf.append(self.tokenizer.bos_id)
        self.buf.extend(self.pending.popleft())
        self.docs_fed += 1
        return True

    def next_row(self) -> list[int] | None:
        while len(self.buf) - self.pos < self.T + 1:
            if not self._feed():
                return None
        row = self.buf[self.pos: self.pos + self.T + 1]
        self.pos += self.T  # the row's last token starts the next row
        if self.pos > 1 << 16:
            del self.buf[: self.pos]
            self.pos = 0
        return row

    def tail(self) -> list[int]:
        return self.buf[self.pos:]


def as_batch(rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of T+1 tokens -> (inputs, targets), each (rows, T) int64."""
    batch = torch.as_tensor(np.array(rows, dtype=np.int64))
    return batch[:, :-1], batch[:, 1:]


def val_rows(next_row: Callable[[], Sequence[int] | None], max_rows: int, batch_size: int,
             seq_len: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first max_rows rows of a val split, in batches of batch_size."""
    rows = []
    while len(rows) < max_rows and (row := next_row()) is not None:
        rows.append(row)
    if not rows:
        raise LLMLabError(f"the val split has fewer than {seq_len + 1} tokens: add validation text or shorten context_len")
    return [as_batch(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]


class RowLoader:
    """What the packing loaders share: each batch takes the whole global batch of rows from the stream (so that
    the position is global), rank r keeping rows r, r+W, ... (`_next_row` and `_ran_out` are theirs)."""

    B: int
    rank: int
    world_size: int
    rows_emitted: int  # global rows taken from the stream, all ranks counted

    def _next_row(self) -> Sequence[int] | None: ...

    def _ran_out(self) -> str: ...

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (B, T) int64, of this rank."""
        rows = []
        for _ in range(self.B * self.world_size):
            row = self._next_row()
            if row is None:
                raise LLMLabError(self._ran_out())
            if self.rows_emitted % self.world_size == self.rank:
                rows.append(row)
            self.rows_emitted += 1
        return as_batch(rows)


class PackedLoader(RowLoader):
    def __init__(self, mixture: Mixture, tokenizer: Tokenizer, batch_size: int, seq_len: int, rank: int = 0,
                 world_size: int = 1, split: str = "train"):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.mixture, self.tokenizer = mixture, tokenizer
        self.B, self.T, self.rank, self.world_size, self.split = batch_size, seq_len, rank, world_size, split
        self.rows_emitted = 0
        self.stream = _Stream(mixture, tokenizer, seq_len, split)
        self._val_cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def _next_row(self) -> list[int] | None:
        return self.stream.next_row()

    def _ran_out(self) -> str:
        per_step = f"{self.world_size} processes x {self.B}" if self.world_size > 1 else f"{self.B}"
        return (f"the {self.split} split ran out of documents after {self.rows_emitted} rows ({per_step} rows per "
                f"micro-batch): use a larger corpus" + (", fewer processes" if self.world_size > 1 else "")
                + " or a smaller batch_size")

    def state_dict(self) -> dict:
        return {"docs_fed": self.stream.docs_fed, "tail": self.stream.tail(), "rows_emitted": self.rows_emitted,
                "seq_len": self.T, "batch_size": self.B, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if state["seq_len"] != self.T:
            raise LLMLabError(f"data position was saved for rows of {state['seq_len']} tokens, this run uses {self.T}")
        self.rows_emitted = state["rows_emitted"]
        self.stream = _Stream(self.mixture, self.tokenizer, self.T, self.split, state["docs_fed"], state["tail"])

    def val_batches(self, max_rows: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first max_rows rows of the val split in batches of B: the same rows on every call (cached)."""
        if self._val_cache is None:
            stream = _Stream(self.mixture, self.tokenizer, self.T, "val")
            self._val_cache = val_rows(stream.next_row, max_rows, self.B, self.T)
        return self._val_cache
