"""World question answering for a base model, framed as `Q: <question>\nA:` (the form of the world's Q/A pages).

Groups: training people asked in a phrasing seen in pretraining (recall), training people in a held-out
phrasing (the fact, not the sentence, was learned), and held-out people whose facts were only ever in
biographies (knowledge extraction; Allen-Zhu & Li 2023, "Physics of Language Models 3.1").
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from llmlab.errors import LLMLabError
from llmlab.tasks import Example, Task, normalize

GROUP_NAMES = {
    ("train", "seen"): "train people, seen phrasing",
    ("train", "heldout"): "train people, held-out phrasing",
    ("heldout", "seen"): "held-out people (bios only)",
}


class WorldQA(Task):
    name = "world_qa"

    def __init__(self, world_dir: str | Path, per_group: int = 200, seed: int = 0):
        path = Path(world_dir) / "eval" / "qa.jsonl"
        if not path.is_file():
            raise LLMLabError(f"no world questions at {path}: run `llmlab world` first")
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        by_group: dict[str, list[Example]] = {}
        for r in rows:
            group = GROUP_NAMES.get((r["group"], r["phrasing"]))
            if group is not None:
                by_group.setdefault(group, []).append(
                    Example(prompt=f"Q: {r['question']}\nA:", answer=r["answer"], group=group,
                            meta={"person": r["person"], "attribute": r["attribute"]}))
        rng = random.Random(seed)
        self._examples = []
        for group in sorted(by_group):
            items = by_group[group]
            self._examples += rng.sample(items, min(per_group, len(items)))

    def examples(self) -> list[Example]:
        return self._examples


class WorldArithmetic(Task):
    """Arithmetic exact match, `Q: What is 347 * 29?\nA:`, grouped by in-range (1-3 digits) and larger numbers."""

    name = "world_arithmetic"

    def __init__(self, world_dir: str | Path, per_group: int = 100):
        path = Path(world_dir) / "eval" / "arithmetic.jsonl"
        if not path.is_file():
            raise LLMLabError(f"no world arithmetic at {path}: run `llmlab world` first")
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        counts: dict[str, int] = {}
        self._examples = []
        for r in rows:
            group = "in range (1-3 digits)" if r["digits"] <= 3 else "larger (4-6 digits)"
            if counts.get(group, 0) < per_group:
                counts[group] = counts.get(group, 0) + 1
                self._examples.append(Example(prompt=f"Q: {r['question']}\nA:", answer=r["answer"], group=group))

    def examples(self) -> list[Example]:
        return self._examples

    def score(self, example: Example, completion: str) -> float:
        """The number after the last `=` (the world's answers restate the problem: `328 * 15 = 4920`), or the
        whole completion when there is none."""
        return float(normalize(completion.rpartition("=")[2]) == normalize(example.answer))
