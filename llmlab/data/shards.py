"""Pre-tokenised token shards: the packed stream of a corpus written once, read memory-mapped.

`write_shards` tokenizes a corpus's train stream (the same `<|bos|>`-joined documents, in the same order, as
`PackedLoader` builds on the fly) up to a number of tokens, and its whole val split, into flat files of uint16
tokens (uint32 for vocabularies over 65,536) of whole documents each, `train-00000.bin`, ..., and `index.json`.
Writing resumes after the last complete shard. `ShardLoader` reads row k of a split as stream[k*T : k*T + T + 1]
across the files, exactly the rows `PackedLoader` makes (the same rank slicing, the same global position), so a
GPU never waits for the tokenizer and a run gives the same batches either way.
"""

from __future__ import annotations

import hashlib
import json
from collections import deque
from itertools import count, islice
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from llmlab.data.loader import ENCODE_DOCS, RowLoader, val_rows
from llmlab.data.sources import Mixture
from llmlab.errors import LLMLabError
from llmlab.fileio import write_atomic
from llmlab.tokenizer import Tokenizer

INDEX = "index.json"
FORMAT = "llmlab token shards v1"


def tokenizer_digest(tokenizer: Tokenizer) -> str:
    return hashlib.sha256(tokenizer.hf.to_str().encode()).hexdigest()


