"""Reading: what teaches the assistant to answer from a passage put after the question, a knowledge file's or
its memory's, citing it, and to say so when the passage does not hold the answer.

A reading conversation is a question and one passage, cited as `[file#index]`, in one user message:

    user       How late does the final line 17 bus depart from Hollowgate?
               [timetable.md#3] The last bus 17 leaves Hollowgate at 22:40.
    assistant  22:40 [timetable.md#3]

and, for a passage that does not hold the answer (in half of them a hard one: of the same pack, sharing words
with the question, drawn so that every passage is a negative as often as it holds an answer: `hard_negatives`),
NOT_IN_PASSAGE. One passage at a time is what fits the cpu
preset's 128-token context (a 12-word passage of invented names is about 40 tokens); a reader that pages
the retrieved passages in one by one (llmlab.assistants.reader) answers from many.

Passages come from two sources:

    packs     the knowledge packs of other draws than the world's own (llmlab.world.packs, seeds
              "reading-<i>"): the same kinds of file with other names and values, so the world's packs, which
              the tests and the benchmark ask about, are never read here; questions in both phrasings
    memory    what a user said earlier in a conversation, stored as `[memory#i] You said: My locker number
              is 4821.` and asked back ("What is my locker number?"), answered in the same way. A memory holds
              everything the user said, so its negatives are of three kinds: another thing told ("My pet is
              dog."), something else the user said (a request, a question, small talk), and a question that
              is not about the user at all ("What pet does Anna Berg have?") read against what the user told

    reading_conversation(rng, draws, names, said)   one conversation (see above); draws = reading_draws(world);
                                                    said(rng): something a user says in another conversation
"""

from __future__ import annotations

import random
from typing import Callable

import numpy as np

from llmlab.assistants.chunks import Chunk
from llmlab.world.core import World
from llmlab.world.entities import CITY_ENDINGS, FOODS, LAST_ENDINGS, PETS, NameMaker
from llmlab.world.packs import Fact, make_packs, pack_chunks

NOT_IN_PASSAGE = "The passage does not say."
NOT_IN_FILES = "The files do not say."
READING_DRAWS = 400
PASSAGE_WORDS = 12
"""words per passage: one or two sentences, so that a passage and a question fit a 128-token context"""
MEMORY_SHARE = 0.3
NEGATIVE_SHARE = 0.4
"""readings whose passage does not hold the answer"""

# What a user tells the assistant about themselves: (the thing, how its value is drawn)
MEMORY_THINGS = [
    ("locker number", lambda rng, names: str(rng.randint(10, 9999))),
    ("flight number", lambda rng, names: f"{rng.choice('ABKLQZ')}{rng.choice('AEUWX')} {rng.randint(100, 999)}"),
    ("door code", lambda rng, names: str(rng.randint(1000, 99999))),
    ("sister's name", lambda rng, names: names.place(["a", "ina", "el"])),
    ("dog's name", lambda rng, names: names.place(["", "o", "y"])),
    ("home town", lambda rng, names: names.place(CITY_ENDINGS)),
    ("landlord", lambda rng, names: f"{names.place(['', 'us'])} {names.place(LAST_ENDINGS)}"),
    ("favourite dish", lambda rng, names: rng.choice(FOODS)),
    ("pet", lambda rng, names: rng.choice(PETS)),
    ("train time", lambda rng, names: f"{rng.randint(5, 22):02d}:{rng.choice([0, 5, 15, 25, 35, 45, 55]):02d}"),
    ("room number", lambda rng, names: f"{rng.choice('ABCD')}{rng.randint(1, 499)}"),
    ("bike lock code", lambda rng, names: str(rng.randint(100, 9999))),
    ("dentist appointment", lambda rng, names: f"{rng.choice(['Monday', 'Tuesday', 'Friday'])} at "
                                               f"{rng.randint(8, 17):02d}:{rng.choice([0, 15, 30, 45]):02d}"),
    ("wifi password", lambda rng, names: f"{names.place(['', 'a']).lower()}{rng.randint(10, 99)}"),
]
# Passages are cited under names drawn from these (and the pack's own), at any index: a reader that learned the
# packs' file names would take "timetable.md" for a cue to the kind of fact, and fail on a file named otherwise.
FILE_NAMES = ["notes.txt", "document", "page.md", "info.pdf", "rows.jsonl", "faq.md", "report.txt", "guide.pdf",
              "minutes.txt", "readme.md", "data.jsonl", "letter.txt", "manual.pdf", "wiki.md", "log.txt"]
MEMORY_ASKS = ["What is my {thing}?", "Do you remember my {thing}?", "What did I say my {thing} was?",
               "Remind me, what is my {thing}?"]


def reading_prompt(chunk: Chunk, question: str) -> list[dict]:
    """The messages that ask `question` of one passage: the question first, then the passage, in one user
    message (read in this order, every token of the passage can look back at the question: a small model
    finds the answer more often than with the passage first)."""
    return [{"role": "user", "content": f"{question}\n[{chunk.cite}] {chunk.text}"}]


def cited(answer: str, chunk: Chunk) -> str:
    return f"{answer} [{chunk.cite}]"


def reading_draws(world: World, n: int = READING_DRAWS) -> list[list[tuple[Fact, list[Chunk], dict]]]:
    """The facts of `n` other draws of the knowledge packs, each with its pack's passages and how a hard
    negative is drawn from them (`hard_negatives`)."""
    return [[(fact, chunks, hard) for facts in make_packs(world, seed=f"reading-{i}").values()
             for chunks in [pack_chunks(facts, PASSAGE_WORDS)] for hard in [hard_negatives(facts, chunks)]
             for fact in facts] for i in range(n)]


