"""`llmlab think`: answer with more compute than one pass (System 2), or measure what that buys.

    llmlab think --prompt "Make 21 from 3, 9, 4 and 2." --strategy beam --budget 16 --show_search true
    llmlab think --eval true            accuracy against compute on the world's held-out puzzles, per level
    llmlab think --prompt "Where does Ada Smith live?" --strategy verify --budget 12
    llmlab think --verify true          verify-then-answer against greedy on people real and recombined

Strategies (llmlab.think.strategies): greedy, vote (self-consistency), claim (vote among the replies that claim
a solution), sequential (claim, sampling 4 at a time until one claims), orm (best-of-N with an outcome verifier), prm (best-of-N with a process verifier), beam (step-level
search guided by the process verifier), verify (for a question about a person, recall the person's facts first;
llmlab.think.recall). The assistant does each step's arithmetic with the calculator, which the engine runs. The
verifiers are reward models of `llmlab rm` trained on puzzle attempts:

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

from tqdm import tqdm

from llmlab import checkpoint
from llmlab.alignment.rollouts import ModelReward
from llmlab.engine import Engine
from llmlab.errors import LLMLabError
from llmlab.tasks.assistant import read_rows, says_dont_know
from llmlab.tasks.puzzles import PuzzleTask
from llmlab.think import curves
from llmlab.think.recall import PROBES, calibration_names
from llmlab.think.strategies import MAX_BUDGET, SEARCHES, STRATEGIES, Thinker, check_budget
from llmlab.tools import tool_runner
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
    """greedy, vote, claim, sequential, orm, prm, beam (the last three need a verifier) or verify (a question
    about a person: recall the person's facts first, calibrated on --world's people)"""
    budget: int = 16
    """replies sampled (beam: next steps proposed per level; verify: recall probes, at most 12)"""
    show_search: bool = False
    """print the candidates weighed, with their scores"""
    eval: bool = False
    """measure every strategy at every budget on the world's held-out puzzles"""
    world: str = "runs/cpu/world"
    """the world whose puzzles --eval measures on, and whose people verify recalls"""
    per_group: int = 40
    """puzzles per level for --eval"""
    groups: str = "puzzles: easy,puzzles: medium,puzzles: hard"
    """levels --eval measures"""
    budgets: str = "1,2,4,8,16,32,64"
    """budgets of --eval"""
    strategies: str = ",".join(SEARCHES)
    """strategies of --eval (those whose verifier is missing are left out)"""
    temperature: float = 1.0
    """sampling temperature of the attempts"""
    max_new_tokens: int = 96
    """longest reply (tool calls and their outputs included)"""
    verify: bool = False
    """measure verify-then-answer: "I don't know" on names recombined from real people's, and right answers about
    held-out and training people, against greedy (verify.json)"""
    verify_budgets: str = "2,6,12"
    """recall probes of --verify"""
    max_flagged: float = 0.02
    """verify's threshold lets through all but this share of the known people it is calibrated on"""
    recall: str = "runs/cpu/base"
    """the model whose recall verify probes (same tokenizer): the assistant's pretrained base by default, whose
    recall separates strangers best (fine-tuning on conversations blurs the biographies' framing the probes use;
    "" probes the assistant itself)"""
    seed: int = 0
    out_dir: str = "runs/cpu/think"
    """where --eval writes think.json and the plots"""
    device: str = "cpu"
    threads: int = 0
    """CPU threads (0: adapt to the free cores)"""

    def __post_init__(self) -> None:
        if not (self.eval or self.verify):
            check_budget(self.strategy, self.budget)
        if not 0 <= self.max_flagged < 1:
            raise LLMLabError(f"--max_flagged is a share of people, from 0 to below 1 (got {self.max_flagged})")
        if any(not 1 <= b <= len(PROBES) for b in self.probe_list()):
            raise LLMLabError(f"--verify_budgets: from 1 to {len(PROBES)} probes each (got {self.verify_budgets!r})")
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

    def probe_list(self) -> list[int]:
        try:
            return sorted({int(b) for b in self.verify_budgets.split(",") if b.strip()})
        except ValueError:
            raise LLMLabError(f"--verify_budgets must be integers separated by commas (got {self.verify_budgets!r})") from None

    def strategy_list(self) -> list[str]:
        return [s.strip() for s in self.strategies.split(",") if s.strip()]


def thinker_of(cfg: Config) -> Thinker:
    ckpt = checkpoint.load(cfg.checkpoint, cfg.device)
    tok = ckpt.require_tokenizer("thinking (it reads and writes the chat format)")
    outcome = ModelReward.load(cfg.outcome, tok, cfg.device) if cfg.outcome else None
    process = ModelReward.load(cfg.process, tok, cfg.device) if cfg.process else None
    # (the puzzles' steps are calculator calls, which the engine runs)
    return Thinker(Engine(ckpt.model), tok, outcome=outcome, process=process, temperature=cfg.temperature,
                   max_new_tokens=cfg.max_new_tokens, give_up=NO_SOLUTION, seed=cfg.seed, world=cfg.world,
                   recall=cfg.recall, run_tool=tool_runner(cfg.world))


