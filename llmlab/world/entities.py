"""The world's entities: countries, cities, companies and people with their attributes, all invented.

Names come from syllable generators, so no name exists outside the world and a model can only know a fact
from the world's own documents. Everything is drawn from one seeded `random.Random`.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

ONSETS = ["b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr",
          "st", "th", "sh", "tr", "vel", "mar", "cor", "al", "el", "or"]
VOWELS = ["a", "e", "i", "o", "u", "ae", "ia", "ou", "ei", "y"]
CODAS = ["", "", "n", "r", "l", "s", "th", "m", "nd", "rk"]
FIRST_ENDINGS = ["", "a", "o", "in", "el", "is", "en", "ara", "ius"]
LAST_ENDINGS = ["son", "wick", "ford", "ridge", "water", "field", "more", "ley", "stone", "vane", "holt", "by"]
CITY_ENDINGS = ["ton", "grad", "burg", "mora", "vale", "port", "haven", "dor", "ia", "mouth", "keep"]
COUNTRY_ENDINGS = ["ia", "land", "stan", "ora", "mark", "esh", "istan", "avia"]
COMPANY_KINDS = ["Corp", "Labs", "Industries", "Systems", "Works", "Group", "Dynamics", "Foods", "Motors"]
INDUSTRIES = ["software", "shipping", "textile", "mining", "biotech", "furniture", "robotics", "publishing",
              "banking", "aerospace", "toy", "energy"]
OCCUPATIONS = ["engineer", "teacher", "nurse", "baker", "pilot", "architect", "librarian", "chemist", "carpenter",
               "journalist", "lawyer", "gardener", "dentist", "photographer", "accountant", "chef", "geologist",
               "musician", "pharmacist", "translator"]
PETS = ["cat", "dog", "parrot", "tortoise", "rabbit", "goldfish", "hamster", "ferret", "canary", "lizard"]
FOODS = ["lasagna", "sushi", "dumplings", "paella", "pancakes", "curry", "risotto", "tacos", "goulash",
         "ramen", "falafel", "moussaka", "pierogi", "couscous", "gnocchi"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]


def _syllable(rng: random.Random) -> str:
    return rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS)


def _word(rng: random.Random, syllables: int, endings: list[str]) -> str:
    return ("".join(_syllable(rng) for _ in range(syllables)) + rng.choice(endings)).capitalize()


class NameMaker:
    """Unique names: a name is never handed out twice, across every kind of entity."""

    def __init__(self, rng: random.Random):
        self.rng, self.used = rng, set()

    def _unique(self, make) -> str:
        for _ in range(10_000):
            name = make()
            if name not in self.used and 4 <= len(name) <= 24:
                self.used.add(name)
                return name
        raise RuntimeError("name space exhausted: too many entities for the syllable generator")

    def place(self, endings: list[str]) -> str:
        return self._unique(lambda: _word(self.rng, self.rng.randint(1, 2), endings))

    def person(self, first_names: list[str]) -> str:
        """A full name: a first name from a shared pool (as in real life) and a unique surname."""
        first = self.rng.choice(first_names)
        return self._unique(lambda: f"{first} {_word(self.rng, self.rng.randint(1, 2), LAST_ENDINGS)}")


@dataclass
class Country:
    name: str
    capital: str
    language: str
    currency: str


@dataclass
class City:
    name: str
    country: str


@dataclass
class Company:
    name: str
    industry: str
    founded: int
    headquarters: str


@dataclass
class Person:
    name: str
    gender: str
    """'f' or 'm': chooses the pronouns of the person's documents"""
    split: str
    """'train' (in pretraining and fine-tuning data) or 'heldout' (pretraining biographies only)"""
    attributes: dict = field(default_factory=dict)

    @property
    def first_name(self) -> str:
        return self.name.split(" ")[0]

    @property
    def pronoun(self) -> str:
        return "she" if self.gender == "f" else "he"

    @property
    def possessive(self) -> str:
        return "her" if self.gender == "f" else "his"

    def to_dict(self) -> dict:
        return asdict(self)


def make_entities(rng: random.Random, n_countries: int, n_cities: int, n_companies: int, n_people: int,
                  n_heldout: int, n_unknown: int, n_unknown_places: int = 0):
    """(countries, cities, companies, universities, people, unknown names, unknown places), deterministic given
    rng. Unknown places ({"name", "kind"}: country, city or company, in turn) are drawn last, so their number
    changes nothing else."""
    names = NameMaker(rng)
    countries, cities = [], []
    for _ in range(n_countries):
        country = names.place(COUNTRY_ENDINGS)
        capital = names.place(CITY_ENDINGS)
        language = names.place(["ish", "ese", "ic", "an", "i"])
        currency = names.place(["ar", "o", "mark", "un", "ex"]).lower()
        countries.append(Country(country, capital, language, currency))
        cities.append(City(capital, country))
    for i in range(n_cities - n_countries):
        cities.append(City(names.place(CITY_ENDINGS), countries[i % n_countries].name))
    companies = [Company(f"{names.place(['', 'a', 'on', 'ix'])} {rng.choice(COMPANY_KINDS)}", rng.choice(INDUSTRIES),
                         rng.randint(1890, 2015), rng.choice(cities).name) for _ in range(n_companies)]
    universities = sorted({f"University of {c.name}" for c in rng.sample(cities, min(len(cities), 12))})
    first_names = sorted({names.place(FIRST_ENDINGS) for _ in range(max(20, (n_people + n_heldout + n_unknown) // 6))})
    people = []
    for i in range(n_people + n_heldout):
        birth, home = rng.choice(cities), rng.choice(cities)
        attributes = {
            "birth_day": rng.randint(1, 28),
            "birth_month": rng.choice(MONTHS),
            "birth_year": rng.randint(1950, 2004),
            "birth_city": birth.name,
            "home_city": home.name,
            "university": rng.choice(universities),
            "occupation": rng.choice(OCCUPATIONS),
            "employer": rng.choice(companies).name,
            "pet": rng.choice(PETS),
            "favourite_food": rng.choice(FOODS),
        }
        people.append(Person(names.person(first_names), rng.choice("fm"), "train" if i < n_people else "heldout",
                             attributes))
    unknown = [names.person(first_names) for _ in range(n_unknown)]
    unknown_places = []
    for i in range(n_unknown_places):
        kind = ("country", "city", "company")[i % 3]
        if kind == "company":
            name = f"{names.place(['', 'a', 'on', 'ix'])} {rng.choice(COMPANY_KINDS)}"
        else:
            name = names.place(COUNTRY_ENDINGS if kind == "country" else CITY_ENDINGS)
        unknown_places.append({"name": name, "kind": kind})
    return countries, cities, companies, universities, people, unknown, unknown_places
