"""`llmlab dpo`: Direct Preference Optimization of an assistant from comparisons (Rafailov et al. 2023).

No reward model and no sampling during training: the policy (starting from `--policy`) raises the
log-probability of each chosen answer relative to the frozen reference (`--ref`, default the same checkpoint)
and lowers the rejected one's, by the loss -log sigmoid(beta * (chosen log-ratio - rejected log-ratio)). Both
log-probabilities are logged separately (`logp_chosen`, `logp_rejected` in metrics.jsonl): when both fall, the
policy moves probability to answers that are in neither set, a known failure of DPO. Pairs as for `llmlab rm`
(the world's gold-labelled comparisons, or preferences.jsonl). At the end the policy meets the reference head to
head on the world's held-out prompts, judged by the gold scorer (`win_rate.json`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from llmlab import checkpoint
from llmlab.alignment.judge import gold_replies, head_to_head
from llmlab.alignment.losses import DPOLoss, dpo, sequence_logprobs
from llmlab.alignment.pairs import PairLoader, encode_pairs, policy_batch
from llmlab.errors import LLMLabError
from llmlab.report import plot_dpo
from llmlab.stages import rm
from llmlab.tasks.gold import GoldTask
from llmlab.tools import tool_runner
from llmlab.training import fit, setup


@dataclass
class Config(rm.Config):
    ref: str = ""
    """the frozen reference (default: --policy)"""
    beta: float = 0.1
    """strength of the pull to the reference: the implicit reward is beta x log(pi / ref)"""
    nll: float = 0.0
    """weight of the chosen answers' negative log-likelihood per token, added to the DPO loss (RPO; 0: DPO
    alone): keeps the chosen answers likely where DPO alone lowers chosen and rejected both"""
    judge_per_family: int = 40
    """held-out prompts per family for the final head-to-head against the reference (0 = none)"""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.beta > 0:
            raise LLMLabError(f"--beta must be positive (got {self.beta})")
        if self.nll < 0:
            raise LLMLabError(f"--nll must be 0 or more (got {self.nll})")


def policy_and_reference(policy_path: str, ref_path: str, device, stage: str):
    """(policy checkpoint, its tokenizer, the frozen reference: `ref_path` or the policy's own checkpoint again),
    checked to share a shape and a tokenizer."""
    policy = checkpoint.load(policy_path, device)
    tok = policy.require_tokenizer(f"{stage} (it reads the chat format)")
    ref = checkpoint.load(ref_path or policy_path, device)
    if ref.model.config != policy.model.config:
        raise LLMLabError(f"{stage}: the reference {ref.path} has another shape than the policy {policy.path}: "
                          f"the reference is the checkpoint the policy starts from (usually the same --policy)")
    if ref.tokenizer is None or ref.tokenizer.hf.to_str() != tok.hf.to_str():
        raise LLMLabError(f"{stage}: the reference {ref.path} has another tokenizer than the policy {policy.path}")
    return policy, tok, ref


def main(cfg: Config) -> dict:
    info = setup(cfg)
    policy, tok, ref = policy_and_reference(cfg.policy, cfg.ref, info.device, "dpo")
    out_dir = Path(cfg.out_dir)
    T = policy.model.config.context_len

    train_pairs, heldout_pairs = rm.load_pair_sets(cfg, ref.model, tok, info)
    train, skipped = encode_pairs(train_pairs, tok, T)
    heldout, _ = encode_pairs(heldout_pairs, tok, T)
    if info.is_main:
        print(f"dpo: {len(train)} training pairs, {len(heldout)} held-out pairs; beta {cfg.beta}, nll {cfg.nll}"
              + "".join(f"; skipped {n} ({why})" for why, n in skipped.items()))

    loader = PairLoader(train, cfg.batch_size, tok.pad_id, "policy", cfg.seed, info.rank, info.world_size)
    objective = DPOLoss(ref.model, cfg.beta, cfg.nll)

    @torch.no_grad()
    def evaluate(model) -> dict:
        if not heldout:
            return {}
        sums = {"val_loss": 0.0, "val_accuracy": 0.0, "val_logp_chosen": 0.0, "val_logp_rejected": 0.0}
        for start in range(0, len(heldout), 32):
            inputs, targets = (t.to(info.device) for t in policy_batch(heldout[start:start + 32], tok.pad_id))
            pc, pr = sequence_logprobs(model, inputs, targets).chunk(2)
            rc, rr = sequence_logprobs(ref.model, inputs, targets).chunk(2)
            losses, cr, rr_ = dpo(pc, pr, rc, rr, cfg.beta)
            for k, v in (("val_loss", losses), ("val_accuracy", (cr > rr_).float()), ("val_logp_chosen", pc),
                         ("val_logp_rejected", pr)):
                sums[k] += float(v.sum())
        return {k: v / len(heldout) for k, v in sums.items()}

    metrics = fit(cfg, info, policy.model, loader, evaluate=evaluate, objective=objective,
                  step_metrics=objective.metrics, tokenizer_path=policy.path,
                  meta={"stage": "dpo", "policy": str(policy.path), "ref": str(ref.path), "pairs": len(train)})
    if info.is_main:
        plot = plot_dpo(out_dir / "metrics.jsonl", out_dir / "dpo.png")
        print(f"dpo: log-probabilities of chosen and rejected answers -> {plot}")
    if info.is_main and cfg.judge_per_family > 0:
        metrics["judge"] = judge(policy.model, ref.model, tok, GoldTask(cfg.world, "heldout", cfg.judge_per_family),
                                 cfg.world, out_dir, "dpo")
    return metrics


def judge(model, ref_model, tok, task, world: str, out_dir: Path, stage: str) -> dict:
    """The trained policy against the reference on a task's held-out prompts; written to win_rate.json."""
    tool = tool_runner(world)
    result = head_to_head(gold_replies(model, tok, task, tool), gold_replies(ref_model, tok, task, tool))
    (out_dir / "win_rate.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{stage}: against the reference on held-out prompts ({task.name}, exact scorer): {result['wins']} wins, "
          f"{result['losses']} losses, {result['ties']} ties: win rate {100 * result['win_rate']:.1f}% "
          f"[{100 * result['win_rate_interval'][0]:.0f}, {100 * result['win_rate_interval'][1]:.0f}]; "
          f"accuracy {100 * result['a_accuracy']:.1f}% vs {100 * result['b_accuracy']:.1f}%")
    return result
