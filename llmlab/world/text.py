"""The world's text: sentence templates for every fact, question phrasings, and document generators.

Knowledge stored in a model is only extractable by questions when each fact was seen in varied forms
(Allen-Zhu & Li 2023, "Physics of Language Models 3.1"): so every fact has several sentence templates, names
alternate with pronouns, and the sentence order of each biography is shuffled. Question phrasings are split
into `seen` (used in the pretraining Q/A pages) and `heldout` (never in any pretraining text) so an evaluation
can tell a learned fact from a memorised sentence.
"""

from __future__ import annotations

import random

from llmlab.world.entities import Company, Country, Person

# attribute -> sentence templates; {s} is the subject (the name or a pronoun), {p} the possessive
FACT_TEMPLATES: dict[str, list[str]] = {
    "birth": ["{s} was born on {birth_month} {birth_day}, {birth_year}, in {birth_city}.",
              "{s} was born in {birth_city} on {birth_day} {birth_month} {birth_year}.",
              "{s} came into the world in {birth_city} in {birth_year}, on {birth_month} {birth_day}.",
              "{s} was born in {birth_year} in the city of {birth_city}, on {birth_month} {birth_day}."],
    "home_city": ["{s} lives in {home_city}.", "{s} now makes {p} home in {home_city}.",
                  "These days {s_low} resides in {home_city}.", "{s} has settled in {home_city}."],
    "university": ["{s} studied at the {university}.", "{s} graduated from the {university}.",
                   "{s} earned {p} degree at the {university}.", "{s} attended the {university}."],
    "occupation": ["{s} works as {a_occupation}.", "{s} is {a_occupation} by profession.",
                   "By trade, {s_low} is {a_occupation}.", "{s} earns a living as {a_occupation}."],
    "employer": ["{s} is employed by {employer}.", "{s} works for {employer}.",
                 "{s} has a job at {employer}.", "{employer} is where {s_low} works."],
    "pet": ["{s} has a pet {pet}.", "{s} keeps {a_pet} as a pet.", "{s} owns {a_pet}.",
            "At home, {s_low} looks after a pet {pet}."],
    "favourite_food": ["{p_cap} favourite food is {favourite_food}.", "{s} loves {favourite_food} more than any other food.",
                       "{s} likes {favourite_food} best.", "Above all, {s_low} enjoys eating {favourite_food}."],
}

# attribute -> question phrasings; the answer of each is `answer(person, attribute)`
QUESTIONS: dict[str, dict[str, list[str]]] = {
    "birth_city": {"seen": ["Where was {name} born?", "In which city was {name} born?", "What is the birth city of {name}?"],
                   "heldout": ["Which city is {name} originally from?", "{name} was born in which city?"]},
    "birth_year": {"seen": ["In which year was {name} born?", "What year was {name} born?"],
                   "heldout": ["{name} was born in what year?", "What is the birth year of {name}?"]},
    "birth_country": {"seen": ["In which country was {name} born?", "What is the birth country of {name}?"],
                      "heldout": ["{name} was born in which country?"]},
    "home_city": {"seen": ["Where does {name} live?", "In which city does {name} live?"],
                  "heldout": ["{name} lives in which city?", "What city is home to {name}?"]},
    "university": {"seen": ["Which university did {name} attend?", "Where did {name} study?"],
                   "heldout": ["{name} graduated from which university?", "What university did {name} go to?"]},
    "occupation": {"seen": ["What does {name} do for a living?", "What is the job of {name}?"],
                   "heldout": ["What is the occupation of {name}?", "{name} works as what?"]},
    "employer": {"seen": ["Which company does {name} work for?", "Who employs {name}?"],
                 "heldout": ["{name} is employed by which company?", "Which company employs {name}?"]},
    "pet": {"seen": ["What pet does {name} have?", "What kind of pet does {name} own?"],
            "heldout": ["Which animal does {name} keep as a pet?", "{name} owns what kind of pet?"]},
    "favourite_food": {"seen": ["What is the favourite food of {name}?", "What food does {name} like best?"],
                       "heldout": ["Which dish does {name} love most?", "{name} likes which food best?"]},
}


def fact_answer(person: Person, attribute: str, city_country: dict[str, str]) -> str:
    """The short answer to a question about `attribute` (exact-match scoring)."""
    a = person.attributes
    if attribute == "birth_country":
        return city_country[a["birth_city"]]
    return str(a[attribute])


def with_article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _values(person: Person) -> dict:
    a = person.attributes
    return dict(a, a_occupation=with_article(a["occupation"]), a_pet=with_article(a["pet"]))


def _fill(template: str, person: Person, use_name: bool) -> str:
    subject = person.name if use_name else person.pronoun.capitalize()
    values = _values(person)
    values.update(s=subject, s_low=person.name if use_name else person.pronoun,
                  p=person.possessive, p_cap=f"{person.name}'s" if use_name else person.possessive.capitalize())
    return template.format(**values)


