"""`llmlab speedrun`: every stage of a preset in order, then `report.md` in the run directory.

world -> tokenizer -> pretrain -> (sft -> rm -> rl) -> evaluation of the base model and the assistants -> samples
-> report. Each stage that already finished (its output complete on disk) is skipped, and pretraining resumes
from its last checkpoint, so an interrupted speedrun continues where it stopped when started again. When a stage
must run again (a world of other settings, a tokenizer missing, more pretraining steps), what the later stages
made from its old output is moved, never deleted, to <run_dir>/stale-<time>/ and made again. A training stage
whose checkpoint was made with other settings than the preset's now (`changed_settings`: an RL KL weight, a
learning rate; not the threads or the checkpoint cadence) runs again from the start, its own output moved too.

Under torchrun every process runs pretraining; rank 0 alone runs the other stages while the rest wait.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from llmlab import checkpoint, dist
from llmlab.config import to_dict
from llmlab.engine import Engine, newline_ids
from llmlab.errors import LLMLabError
from llmlab.report import write_report
from llmlab.stages import chat, dpo, evaluate, feedback, pretrain, rl, rm, sample, serve, sft, tokenizer, world
from llmlab.tasks import run_task
from llmlab.tasks.knowledge import stored_knowledge
from llmlab.tasks.world_qa import WorldArithmetic, WorldQA


@dataclass
class Config:
    run_dir: str = "runs/cpu"
    """directory of the whole run: world/, tokenizer/, base/, report.md"""
    world: world.Config = field(default_factory=world.Config)
    """the world stage"""
    tokenizer: tokenizer.Config = field(default_factory=tokenizer.Config)
    """the tokenizer stage"""
    pretrain: pretrain.Config = field(default_factory=pretrain.Config)
    """the pretraining stage"""
    sample: sample.Config = field(default_factory=sample.Config)
    """sampling settings for `llmlab sample` and the report's samples"""
    sft: sft.Config = field(default_factory=sft.Config)
    """the fine-tuning stage"""
    rm: rm.Config = field(default_factory=rm.Config)
    """the reward model"""
    dpo: dpo.Config = field(default_factory=dpo.Config)
    """DPO from the reward model's comparisons (not run by the speedrun)"""
    rl: rl.Config = field(default_factory=rl.Config)
    """RL of the assistant against the reward model (RLHF)"""
    eval: evaluate.Config = field(default_factory=evaluate.Config)
    """the evaluation of the assistant"""
    chat: chat.Config = field(default_factory=chat.Config)
    """settings of `llmlab chat` for this run"""
    serve: serve.Config = field(default_factory=serve.Config)
    """settings of `llmlab serve` for this run (not run by the speedrun)"""
    feedback: feedback.Config = field(default_factory=feedback.Config)
    """settings of `llmlab feedback` for this run (not run by the speedrun)"""
    assistant: bool = False
    """also fine-tune the assistant (sft) and evaluate it beside the base model (the report card)"""
    align: bool = False
    """after fine-tuning, train a reward model (rm) and steer the assistant by it (rl); the report card gets the
    RL'd assistant's column"""
    eval_questions: int = 200
    """world questions per group in the base model's evaluation"""

    def __post_init__(self) -> None:
        if self.eval_questions < 1:
            raise LLMLabError(f"speedrun: eval_questions must be positive (got {self.eval_questions})")


RUN_ONLY = frozenset({"threads", "device", "compile", "parallel", "resume", "keep_checkpoints", "save_every",
                      "eval_every", "eval_rows", "out_dir", "max_steps"})
"""settings of a training stage that do not change what it makes (more `max_steps` resume its checkpoint)"""


def _flat(d: dict, prefix: str = "") -> dict:
    """{"optim.muon_lr": 0.04, ...}: nested settings with dotted names."""
    out = {}
    for key, value in d.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return out


def changed_settings(cfg) -> list[str]:
    """"name: old -> new" for each setting (outside RUN_ONLY) that the training stage's checkpoint was made with
    and `cfg` changes (a preset's RL KL weight, a learning rate); [] when there is no checkpoint."""
    if not checkpoint.has_checkpoint(cfg.out_dir):
        return []
    saved = _flat(checkpoint.read_info(cfg.out_dir).get("config") or {})
    now = _flat(json.loads(json.dumps(to_dict(cfg))))
    return [f"{k}: {saved[k]!r} -> {now[k]!r}" for k in sorted(now.keys() & saved.keys())
            if k.split(".")[0] not in RUN_ONLY and saved[k] != now[k]]