def measure_verify(cfg: Config, thinker: Thinker) -> dict:
    """Greedy vs verify at each probe budget: "I don't know" on the world's recombined-name questions, right
    answers about the held-out people verify was not calibrated on and about training people (seen phrasings)."""
    world = thinker.recaller().world
    calibration = calibration_names(world)
    evaluated = {p.name for p in world.people} - set(calibration)
    one_each: dict[tuple[str, str], dict] = {}  # one question per person: a rate over people, not over a few people's questions
    for r in read_rows(Path(cfg.world) / "eval" / "qa.jsonl"):
        if r["person"] in evaluated and r["phrasing"] == "seen":
            one_each.setdefault((r["group"], r["person"]), r)
    items = {"recombined": [(r["messages"], r["expect"]) for r in read_rows(Path(cfg.world) / "eval" / "assistant.jsonl")
                            if r["kind"] == "recombined"][:cfg.per_group]}
    for group, label in (("heldout", "held-out people"), ("train", "train people")):
        items[label] = [([{"role": "user", "content": r["question"]}], r["answer"])
                        for (g, _), r in one_each.items() if g == group][:cfg.per_group]

    def rate(group: str, texts: list[str]) -> float:
        if group == "recombined":
            return sum(says_dont_know(t) for t in texts) / len(texts)
        return sum(answer.lower() in t.lower() for t, (_, answer) in zip(texts, items[group])) / len(texts)

    greedy = {g: [thinker.answer(m, "greedy", 1).text for m, _ in rows] for g, rows in tqdm(items.items(), desc="greedy")}
    out = {"greedy": {g: rate(g, t) for g, t in greedy.items()}, "n": {g: len(v) for g, v in items.items()},
           "calibrated_on": len(calibration), "budgets": {}}
    for probes in cfg.probe_list():
        threshold = thinker.calibrated(probes, cfg.max_flagged)
        texts = {g: [thinker.answer(m, "verify", probes).text for m, _ in tqdm(rows, desc=f"verify, {probes} probes")]
                 for g, rows in items.items()}
        out["budgets"][probes] = {"threshold": threshold, **{g: rate(g, t) for g, t in texts.items()}}
    return out


def print_verify(result: dict) -> None:
    n = result["n"]
    print(f"verify-then-answer ({n['recombined']} recombined names; one question each about {n['held-out people']} "
          f"held-out and {n['train people']} training people, none of them calibrated on):")
    print(f"  {'':<22} {'dont know (recombined)':>24} {'held-out right':>16} {'train right':>13}")
    g = result["greedy"]
    print(f"  {'greedy':<22} {100 * g['recombined']:23.1f}% {100 * g['held-out people']:15.1f}% {100 * g['train people']:12.1f}%")
    for probes, r in result["budgets"].items():
        label = f"verify, {probes} probes"
        print(f"  {label:<22} {100 * r['recombined']:23.1f}% {100 * r['held-out people']:15.1f}% "
              f"{100 * r['train people']:12.1f}%   (threshold {r['threshold']:.3f})")


def main(cfg: Config) -> dict:
    configure_torch(cfg.threads)
    thinker = thinker_of(cfg)
    if cfg.verify:
        t0 = time.perf_counter()
        result = measure_verify(cfg, thinker)
        result["seconds"] = time.perf_counter() - t0
        out = Path(cfg.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "verify.json").write_text(json.dumps(result, indent=1) + "\n")
        print_verify(result)
        print(f"think: {result['seconds']:.0f} s -> {out / 'verify.json'}")
        return result
    if not cfg.eval:
        if not cfg.prompt:
            raise LLMLabError("give --prompt QUESTION to answer, or --eval true to measure the strategies")
        if cfg.strategy == "verify":
            thinker.calibrated(min(cfg.budget, len(PROBES)), cfg.max_flagged)
        t0 = time.perf_counter()
        budget = min(cfg.budget, len(PROBES)) if cfg.strategy == "verify" else cfg.budget
        a = thinker.answer([{"role": "user", "content": cfg.prompt}], cfg.strategy, budget)
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
        q = row.get("sequential")
        seq = f" | sequential@{q['choice'][1]} {100 * q['accuracy']:.1f}% ({q['tokens']:.0f} tok)" if q else ""
        print(f"  <= {row['tokens']:7.0f} tokens: best fixed {f['choice'][0]}@{f['choice'][1]} {100 * f['accuracy']:.1f}% "
              f"({f['tokens']:.0f} tok) | by difficulty {100 * p['accuracy']:.1f}% ({p['tokens']:.0f} tok) {p['choice']}"
              f"{seq}")
