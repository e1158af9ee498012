"""Accuracy against inference compute: every strategy at every budget on the same problems, per difficulty, and a
compute-optimal policy that picks the strategy and budget by each problem's estimated difficulty.

For the sampling strategies (vote, claim, orm, prm) each problem's replies are drawn once, max(budgets) of them, and
budget N is measured on the disjoint groups of N among them (all of them averaged), as Wang et al. and Cobbe et
al. measure their curves; beam search runs once per budget. Compute is per problem: tokens generated, and FLOPs
(Compute.flops).

The compute-optimal policy (after Snell et al. 2024) estimates a problem's difficulty without its answer from
PILOT of the replies (their cost is charged to the policy, once: a sampling strategy's N replies begin with
them): by how few of them claim an answer (the claim strategy's reading), else by the process verifier's best
score among them; it puts the problem in
one of `bins` by quantile, and uses for each bin the strategy and budget that a calibration half of the problems
says give the most accuracy for the average compute; it is measured on the other half against the best single
strategy and budget at no more average compute. `sequential` is a policy too, one that reads difficulty as it
goes (it stops sampling at the first claimed answer); it is measured the same way.
"""

from __future__ import annotations

import itertools
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from llmlab.report import pyplot
from llmlab.tasks import Example
from llmlab.think.strategies import ROUND, Compute, Thinker


PILOT = 4
"""replies whose process-verifier scores estimate a problem's difficulty"""


@dataclass
class Point:
    strategy: str
    budget: int
    correct: float
    """mean over the groups of this budget (0..1)"""
    tokens: float
    """generated tokens"""
    flops: float