def _done(cfg) -> bool:
    """A training stage is done when its latest checkpoint is at max_steps and was made with cfg's settings."""
    return (checkpoint.has_checkpoint(cfg.out_dir) and checkpoint.read_info(cfg.out_dir)["step"] >= cfg.max_steps
            and not changed_settings(cfg))


def _tokenized(cfg) -> bool:
    return (Path(cfg.out_dir) / "tokenizer.json").is_file()


def outdated_by(chain: list[tuple[str, bool, str]],
                remade: frozenset[str] = frozenset()) -> tuple[str | None, list[str]]:
    """chain: (stage, done, output) in order. The first stage that will run, and the outputs of the stages
    after it (made from what it replaces), its own too when it is in `remade` (made anew, not resumed: its
    settings changed)."""
    for i, (name, done, _) in enumerate(chain):
        if not done:
            return name, [out for _, _, out in chain[i + (name not in remade):]]
    return None, []


def set_aside(run_dir: Path, outputs: list[str]) -> Path | None:
    """Move the existing `outputs` (stage directories) into run_dir/stale-<time>/; that folder, or None."""
    present = [Path(p) for p in outputs if Path(p).exists()]
    if not present:
        return None
    stale = run_dir / time.strftime("stale-%Y%m%d-%H%M%S")
    stale.mkdir(parents=True, exist_ok=True)
    for p in present:
        p.rename(stale / p.name)
    return stale


