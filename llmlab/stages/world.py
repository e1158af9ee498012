"""`llmlab world`: generate the embedded default world, deterministically from a seed."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from llmlab import world
from llmlab.world import WorldConfig


@dataclass
class Config(WorldConfig):
    out_dir: str = "runs/cpu/world"
    """where the world is written (world.json, pretrain/*.jsonl, sft/*.jsonl, eval/*.jsonl)"""


def is_done(cfg: Config) -> bool:
    """Whether cfg.out_dir holds the world these settings make (its world.json records them)."""
    path = Path(cfg.out_dir) / "world.json"
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("config") == cfg.content()
    except json.JSONDecodeError:
        return False


def main(cfg: Config) -> dict:
    t0 = time.perf_counter()
    w = world.generate(cfg)
    counts = world.write(w, cfg.out_dir)
    seconds = time.perf_counter() - t0
    summary = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
    print(f"world: {len(w.group('train'))} train + {len(w.group('heldout'))} held-out people, "
          f"{len(w.unknown_people)} unknown names, {len(w.cities)} cities, {len(w.companies)} companies; "
          f"documents: {summary}; {seconds:.1f} s -> {cfg.out_dir}")
    return {"documents": counts, "people": len(w.people), "seconds": seconds}
