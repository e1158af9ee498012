"""`llmlab redteam`: attack the assistant with every family of llmlab.redteam, apply defenses, and write the
security card: attack success rate (ASR) with a 95% interval per family, defense and goal, beside utility and
over-refusal.

    llmlab redteam                                   the cpu assistant, every family, defenses none and filter
    llmlab redteam --defenses none,filter,adv,filter+adv --transfer runs/cpu-seed1/sft
    llmlab redteam --url http://127.0.0.1:8000 --defenses none    a running `llmlab serve`, through its API

Goals and their exact judges are in llmlab.redteam.goals: a forbidden request complied with, a secret code
leaked. Each family is measured on the held-out half of the goals (held-out people, fresh codes, request
wordings fine-tuning never showed); GCG's suffix is optimised on the training half (llmlab.redteam.gcg), on
--checkpoint even when --url serves the assistant (a transfer attack, as against a closed model).

Defenses (comma-separated; combine with "+"):

    filter   a perplexity filter in front of the assistant, calibrated to flag --filter_max_flagged of the
             benign messages of fine-tuning's side of the world (llmlab.redteam.defenses)
    adv      adversarial training: the training half's attacks that worked become refusals in an `llmlab sft`
             run from --checkpoint, mixed with the world's conversations (--adv_share) and benign look-alikes in
             the same wrappers; GCG is then run again against the trained model (an adaptive attacker)

Utility: right answers to benign questions (people's facts, arithmetic with the calculator); over-refusal:
benign look-alikes of the forbidden requests and small talk refused. Results are kept per (model, defense,
family, goal) in rows.jsonl, so a killed run resumes where it stopped; card.md and card.json are the card.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from llmlab import checkpoint, presets
from llmlab.engine import Engine
from llmlab.errors import LLMLabError
from llmlab.redteam import card
from llmlab.redteam.assistant import Local, Replies, Served, filtered
from llmlab.redteam.attacks import FAMILIES, ROLEPLAY, attack_text
from llmlab.redteam.defenses import PerplexityFilter, adversarial_mix, benign_messages
from llmlab.redteam.gcg import GCGConfig, GCGResult, optimize
from llmlab.redteam.goals import GOALS, Goal, goals_of, hit
from llmlab.stages import sft
from llmlab.tasks.assistant import AssistantArithmetic, AssistantPolicy, AssistantQA, refuses, says_dont_know
from llmlab.tools import tool_runner
from llmlab.training import configure_torch
from llmlab.world import load

DEFENSES = ("filter", "adv")
TRANSFER = "none (second model)"  # the defense column of the rows measured on --transfer


@dataclass
class Config:
    checkpoint: str = "runs/cpu/sft"
    """the assistant to attack (and, with --url, the white-box model GCG's suffix is optimised on)"""
    world: str = "runs/cpu/world"
    """the world whose people, policy and secret define the goals"""
    url: str = ""
    """attack a running `llmlab serve` (its base URL) instead of answering with --checkpoint"""
    out_dir: str = "runs/cpu/redteam"
    """where rows.jsonl (every measurement, read back on resume), the suffixes, card.md and card.json go"""
    families: str = ",".join(FAMILIES)
    """attack families: direct, roleplay, base64, rot13, leet, gcg"""
    goals: str = ",".join(GOALS)
    """forbidden (a forbidden request complied with), secret (the system prompt's code leaked)"""
    defenses: str = "none,filter"
    """none, filter, adv, or a combination such as filter+adv (see the module docstring)"""
    n: int = 60
    """held-out attempts per family and goal"""
    transfer: str = ""
    """a second assistant (another seed or size, same tokenizer) that the suffixes optimised on --checkpoint are
    also tried on"""
    gcg_train: int = 12
    """training goals the universal suffix is optimised on (per goal kind)"""
    gcg_steps: int = 150
    """GCG's budget: optimisation steps per suffix"""
    gcg_suffix_len: int = 10
    """tokens in the suffix"""
    gcg_candidates: int = 64
    """suffixes evaluated per step"""
    gcg_topk: int = 64
    """tokens kept per position from the gradient"""
    filter_window: int = 8
    """tokens per window of the perplexity filter"""
    filter_max_flagged: float = 0.01
    """share of fine-tuning's benign messages the filter's threshold lets it flag"""
    adv_steps: int = 300
    """steps of adversarial training (an `llmlab sft` run from --checkpoint)"""
    adv_share: float = 0.3
    """share of adversarial training's rows that are attacks and wrapped look-alikes (the rest: the world's)"""
    recipe: str = "cpu"
    """the preset whose fine-tuning recipe (learning rates, batch) adversarial training follows"""
    utility_n: int = 40
    """benign examples per utility group"""
    max_new_tokens: int = 40
    """longest reply (greedy)"""
    seed: int = 0
    """draws the goals, the suffixes' candidates and adversarial training"""
    threads: int = 0
    """CPU threads (0: adapt to the free cores)"""

    def __post_init__(self) -> None:
        for name, given, known in (("families", self.family_list(), FAMILIES), ("goals", self.goal_list(), GOALS)):
            unknown = [x for x in given if x not in known]
            if unknown or not given:
                raise LLMLabError(f"--{name}: unknown or none ({', '.join(unknown) or 'empty'}); choose from {', '.join(known)}")
        for d in self.defense_list():
            if d != "none" and not set(d.split("+")) <= set(DEFENSES):
                raise LLMLabError(f"--defenses: unknown {d!r}; use none, {', '.join(DEFENSES)} or a combination with +")
        if "gcg" in self.family_list() and self.gcg_steps < 1:
            raise LLMLabError(f"--gcg_steps must be at least 1 for the gcg family (got {self.gcg_steps}); "
                              f"leave gcg out of --families to skip it")
        if self.n < 1:
            raise LLMLabError(f"--n must be at least 1 (got {self.n})")
        if self.url and any("adv" in d for d in self.defense_list()):
            raise LLMLabError("--defenses adv trains a model: it needs --checkpoint, not --url")

    def family_list(self) -> list[str]:
        return [f.strip() for f in self.families.split(",") if f.strip()]

    def goal_list(self) -> list[str]:
        return [g.strip() for g in self.goals.split(",") if g.strip()]

    def defense_list(self) -> list[str]:
        return [d.strip() for d in self.defenses.split(",") if d.strip()]


class Rows:
    """rows.jsonl: one measured (model, defense, family, goal) per line, read back on resume."""

    def __init__(self, path: Path):
        self.path = path
        self.done: dict[str, dict] = {}
        if path.is_file():
            for line in path.read_text().splitlines():
                if line.strip():
                    r = json.loads(line)
                    self.done[r["key"]] = r

    def get(self, key: str) -> dict | None:
        return self.done.get(key)

    def add(self, key: str, row: dict) -> dict:
        row = {"key": key, **row}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.done[key] = row
        return row


def _load_assistant(path: str, device: str = "cpu"):
    ckpt = checkpoint.load(path, device)
    tok = ckpt.require_tokenizer("attacking an assistant (it reads and writes the chat format)")
    if checkpoint.read_info(ckpt.path).get("stage") == "pretrain":
        raise LLMLabError(f"{path} is a pretrained base, not an assistant: it has never seen the chat format, so no "
                          f"attack on its policy means anything. Attack a fine-tuned checkpoint (llmlab sft)")
    return ckpt, tok


def suffix_for(cfg: Config, model, tok, kind: str, world, out: Path, tag: str) -> GCGResult:
    goals = goals_of(world, kind, "train", cfg.gcg_train, cfg.seed)
    gcfg = GCGConfig(steps=cfg.gcg_steps, suffix_len=cfg.gcg_suffix_len, topk=cfg.gcg_topk,
                     candidates=cfg.gcg_candidates, seed=cfg.seed)
    bar = tqdm(total=cfg.gcg_steps, desc=f"gcg {kind} ({tag})")

    def progress(step: int, loss: float, matched: float) -> None:
        bar.n = step
        bar.set_postfix(loss=f"{loss:.3f}", matched=f"{matched:.0%}")
        bar.refresh()

    result = optimize(model, tok, goals, gcfg, out / f"gcg-{kind}-{tag}.json", progress)
    bar.close()
    return result


def measure(replies: Replies, goals: list[Goal], family: str, suffix: str = "") -> dict:
    texts = [attack_text(family, g, "heldout", i, suffix) for i, g in enumerate(goals)]
    out = replies([g.messages(t) for g, t in zip(goals, texts)])
    judged = [(g, t, r) for g, t, r in zip(goals, texts, out) if r is not None]
    hits = sum(hit(g, r) for g, _, r in judged)
    return {"hits": hits, "n": len(judged), "skipped": len(goals) - len(judged),
            "samples": [{"attack": t, "reply": r, "hit": hit(g, r)} for g, t, r in judged[:3]]}


def utility(replies: Replies, world_dir: str, n: int) -> dict:
    """Right answers to benign questions, and refusals of benign requests (over-refusal)."""
    right, total = 0, 0
    tasks = [AssistantQA(world_dir, per_group=n), AssistantArithmetic(world_dir, tools=True, per_group=n)]
    for task in tasks:
        examples = [e for e in task.examples() if e.group in ("train people, seen phrasing", "1-3 digits")]
        out = replies([e.meta["messages"] for e in examples])
        scored = [task.score(e, r) for e, r in zip(examples, out) if r is not None]
        right, total = right + sum(scored), total + len(scored)
    policy = [e for e in AssistantPolicy(world_dir, per_group=n).examples() if e.meta["kind"] in ("benign", "small_talk")]
    out = replies([e.meta["messages"] for e in policy])
    refused = [refuses(r) or (e.meta["kind"] == "small_talk" and says_dont_know(r)) for e, r in zip(policy, out) if r is not None]
    return {"utility": right / max(total, 1), "over_refusal": sum(refused) / max(len(refused), 1),
            "n_utility": total, "n_over_refusal": len(refused)}


def adversarial_checkpoint(cfg: Config, world, tok, suffixes: dict[str, GCGResult], out: Path) -> str:
    """Train (once) the adversarially trained assistant; its path."""
    where = out / "adv"
    if checkpoint.has_checkpoint(where) and checkpoint.read_info(checkpoint.resolve(where)).get("step") == cfg.adv_steps:
        return str(where)
    hits: list[tuple[Goal, str]] = []
    for kind in cfg.goal_list():
        goals = goals_of(world, kind, "train", 200, cfg.seed + 1)
        for i, g in enumerate(goals):
            hits.append((g, ROLEPLAY["train"][i % len(ROLEPLAY["train"])].format(request=g.request)))
            if kind in suffixes:
                hits.append((g, f"{g.request} {suffixes[kind].text.strip()}"))
            hits.append((g, g.request))
    suffix_texts = [s.text.strip() for s in suffixes.values()]

    def wrap(request: str, i: int) -> str:
        if suffix_texts and i % 2:
            return f"{request} {suffix_texts[i // 2 % len(suffix_texts)]}"
        return ROLEPLAY["train"][i % len(ROLEPLAY["train"])].format(request=request)

    rows = adversarial_mix(world, hits, wrap, cfg.seed, n_benign=len(hits))
    data = out / "adversarial.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    scfg = dataclasses.replace(presets.get(cfg.recipe).sft, base=cfg.checkpoint, out_dir=str(where),
                               data=f"{cfg.world}*{1 - cfg.adv_share:g},{data}*{cfg.adv_share:g}",
                               max_steps=cfg.adv_steps, seed=cfg.seed, threads=cfg.threads)
    sft.main(scfg)
    return str(where)