def biography(rng: random.Random, person: Person) -> str:
    """All of a person's facts, each in a random template, in shuffled order; the first names the person."""
    facts = list(FACT_TEMPLATES)
    rng.shuffle(facts)
    sentences = []
    for i, fact in enumerate(facts):
        use_name = i == 0 or rng.random() < 0.35
        name_form = person.name if use_name and (i == 0 or rng.random() < 0.6) else person.first_name
        filled = _fill(rng.choice(FACT_TEMPLATES[fact]), person, use_name)
        sentences.append(filled.replace(person.name, name_form) if i > 0 else filled)
    return " ".join(sentences)


STORY_OPENINGS = ["One {weekday} morning, {name} woke up early in {home_city}.",
                  "It was a rainy {weekday} in {home_city}, and {name} had a long day ahead.",
                  "On a quiet {weekday}, {name} decided to take a walk around {home_city}."]
STORY_MIDDLES = ["Before leaving, {pronoun} fed {possessive} {pet} and grabbed a coffee.",
                 "At {employer}, the other staff asked {name} for help, as usual for {a_occupation}.",
                 "{name} remembered the old days at the {university} and smiled.",
                 "For lunch {pronoun} went looking for {favourite_food}, {possessive} favourite.",
                 "A letter arrived from {birth_city}, the city where {name} was born."]
STORY_ENDINGS = ["By evening, {name} was tired but happy.", "It had been a good day after all.",
                 "{name} went to bed thinking about tomorrow."]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def story(rng: random.Random, person: Person) -> str:
    values = dict(_values(person), name=person.first_name, pronoun=person.pronoun, possessive=person.possessive,
                  weekday=rng.choice(WEEKDAYS))
    parts = [rng.choice(STORY_OPENINGS)] + rng.sample(STORY_MIDDLES, 3) + [rng.choice(STORY_ENDINGS)]
    text = " ".join(p.format(**values) for p in parts)
    return text[0].upper() + text[1:]


def country_entry(rng: random.Random, c: Country, cities: list[str]) -> str:
    first = rng.choice(["{n} is a country whose capital is {cap}.", "The capital of {n} is {cap}.",
                        "{cap} is the capital city of {n}."]).format(n=c.name, cap=c.capital)
    rest = [f"People in {c.name} speak {c.language}.", f"The currency of {c.name} is the {c.currency}.",
            f"Cities of {c.name} include {', '.join(cities)}."]
    rng.shuffle(rest)
    return " ".join([first] + rest)


def city_entry(rng: random.Random, city: str, country: str, is_capital: bool) -> str:
    text = rng.choice(["{c} is a city in {k}.", "The city of {c} lies in {k}.", "{c} is located in {k}."])
    text = text.format(c=city, k=country)
    return text + (f" It is the capital of {country}." if is_capital else "")


def company_entry(rng: random.Random, c: Company) -> str:
    sentences = [f"{c.name} is a {c.industry} company.", f"{c.name} was founded in {c.founded}.",
                 f"The headquarters of {c.name} are in {c.headquarters}."]
    rng.shuffle(sentences)
    return " ".join(sentences)


def number(rng: random.Random, digits: int) -> int:
    """A number of exactly `digits` digits (0-9 for one)."""
    return rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1)


def problem(a: int, op: str, b: int) -> tuple[str, str]:
    """(question, answer) of `What is a op b?`."""
    return f"What is {a} {op} {b}?", str({"+": a + b, "-": a - b, "*": a * b}[op])


def arithmetic_problem(rng: random.Random, max_digits: int, min_digits: int = 1,
                       op: str | None = None) -> tuple[str, str, str, int]:
    """(question, answer, op, digits): `What is a op b?` with operands of min..max digits (`digits`: a's).
    Large products (4 or more digits) have both operands of min_digits..max_digits digits."""
    op = op or rng.choice(["+", "-", "*"])
    digits = rng.randint(min_digits, max_digits)
    a = number(rng, digits)
    b = number(rng, digits if op != "*" or digits <= 3 else rng.randint(min_digits, max_digits))
    if op == "*" and max_digits <= 3:
        b = rng.randint(0, 99)  # products stay learnable for a small model
    return *problem(a, op, b), op, digits


def arithmetic_document(rng: random.Random, max_digits: int = 3) -> str:
    """A worked example: a Q/A pair whose answer restates the problem (`A: 328 * 15 = 4920`, so the model
    also learns to copy numbers), or a few equations; operands of up to `max_digits` digits (in range: 3)."""
    if rng.random() < 0.5:
        q, a, _, _ = arithmetic_problem(rng, max_digits)
        return f"Q: {q}\nA: {q[8:-1]} = {a}"
    lines = []
    for _ in range(rng.randint(2, 4)):
        q, a, _, _ = arithmetic_problem(rng, max_digits)
        lines.append(f"{q[8:-1]} = {a}")
    return "\n".join(lines)


def question(person: Person, attribute: str, phrasing: str, rng: random.Random) -> str:
    return rng.choice(QUESTIONS[attribute][phrasing]).format(name=person.name)
