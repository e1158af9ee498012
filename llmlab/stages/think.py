"""`llmlab think`: answer with more compute than one pass (System 2), or measure what that buys.

    llmlab think --prompt "Make 21 from 3, 9, 4 and 2." --strategy beam --budget 16 --show_search true
    llmlab think --eval true            accuracy against compute on the world's held-out puzzles, per level

Strategies (llmlab.think.strategies): greedy, vote (self-consistency), orm (best-of-N with an outcome
verifier), prm (best-of-N with a process verifier), beam (step-level search guided by the process verifier).
The verifiers are reward models of `llmlab rm` trained on puzzle attempts:

    llmlab rm --pairs puzzles:outcome --heldout puzzles:outcome --out_dir runs/cpu/orm
    llmlab rm --pairs puzzles:process --heldout puzzles:process --out_dir runs/cpu/prm

`--eval` writes think.json (every problem's points), think.png (accuracy against generated tokens per level) and
think_flops.png in --out_dir, and prints the curves and the compute-optimal policy's comparison.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from llmlab import checkpoint
from llmlab.alignment.rollouts import load_reward_model
from llmlab.engine import Engine
from llmlab.errors import LLMLabError
from llmlab.tasks.puzzles import PuzzleTask
from llmlab.think import curves
from llmlab.think.strategies import MAX_BUDGET, STRATEGIES, Thinker, check_budget
from llmlab.training import configure_torch
from llmlab.world.puzzles import NO_SOLUTION


@dataclass
class Config:
    checkpoint: str = "runs/cpu/sft"
    """the assistant that writes the attempts"""
    outcome: str = ""
    """an outcome verifier (`llmlab rm --pairs puzzles:outcome`); needed by orm"""
    process: str = ""
    """a process verifier (`llmlab rm --pairs puzzles:process`); needed by prm and beam"""
    prompt: str = ""
    """a question to answer (else --eval)"""
    strategy: str = "vote"
    """greedy, vote, orm, prm or beam (the last three need a verifier)"""
    budget: int = 16
    """replies sampled (beam: next steps proposed per level)"""
    show_search: bool = False
    """print the candidates weighed, with their scores"""
    eval: bool = False
    """measure every strategy at every budget on the world's held-out puzzles"""
    world: str = "runs/cpu/world"
    """the world whose puzzles --eval measures on"""
    per_group: int = 40
    """puzzles per level for --eval"""
    groups: str = "puzzles: easy,puzzles: medium,puzzles: hard"
    """levels --eval measures"""
    budgets: str = "1,2,4,8,16,32,64"
    """budgets of --eval"""
    strategies: str = ",".join(STRATEGIES)
    """strategies of --eval (those whose verifier is missing are left out)"""
    temperature: float = 1.0
    """sampling temperature of the attempts"""
    max_new_tokens: int = 64
    """longest reply"""
    seed: int = 0
    out_dir: str = "runs/cpu/think"
    """where --eval writes think.json and the plots"""
    device: str = "cpu"
    threads: int = 0
    """CPU threads (0: adapt to the free cores)"""

    def __post_init__(self) -> None:
        if not self.eval:
            check_budget(self.strategy, self.budget)
        for b in self.budget_list():
            if not 1 <= b <= MAX_BUDGET:
                raise LLMLabError(f"--budgets: each budget must be from 1 to {MAX_BUDGET} (got {b})")
        unknown = set(self.strategy_list()) - set(STRATEGIES)
        if unknown:
            raise LLMLabError(f"--strategies: unknown {', '.join(sorted(unknown))}; choose from {', '.join(STRATEGIES)}")

    def budget_list(self) -> list[int]:
        try:
            return sorted({int(b) for b in self.budgets.split(",") if b.strip()})
        except ValueError:
            raise LLMLabError(f"--budgets must be integers separated by commas (got {self.budgets!r})") from None

    def strategy_list(self) -> list[str]:
        return [s.strip() for s in self.strategies.split(",") if s.strip()]