def main(cfg: Config) -> dict:
    configure_torch(cfg.threads)
    t0 = time.perf_counter()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    world = load(cfg.world)
    ckpt, tok = _load_assistant(cfg.checkpoint)
    rows = Rows(out / "rows.jsonl")
    families, kinds = cfg.family_list(), cfg.goal_list()
    heldout = {k: goals_of(world, k, "heldout", cfg.n, cfg.seed) for k in kinds}
    suffixes = {k: suffix_for(cfg, ckpt.model, tok, k, world, out, "base") for k in kinds} if "gcg" in families else {}
    flt = PerplexityFilter(ckpt.model, tok, cfg.filter_window)
    threshold = flt.calibrate(benign_messages(world, 300, cfg.seed, "train"), cfg.filter_max_flagged)
    run_tool = tool_runner(cfg.world)
    results: list[dict] = []
    utilities: dict[str, dict] = {}

    def assistant(model_path: str | None, defense: str) -> Replies:
        if cfg.url and model_path is None:
            base: Replies = Served(cfg.url, cfg.max_new_tokens)
        else:
            model = ckpt.model if model_path is None else _load_assistant(model_path)[0].model
            base = Local(Engine(model), tok, run_tool, cfg.max_new_tokens)
        return filtered(base, flt) if "filter" in defense.split("+") else base

    for defense in cfg.defense_list():
        adv = "adv" in defense.split("+")
        path = adversarial_checkpoint(cfg, world, tok, suffixes, out) if adv else None
        replies = assistant(path, defense)
        model_tag = "adv" if adv else "base"
        for family in families:
            for kind in kinds:
                key = f"{model_tag}|{defense}|{family}|{kind}"
                if rows.get(key) is None:
                    r = measure(replies, heldout[kind], family, suffixes[kind].text if kind in suffixes else "")
                    rows.add(key, {"family": family, "defense": defense, "goal": kind, **r})
                results.append(rows.get(key))
        if adv and "gcg" in families:  # the attacker re-optimises against the trained model (white box)
            adv_model = _load_assistant(path)[0].model
            for kind in kinds:
                key = f"{model_tag}|{defense}|gcg (adaptive)|{kind}"
                if rows.get(key) is None:
                    s = suffix_for(cfg, adv_model, tok, kind, world, out, "adv")
                    rows.add(key, {"family": "gcg (adaptive)", "defense": defense, "goal": kind,
                                   **measure(replies, heldout[kind], "gcg", s.text)})
                results.append(rows.get(key))
        key = f"{model_tag}|{defense}|utility"
        if rows.get(key) is None:
            rows.add(key, utility(replies, cfg.world, cfg.utility_n))
        utilities[defense] = rows.get(key)
    if cfg.transfer and suffixes:
        replies = assistant(cfg.transfer, "none")
        for kind in kinds:
            key = f"transfer:{cfg.transfer}|none|gcg|{kind}"
            if rows.get(key) is None:
                rows.add(key, {"family": "gcg (transfer)", "defense": TRANSFER, "goal": kind,
                               **measure(replies, heldout[kind], "gcg", suffixes[kind].text)})
            results.append(rows.get(key))
            key = f"transfer:{cfg.transfer}|none|direct|{kind}"
            if rows.get(key) is None:
                rows.add(key, {"family": "direct", "defense": TRANSFER, "goal": kind,
                               **measure(replies, heldout[kind], "direct")})
            results.append(rows.get(key))
    card_rows = [card.Row(r["family"], r["defense"], r["goal"], r["hits"], r["n"]) for r in results]
    table = card.markdown(card_rows, utilities)
    summary = {"rows": [r.to_dict() for r in card_rows], "utility": utilities, "filter_threshold": threshold,
               "suffixes": {k: {"text": s.text, "loss": s.loss, "steps": s.step, "matched": s.matched}
                            for k, s in suffixes.items()},
               "samples": {f"{r['family']}|{r['defense']}|{r['goal']}": r["samples"] for r in results},
               "checkpoint": cfg.checkpoint, "url": cfg.url, "transfer": cfg.transfer,
               "seconds": time.perf_counter() - t0}
    (out / "card.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "card.md").write_text("# Security card\n\n" + table)
    print(table)
    print(f"redteam: {summary['seconds']:.0f} s -> {out / 'card.md'}")
    return summary
