"""Custom assistants on disk: one folder each under the store's root (beside the feedback store).

    <root>/<name>/assistant.json   {"name", "instructions", "tools", "files": [{"name", "sha256", "bytes",
                                    "chunks"}], "max_words", "created"}
    <root>/<name>/files/           the knowledge files as given (what the passages cite)
    <root>/<name>/chunks.jsonl     their passages {"file", "index", "text"} (llmlab.assistants.chunks)
    <root>/<name>/adapter/         its LoRA adapter, if it has one (PEFT's files: llmlab.lora), through which the
                                   server runs its requests, batched with other assistants' and the base's

Creating reads and chunks every file before anything is written, builds the folder under a temporary name and
renames it into place: a bad file, a name taken, or a process killed midway leaves no half-made assistant.
Deleting renames the folder away first, then removes it; whoever loaded the assistant before keeps what it
loaded (a request in flight finishes), and the next lookup says it no longer exists.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llmlab.assistants.chunks import Chunk, chunk_text
from llmlab.assistants.files import MAX_BYTES, read_text
from llmlab.errors import LLMLabError
from llmlab.lora import BASE, CONFIG, WEIGHTS, read_adapter_config
from llmlab.world.reading import PASSAGE_WORDS

NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
TOOLS = ("calculator", "search", "python")
MAX_FILES = 20  # as many as a GPT takes


@dataclass
class Assistant:
    name: str
    instructions: str = ""
    tools: list[str] = field(default_factory=list)
    files: list[dict] = field(default_factory=list)
    """{"name", "sha256", "bytes", "chunks"} per knowledge file"""
    max_words: int = PASSAGE_WORDS
    """words per passage its files were cut into"""
    created: float = 0.0
    adapter: bool = False
    """whether it answers through a LoRA adapter of its own (in its folder's adapter/)"""


def check_adapter(path: str | Path) -> list[Path]:
    """The files of the LoRA adapter at `path` (PEFT's format), read and checked: its config, and weights that
    are safetensors holding an A and a B for the same layers. Whether it fits a model is the server's check."""
    from safetensors import SafetensorError, safe_open  # deferred: only assistants with an adapter read one

    config = read_adapter_config(path)
    weights = Path(path) / WEIGHTS
    try:
        with safe_open(str(weights), "pt") as f:
            keys = set(f.keys())
    except (SafetensorError, OSError) as e:
        raise LLMLabError(f"{weights} is not a safetensors file ({e})") from None
    a = {k.removesuffix(".lora_A.weight") for k in keys if k.endswith(".lora_A.weight")}
    b = {k.removesuffix(".lora_B.weight") for k in keys if k.endswith(".lora_B.weight")}
    if not a or a != b:
        raise LLMLabError(f"{weights} does not hold a LoRA adapter's A and B weights for the same layers")
    if not isinstance(config.get("r"), int) or config["r"] < 1 or not config.get("target_modules"):
        raise LLMLabError(f"{Path(path) / CONFIG}: r and target_modules are missing or invalid")
    return [Path(path) / n for n in (CONFIG, WEIGHTS, BASE) if (Path(path) / n).is_file()]


class AssistantStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _dir(self, name: str) -> Path:
        return self.root / name

    def create(self, name: str, instructions: str = "", files: list[str | Path] = (), tools: list[str] = (),
               max_words: int = PASSAGE_WORDS, max_bytes: int = MAX_BYTES, adapter: str | Path = "") -> Assistant:
        """A new assistant (see the module docstring); an LLMLabError names what is wrong, and nothing is written."""
        if not NAME.fullmatch(name):
            raise LLMLabError(f"assistant name {name!r}: use 1-64 lowercase letters, digits, '-' or '_', starting "
                              f"with a letter or digit")
        if self._dir(name).exists():
            raise LLMLabError(f"an assistant named {name!r} already exists: delete it first (`llmlab assistant "
                              f"delete {name}`) or choose another name")
        unknown = [t for t in tools if t not in TOOLS]
        if unknown:
            raise LLMLabError(f"unknown tool(s) {', '.join(unknown)}: choose from {', '.join(TOOLS)}")
        paths = [Path(f) for f in files]
        if len(paths) > MAX_FILES:
            raise LLMLabError(f"{len(paths)} knowledge files: an assistant takes at most {MAX_FILES}")
        names = [p.name for p in paths]
        if len(set(names)) < len(names):
            raise LLMLabError(f"two knowledge files share a name ({', '.join(sorted({n for n in names if names.count(n) > 1}))}): "
                              f"rename one, since answers cite files by name")
        texts = [read_text(p, max_bytes) for p in paths]  # every file checked before anything is written
        adapter_files = check_adapter(adapter) if adapter else []
        chunks = [c for p, t in zip(paths, texts) for c in chunk_text(t, p.name, max_words)]
        record = Assistant(name, instructions, list(tools), [
            {"name": p.name, "sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "bytes": p.stat().st_size,
             "chunks": sum(c.file == p.name for c in chunks)} for p in paths], max_words, time.time(), bool(adapter))
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            (tmp / "files").mkdir(parents=True)
            for p in paths:
                shutil.copyfile(p, tmp / "files" / p.name)
            if adapter_files:
                (tmp / "adapter").mkdir()
                for f in adapter_files:
                    shutil.copyfile(f, tmp / "adapter" / f.name)
            (tmp / "chunks.jsonl").write_text("".join(json.dumps(asdict(c)) + "\n" for c in chunks))
            (tmp / "assistant.json").write_text(json.dumps(asdict(record), indent=1) + "\n")
            try:
                os.rename(tmp, self._dir(name))  # fails if the name was taken meanwhile
            except OSError:
                raise LLMLabError(f"an assistant named {name!r} already exists") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return record

    def list(self) -> list[Assistant]:
        if not self.root.is_dir():
            return []
        return [self.get(d.name) for d in sorted(self.root.iterdir())
                if not d.name.startswith(".") and (d / "assistant.json").is_file()]

    def get(self, name: str) -> Assistant:
        file = self._dir(name) / "assistant.json"
        if not NAME.fullmatch(name) or not file.is_file():
            known = ", ".join(a.name for a in self.list()) or "none yet"
            raise LLMLabError(f"no assistant named {name!r} in {self.root} (assistants: {known})")
        try:
            return Assistant(**json.loads(file.read_text()))
        except (json.JSONDecodeError, TypeError) as e:
            raise LLMLabError(f"{file} is corrupt ({e}): delete the assistant and create it again") from None

    def adapter_dir(self, name: str) -> Path:
        return self._dir(name) / "adapter"

    def chunks(self, name: str) -> list[Chunk]:
        self.get(name)
        path = self._dir(name) / "chunks.jsonl"
        return [Chunk(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]

    def delete(self, name: str) -> None:
        self.get(name)
        gone = self.root / f".{name}.deleted-{os.getpid()}-{time.monotonic_ns()}"
        os.rename(self._dir(name), gone)
        shutil.rmtree(gone, ignore_errors=True)
