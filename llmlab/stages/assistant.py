"""`llmlab assistant`: custom assistants made from instructions, knowledge files and a choice of tools.

    llmlab assistant create shop --instructions "You answer questions about the shop." \
        --files runs/cpu/world/packs/handbook/handbook.md,runs/cpu/world/packs/handbook/policies.txt \
        --tools calculator,search
    llmlab assistant list
    llmlab assistant show shop            its instructions, tools and files (with their passages)
    llmlab assistant delete shop

Assistants live in --store (one folder each, beside the feedback store; llmlab.assistants.store). Files are
plain text, Markdown, JSONL ({"text"} rows) or PDF, read, checked and cut into passages when the assistant is
created (llmlab.assistants.files, .chunks); a bad file stops the command and nothing is created.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from llmlab.assistants.store import TOOLS, AssistantStore
from llmlab.errors import LLMLabError

ACTIONS = ("create", "list", "show", "delete")


@dataclass
class Config:
    action: str = "list"
    """create, list, show or delete"""
    name: str = ""
    """the assistant's name (create, show, delete): lowercase letters, digits, '-' and '_'"""
    instructions: str = ""
    """create: its instructions (the system prompt of every conversation with it)"""
    files: str = ""
    """create: its knowledge files, comma-separated (.txt, .md, .jsonl, .pdf)"""
    tools: str = ""
    """create: the tools it may use, comma-separated (calculator, search, python)"""
    max_words: int = 25
    """create: words per passage its files are cut into"""
    store: str = "runs/cpu/assistants"
    """where assistants are kept"""

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise LLMLabError(f"assistant: unknown action {self.action!r}: use one of {', '.join(ACTIONS)}")
        if self.max_words < 1:
            raise LLMLabError(f"--max_words must be positive (got {self.max_words})")


def _split(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def main(cfg: Config) -> dict:
    if cfg.action != "list" and not cfg.name:
        raise LLMLabError(f"assistant {cfg.action}: give the assistant's name (`llmlab assistant {cfg.action} NAME`)")
    store = AssistantStore(cfg.store)
    if cfg.action == "create":
        a = store.create(cfg.name, cfg.instructions, _split(cfg.files), _split(cfg.tools), cfg.max_words)
        passages = sum(f["chunks"] for f in a.files)
        print(f"assistant {a.name}: {len(a.files)} files, {passages} passages, tools: {', '.join(a.tools) or 'none'} "
              f"-> {store.root / a.name}")
        return asdict(a)
    if cfg.action == "list":
        found = store.list()
        for a in found:
            print(f"{a.name:20} {len(a.files):3} files  tools: {', '.join(a.tools) or 'none':28} "
                  f"{a.instructions[:60]}")
        if not found:
            print(f"no assistants in {store.root} yet: `llmlab assistant create NAME --files ...` makes one "
                  f"(tools: {', '.join(TOOLS)})")
        return {"assistants": [asdict(a) for a in found]}
    if cfg.action == "show":
        a = store.get(cfg.name)
        print(f"name:         {a.name}\ninstructions: {a.instructions or '(none)'}\ntools:        "
              f"{', '.join(a.tools) or 'none'}\nfiles:")
        for f in a.files:
            print(f"  {f['name']:24} {f['bytes']:>9,} bytes  {f['chunks']:4} passages  sha256 {f['sha256'][:12]}")
        return asdict(a)
    store.delete(cfg.name)
    print(f"assistant {cfg.name} deleted")
    return {"deleted": cfg.name}
