"""The world's number puzzles as a task (llmlab.world.puzzles): held-out puzzles of each level, and some
without a solution, asked as conversations and scored exactly, step by step.

`score` is 1 for a complete valid solution (or "There is no solution." where there is none); `verdict` gives
the per-step labels a process reward model learns from and the conclusion self-consistency votes on.
"""

from __future__ import annotations

import random
from pathlib import Path

from llmlab.chat import parse_turn
from llmlab.tasks import Example
from llmlab.tasks.assistant import ChatTask, read_rows
from llmlab.tokenizer import Tokenizer
from llmlab.world.puzzles import (
    NO_SOLUTION, Puzzle, Verdict, check, from_calls, level, parse_question, parse_step, puzzles, solvable,
)


def claimed(p: Puzzle, text: str) -> str | None:
    """An attempt's claim: "no solution", the set of its steps (order aside) if its last line leaves the target
    alone, or None; arithmetic is not checked (that is the ground truth's job)."""
    if NO_SOLUTION.lower().rstrip(".") in text.lower():
        return "no solution"
    steps = [parse_step(line) for line in text.strip().split("\n") if line.strip()]
    if not steps or None in steps or steps[-1].left != (p.target,):
        return None
    return " | ".join(sorted(s.text() for s in steps))


def read_attempt(tokenizer: Tokenizer, ids: list[int]) -> str:
    """A generated turn's attempt in the checker's lines: each calculator call and its output a step (from_calls)."""
    return from_calls(parse_turn(tokenizer, ids))


def reply_conclusion(messages: list[dict], text: str) -> str | None:
    """What a reply to a conversation concludes, for voting: `claimed` when the last message asks a puzzle in
    one of the world's phrasings, else the reply itself."""
    p = parse_question(messages[-1]["content"]) if messages else None
    return claimed(p, text) if p is not None else text.strip() or None


def puzzle_of(example: Example) -> Puzzle:
    return Puzzle(tuple(example.meta["numbers"]), example.meta["target"])


def puzzle_example(question: str, numbers, target: int, group: str) -> Example:
    return Example(prompt=question, answer=str(target), group=group,
                   meta={"messages": [{"role": "user", "content": question}], "numbers": tuple(sorted(numbers)),
                         "target": target})


class PuzzleTask(ChatTask):
    """eval/puzzles.jsonl: groups "puzzles: easy|medium|hard|no solution". The calculator does each step's
    arithmetic; what is scored is the whole turn, read back into lines (`from_calls`)."""

    name = "puzzles"
    tools = True

    def read(self, tokenizer: Tokenizer, ids: list[int]) -> str:
        return read_attempt(tokenizer, ids)

    def __init__(self, world_dir: str | Path | None, per_group: int = 100, groups: tuple[str, ...] | None = None):
        path = Path(world_dir or "") / "eval" / "puzzles.jsonl"
        counts: dict[str, int] = {}
        self._examples = []
        for r in read_rows(path) if world_dir is not None and path.is_file() else []:
            if (groups is None or r["group"] in groups) and counts.get(r["group"], 0) < per_group:
                counts[r["group"]] = counts.get(r["group"], 0) + 1
                self._examples.append(puzzle_example(r["question"], r["numbers"], r["target"], r["group"]))

    @classmethod
    def generated(cls, seed: int, split: str, per_size: int) -> PuzzleTask:
        """per_size puzzles of three and of four numbers from `split` ("train": never the evaluation's), a
        tenth of them without a solution; grouped by level."""
        task = cls(None)
        rng = random.Random(f"{seed}-puzzle-task-{split}")
        for n_numbers in (3, 4):
            for p in puzzles(seed, split, per_size, n_numbers, solvable_p=0.9):
                group = f"puzzles: {level(p) if solvable(p.numbers, p.target) else 'no solution'}"
                task._examples.append(puzzle_example(p.question(rng), p.numbers, p.target, group))
        return task

    def examples(self) -> list[Example]:
        return self._examples

    def verdict(self, example: Example, completion: str) -> Verdict:
        return check(puzzle_of(example), completion)

    def score(self, example: Example, completion: str, called_tool: bool = False) -> float:
        return float(self.verdict(example, completion).solved)

    def reward(self, example: Example, completion: str, called_tool: bool = False) -> float:
        return self.score(example, completion)

    def conclusion(self, example: Example, completion: str) -> str | None:
        """What an attempt claims, read without the ground truth (for self-consistency): "no solution", or its
        steps as a set when they end at the target; None when it claims neither."""
        return claimed(puzzle_of(example), completion)
