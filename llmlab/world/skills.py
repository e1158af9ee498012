"""The assistant's skills beyond people: questions about places and companies, small talk, and the python tool.

Each skill is a generator of (question, answer) material with exact ground truth, used twice: by
llmlab.world.conversations to write fine-tuning conversations, and by the world's evaluation rows, which ask
other instances (other entities, held-out phrasings, other words, numbers and dates).

    places      the capital, language and currency of a country, the country of a city, the industry, founding
                year and headquarters of a company: the facts of the world's encyclopedia entries. A quarter of
                the cities, companies and countries (`place_split`) never appear in fine-tuning, so asking about
                them measures what the assistant extracts from pretraining, as held-out people do
    small talk  greetings, thanks, goodbyes and "what can you do?": answered in kind, never refused
    python      counting the letters of a word, sorting numbers, days between two dates, the weekday of a date,
                and arithmetic "with python": a one-line program whose printed output the answer then states.
                The tool does the work; the model only copies the question's words, numbers or dates into the
                program and the output into its answer
"""

from __future__ import annotations

import datetime
import random

from llmlab.world.entities import Company, Country
from llmlab.world.text import number

# ------------------------------------------------------------------------------------------------------ places
# (entity kind, attribute) -> question phrasings, `seen` in fine-tuning and `heldout` (never in any data); the
# answer of each is a sentence in the form of the encyclopedia's, so the fact is said the way it was read.
PLACE_QUESTIONS: dict[tuple[str, str], dict[str, list[str]]] = {
    ("country", "capital"): {"seen": ["What is the capital of {name}?", "Which city is the capital of {name}?",
                                      "What is the capital city of {name}?", "Tell me the capital of {name}.",
                                      "Which city is {name}'s capital?",
                                      "{name}'s capital is which city?", "Do you know the capital of {name}?"],
                             "heldout": ["{name} has which city as its capital?", "Name the capital city of {name}."]},
    ("country", "language"): {"seen": ["What language do people speak in {name}?", "Which language is spoken in {name}?",
                                       "What is the language of {name}?", "Which language do people in {name} use?",
                                       "Tell me the language of {name}.",
                                       "{name} speaks which language?", "Do you know the language of {name}?"],
                              "heldout": ["What do people in {name} speak?", "The people of {name} speak which language?"]},
    ("country", "currency"): {"seen": ["What is the currency of {name}?", "Which currency is used in {name}?",
                                       "What currency does {name} use?", "Tell me the currency of {name}.",
                                       "What is the money of {name} called?",
                                       "{name} uses which currency?", "Do you know the currency of {name}?"],
                              "heldout": ["What money do people use in {name}?", "{name} pays with which currency?"]},
    ("city", "country"): {"seen": ["In which country is {name}?", "Which country is {name} in?",
                                   "What country is {name} in?", "Where is {name}?", "In what country does {name} lie?",
                                   "{name} is in which country?", "Do you know where {name} is?"],
                          "heldout": ["{name} lies in which country?", "Where is the city of {name}?"]},
    ("company", "industry"): {"seen": ["What kind of company is {name}?", "What does {name} do?",
                                       "What industry is {name} in?", "What is {name}'s business?",
                                       "Tell me what {name} does.",
                                       "{name} works in which line of business?", "Do you know what {name} does?"],
                              "heldout": ["Which industry is {name} in?", "What business is {name} in?"]},
    ("company", "founded"): {"seen": ["When was {name} founded?", "In which year was {name} founded?",
                                      "What year was {name} founded?", "When did {name} start?",
                                      "Tell me when {name} was founded.",
                                      "{name} dates from which year?", "Do you know when {name} was founded?"],
                             "heldout": ["{name} was founded in which year?", "What year did {name} start?"]},
    ("company", "headquarters"): {"seen": ["Where are the headquarters of {name}?", "Where is {name} based?",
                                           "Where is {name} headquartered?", "In which city is {name} based?",
                                           "Tell me where {name} has its headquarters.",
                                           "{name} is based in which city?", "Do you know where {name} is based?"],
                                  "heldout": ["In which city is {name} headquartered?", "Which city is home to {name}?"]},
}
PLACE_ANSWERS = {
    ("country", "capital"): "The capital of {name} is {a}.", ("country", "language"): "People in {name} speak {a}.",
    ("country", "currency"): "The currency of {name} is the {a}.", ("city", "country"): "{name} is a city in {a}.",
    ("company", "industry"): "{name} is {article} {a} company.", ("company", "founded"): "{name} was founded in {a}.",
    ("company", "headquarters"): "The headquarters of {name} are in {a}.",
}
UNKNOWN_PLACE_ANSWERS = {"country": "I don't know a country called {name}.", "city": "I don't know a city called {name}.",
                         "company": "I don't know a company called {name}."}