def main(cfg: Config) -> dict:
    run_dir = Path(cfg.run_dir)
    if Path(cfg.pretrain.out_dir).parent != run_dir:  # (the stages' paths come from the preset's --run)
        raise LLMLabError(f"--run_dir {run_dir} is not where the stages write ({Path(cfg.pretrain.out_dir).parent}): "
                          f"use --run {run_dir} to put every stage of the run there")
    info = dist.init(cfg.pretrain.device)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    results: dict = {"preset_config": to_dict(cfg), "seconds": {}, "earlier": []}
    try:  # the times of stages an earlier, interrupted invocation completed
        earlier = json.loads((run_dir / "speedrun.json").read_text())["seconds"]
    except (OSError, ValueError, KeyError, TypeError):
        earlier = {}
    t_run = time.perf_counter()

    def stage(name: str, done: bool, fn, every_rank: bool = False):
        """Run a stage (on rank 0 only unless every_rank), then wait for all ranks."""
        t0 = time.perf_counter()
        out = None
        if done:
            if info.is_main:
                print(f"== {name}: already complete, skipped")
        elif every_rank or info.is_main:
            if info.is_main:
                print(f"== {name}")
            out = fn()
        dist.barrier()
        results["seconds"][name] = time.perf_counter() - t0
        if done and isinstance(earlier.get(name), (int, float)):
            results["seconds"][name] = earlier[name]
            results["earlier"].append(name)
        return out

    chain = [("world", world.is_done(cfg.world), cfg.world.out_dir),
             ("tokenizer", _tokenized(cfg.tokenizer), cfg.tokenizer.out_dir),
             ("pretrain", _done(cfg.pretrain), cfg.pretrain.out_dir)]
    chain += [("sft", _done(cfg.sft), cfg.sft.out_dir)] if cfg.assistant else []
    chain += [("rm", _done(cfg.rm), cfg.rm.out_dir), ("rl", _done(cfg.rl), cfg.rl.out_dir)] if cfg.assistant and cfg.align else []
    trained = {"pretrain": cfg.pretrain, "sft": cfg.sft, "rm": cfg.rm, "rl": cfg.rl}
    remade = {name: changes for name, _, _ in chain
              if name in trained and (changes := changed_settings(trained[name]))}
    rerun, outdated = outdated_by(chain, frozenset(remade))
    if info.is_main and rerun in remade:
        print(f"== {rerun} was trained with other settings ({'; '.join(remade[rerun])}): it is trained anew")
    if info.is_main and outdated and (stale := set_aside(run_dir, outdated)):
        print(f"== {rerun} runs again: the earlier outputs it and the later stages made were moved to {stale}")
    dist.barrier()
    results["world"] = stage("world", chain[0][1], lambda: world.main(cfg.world))
    results["tokenizer"] = stage("tokenizer", _tokenized(cfg.tokenizer), lambda: tokenizer.main(cfg.tokenizer))
    stage("pretrain", _done(cfg.pretrain), lambda: pretrain.main(cfg.pretrain), every_rank=True)
    if cfg.assistant:
        stage("sft", _done(cfg.sft), lambda: sft.main(cfg.sft), every_rank=True)
    aligned = cfg.assistant and cfg.align
    if aligned:
        stage("rm", _done(cfg.rm), lambda: rm.main(cfg.rm), every_rank=True)
        stage("rl", _done(cfg.rl), lambda: rl.main(cfg.rl), every_rank=True)
    if not info.is_main:
        return {}
    if cfg.assistant:
        results["sft"] = checkpoint.read_info(cfg.sft.out_dir)["metrics"]
    if aligned:
        results["rm"] = json.loads((Path(cfg.rm.out_dir) / "rm_eval.json").read_text())
        results["rl"] = {**checkpoint.read_info(cfg.rl.out_dir)["metrics"],
                         "judge": json.loads((Path(cfg.rl.out_dir) / "win_rate.json").read_text())}
    results["pretrain"] = checkpoint.read_info(cfg.pretrain.out_dir)["metrics"]

    def evaluate_base_model() -> dict:
        base = checkpoint.load(cfg.pretrain.out_dir)
        tok = base.tokenizer
        engine = Engine(base.model)
        stops = [tok.bos_id] + newline_ids(tok)
        out = {
            "world_qa": run_task(WorldQA(cfg.world.out_dir, per_group=cfg.eval_questions), engine, tok, stop_ids=stops),
            "arithmetic": run_task(WorldArithmetic(cfg.world.out_dir, per_group=cfg.eval_questions // 2), engine, tok,
                                   stop_ids=stops),
        }
        prompts = [ex.prompt for ex in WorldQA(cfg.world.out_dir, per_group=2, seed=1).examples()[:3]]
        params = dataclasses.replace(cfg.sample.sampling, max_new_tokens=48, top_p=1.0, seed=0)
        free = engine.generate([[tok.bos_id] + tok.encode(p) for p in prompts], params, [tok.bos_id])
        out["samples"] = [{"prompt": p, "completion": tok.decode(c)} for p, c in zip(prompts, free)]
        return out

    results["eval"] = stage("eval", False, evaluate_base_model)

    def evaluate_both() -> dict:
        """Base (Q:/A:) and assistant (chat, tools) on the same tasks, for the report card."""
        per_group = max(cfg.eval_questions // 2, 8)
        base = checkpoint.load(cfg.pretrain.out_dir).model
        assistant = checkpoint.load(cfg.sft.out_dir)
        tok = assistant.tokenizer
        world_dir = cfg.world.out_dir
        card = {"base": evaluate.evaluate_base(Engine(base), tok, world_dir, per_group)
                | {"knowledge": stored_knowledge(base, tok, world_dir, per_group=per_group // 2)},
                "chat": evaluate.evaluate_chat(Engine(assistant.model), tok, world_dir, per_group)
                | {"knowledge": stored_knowledge(assistant.model, tok, world_dir, per_group=per_group // 2)}}
        if aligned:
            steered = checkpoint.load(cfg.rl.out_dir).model
            card["rl"] = evaluate.evaluate_chat(Engine(steered), tok, world_dir, per_group) \
                | {"knowledge": stored_knowledge(steered, tok, world_dir, per_group=per_group // 2)}
        return card

    if cfg.assistant:
        results["card"] = stage("report card", False, evaluate_both)
    results["seconds"]["total"] = time.perf_counter() - t_run + sum(results["seconds"][n] for n in results["earlier"])
    (run_dir / "speedrun.json").write_text(json.dumps(results, indent=2) + "\n")
    report = write_report(run_dir, results, cfg)
    qa = results["eval"]["world_qa"]["groups"]
    print("world QA (base, Q:/A:): " + ", ".join(f"{g} {100 * a:.0f}%" for g, a in qa.items()))
    print(f"report: {report}  ({results['seconds']['total']:.0f} s)")
    return results