def problem_points(thinker: Thinker, example: Example, correct: Callable[[str], bool], strategies: list[str],
                   budgets: list[int], seed: int) -> tuple[list[Point], float, float]:
    """(every (strategy, budget) measured on one problem, its difficulty estimate from the first PILOT replies
    (minus the share that claim an answer when claim is measured, else minus the process verifier's best score
    among them, else NaN), the tokens of those replies)."""
    messages = example.meta["messages"]
    flops = lambda c: c.flops(thinker.generator_params, thinker.verifier_params)  # noqa: E731
    points = []
    if "greedy" in strategies:
        a = thinker.answer(messages, "greedy", 1)
        points += [Point("greedy", 1, float(correct(a.text)), a.compute.generated, flops(a.compute))]
    top = max(budgets)
    lengths: list[int] = []
    texts, compute = thinker.sample(messages, top, seed, lengths=lengths)
    per_sample = Compute(compute.generated / top, compute.processed / top)
    scored = {s: thinker.score(messages, texts, s) for s in ("orm", "prm") if s in strategies}
    for strategy in [s for s in strategies if s in ("vote", "claim", "orm", "prm")]:
        for n in budgets:
            rows = []
            for g in range(top // n):
                part = slice(g * n, (g + 1) * n)
                a = thinker.pick(messages, texts[part], strategy, Compute(per_sample.generated * n, per_sample.processed * n),
                                 (scored[strategy][0][part], scored[strategy][1][part]) if strategy in scored else None)
                rows.append((float(correct(a.text)), a.compute.generated, flops(a.compute)))
            points.append(Point(strategy, n, *(statistics.fmean(col) for col in zip(*rows))))
    if "sequential" in strategies:  # within each group of N, rounds of ROUND until a reply claims an answer
        prompt = compute.processed - compute.generated  # (the prompt's tokens, read once per round)
        claimed = thinker.claims(messages, texts)
        for n in budgets:
            rows = []
            for g in range(top // n):
                start, drawn, rounds = g * n, 0, 0
                while drawn < n and not any(claimed[start:start + drawn]):
                    drawn, rounds = min(drawn + ROUND, n), rounds + 1
                a = thinker.pick(messages, texts[start:start + drawn], "claim")
                generated = sum(lengths[start:start + drawn])
                c = Compute(generated, rounds * prompt + generated)
                rows.append((float(correct(a.text)), c.generated, flops(c)))
            points.append(Point("sequential", n, *(statistics.fmean(col) for col in zip(*rows))))
    if "beam" in strategies:
        for n in budgets:
            a = thinker.answer(messages, "beam", n, seed=seed)
            points.append(Point("beam", n, float(correct(a.text)), a.compute.generated, flops(a.compute)))
    difficulty = float("nan")
    if "claim" in strategies:  # the share of the first 4 replies that claim an answer, negated
        difficulty = -sum(thinker.claims(messages, texts[:PILOT])) / PILOT
    elif "prm" in scored:  # the process verifier's best score among the first 4 replies, negated
        difficulty = -max(scored["prm"][0][:PILOT])
    return points, difficulty, per_sample.generated * PILOT


def measure(thinker: Thinker, examples: list[Example], correct: Callable[[Example, str], bool],
            strategies: list[str], budgets: list[int], seed: int = 0) -> list[dict]:
    """One row per problem: {"group", "difficulty", "pilot_tokens", "points": [Point as dict]}."""
    rows = []
    for i, e in enumerate(tqdm(examples, desc="think", dynamic_ncols=True)):
        points, difficulty, pilot = problem_points(thinker, e, lambda text, e=e: correct(e, text), strategies, budgets,
                                                   seed + i)
        rows.append({"group": e.group, "difficulty": difficulty, "pilot_tokens": pilot,
                     "points": [p.__dict__ for p in points]})
    return rows


def curves(rows: list[dict], group: str | None = None) -> dict[str, list[dict]]:
    """strategy -> [{"budget", "accuracy", "tokens", "flops"}] averaged over the problems (of one group)."""
    acc: dict[tuple[str, int], list[tuple[float, float, float]]] = defaultdict(list)
    for r in rows:
        if group is None or r["group"] == group:
            for p in r["points"]:
                acc[(p["strategy"], p["budget"])].append((p["correct"], p["tokens"], p["flops"]))
    out: dict[str, list[dict]] = defaultdict(list)
    for (strategy, budget), vals in sorted(acc.items()):
        c, t, f = (statistics.fmean(col) for col in zip(*vals))
        out[strategy].append({"budget": budget, "accuracy": c, "tokens": t, "flops": f, "problems": len(vals)})
    return dict(out)


def compute_optimal(rows: list[dict], bins: int = 3) -> list[dict]:
    """For each compute level of the fixed strategies: the best fixed (strategy, budget), the difficulty-binned
    policy and the best budget of `sequential` (a policy of its own: each problem's samples decide when to stop),
    each chosen on the even problems within that level and measured on the odd ones. Returns rows {"tokens",
    "fixed", "policy", "sequential" (None where it was not measured or no budget fits)}."""
    calib, test = rows[0::2], rows[1::2]
    sampled = ("vote", "claim", "orm", "prm")  # (their replies begin with the pilot's)
    scored = sorted(r["difficulty"] for r in calib if r["difficulty"] == r["difficulty"])
    if not scored:
        return []
    edges = [scored[int(len(scored) * k / bins)] for k in range(1, bins)]
    bin_of = lambda r: sum(r["difficulty"] >= e for e in edges)  # noqa: E731  (edge k opens bin k)
    measured = sorted({(p["strategy"], p["budget"]) for r in rows for p in r["points"]})
    options = [o for o in measured if o[0] != "sequential"]
    adaptive = [o for o in measured if o[0] == "sequential"]

    def means(part: list[dict]) -> dict[tuple[str, int], tuple[float, float]]:
        """(strategy, budget) -> (accuracy, generated tokens), averaged over the problems of `part`."""
        per: dict[tuple[str, int], list[tuple[float, float]]] = defaultdict(list)
        for r in part:
            for p in r["points"]:
                per[(p["strategy"], p["budget"])].append((p["correct"], p["tokens"]))
        return {o: tuple(statistics.fmean(col) for col in zip(*v)) for o, v in per.items()}

    def table(part: list[dict]) -> dict[int, dict[tuple[str, int], tuple[float, float]]]:
        return {b: means([r for r in part if bin_of(r) == b]) for b in sorted({bin_of(r) for r in part})}

    cal, tst = table(calib), table(test)
    share = {b: sum(bin_of(r) == b for r in calib) / len(calib) for b in cal}
    pilot = statistics.fmean(r["pilot_tokens"] for r in rows)
    whole = {id(calib): means(calib), id(test): means(test)}
    spend = lambda tokens, o: max(pilot, tokens) if o[0] in sampled else pilot + tokens  # noqa: E731
    overall = lambda part, o: whole[id(part)][o][0]  # noqa: E731
    cost = lambda part, o: whole[id(part)][o][1]  # noqa: E731
    out = []
    for level in sorted({cost(calib, o) for o in options}):
        fixed = max((o for o in options if cost(calib, o) <= level), key=lambda o: overall(calib, o))
        best, best_acc = None, -1.0
        for combo in itertools.product(options, repeat=len(cal)):
            choice = dict(zip(sorted(cal), combo))
            if any(o not in cal[b] for b, o in choice.items()):
                continue
            spent = sum(share[b] * spend(cal[b][o][1], o) for b, o in choice.items())
            gained = sum(share[b] * cal[b][o][0] for b, o in choice.items())
            if spent <= level and gained > best_acc:
                best, best_acc = choice, gained
        if best is None:
            continue
        fits = [o for o in adaptive if cost(calib, o) <= level]
        seq = max(fits, key=lambda o: overall(calib, o)) if fits else None
        test_share = {b: sum(bin_of(r) == b for r in test) / len(test) for b in tst}
        policy_acc = sum(test_share[b] * tst[b][o][0] for b, o in best.items() if b in tst and o in tst[b])
        policy_cost = sum(test_share[b] * spend(tst[b][o][1], o) for b, o in best.items() if b in tst and o in tst[b])
        out.append({"tokens": level, "fixed": {"choice": list(fixed), "accuracy": overall(test, fixed),
                                               "tokens": cost(test, fixed)},
                    "policy": {"choice": {str(b): list(o) for b, o in best.items()}, "accuracy": policy_acc,
                               "tokens": policy_cost},
                    "sequential": None if seq is None else {"choice": list(seq), "accuracy": overall(test, seq),
                                                            "tokens": cost(test, seq)}})
    return out


def plot(rows: list[dict], groups: list[str], out_png: Path, x: str = "tokens") -> Path:
    """Accuracy against compute (log x), one panel per group, a line per strategy."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.6), dpi=110, squeeze=False)
    for ax, group in zip(axes[0], groups):
        for strategy, pts in curves(rows, group).items():
            xs = [p[x] for p in pts]
            ys = [100 * p["accuracy"] for p in pts]
            ax.plot(xs, ys, marker="o", ms=3, label=strategy, ls="none" if len(pts) == 1 else "-")
        ax.set_xscale("log")
        ax.set_title(group.replace("puzzles: ", ""), fontsize=10)
        ax.set_xlabel("generated tokens per problem" if x == "tokens" else "FLOPs per problem")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("% solved")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