def place_split(names: list[str]) -> tuple[list[str], list[str]]:
    """(fine-tuned, pretraining only): every fourth name is held out of fine-tuning."""
    return [n for i, n in enumerate(names) if i % 4 != 3], [n for i, n in enumerate(names) if i % 4 == 3]


def place_fact(entity: Country | Company | tuple[str, str], kind: str, attribute: str) -> str:
    """The short answer; a city is (name, country)."""
    if kind == "city":
        return entity[1]
    return str(getattr(entity, attribute))


def place_question(rng: random.Random, kind: str, attribute: str, name: str, phrasing: str) -> str:
    return rng.choice(PLACE_QUESTIONS[(kind, attribute)][phrasing]).format(name=name)


def place_answer(kind: str, attribute: str, name: str, fact: str) -> str:
    article = "an" if fact[:1] in "aeiou" else "a"
    return PLACE_ANSWERS[(kind, attribute)].format(name=name, a=fact, article=article)


def unknown_place_question(rng: random.Random, kind: str, name: str,
                           phrasings: tuple[str, ...] = ("seen", "heldout")) -> str:
    """A question about the place `name` of `kind` in one of `phrasings`: fine-tuning asks in the seen ones only
    (asked unknown places in the held-out ones too, the assistant learnt that a held-out phrasing means "I don't
    know a country called ...": 44% right on known places asked so), the evaluation in both."""
    attributes = [a for k, a in PLACE_QUESTIONS if k == kind]
    return place_question(rng, kind, rng.choice(attributes), name, rng.choice(phrasings))