def thinker_of(cfg: Config) -> Thinker:
    ckpt = checkpoint.load(cfg.checkpoint, cfg.device)
    tok = ckpt.require_tokenizer("thinking (it reads and writes the chat format)")
    outcome = load_reward_model(cfg.outcome, tok, cfg.device) if cfg.outcome else None
    process = load_reward_model(cfg.process, tok, cfg.device) if cfg.process else None
    return Thinker(Engine(ckpt.model), tok, outcome=outcome, process=process, temperature=cfg.temperature,
                   max_new_tokens=cfg.max_new_tokens, give_up=NO_SOLUTION, seed=cfg.seed)


def main(cfg: Config) -> dict:
    configure_torch(cfg.threads)
    thinker = thinker_of(cfg)
    if not cfg.eval:
        if not cfg.prompt:
            raise LLMLabError("give --prompt QUESTION to answer, or --eval true to measure the strategies")
        t0 = time.perf_counter()
        a = thinker.answer([{"role": "user", "content": cfg.prompt}], cfg.strategy, cfg.budget)
        if cfg.show_search:
            for text, score in a.candidates[:20]:
                print(f"[{score:+.3f}] " + text.replace("\n", " | "))
        print(a.text)
        c = a.compute
        print(f"think: {cfg.strategy} at budget {cfg.budget}: {c.generated} tokens generated, {c.scored} read by "
              f"the verifier, {c.flops(thinker.generator_params, thinker.verifier_params):.2e} FLOPs, "
              f"{time.perf_counter() - t0:.1f} s")
        return {"answer": a.text, "compute": c.__dict__}

    strategies = [s for s in cfg.strategy_list()
                  if not (s == "orm" and thinker.outcome is None) and not (s in ("prm", "beam") and thinker.process is None)]
    left_out = sorted(set(cfg.strategy_list()) - set(strategies))
    if left_out:
        print(f"think: leaving out {', '.join(left_out)} (no verifier given: --outcome / --process)")
    groups = [g.strip() for g in cfg.groups.split(",") if g.strip()]
    task = PuzzleTask(cfg.world, cfg.per_group, tuple(groups))
    if not task.examples():
        raise LLMLabError(f"no puzzles of {groups} in {cfg.world}/eval/puzzles.jsonl: regenerate the world with `llmlab world`")
    t0 = time.perf_counter()
    rows = curves.measure(thinker, task.examples(), lambda e, text: bool(task.score(e, text)), strategies,
                          cfg.budget_list(), cfg.seed)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {"config": cfg.__dict__, "rows": rows, "seconds": time.perf_counter() - t0,
              "curves": {g: curves.curves(rows, g) for g in groups}, "optimal": curves.compute_optimal(rows)}
    (out / "think.json").write_text(json.dumps(result, indent=1) + "\n")
    curves.plot(rows, groups, out / "think.png")
    curves.plot(rows, groups, out / "think_flops.png", x="flops")
    print_summary(result, groups)
    print(f"think: {len(rows)} puzzles in {result['seconds']:.0f} s -> {out / 'think.json'}, {out / 'think.png'}")
    return result


def print_summary(result: dict, groups: list[str]) -> None:
    for g in groups:
        print(f"{g}: % solved (generated tokens per problem)")
        for strategy, pts in result["curves"][g].items():
            print(f"  {strategy:7}" + "".join(f"  N={p['budget']}: {100 * p['accuracy']:5.1f} ({p['tokens']:.0f})" for p in pts))
    for row in result["optimal"]:
        f, p = row["fixed"], row["policy"]
        print(f"  <= {row['tokens']:7.0f} tokens: best fixed {f['choice'][0]}@{f['choice'][1]} {100 * f['accuracy']:.1f}% "
              f"({f['tokens']:.0f} tok) | by difficulty {100 * p['accuracy']:.1f}% ({p['tokens']:.0f} tok) {p['choice']}")
