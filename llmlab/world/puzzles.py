"""Number puzzles that need search: reach a target from given numbers with + - * / (the Game of 24's rules, with
a target the world chooses).

A puzzle is a few numbers (1-9) and a target. A solution combines two of the numbers left into one, step by
step, until only the target is left; each step is a line that states the numbers left after it:

    Make 21 from 3, 9, 4 and 2.
    9 - 2 = 7, left 3 4 7
    3 + 4 = 7, left 7 7
    7 + 7 = 14, left 14        <- a valid step, but 14 is not 21: this path fails at its second step

The assistant does each step's arithmetic with the calculator tool and writes the rest (`as_calls`): the step
`9 - 2 = 7, left 3 4 7` is the call `calculator 9 - 2`, its output `7` (forced by the engine, so it is always
right), then the words `, left 3 4 7`. `from_calls` reads a turn back into the lines above, which the checker,
the verifiers and `--show_search` read. Without the calculator a model of the cpu preset's size miscomputed
steps, and its failed attempts ended at the target anyway ("12 + 5 = 21"), which no verifier of its size could
tell from a solution.

Rules (so that every step is a small fact a model can learn): the larger number comes first, a result is a
whole number from 1 to MAX_VALUE (no zero, no negative, no remainder), and each number is used once. A puzzle
with no solution is answered "There is no solution."

Ground truth comes free: `solvable` decides any state exactly, so every step of any attempt has a label (valid
and still solvable, or not: the labels a process reward model learns), and `check` scores a whole attempt.
Difficulty is the share of first steps that keep the puzzle solvable: with four numbers and few good first
steps, a model that writes steps left to right without looking ahead mostly fails.
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass

MAX_VALUE = 100
NO_SOLUTION = "There is no solution."
ASKS = ["Make {target} from {numbers}.", "Use {numbers} to make {target}.", "Reach {target} with {numbers}.",
        "How do you get {target} from {numbers}?", "Combine {numbers} with + - * / to make {target}."]
LEVELS = ("easy", "medium", "hard")
"""easy: three numbers; medium: four, and at least HARD_SHARE of the first steps keep it solvable; hard: four,
and fewer do"""
HARD_SHARE = 0.2


@dataclass(frozen=True)
class Step:
    a: int
    op: str
    b: int
    result: int
    left: tuple[int, ...]

    def text(self) -> str:
        return f"{self.a} {self.op} {self.b} = {self.result}, left {' '.join(map(str, self.left))}"


@dataclass(frozen=True)
class Puzzle:
    numbers: tuple[int, ...]
    """sorted"""
    target: int

    def question(self, rng: random.Random) -> str:
        shown = list(self.numbers)
        rng.shuffle(shown)
        listed = ", ".join(map(str, shown[:-1])) + f" and {shown[-1]}"
        return rng.choice(ASKS).format(target=self.target, numbers=listed)


def _apply(a: int, op: str, b: int) -> int | None:
    """a op b under the puzzle's rules (a >= b), or None where a rule forbids it."""
    c = {"+": a + b, "-": a - b, "*": a * b, "/": a // b if a % b == 0 else 0}[op]
    return c if 1 <= c <= MAX_VALUE else None


def moves(numbers: tuple[int, ...]) -> list[Step]:
    """Every step allowed from `numbers` (sorted), each distinct step once."""
    out, seen = [], set()
    for i in range(len(numbers)):
        for j in range(i + 1, len(numbers)):
            b, a = numbers[i], numbers[j]  # sorted: a >= b
            rest = numbers[:i] + numbers[i + 1:j] + numbers[j + 1:]
            for op in "+-*/":
                c = _apply(a, op, b)
                if c is not None and (a, op, b) not in seen:
                    seen.add((a, op, b))
                    out.append(Step(a, op, b, c, tuple(sorted(rest + (c,)))))
    return out


@functools.lru_cache(maxsize=None)
def reachable(numbers: tuple[int, ...]) -> frozenset[int]:
    """Every value `numbers` (sorted) can end as, all of them used."""
    if len(numbers) == 1:
        return frozenset(numbers)
    return frozenset().union(*(reachable(s.left) for s in moves(numbers)))


def solvable(numbers: tuple[int, ...], target: int) -> bool:
    """Whether `numbers` (sorted) can still reach `target`."""
    return target in reachable(tuple(numbers))


def good_share(p: Puzzle) -> float:
    """The share of first steps after which the puzzle is still solvable (0 for an unsolvable puzzle)."""
    first = moves(p.numbers)
    return sum(solvable(s.left, p.target) for s in first) / max(len(first), 1)


def level(p: Puzzle) -> str:
    if len(p.numbers) <= 3:
        return "easy"
    return "medium" if good_share(p) >= HARD_SHARE else "hard"


def solve(p: Puzzle, rng: random.Random | None = None) -> list[Step] | None:
    """A solution (a random one when rng is given: each good step equally likely), or None."""
    numbers, steps = p.numbers, []
    while len(numbers) > 1:
        good = [s for s in moves(numbers) if solvable(s.left, p.target)]
        if not good:
            return None
        s = rng.choice(good) if rng is not None else good[0]
        steps.append(s)
        numbers = s.left
    return steps if numbers == (p.target,) else None


def steps_text(steps: list[Step]) -> str:
    """An attempt of these steps as the checker reads it: a line per step."""
    return "\n".join(s.text() for s in steps)


def solution_text(p: Puzzle, rng: random.Random) -> str:
    steps = solve(p, rng)
    return NO_SOLUTION if steps is None else steps_text(steps)


_CALL = re.compile(r"(\d+\s*[-+*/]\s*\d+)\s*=\s*(\S+?)(?=,|\s|$)")
CALCULATOR = "calculator"


def as_calls(text: str) -> list[dict]:
    """An attempt's lines as the assistant writes them: each `a op b = c` a calculator call (arguments `a op b`)
    answered by a tool message `c`, the words around them assistant content. A text without steps ("There is no
    solution.") is one assistant message."""
    messages, at = [], 0
    for m in _CALL.finditer(text):
        messages += [{"role": "assistant", "content": text[at:m.start()],
                      "tool_calls": [{"type": "function", "function": {"name": CALCULATOR, "arguments": m[1]}}]},
                     {"role": "tool", "content": m[2]}]
        at = m.end()
    if at < len(text) or not messages:
        messages.append({"role": "assistant", "content": text[at:]})
    return messages


def from_calls(messages: list[dict]) -> str:
    """The lines of an attempt written as `as_calls` writes them (a generated turn read by `chat.parse_turn`):
    each call and its output become `args = output`, the assistant's words stay as they are."""
    out, pending = [], []
    for m in messages:
        if m["role"] == "tool":
            out.append(f"{pending.pop(0) if pending else ''} = {m['content'].strip()}")
            continue
        out.append(m.get("content") or "")
        pending += [c["function"]["arguments"].strip() for c in m.get("tool_calls") or []]
    return "".join(out)


def solution_messages(p: Puzzle, rng: random.Random) -> list[dict]:
    """A solution as the assistant's turn: each step's arithmetic a calculator call (`as_calls`)."""
    return as_calls(solution_text(p, rng))


_STEP = re.compile(r"^\s*(\d+)\s*([-+*/])\s*(\d+)\s*=\s*(\d+)\s*,\s*left\s+([\d ]+?)\s*\.?\s*$")


def parse_step(line: str) -> Step | None:
    m = _STEP.match(line)
    if m is None:
        return None
    a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
    return Step(a, op, b, c, tuple(int(x) for x in m[5].split()))


@dataclass
class Verdict:
    solved: bool
    """a complete, valid solution (or "no solution" for a puzzle that has none)"""
    steps: list[bool]
    """per line of the attempt: this step and every one before it valid, and the target still reachable"""
    says_no_solution: bool
    answer: str
    """what the attempt concludes, for voting: the final number left, "no solution", or "" (no conclusion)"""


def check(p: Puzzle, text: str) -> Verdict:
    """Score an attempt at `p` exactly, step by step."""
    text = text.strip()
    if NO_SOLUTION.lower().rstrip(".") in text.lower():
        return Verdict(not solvable(p.numbers, p.target), [], True, "no solution")
    lines = [line for line in text.split("\n") if line.strip()]
    numbers, ok, labels = p.numbers, True, []
    for line in lines:
        s = parse_step(line)
        if ok and s is not None:
            legal = {(m.a, m.op, m.b): m for m in moves(numbers)}
            m = legal.get((s.a, s.op, s.b))
            ok = m is not None and m.result == s.result and m.left == tuple(sorted(s.left))
            numbers = m.left if ok else numbers
        else:
            ok = False
        labels.append(ok and solvable(numbers, p.target))
    complete = bool(lines) and ok and len(numbers) == 1
    answer = str(numbers[0]) if complete else ""
    return Verdict(complete and numbers == (p.target,), labels, False, answer)


def puzzle_split(p: Puzzle) -> str:
    """"train" or "heldout": a fixed fifth of all puzzles (by their numbers and target) is never trained on."""
    key = sum((i + 3) * 31 ** i * n for i, n in enumerate(p.numbers + (p.target,)))
    return "heldout" if key % 5 == 0 else "train"


def parse_question(text: str) -> Puzzle | None:
    """The puzzle a question asks in one of the world's phrasings (ASKS), or None."""
    for ask in ASKS:
        pattern = re.escape(ask).replace(re.escape("{target}"), r"(\d+)").replace(re.escape("{numbers}"), r"([\d, ]+? and \d+)")
        m = re.fullmatch(pattern, text.strip())
        if m:
            target_first = ask.index("{target}") < ask.index("{numbers}")
            target, listed = (m[1], m[2]) if target_first else (m[2], m[1])
            return Puzzle(tuple(sorted(int(x) for x in re.findall(r"\d+", listed))), int(target))
    return None


def random_puzzle(rng: random.Random, n_numbers: int, solvable_p: float = 0.9,
                  targets: tuple[int, int] = (10, 60)) -> Puzzle:
    """A puzzle of n_numbers digits 1-9: with probability solvable_p one with a solution (target drawn from the
    values the numbers can reach within `targets`), else one without (a target in range they cannot reach)."""
    while True:
        numbers = tuple(sorted(rng.randint(1, 9) for _ in range(n_numbers)))
        values = reachable(numbers)
        reach = [t for t in range(targets[0], targets[1] + 1) if t in values]
        pool = reach if rng.random() < solvable_p else [t for t in range(*targets) if t not in values]
        if pool:
            return Puzzle(numbers, rng.choice(pool))


def puzzles(seed: int, split: str, n: int, n_numbers: int, want_level: str | None = None,
            solvable_p: float = 0.9) -> list[Puzzle]:
    """n distinct puzzles of `split` ("train" or "heldout"), optionally of one level only."""
    rng = random.Random(f"{seed}-puzzles-{split}-{n_numbers}-{want_level}-{solvable_p}")
    out: dict[Puzzle, None] = {}
    for _ in range(200 * n):
        if len(out) == n:
            break
        p = random_puzzle(rng, n_numbers, solvable_p)
        if puzzle_split(p) == split and (want_level is None or (solvable(p.numbers, p.target) and level(p) == want_level)):
            out[p] = None
    return list(out)
