"""Corpus sources behind one interface, and their weighted mixture.

A source yields documents (strings) for a split, "train" or "val":
- a world directory (`world:DIR`, or any DIR holding world.json): its own pretrain/{train,val}.jsonl;
- plain text files, or a folder of them: each file is one document; train is its first 90% of characters and
  val the last 10% (the Tiny Shakespeare convention);
- `.jsonl`/`.json` and `.parquet` files (or folders of them) with a `text` column, read through `datasets`, and
  `hf:NAME[:CONFIG]` from the Hugging Face hub through the very same call: every 100th record is val.
A spec string names one or more sources with weights: `runs/cpu/world*0.9,notes.txt*0.1`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Iterator

from llmlab.errors import LLMLabError

VAL_EVERY = 100  # record i is validation when i % VAL_EVERY == VAL_EVERY - 1
TEXT_VAL_FRACTION = 0.1
RECORD_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class Source:
    """A named document stream; `documents(split)` starts from the beginning on every call."""

    name: str

    def documents(self, split: str) -> Iterator[str]:
        raise NotImplementedError


def _check_split(split: str) -> None:
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")


class WorldSource(Source):
    def __init__(self, root: Path):
        self.root, self.name = root, f"world:{root}"

    def documents(self, split: str) -> Iterator[str]:
        _check_split(split)
        path = self.root / "pretrain" / f"{split}.jsonl"
        if not path.is_file():
            raise LLMLabError(f"world at {self.root} has no {path.name}: regenerate it with `llmlab world`")
        with open(path, encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)["text"]


class WorldConversations(Source):
    """The world's fine-tuning conversations (sft/{split}.jsonl): each document is a list of messages."""

    def __init__(self, root: Path):
        self.root, self.name = root, f"world:{root}"

    def documents(self, split: str) -> Iterator[list[dict]]:
        _check_split(split)
        path = self.root / "sft" / f"{split}.jsonl"
        if not path.is_file():
            raise LLMLabError(f"world at {self.root} has no sft/{path.name}: regenerate it with `llmlab world`")
        with open(path, encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)["messages"]


class TextSource(Source):
    def __init__(self, files: list[Path], name: str):
        self.files, self.name = files, name

    def documents(self, split: str) -> Iterator[str]:
        _check_split(split)
        for path in self.files:
            raw = path.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise LLMLabError(f"{path} is not UTF-8 (bad byte at offset {e.start}): convert it, e.g. with iconv") from None
            cut = int(len(text) * (1 - TEXT_VAL_FRACTION))
            piece = text[:cut] if split == "train" else text[cut:]
            if piece:
                yield piece


class RecordSource(Source):
    """Records with a `text` column through `datasets.load_dataset(..., streaming=True)`: local files and the
    hub take the same path, so the local tests cover the hub code too."""

    def __init__(self, builder: str, name: str, data_files: list[str] | None = None, config: str | None = None,
                 column: str = "text"):
        self.builder, self.name, self.data_files, self.config, self.column = builder, name, data_files, config, column

    def _dataset(self):
        import datasets  # deferred: slow to import (pyarrow, fsspec), needed only for hf: sources

        datasets.logging.set_verbosity_error()
        try:
            if self.data_files is not None:
                return datasets.load_dataset(self.builder, data_files=self.data_files, split="train", streaming=True)
            return datasets.load_dataset(self.builder, self.config, split="train", streaming=True)
        except Exception as e:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ...)
            raise LLMLabError(f"cannot load corpus {self.name}: {str(e).splitlines()[0]}") from None

    def documents(self, split: str) -> Iterator[str]:
        _check_split(split)
        want_val = split == "val"
        try:
            for i, record in enumerate(self._dataset()):
                if self.column not in record:
                    raise LLMLabError(f"corpus {self.name} has no {self.column!r} column (columns: "
                                      f"{', '.join(record)}): pass a file with a {self.column!r} column")
                if (i % VAL_EVERY == VAL_EVERY - 1) == want_val:
                    text = record[self.column]
                    if self.column == "text" and text is not None and not isinstance(text, str):
                        raise LLMLabError(f"corpus {self.name}: record {i} has a {type(text).__name__} in its "
                                          f"'text' column, not a string: {str(text)[:40]!r}")
                    if text:
                        yield text
        except LLMLabError:
            raise
        except Exception as e:  # malformed JSON lines or parquet surface while iterating
            raise LLMLabError(f"cannot read corpus {self.name}: {str(e).splitlines()[0]}") from None