# -------------------------------------------------------------------------------------------------- small talk
# (user message, reply); the eval asks the held-out messages, which fine-tuning never shows
SMALL_TALK_SEEN = [
    ("Hello!", "Hello! How can I help you today?"), ("Hi", "Hi! What would you like to know?"),
    ("Hi!", "Hi! What would you like to know?"), ("Hey there!", "Hello! How can I help you today?"),
    ("Hey!", "Hello! How can I help you today?"), ("Hello, anyone there?", "Yes, I'm here. How can I help?"),
    ("Good morning!", "Good morning! How can I help?"), ("Good day.", "Good day! How can I help?"),
    ("How are you?", "I'm well, thank you. What can I do for you?"),
    ("How are you doing today?", "I'm well, thank you. What can I do for you?"),
    ("What's up?", "Not much! What can I do for you?"), ("Thanks!", "You're welcome!"),
    ("Thank you very much.", "You're welcome! Anything else?"), ("Many thanks.", "You're welcome!"),
    ("Bye!", "Goodbye! Have a nice day."), ("See you!", "See you! Have a nice day."),
    ("Goodbye!", "Goodbye! Have a nice day."), ("Good night!", "Good night! Sleep well."),
    ("What can you do?", "I can answer questions about the people, places and companies I read about, and I can "
                         "use a calculator and Python."),
    ("How can you help me?", "I can answer questions about the people, places and companies I read about, and I "
                             "can use a calculator and Python."),
    ("Could you help me with something?", "Of course! What do you need?"),
    ("What do you do?", "I answer questions about the people, places and companies I read about, and I can use "
                        "a calculator and Python."),
    ("Tell me about your skills.", "I answer questions about the people, places and companies I read about, and I "
                                   "can use a calculator and Python."),
    ("I have a question.", "Sure, go ahead!"), ("Nice to meet you.", "Nice to meet you too! How can I help?"),
    ("That was helpful.", "I'm glad it helped!"), ("Great, thank you!", "You're welcome!"),
    ("Ok.", "Anything else I can help with?"), ("Cool!", "Glad you like it! Anything else?"),
    ("How are things?", "I'm well, thank you. What can I do for you?"),
    ("How's your day?", "I'm well, thank you. What can I do for you?"),
    ("Hi, how are you doing?", "I'm well, thank you. What can I do for you?"),
    ("Yo!", "Hi! What would you like to know?"), ("Greetings!", "Hello! How can I help you today?"),
    ("Cheers!", "You're welcome!"), ("Take care!", "Goodbye! Have a nice day."),
    ("Morning!", "Good morning! How can I help?"), ("Hiya!", "Hi! What would you like to know?"),
    ("Howdy!", "Hello! How can I help you today?"), ("Hello there.", "Hello! How can I help you today?"),
    ("Good to see you!", "Hello! How can I help you today?"),
    ("How have you been?", "I'm well, thank you. What can I do for you?"),
    ("How's everything?", "I'm well, thank you. What can I do for you?"), ("Thanks so much!", "You're welcome!"),
    ("Thank you kindly.", "You're welcome!"), ("Much appreciated.", "You're welcome!"),
    ("Bye for now!", "Goodbye! Have a nice day."), ("Have a good day!", "Goodbye! Have a nice day."),
    ("Pleased to meet you.", "Nice to meet you too! How can I help?"),
    ("What else can you do?", "I can answer questions about the people, places and companies I read about, and I "
                              "can use a calculator and Python."),
    ("Can I ask you something?", "Sure, go ahead!"),
]
SMALL_TALK_HELDOUT = ["Hi there!", "Hello", "hey", "Good evening!", "Good afternoon.", "How is it going?",
                      "Thanks a lot!", "Thank you!", "Goodbye.", "See you later!", "Can you help me?",
                      "What are you able to do?", "Great, thanks.", "Nice to meet you!", "Hello, how are you?"]
# What each reply of SMALL_TALK_SEEN answers, and what each held-out message asks: a reply suits a message when
# they share an intent ("You're welcome!" is no answer to "hey"); the gold scorer's notion of right small talk
_REPLY_INTENT = {
    "Hello! How can I help you today?": "greeting", "Hi! What would you like to know?": "greeting",
    "Yes, I'm here. How can I help?": "greeting", "Good morning! How can I help?": "greeting",
    "Good day! How can I help?": "greeting", "Nice to meet you too! How can I help?": "greeting",
    "I'm well, thank you. What can I do for you?": "how are you", "Not much! What can I do for you?": "how are you",
    "You're welcome!": "thanks", "You're welcome! Anything else?": "thanks", "I'm glad it helped!": "thanks",
    "Glad you like it! Anything else?": "thanks", "Anything else I can help with?": "thanks",
    "Goodbye! Have a nice day.": "goodbye", "See you! Have a nice day.": "goodbye",
    "Good night! Sleep well.": "goodbye", "Of course! What do you need?": "help", "Sure, go ahead!": "help",
    "I can answer questions about the people, places and companies I read about, and I can use a calculator and "
    "Python.": "skills",
    "I answer questions about the people, places and companies I read about, and I can use a calculator and "
    "Python.": "skills",
}
_HELDOUT_INTENTS = {
    "Hi there!": ("greeting",), "Hello": ("greeting",), "hey": ("greeting",), "Good evening!": ("greeting",),
    "Good afternoon.": ("greeting",), "How is it going?": ("how are you",), "Thanks a lot!": ("thanks",),
    "Thank you!": ("thanks",), "Goodbye.": ("goodbye",), "See you later!": ("goodbye",),
    "Can you help me?": ("help", "skills"), "What are you able to do?": ("skills",), "Great, thanks.": ("thanks",),
    "Nice to meet you!": ("greeting",), "Hello, how are you?": ("greeting", "how are you"),
}