def is_shard_dir(path: str | Path) -> bool:
    index = Path(path) / INDEX
    try:
        return index.is_file() and json.loads(index.read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def _dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def write_shards(mixture: Mixture, tokenizer: Tokenizer, out_dir: str | Path, train_tokens: int, seed: int,
                 corpus: str, shard_tokens: int = 1 << 26, progress: Callable[[int], None] | None = None) -> dict:
    """Write (or finish writing) the shards of `mixture` and return the index. Train: whole documents until the
    stream holds at least `train_tokens` tokens; val: every document. A shard closes at the first document end
    past `shard_tokens`; the index is rewritten after each, so a killed run resumes after the last one.
    `progress(tokens)` is told of the tokens written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    digest, dtype = tokenizer_digest(tokenizer), _dtype(tokenizer.vocab_size)
    fresh = {"format": FORMAT, "corpus": corpus, "seed": seed, "tokenizer_sha256": digest,
             "vocab_size": tokenizer.vocab_size, "dtype": dtype.name, "train_tokens": train_tokens,
             "splits": {"train": {"shards": [], "tokens": 0, "docs": 0, "done": False},
                        "val": {"shards": [], "tokens": 0, "docs": 0, "done": False}}}
    index = json.loads((out / INDEX).read_text()) if (out / INDEX).is_file() else fresh
    same = {k: index.get(k) for k in ("format", "corpus", "seed", "tokenizer_sha256", "train_tokens")}
    if same != {k: fresh[k] for k in same}:
        raise LLMLabError(f"{out} holds shards of another corpus, seed, tokenizer or length ({same}): "
                          f"give another --out_dir, or delete it to write these")
    def save_index() -> None:
        write_atomic(out / INDEX, (json.dumps(index, indent=1) + "\n").encode())

    for split in ("train", "val"):
        state = index["splits"][split]
        if state["done"]:
            continue
        if split == "val":  # small: written again from the start when it was cut off
            state.update(shards=[], tokens=0, docs=0)
        docs = mixture.documents(split, skip=state["docs"]) if split == "train" else mixture.documents("val")
        pending: deque[list[int]] = deque()
        buf: list[int] = []

        def close(done: bool) -> None:
            name = f"{split}-{len(state['shards']):05d}.bin"
            write_atomic(out / name, np.asarray(buf, dtype=dtype).tobytes())
            state["shards"].append({"file": name, "tokens": len(buf)})
            state["tokens"] += len(buf)
            state["done"] = done
            save_index()
            if progress:
                progress(len(buf))

        while True:
            if not pending:  # the next documents, tokenized together as the packing loader does
                texts = list(islice(docs, ENCODE_DOCS))
                if not texts:
                    break  # (val: its end; train never ends)
                pending.extend(tokenizer.encode_batch(texts))
            buf.append(tokenizer.bos_id)
            buf.extend(pending.popleft())
            state["docs"] += 1
            done = split == "train" and state["tokens"] + len(buf) >= train_tokens
            if len(buf) >= shard_tokens or done:
                close(done)
                buf = []
                if done:
                    break
        if split == "val":
            if not buf and not state["shards"]:
                raise LLMLabError(f"corpus {corpus} has no val documents: shards need a val split")
            if buf:
                close(True)
            else:
                state["done"] = True
                save_index()
    return index


class _Tokens:
    """The token stream of one split, across its memory-mapped shard files."""

    def __init__(self, folder: Path, index: dict, split: str):
        shards = index["splits"][split]["shards"]
        self.maps = [np.memmap(folder / s["file"], dtype=index["dtype"], mode="r") for s in shards]
        for m, s in zip(self.maps, shards):
            if len(m) != s["tokens"]:
                raise LLMLabError(f"{folder / s['file']}: {len(m)} tokens, the index says {s['tokens']}: "
                                  f"the shards are damaged; write them again with `llmlab tokenize`")
        self.starts = np.cumsum([0] + [len(m) for m in self.maps])
        self.total = int(self.starts[-1])

    def slice(self, start: int, stop: int) -> np.ndarray:
        parts, at = [], start
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        while at < stop:
            local = at - int(self.starts[i])
            take = min(stop - at, len(self.maps[i]) - local)
            parts.append(self.maps[i][local:local + take])
            at += take
            i += 1
        return np.concatenate(parts).astype(np.int64)


class ShardLoader(RowLoader):
    """`PackedLoader` over shards written by `write_shards` (the same rows, rank slicing and position)."""

    def __init__(self, folder: str | Path, tokenizer: Tokenizer, batch_size: int, seq_len: int, seed: int,
                 rank: int = 0, world_size: int = 1, split: str = "train"):
        self.folder = Path(folder)
        try:
            self.index = json.loads((self.folder / INDEX).read_text())
            finished = all(self.index["splits"][s]["done"] for s in ("train", "val"))
            missing = {"tokenizer_sha256", "seed", "dtype"} - set(self.index)
        except (OSError, ValueError, KeyError, TypeError) as e:
            missing, finished = {repr(e)}, False
        if missing:
            raise LLMLabError(f"{self.folder / INDEX} is damaged or not a shard index (missing {sorted(missing)}): "
                              f"write the shards again with `llmlab tokenize`")
        if not finished:
            raise LLMLabError(f"the shards in {folder} are not finished (`llmlab tokenize` was stopped): run it again "
                              f"with the same flags to finish them")
        if self.index["tokenizer_sha256"] != tokenizer_digest(tokenizer):
            raise LLMLabError(f"the shards in {folder} were written with another tokenizer than this run's: "
                              f"tokenize the corpus again with it")
        if self.index["seed"] != seed:
            raise LLMLabError(f"the shards in {folder} hold the corpus mixed with --seed {self.index['seed']}, this "
                              f"run has --seed {seed}: use that seed, or tokenize again with this one")
        self.B, self.T, self.rank, self.world_size, self.split = batch_size, seq_len, rank, world_size, split
        self.tokens = _Tokens(self.folder, self.index, split)
        self.rows_emitted = 0
        self._val_cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def _row(self, k: int) -> np.ndarray | None:
        start = k * self.T
        return self.tokens.slice(start, start + self.T + 1) if start + self.T + 1 <= self.tokens.total else None

    def _next_row(self) -> np.ndarray | None:
        return self._row(self.rows_emitted)

    def _ran_out(self) -> str:
        return (f"the shards in {self.folder} hold {self.tokens.total:,} {self.split} tokens, {self.rows_emitted} rows "
                f"of {self.T}: this run needs more; tokenize more (`llmlab tokenize --train_tokens`)")

    def state_dict(self) -> dict:
        return {"rows_emitted": self.rows_emitted, "seq_len": self.T, "batch_size": self.B,
                "world_size": self.world_size, "shards": str(self.folder)}

    def load_state_dict(self, state: dict) -> None:
        if "rows_emitted" not in state or "shards" not in state:
            raise LLMLabError("this checkpoint's data position is not one of token shards: resume it with the corpus "
                              "it was trained on")
        if state["seq_len"] != self.T:
            raise LLMLabError(f"data position was saved for rows of {state['seq_len']} tokens, this run uses {self.T}")
        self.rows_emitted = state["rows_emitted"]

    def val_batches(self, max_rows: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first max_rows rows of the val split in batches of B (cached)."""
        if self._val_cache is None:
            k = count()
            self._val_cache = val_rows(lambda: self._row(next(k)), max_rows, self.B, self.T)
        return self._val_cache