def open_source(spec: str, column: str = "text") -> Source:
    """The source a spec names (see the module docstring). column="messages" reads conversations instead of
    text: the world's fine-tuning conversations, or the `messages` column of JSONL/parquet/hf: records."""
    world = WorldSource if column == "text" else WorldConversations
    if spec.startswith("hf:"):
        name, _, config = spec[3:].partition(":")
        return RecordSource(name, spec, config=config or None, column=column)
    if spec.startswith("world:"):
        root = Path(spec[6:])
        if not (root / "world.json").is_file():
            raise LLMLabError(f"no world at {root}: run `llmlab world --out_dir {root}` first")
        return world(root)
    path = Path(spec)
    if not path.exists():
        raise LLMLabError(f"corpus path {path} does not exist")
    if path.is_dir() and (path / "world.json").is_file():
        return world(path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")) if path.is_dir() else [path]
    if not files:
        raise LLMLabError(f"corpus folder {path} has no files")
    kinds = {RECORD_SUFFIXES.get(p.suffix.lower()) for p in files}
    if kinds == {None}:
        if column != "text":
            raise LLMLabError(f"{path} is plain text, which holds no conversations: give a world directory or "
                              f"JSONL/parquet records with a {column!r} column")
        return TextSource(files, spec)
    if len(kinds) == 1:
        if all(p.stat().st_size == 0 for p in files):  # (`datasets` fails on these with an IndexError)
            raise LLMLabError(f"corpus {path} is empty: its {kinds.pop()} files hold no records")
        return RecordSource(kinds.pop(), spec, data_files=[str(p) for p in files], column=column)
    raise LLMLabError(f"corpus folder {path} mixes file types: use one folder per type and mix them with commas")


def parse_corpus(spec: str, column: str = "text") -> list[tuple[Source, float]]:
    """`A*0.8,B*0.2` -> [(source A, 0.8), (source B, 0.2)]; a weight defaults to 1. column: see open_source."""
    out = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        path, star, weight = part.rpartition("*")
        if not star:
            path, weight = part, "1"
        try:
            w = float(weight)
        except ValueError:
            raise LLMLabError(f"bad weight {weight!r} in corpus spec {spec!r}: write PATH*WEIGHT") from None
        if not w > 0:
            raise LLMLabError(f"corpus weight must be positive, got {w} for {path}")
        out.append((open_source(path, column), w))
    if not out:
        raise LLMLabError("empty corpus spec: give a world dir, a file or folder, or hf:NAME")
    return out


class Mixture:
    """A deterministic weighted interleaving of sources.

    Train: infinite; at each document a seeded RNG picks a source with probability proportional to its weight,
    and a source that runs out starts over (a new epoch of it). Val: each source's val documents once, in order.
    The position is (documents drawn per source, RNG draws), so it can be restored by replaying without
    tokenizing.
    """

    def __init__(self, sources: list[tuple[Source, float]], seed: int = 0):
        self.sources = sources
        self.seed = seed

    def documents(self, split: str, skip: int = 0) -> Iterator[str]:
        """Documents of a split; train starts after `skip` documents (skipped ones are read but not returned)."""
        if split == "val":
            for source, _ in self.sources:
                yield from source.documents("val")
            return
        rng = random.Random(self.seed)
        weights = [w for _, w in self.sources]
        iters = [self._cycle(source) for source, _ in self.sources]
        n = 0
        while True:
            i = rng.choices(range(len(iters)), weights)[0] if len(iters) > 1 else 0
            doc = next(iters[i])
            if n >= skip:
                yield doc
            n += 1

    @staticmethod
    def _cycle(source: Source) -> Iterator[str]:
        while True:
            empty = True
            for doc in source.documents("train"):
                empty = False
                yield doc
            if empty:
                raise LLMLabError(f"corpus {source.name} has no documents in split train")
