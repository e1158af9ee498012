"""Training data for verifiers, free from the world's ground truth: the assistant attempts puzzles, and the exact
checker (llmlab.world.puzzles.check) labels each attempt and each of its steps.

    outcome   pairs of whole attempts at one puzzle: a solved one over a failed one. A reward model trained on
              them is an outcome verifier (Cobbe et al. 2021)
    process   pairs of partial attempts at one puzzle with the same number of steps: one whose steps are all
              valid and can still reach the target, over one whose last step is the first that cannot. A reward
              model trained on them scores a partial attempt (the process verifier of Lightman et al. 2023, here
              learned from step comparisons instead of step classification)

The assistant's own attempts are few and mostly wrong where it is weak (its first steps on hard puzzles are
rarely valid), so each puzzle also gives pairs made from the solver's solutions (`solver_attempts`): a solution
against the same lines with one step replaced by a wrong one, either a step that is allowed but leaves the
target out of reach, or one whose list of numbers left is miscopied (the calculator computes each result, so a
result is never wrong; what the assistant writes itself can be); and against complete attempts of allowed
steps chosen at random that end on another number.

Attempts are compared as the assistant writes them (`as_calls`: each step's arithmetic a calculator call).

Both are written in the comparisons' file format (llmlab.data.preferences), so `llmlab rm --pairs puzzles:process`
trains and measures a verifier as it does any reward model.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tqdm import tqdm

from typing import Callable

from llmlab.alignment.pairs import sample_replies
from llmlab.data.preferences import write_jsonl
from llmlab.engine import Engine, SamplingParams
from llmlab.errors import LLMLabError
from llmlab.tasks.puzzles import PuzzleTask, puzzle_of
from llmlab.think.strategies import step_prefixes
from llmlab.world.puzzles import Puzzle, Step, as_calls, moves, solvable, solve, steps_text
from llmlab.tokenizer import Tokenizer

KINDS = ("outcome", "process")


def _prefixes(text: str, labels: list[bool]) -> list[tuple[int, str, bool]]:
    """(depth, the attempt's first depth+1 lines, label of that step) up to and including the first bad step."""
    out = []
    for d, (prefix, ok) in enumerate(zip(step_prefixes(text), labels)):
        out.append((d, prefix, ok))
        if not ok:
            break
    return out


def attempt_pairs(task: PuzzleTask, attempts: list[tuple], kind: str, per_prompt: int, seed: int = 0) -> list[dict]:
    """Comparison rows of `kind` from attempts at a puzzle task's puzzles, `[(example, [text, ...]), ...]` (texts
    in the checker's lines, as `task.read` reads a turn)."""
    if kind not in KINDS:
        raise LLMLabError(f"unknown verifier kind {kind!r}: choose one of {', '.join(KINDS)}")
    rng = random.Random(f"{seed}-verifier-pairs-{kind}")
    rows = []
    for example, attempted in attempts:
        texts = {t.strip() for t in attempted} - {""}
        verdicts = {t: task.verdict(example, t) for t in sorted(texts)}
        if kind == "outcome":
            good = [t for t, v in verdicts.items() if v.solved]
            bad = [t for t, v in verdicts.items() if not v.solved]
            found = [(g, b, example.group) for g in good for b in bad]
        else:
            steps: dict[int, tuple[set, set]] = {}
            for t, v in verdicts.items():
                labels = v.steps if not v.says_no_solution else [v.solved]
                for d, prefix, ok in _prefixes(t, labels):
                    steps.setdefault(d, (set(), set()))[0 if ok else 1].add(prefix)
            found = [(g, b, f"{example.group}, step {d + 1}") for d, (good, bad) in sorted(steps.items())
                     for g in sorted(good) for b in sorted(bad)]
        rng.shuffle(found)
        for chosen, rejected, family in found[:per_prompt]:
            rows.append({"prompt": example.meta["messages"], "chosen": as_calls(chosen), "rejected": as_calls(rejected),
                         "family": family,
                         "gold_chosen": 1.0, "gold_rejected": 0.0, "source": f"puzzles:{kind}"})
    return rows


def _corrupt(p: Puzzle, steps: list[Step], at: int, rng: random.Random) -> str | None:
    """The solution's first `at` lines, then a wrong step: allowed but a dead end, or one whose numbers left are
    miscopied (the result, which the calculator gives, right)."""
    numbers = steps[at - 1].left if at else p.numbers
    dead = [m for m in moves(numbers) if not solvable(m.left, p.target)]
    if dead and rng.random() < 0.5:
        wrong = rng.choice(dead)
    else:
        s = steps[at]
        left = list(s.left)
        i = rng.randrange(len(left))
        left[i] += rng.choice([-2, -1, 1, 2, 10])
        if left[i] < 1:
            return None
        wrong = Step(s.a, s.op, s.b, s.result, tuple(sorted(left)))
    return steps_text(steps[:at] + [wrong])


def random_walk(p: Puzzle, rng: random.Random) -> list[Step]:
    """Allowed steps chosen at random until one number is left (or none is allowed)."""
    numbers, steps = p.numbers, []
    while len(numbers) > 1 and (allowed := moves(numbers)):
        steps.append(rng.choice(allowed))
        numbers = steps[-1].left
    return steps


def solver_attempts(task: PuzzleTask, seed: int = 0, misses: int = 2) -> list[tuple]:
    """Per solvable puzzle of the task: its solution; at every step, a corrupted prefix (see the module
    docstring); and up to `misses` complete attempts of allowed steps that end on another number than the
    target (what an outcome verifier must tell from a solution: every step right, the wrong number at the end),
    as `(example, [texts])`."""
    rng = random.Random(f"{seed}-solver-attempts")
    out = []
    for example in task.examples():
        p = puzzle_of(example)
        steps = solve(p, rng)
        if steps:
            wrong = [_corrupt(p, steps, at, rng) for at in range(len(steps))]
            walks = [random_walk(p, rng) for _ in range(4 * misses)]
            missed = list(dict.fromkeys(steps_text(w) for w in walks
                                        if len(w) == len(steps) and w[-1].left != (p.target,)))[:misses]
            out.append((example, [steps_text(steps)] + [w for w in wrong if w] + missed))
    return out


def puzzle_comparisons(engine: Engine, tok: Tokenizer, task: PuzzleTask, kind: str, k: int, params: SamplingParams,
                       per_prompt: int, path: str | Path, run_tool: Callable[[str], str]) -> list[dict]:
    """Verifier comparisons of `kind` from k sampled attempts at each of the task's puzzles (the engine running
    their calculator calls through `run_tool`), cached in `path` (an existing file is read back, so a resumed run
    trains on the same pairs)."""
    path = Path(path)
    if path.is_file():
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    with tqdm(total=len(task.examples()), desc=f"puzzle attempts ({kind})", dynamic_ncols=True) as bar:
        sampled = sample_replies(engine, tok, task, k, params, run_tool, progress=bar.update)
    attempts = [(e, [task.read(tok, ids) for ids, _, _, _ in scored]) for e, scored in sampled]
    rows = attempt_pairs(task, attempts, kind, per_prompt, params.seed)
    rows += [dict(r, source=f"puzzles:{kind} (solver)")
             for r in attempt_pairs(task, solver_attempts(task, params.seed), kind, per_prompt, params.seed)]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(path, rows)
    return rows
