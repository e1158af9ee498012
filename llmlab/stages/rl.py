"""`llmlab rl`: on-policy reinforcement learning of an assistant against a reward: RLHF (`--reward rm:PATH`),
a verifiable reward (`--reward task:gold`), or a weighted sum (`rm:PATH*1,task:gold*0.5`).

The algorithm is REINFORCE with group-relative advantages (GRPO without the clipping, as nanochat's chat_rl):
each step samples `--group_size` replies to each of `--batch_size` prompts through the engine (tools run
inside it), scores them, and takes each reward minus its group's mean as the advantage of every token of the
reply; the loss adds beta times a per-token KL estimate to the frozen reference (llmlab.alignment.losses). Why
this and not PPO: with one gradient step per batch of fresh samples the policy that sampled is the policy being
updated, so PPO's importance ratio is exactly 1 and its clipping never acts; a value network would be a second
model to train for a baseline the group mean gives for free (and, unlike dividing by the group's standard
deviation, without favouring prompts whose rewards barely differ). Groups whose rewards are all equal teach
nothing: their share is logged (`zero_spread`), as are the reward, the KL per reply and the reply length.

A run whose KL to the reference passes `--max_kl` nats per reply stops with a message (the last good checkpoint
stays). At the end the policy meets the reference head to head on the world's held-out prompts, judged by the
gold scorer (`win_rate.json`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llmlab import checkpoint
from llmlab.alignment.judge import gold_replies
from llmlab.alignment.losses import PolicyGradientLoss
from llmlab.alignment.rollouts import TASKS, Rollouts, parse_reward, task_by_name
from llmlab.engine import SamplingParams
from llmlab.errors import LLMLabError
from llmlab.stages.dpo import judge, policy_and_reference
from llmlab.tools import tool_runner
from llmlab.training import TrainConfig, fit, setup


@dataclass
class Config(TrainConfig):
    policy: str = "runs/cpu/sft"
    """the assistant to train (and, unless --ref, the frozen reference)"""
    ref: str = ""
    """the frozen reference of the KL penalty (default: --policy)"""
    reward: str = "task:gold"
    """task:gold (the world's gold scorer), rm:PATH (a reward model of `llmlab rm`), or a weighted sum: rm:PATH*1,task:gold*0.5"""
    world: str = "runs/cpu/world"
    """the world whose prompts are asked (its train split; the held-out split judges)"""
    prompts: str = "gold"
    """the prompts: gold (the world's eleven families) or chain (two-step word problems with the calculator)"""
    prompts_per_family: int = 80
    """training prompts per family (chain: per template)"""
    group_size: int = 4
    """replies sampled per prompt; advantages are relative to the group's mean"""
    beta: float = 0.05
    """weight of the per-token KL penalty to the reference"""
    temperature: float = 1.0
    """sampling temperature of the rollouts"""
    max_new_tokens: int = 96
    """longest reply of a rollout, tool outputs included (a python call with its output and answer takes up to
    about 90 tokens)"""
    scale_advantages: bool = False
    """divide the advantages by the standard deviation of the batch's rewards (a reward model's scores have no
    set unit; without it their scale multiplies the learning rate)"""
    mask_truncated: bool = False
    """give a reply cut off by --max_new_tokens (or by the context) no advantage, and leave it out of its group's
    mean (llmlab.alignment.rollouts.rollout_batch): its answer never came"""
    max_kl: float = 20.0
    """stop when the mean KL to the reference passes this many nats per reply (a diverging run)"""
    eval_per_family: int = 16
    """held-out prompts per family for the evaluation every eval_every steps (greedy, gold reward)"""
    judge_per_family: int = 40
    """held-out prompts per family for the final head-to-head against the reference (0 = none)"""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.group_size < 2:
            raise LLMLabError(f"--group_size must be at least 2: advantages compare replies to one prompt (got {self.group_size})")
        for name in ("beta", "temperature", "max_kl"):
            if not getattr(self, name) >= 0:
                raise LLMLabError(f"--{name} must be >= 0 (got {getattr(self, name)})")
        if self.prompts not in TASKS:
            raise LLMLabError(f"--prompts must be one of {', '.join(TASKS)} (got {self.prompts!r})")
        if self.temperature == 0:
            raise LLMLabError("--temperature must be > 0: greedy replies to one prompt are all the same")


def main(cfg: Config) -> dict:
    info = setup(cfg)
    policy, tok, ref = policy_and_reference(cfg.policy, cfg.ref, info.device, "rl")
    reward = parse_reward(cfg.reward, tok, cfg.world, info.device)
    tool = tool_runner(cfg.world)
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature)
    examples = task_by_name(cfg.prompts, cfg.world, "train", cfg.prompts_per_family).examples()
    task_reward = f"task:{cfg.prompts}"
    gold = None if cfg.reward == task_reward else parse_reward(task_reward, tok, cfg.world, info.device)
    rollouts = Rollouts(policy.model, ref.model, tok, list(examples), reward, tool, cfg.batch_size, cfg.group_size,
                        params, cfg.seed, info.rank, info.world_size, cfg.scale_advantages, gold, cfg.mask_truncated)
    objective = PolicyGradientLoss(cfg.beta, cfg.temperature)
    heldout = task_by_name(cfg.prompts, cfg.world, "heldout", cfg.eval_per_family)
    if info.is_main:
        print(f"rl: {len(rollouts.examples)} prompts x {cfg.group_size} replies, {cfg.batch_size} prompts per step; "
              f"reward {cfg.reward}; beta {cfg.beta}" + (f"; {rollouts.skipped} prompts too long skipped" if rollouts.skipped else ""))

    def evaluate(model) -> dict:
        rows = gold_replies(policy.model, tok, heldout, tool)  # (room for the longest right replies)
        return {"val_gold_reward": sum(r["reward"] for r in rows) / len(rows),
                "val_accuracy": sum(r["correct"] for r in rows) / len(rows),
                "val_words": sum(r["words"] for r in rows) / len(rows)}

    def step_metrics() -> dict:
        s = rollouts.stats
        row = {"reward": s.reward, "zero_spread": s.zero_spread, "reply_tokens": s.reply_tokens,
               "finished": s.finished, **objective.metrics(), **({"gold_reward": s.gold} if s.gold is not None else {})}
        if row.get("kl_per_reply", 0.0) > cfg.max_kl:
            kept = checkpoint.resolve(cfg.out_dir) if checkpoint.has_checkpoint(cfg.out_dir) else "none yet"
            raise LLMLabError(f"rl: the KL to the reference reached {row['kl_per_reply']:.1f} nats per reply "
                              f"(--max_kl {cfg.max_kl}): the policy is running away from the reference; raise --beta "
                              f"or lower the learning rates (--optim.muon_lr ...). The last good checkpoint: {kept}")
        return row

    metrics = fit(cfg, info, policy.model, rollouts, evaluate=evaluate, objective=objective, step_metrics=step_metrics,
                  tokenizer_path=policy.path,
                  meta={"stage": "rl", "policy": str(policy.path), "ref": str(ref.path), "reward": cfg.reward})
    if info.is_main and cfg.judge_per_family > 0:
        task = task_by_name(cfg.prompts, cfg.world, "heldout", cfg.judge_per_family)
        metrics["judge"] = judge(policy.model, ref.model, tok, task, cfg.world, Path(cfg.out_dir), "rl")
    return metrics
