"""The embedded default world: a small invented universe whose ground truth is known.

`generate(cfg)` builds it in memory from a seed (same seed and config -> byte-identical files), `World.write`
puts it on disk atomically, `load(dir)` reads it back. On disk:

    world.json              seed, config, countries, cities, companies, people (with their split), unknown names
    pretrain/train.jsonl    documents {"text", "kind"}: bio, encyclopedia, story, arithmetic, qa (shuffled)
    pretrain/val.jsonl      fresh documents of every kind, never in train
    eval/qa.jsonl           {"question", "answer", "person", "attribute", "group", "phrasing"}
    eval/unknown.jsonl      questions about people who do not exist
    eval/arithmetic.jsonl   {"question", "answer", "op", "digits", "group"}: 1-3 digits (in range), 4-6 digits,
                            and 5-6 digit multiplication (both operands)
    sft/train.jsonl         fine-tuning conversations {"kind", "messages"} (llmlab.world.conversations)
    sft/val.jsonl           fresh conversations of the same kinds
    eval/assistant.jsonl    policy rows {"kind", "messages", "expect"}: unknown people, forbidden and benign
                            requests, secrets, strangers named with real first names and surnames recombined
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from llmlab.errors import LLMLabError
from llmlab.world.entities import City, Company, Country, Person, make_entities
from llmlab.world.text import (
    FACT_TEMPLATES, QUESTIONS, arithmetic_document, arithmetic_problem, biography, city_entry, company_entry,
    country_entry, fact_answer, question, story,
)

__all__ = ["World", "generate", "load", "Person", "QUESTIONS", "FACT_TEMPLATES"]


def _dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True)


@dataclass
class World:
    seed: int
    config: dict
    countries: list[Country]
    cities: list[City]
    companies: list[Company]
    universities: list[str]
    people: list[Person]
    unknown_people: list[str]

    def __post_init__(self) -> None:
        self.city_country = {c.name: c.country for c in self.cities}
        self._by_name = {p.name: p for p in self.people}

    # ---- facts and questions ------------------------------------------------------------------------

    def person(self, name: str) -> Person:
        return self._by_name[name]

    def group(self, split: str) -> list[Person]:
        return [p for p in self.people if p.split == split]

    @property
    def question_templates(self) -> dict[str, dict[str, list[str]]]:
        return QUESTIONS

    def answer(self, person: Person, attribute: str) -> str:
        return fact_answer(person, attribute, self.city_country)

    def ask(self, person: Person, attribute: str, phrasing: str, rng: random.Random) -> tuple[str, str]:
        """(question, answer) about a person's attribute in a `seen` or `heldout` phrasing."""
        return question(person, attribute, phrasing, rng), self.answer(person, attribute)

    # ---- documents -----------------------------------------------------------------------------------

    def _documents(self, rng: random.Random, counts: dict[str, int]) -> list[dict]:
        """Documents of each kind; `counts` gives bios/stories per person and totals for the rest."""
        docs = []
        people = [p for p in self.people]
        for p in people:
            docs += [{"kind": "bio", "text": biography(rng, p)} for _ in range(counts["bios_per_person"])]
            docs += [{"kind": "story", "text": story(rng, p)} for _ in range(counts["stories_per_person"])]
        cities_of = {c.name: [x.name for x in self.cities if x.country == c.name] for c in self.countries}
        capitals = {c.capital for c in self.countries}
        for _ in range(counts["encyclopedia_rounds"]):
            docs += [{"kind": "encyclopedia", "text": country_entry(rng, c, cities_of[c.name])} for c in self.countries]
            docs += [{"kind": "encyclopedia", "text": city_entry(rng, c.name, c.country, c.name in capitals)} for c in self.cities]
            docs += [{"kind": "encyclopedia", "text": company_entry(rng, c)} for c in self.companies]
        docs += [{"kind": "arithmetic", "text": arithmetic_document(rng)} for _ in range(counts["arithmetic"])]
        train_people = self.group("train")
        for _ in range(counts["qa_pages"] if train_people else 0):
            pairs = []
            for _ in range(rng.randint(2, 5)):
                q, a = self.ask(rng.choice(train_people), rng.choice(list(QUESTIONS)), "seen", rng)
                pairs.append(f"Q: {q}\nA: {a}")
            docs.append({"kind": "qa", "text": "\n\n".join(pairs)})
        rng.shuffle(docs)
        return docs

    def pretrain_documents(self) -> tuple[list[dict], list[dict]]:
        """(train, val) documents. Val draws fresh samples from a separate RNG stream, about
        `val_docs` of them, with the kinds in the same proportions."""
        cfg = self.config
        train = self._documents(random.Random(f"{self.seed}-train"), {
            "bios_per_person": cfg["bios_per_person"], "stories_per_person": cfg["stories_per_person"],
            "encyclopedia_rounds": 2, "arithmetic": cfg["n_arithmetic"], "qa_pages": cfg["qa_pages"]})
        val_rng = random.Random(f"{self.seed}-val")
        pool = self._documents(val_rng, {"bios_per_person": 1, "stories_per_person": 1, "encyclopedia_rounds": 1,
                                         "arithmetic": cfg["n_arithmetic"] // 10 + 1, "qa_pages": cfg["qa_pages"] // 10 + 1})
        train_texts = {d["text"] for d in train}
        val = [d for d in pool if d["text"] not in train_texts][: cfg["val_docs"]]
        return train, val

    def eval_rows(self) -> dict[str, list[dict]]:
        rng = random.Random(f"{self.seed}-eval")
        qa = []
        for p in self.people:
            for attribute in QUESTIONS:
                phrasings = ["seen", "heldout"] if p.split == "train" else ["seen"]
                for phrasing in phrasings:
                    q, a = self.ask(p, attribute, phrasing, rng)
                    qa.append({"question": q, "answer": a, "person": p.name, "attribute": attribute,
                               "group": p.split, "phrasing": phrasing})
        unknown = []
        for name in self.unknown_people:
            attribute = rng.choice(list(QUESTIONS))
            q = rng.choice(QUESTIONS[attribute]["seen"] + QUESTIONS[attribute]["heldout"]).format(name=name)
            unknown.append({"question": q, "person": name, "attribute": attribute})
        arithmetic = []
        for lo, hi, op, group in ((1, 3, None, "1-3 digits"), (4, 6, None, "4-6 digits"),
                                  (5, 6, "*", "5-6 digit multiplication")):
            for _ in range(100):
                q, a, op_, digits = arithmetic_problem(rng, hi, lo, op)
                arithmetic.append({"question": q, "answer": a, "op": op_, "digits": digits, "group": group})
        return {"qa": qa, "unknown": unknown, "arithmetic": arithmetic}

    # ---- disk ----------------------------------------------------------------------------------------

    def to_json(self) -> dict:
        return {"seed": self.seed, "config": self.config,
                "countries": [asdict(c) for c in self.countries], "cities": [asdict(c) for c in self.cities],
                "companies": [asdict(c) for c in self.companies], "universities": self.universities,
                "people": [p.to_dict() for p in self.people], "unknown_people": self.unknown_people}

    def write(self, out_dir: str | Path) -> dict:
        """Write every file into a temporary sibling directory, then swap it into place: a killed run never
        leaves a half-written world. Returns {kind: document count} of the training documents."""
        out_dir = Path(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "pretrain").mkdir(parents=True)
        (tmp / "eval").mkdir()
        (tmp / "sft").mkdir()
        train, val = self.pretrain_documents()
        for name, docs in (("train", train), ("val", val)):
            _write_lines(tmp / "pretrain" / f"{name}.jsonl", docs)
        for name, rows in self.eval_rows().items():
            _write_lines(tmp / "eval" / f"{name}.jsonl", rows)
        from llmlab.world.conversations import assistant_eval_rows, sft_conversations

        n_sft = self.config.get("sft_conversations", 0)
        _write_lines(tmp / "sft" / "train.jsonl", sft_conversations(self, n_sft, self.seed))
        _write_lines(tmp / "sft" / "val.jsonl", sft_conversations(self, max(n_sft // 20, 1), self.seed + 1))
        _write_lines(tmp / "eval" / "assistant.jsonl", assistant_eval_rows(self, self.seed))
        _write_lines(tmp / "world.json", [self.to_json()])  # the completion marker, written last
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


def generate(cfg) -> World:
    """The world of a `llmlab.stages.world.Config`, deterministic in (seed, config)."""
    rng = random.Random(cfg.seed)
    countries, cities, companies, universities, people, unknown = make_entities(
        rng, cfg.n_countries, cfg.n_cities, cfg.n_companies, cfg.n_people, cfg.n_heldout, cfg.n_unknown)
    return World(cfg.seed, cfg.content(), countries, cities, companies, universities, people, unknown)


def load(path: str | Path) -> World:
    path = Path(path)
    file = path / "world.json"
    if not file.is_file():
        raise LLMLabError(f"no world at {path}: run `llmlab world --out_dir {path}` first")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        return World(data["seed"], data["config"], [Country(**c) for c in data["countries"]],
                     [City(**c) for c in data["cities"]], [Company(**c) for c in data["companies"]],
                     data["universities"], [Person(**p) for p in data["people"]], data["unknown_people"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise LLMLabError(f"{file} is corrupt ({e}): regenerate it with `llmlab world`") from None