_SEEN_REPLY = dict(SMALL_TALK_SEEN)
_REPLIES_OF: dict[str, frozenset[str]] = {intent: frozenset(r for r, i in _REPLY_INTENT.items() if i == intent)
                                          for intent in set(_REPLY_INTENT.values())}


def small_talk_replies(message: str) -> frozenset[str]:
    """The world's replies that suit a small-talk `message` (seen or held-out): those of its intent(s); empty
    for a message that is not small talk."""
    seen = _SEEN_REPLY.get(message)
    intents = (_REPLY_INTENT[seen],) if seen is not None else _HELDOUT_INTENTS.get(message, ())
    return frozenset().union(*(_REPLIES_OF[i] for i in intents))

# ------------------------------------------------------------------------------------------------ python tasks
PYTHON_TASKS = ("count letters", "sort numbers", "days between dates", "day of the week", "compute with python")
PYTHON_TASK_WEIGHTS = (6, 2, 1, 1, 1)
"""how often fine-tuning asks each task: the two whose call copies a word or a list of numbers from the question
more often than the date and arithmetic tasks, whose formats are more regular. A word is one token, and a model
of the cpu preset's size writes it into a call only once fine-tuning has shown it that word's call several times
(it does not copy a word it was never shown: the card's "words new to fine-tuning"): right about 60% of the
time for words shown 1-3 times, 100% from 8 on. At 2 (the cpu preset: a word shown 4 times on average) 72-83%
of the counts were right, at 6 (12 times) 95-96%; sorting at 4 instead of 2 (counting at 6 instead of 4) was no
better (73.5% / 62% against 90% / 57% on the same two base models: its copies hang on the draw more than on the
count)"""
_ASK = {
    "count letters": {"seen": ["How many letters are in the word {w}?", "Count the letters in {w}.",
                               "How many letters does {w} have?", "Use python to count the letters in {w}.",
                               "What is the length of the word {w}?", "How many letters does the word {w} have?",
                               "Tell me how many letters {w} has.", "Give me the number of letters in {w}."],
                      "heldout": ["How long is the word {w}, in letters?", "Use python to count the letters of {w}."]},
    "sort numbers": {"seen": ["Sort these numbers from smallest to largest: {xs}.", "Put {xs} in increasing order.",
                              "Sort {xs}.", "Use python to sort these numbers: {xs}.",
                              "Order {xs} from small to large.", "Sort the numbers {xs}.",
                              "Arrange {xs} from smallest to largest."],
                     "heldout": ["Use python to sort {xs}.", "Order these from low to high: {xs}."]},
    "days between dates": {"seen": ["How many days from {a} to {b}?", "Days between {a} and {b}?",
                                    "Count the days from {a} to {b}.", "Days from {a} until {b}?",
                                    "How many days between {a} and {b}?",
                                    # (every task has a "Use python to ..." phrasing: with the weekday's alone, "Use
                                    # python to count the days from ..." drew the weekday's program)
                                    "Use python to get the number of days between {a} and {b}."],
                           "heldout": ["Use python to count the days from {a} to {b}.", "What is the number of days from {a} to {b}?"]},
    "day of the week": {"seen": ["What day of the week was {a}?", "Which weekday was {a}?", "What weekday is {a}?",
                                 "Use python to tell the weekday of {a}.", "Which day of the week is {a}?",
                                 "On what day did {a} fall?", "Which day of the week did {a} fall on?",
                                 "{a} was which day of the week?"],
                        "heldout": ["Use python to find the weekday of {a}.", "On which day of the week did {a} fall?"]},
    "compute with python": {"seen": ["Use python to compute {x} {op} {y}.", "Compute {x} {op} {y} with python.",
                                     "Use python: what is {x} {op} {y}?", "Run {x} {op} {y} in python.",
                                     "With python, compute {x} {op} {y}."],
                            "heldout": ["Run python to work out {x} {op} {y}.", "With python, what is {x} {op} {y}?"]},
}