def _overlap(question: str, text: str) -> int:
    words = {w.strip("?.,").lower() for w in question.split()}
    return len(words & {w.strip("?.,").lower() for w in text.split()})


def hard_negatives(facts: list[Fact], chunks: list[Chunk], rounds: int = 100) -> dict[str, list[float]]:
    """{question: the weight of each passage as its hard negative}, for the pack's questions in both phrasings:
    a passage that does not hold the answer, weighted by (1 + words shared with the question)^2, scaled (by
    alternate row and column normalisation, Sinkhorn's) so that every question draws one and every passage is
    drawn as often as it holds an answer.

    Drawn by shared words alone, the passages that name the company ("Sturkbruron Cooperative was founded in
    2003 in Tristummouth.") share words with every question of a handbook and were negatives in two readings of
    three: the assistant learned the passage, not the question ("When was Sturkbruron Cooperative founded?",
    read against that very passage, was answered 10% of the time). Balanced, a timetable's negatives stay hard
    (its many lines are asked alike), a handbook's and a syllabus's are about as hard as random ones: only four
    passages name the company that every question names."""
    questions = [(q, f) for f in facts for q in (f.question, f.seen)]
    w = np.array([[0.0 if f.sentence in c.text else (1 + _overlap(q, c.text)) ** 2 for c in chunks]
                  for q, f in questions])
    held = np.array([sum(f.sentence in c.text for f in facts) for c in chunks], dtype=float)
    target = held * len(questions) / held.sum()
    for _ in range(rounds):
        rows = w.sum(axis=1, keepdims=True)
        w = np.divide(w, rows, out=w, where=rows > 0)
        cols = w.sum(axis=0)
        w *= np.divide(target, cols, out=np.zeros_like(cols), where=cols > 0)
    return {q: row for (q, _), row in zip(questions, w.tolist())}


def _negative(rng: random.Random, question: str, holding: set[int], chunks: list[Chunk], hard: dict) -> Chunk:
    """A passage that does not hold the answer: in half the draws a hard one (`hard_negatives`), else any."""
    weights = hard[question]
    if rng.random() < 0.5 and sum(weights) > 0:  # (all 0 where every other passage holds the answer too)
        return rng.choices(chunks, weights=weights)[0]
    return rng.choice([c for i, c in enumerate(chunks) if i not in holding])


def pack_reading(rng: random.Random, fact: Fact, chunks: list[Chunk], hard: dict) -> list[dict]:
    """A reading of `fact` against one of its pack's passages `chunks` (`hard`: `hard_negatives`)."""
    question = fact.question if rng.random() < 0.5 else fact.seen
    holding = {i for i, c in enumerate(chunks) if fact.sentence in c.text}
    positive = rng.random() > NEGATIVE_SHARE
    chunk = chunks[rng.choice(sorted(holding))] if positive else _negative(rng, question, holding, chunks, hard)
    if rng.random() < 0.5:  # cited under another name and index (see FILE_NAMES)
        chunk = Chunk(rng.choice(FILE_NAMES), rng.randint(0, 99), chunk.text)
    reply = cited(fact.answer, chunk) if positive else NOT_IN_PASSAGE
    return [*reading_prompt(chunk, question), {"role": "assistant", "content": reply}]


def memory_fact(rng: random.Random, names: NameMaker) -> tuple[str, str, str]:
    """(what the user said, a question asking it back, the answer)"""
    thing, draw = rng.choice(MEMORY_THINGS)
    value = draw(rng, names)
    return f"My {thing} is {value}.", rng.choice(MEMORY_ASKS).format(thing=thing), value


def told_thing(said: str) -> str:
    """What a `memory_fact` statement is about: "My wifi password is x." -> "wifi password" (its question's
    wording varies, "What did I say my wifi password was?", so the statement is where to read it)."""
    return said.removeprefix("My ").split(" is ", 1)[0]


def memory_passage(index: int, said: str) -> Chunk:
    return Chunk("memory", index, f"You said: {said}")


def memory_reading(rng: random.Random, names: NameMaker, said: Callable[[random.Random], str]) -> list[dict]:
    told, question, answer = memory_fact(rng, names)
    index = rng.randint(0, 99)
    if rng.random() > NEGATIVE_SHARE:
        chunk = memory_passage(index, told)
        return [*reading_prompt(chunk, question), {"role": "assistant", "content": cited(answer, chunk)}]
    kind = rng.random()
    if kind < 0.5:  # another thing told
        other = memory_fact(rng, names)
        while told_thing(other[0]) == told_thing(told):
            other = memory_fact(rng, names)
        chunk = memory_passage(index, other[0])
    elif kind < 0.75:  # something else the user said
        chunk = memory_passage(index, said(rng))
    else:  # a question not about the user, read against what the user told or said
        question = said(rng)
        while not question.endswith("?"):
            question = said(rng)
        chunk = memory_passage(index, told if rng.random() < 0.5 else said(rng))
    return [*reading_prompt(chunk, question), {"role": "assistant", "content": NOT_IN_PASSAGE}]


def reading_conversation(rng: random.Random, draws: list[list[tuple[Fact, list[Chunk], dict]]],
                         names: NameMaker, said: Callable[[random.Random], str]) -> list[dict]:
    """One reading conversation (see the module docstring)."""
    if rng.random() < MEMORY_SHARE:
        return memory_reading(rng, names, said)
    return pack_reading(rng, *rng.choice(rng.choice(draws)))
