"""The World: the invented universe's entities and what follows from them (facts, questions, documents, eval
rows). `llmlab.world` generates it from a seed, writes it to disk and loads it back."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

from llmlab.world import language
from llmlab.world.entities import City, Company, Country, Person
from llmlab.world.text import (
    QUESTIONS, arithmetic_document, arithmetic_problem, biography, city_entry, company_entry, country_entry,
    fact_answer, question, story,
)


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
    unknown_places: list[dict] = field(default_factory=list)
    """{"name", "kind"}: countries, cities and companies that do not exist"""

    def __post_init__(self) -> None:
        self.city_country = {c.name: c.country for c in self.cities}
        self._by_name = {p.name: p for p in self.people}

    # ---- facts and questions ------------------------------------------------------------------------

    def person(self, name: str) -> Person:
        return self._by_name[name]

    def group(self, split: str) -> list[Person]:
        return [p for p in self.people if p.split == split]

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
        docs += [{"kind": "arithmetic", "text": arithmetic_document(rng, self.config.get("arithmetic_digits", 3))}
                 for _ in range(counts["arithmetic"])]
        train_people = self.group("train")
        for _ in range(counts["qa_pages"] if train_people else 0):
            pairs = []
            for _ in range(rng.randint(2, 5)):
                q, a = self.ask(rng.choice(train_people), rng.choice(list(QUESTIONS)), "seen", rng)
                pairs.append(f"Q: {q}\nA: {a}")
            docs.append({"kind": "qa", "text": "\n\n".join(pairs)})
        for p in people:  # the second language (drawn last: a world without it is what it was before it)
            docs += [{"kind": "bio_l2", "text": language.biography(rng, p)} for _ in range(counts["l2_bios_per_person"])]
        for _ in range(counts["l2_qa_pages"] if train_people else 0):
            docs.append({"kind": "qa_l2", "text": language.qa_page(rng, train_people)})
        rng.shuffle(docs)
        return docs

    def pretrain_documents(self) -> tuple[list[dict], list[dict]]:
        """(train, val) documents. Val draws fresh samples from a separate RNG stream, about
        `val_docs` of them, with the kinds in the same proportions."""
        cfg = self.config
        train = self._documents(random.Random(f"{self.seed}-train"), {
            "bios_per_person": cfg["bios_per_person"], "stories_per_person": cfg["stories_per_person"],
            "encyclopedia_rounds": cfg.get("encyclopedia_rounds", 2), "arithmetic": cfg["n_arithmetic"],
            "qa_pages": cfg["qa_pages"], "l2_bios_per_person": cfg.get("l2_bios_per_person", 0),
            "l2_qa_pages": cfg.get("l2_qa_pages", 0)})
        val_rng = random.Random(f"{self.seed}-val")
        pool = self._documents(val_rng, {"bios_per_person": 1, "stories_per_person": 1, "encyclopedia_rounds": 1,
                                         "arithmetic": cfg["n_arithmetic"] // 10 + 1, "qa_pages": cfg["qa_pages"] // 10 + 1,
                                         "l2_bios_per_person": min(cfg.get("l2_bios_per_person", 0), 1),
                                         "l2_qa_pages": cfg.get("l2_qa_pages", 0) // 10})
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
                "people": [p.to_dict() for p in self.people], "unknown_people": self.unknown_people,
                "unknown_places": self.unknown_places}