def _date(rng: random.Random) -> datetime.date:
    return datetime.date(rng.randint(1950, 2030), 1, 1) + datetime.timedelta(days=rng.randint(0, 364))


def python_task(rng: random.Random, task: str, phrasing: str, words: list[str]) -> dict:
    """{"question", "code", "output", "answer" (the reply), "expect" (what a right reply contains)} for `task`;
    `output` is what the sandbox prints, `words` the words to count the letters of."""
    ask = rng.choice(_ASK[task][phrasing])
    if task == "count letters":
        w = rng.choice(words)
        out = str(len(w))
        # " {w}" keeps the word the single token it is in the question (a quote before it splits it into
        # pieces the model must spell out); the copy is then one token, the count a lookup the model can learn.
        return {"question": ask.format(w=w), "code": f'print(len(" {w}".strip()))',
                "output": out + "\n",
                "answer": f"It has {out} letters.", "expect": out}
    if task == "sort numbers":
        xs = [number(rng, rng.randint(1, 2)) for _ in range(rng.randint(3, 5))]
        listed = ", ".join(map(str, sorted(xs)))
        # "( 5, 97, 3)": the numbers' tokens then read exactly as the question's " 5, 97, 3" (digits are single
        # tokens), so the call is a copy of a stretch of the question (the list as Python writes it, "[5, 97, 3]",
        # started differently and drew miscopies: "5" -> "55", a number dropped or repeated); a tuple, not a list
        # with that space, "[ 5, 97, 3]", because "[" opens a citation in every
        # reading conversation ("22:40 [timetable.md#3]"), and after "sorted([" the assistant wrote one
        # ("sorted([do.md#ument#6]e 89")
        shown = ", ".join(map(str, xs))
        return {"question": ask.format(xs=shown), "code": f'print(*sorted(( {shown})), sep=", ")',
                "output": listed + "\n", "answer": f"In order: {listed}.", "expect": listed}
    if task == "days between dates":
        a = _date(rng)
        b = a + datetime.timedelta(days=rng.randint(1, 2000))
        days = str((b - a).days)
        code = f'from datetime import date as d; print((d.fromisoformat("{b}") - d.fromisoformat("{a}")).days)'
        return {"question": ask.format(a=a, b=b), "code": code, "output": days + "\n",
                "answer": f"{days} days.", "expect": days}
    if task == "day of the week":
        a = _date(rng)
        day = a.strftime("%A")
        code = f'from datetime import date as d; print(d.fromisoformat("{a}").strftime("%A"))'
        return {"question": ask.format(a=a), "code": code, "output": day + "\n", "answer": f"It was a {day}.",
                "expect": day}
    if task == "compute with python":
        op = rng.choice(["+", "-", "*"])
        x, y = number(rng, rng.randint(2, 6)), number(rng, rng.randint(1, 6))
        out = str({"+": x + y, "-": x - y, "*": x * y}[op])
        # "print( 48213": the first number after a space, as in the question (and in the calculator's calls)
        return {"question": ask.format(x=x, op=op, y=y), "code": f"print( {x} {op} {y})", "output": out + "\n",
                "answer": f"The answer is {out}.", "expect": out}
    raise ValueError(f"unknown python task {task!r}")


def python_messages(item: dict) -> list[dict]:
    """The conversation of a python task: the question, the call, its output, the answer."""
    return [{"role": "user", "content": item["question"]},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "python", "arguments": item["code"]}}]},
            {"role": "tool", "content": item["output"]},
            {"role": "assistant", "content": item["answer"]}]
