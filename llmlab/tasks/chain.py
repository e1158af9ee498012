"""Two-step word problems solved with the calculator, and a demonstrator with a blind spot: the task on which
RL goes beyond the demonstrations it was fine-tuned on.

Each template is a short story whose answer is one calculator expression of three or four numbers ("{a} * {b}
- {c}"). The demonstrator writes the right expression for four of the seven templates; for the other three (its
blind spot) it usually writes a plausible wrong one ("+" where the story takes away) and the right one only
`BLIND_RIGHT` of the time: about 70% of its answers are right. Its mistakes are its habit, so fine-tuning on
its demonstrations copies the habit: greedy decoding writes the usual, wrong expression. The reward is exact:
the right number in the reply after the calculator's output. RL samples, finds that the demonstrator's rarer
expression is the one that pays, and makes it the assistant's first choice.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from llmlab.tasks import Example
from llmlab.tasks.assistant import ChatTask
from llmlab.tools.calculator import calculate


@dataclass(frozen=True)
class Template:
    story: str
    expression: str
    """the right calculator expression"""
    demonstrated: str
    """what the demonstrator writes (the same, except on its blind spot)"""


TEMPLATES = [
    Template("Ana buys {a} boxes of {b} apples and gives away {c} apples. How many apples are left?",
             "{a} * {b} - {c}", "{a} * {b} - {c}"),
    Template("Ben saves {a} coins a week for {b} weeks, then spends {c} coins. How many coins remain?",
             "{a} * {b} - {c}", "{a} * {b} + {c}"),
    Template("A school has {a} classes of {b} pupils and {c} teachers. How many people are there?",
             "{a} * {b} + {c}", "{a} * {b} + {c}"),
    Template("A farm has {a} rows of {b} trees and {c} more trees by the road. How many trees are there in all?",
             "{a} * {b} + {c}", "{a} * {b} + {c}"),
    Template("A shop sells {a} packs of {b} pens and {c} packs of {d} pencils. How many items is that?",
             "{a} * {b} + {c} * {d}", "{a} * {b} + {c} * {d}"),
    # the blind spot (with the second template): the demonstrator mostly adds where the story takes away
    Template("A train has {a} cars of {b} seats, and {c} seats are taken. How many seats are free?",
             "{a} * {b} - {c}", "{a} * {b} + {c}"),
    Template("A library has {a} shelves of {b} books, and {c} books are lent out. How many books are in?",
             "{a} * {b} - {c}", "{a} * {b} + {c}"),
]
BLIND = {1, 5, 6}
BLIND_RIGHT = 0.3
"""how often the demonstrator gets a problem of its blind spot right"""


def _numbers(rng: random.Random) -> dict:
    a, b = rng.randint(11, 99), rng.randint(11, 99)
    return {"a": a, "b": b, "c": rng.randint(10, min(999, a * b - 1)), "d": rng.randint(11, 99)}


def problems(split: str, n: int, seed: int = 0) -> list[dict]:
    """n problems of `split` ("train" or "heldout": other numbers, never the same problem), templates in turn:
    {"template", "question", "expression", "demonstrated", "answer", "demonstrated_answer"}."""
    rng = random.Random(f"{seed}-chain-{split}")
    other = {p["question"] for p in problems("train", n, seed)} if split == "heldout" else set()
    out = []
    while len(out) < n:
        t = len(out) % len(TEMPLATES)
        template, values = TEMPLATES[t], _numbers(rng)
        question = template.story.format(**values)
        if question in other:
            continue
        expression = template.expression.format(**values)
        right = t not in BLIND or rng.random() < BLIND_RIGHT
        demonstrated = expression if right else template.demonstrated.format(**values)
        out.append({"template": t, "question": question, "expression": expression, "demonstrated": demonstrated,
                    "answer": calculate(expression), "demonstrated_answer": calculate(demonstrated)})
    return out


def demonstration(problem: dict) -> list[dict]:
    """The demonstrator's conversation: the question, its calculator call, the output, its answer."""
    return [{"role": "user", "content": problem["question"]},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "calculator", "arguments": problem["demonstrated"]}}]},
            {"role": "tool", "content": problem["demonstrated_answer"]},
            {"role": "assistant", "content": f"The answer is {problem['demonstrated_answer']}."}]


def demonstrator_accuracy(rows: list[dict]) -> float:
    return sum(p["demonstrated_answer"] == p["answer"] for p in rows) / len(rows)


class ChainTask(ChatTask):
    """The problems as a task: right when the exact answer is a number of the reply (after the tool's output)."""

    name = "chain"

    def __init__(self, split: str = "train", n: int = 700, seed: int = 0):
        self.tools = True
        self._examples = [Example(prompt=p["question"], answer=p["answer"],
                                  group="blind spot" if p["template"] in BLIND else "demonstrated well",
                                  meta={"messages": [{"role": "user", "content": p["question"]}]})
                          for p in problems(split, n, seed)]

    def examples(self) -> list[Example]:
        return self._examples

    def score(self, example: Example, completion: str, called_tool: bool = False) -> float:
        return float(example.answer in re.findall(r"-?\d+", completion))

    def reward(self, example: Example, completion: str, called_tool: bool = False) -> float:
        return self.score(example, completion, called_tool)
