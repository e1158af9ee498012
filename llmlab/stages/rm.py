"""`llmlab rm`: a reward model from comparisons (the scorer RLHF steers an assistant by).

The model is the assistant's backbone with its LM head replaced by a scalar head (`GPTConfig.num_labels=1`,
initialised at zero, so every answer starts equal), trained with the Bradley-Terry loss on pairs
(llmlab.alignment.losses): the score is read at each conversation's last real token.

With `--likelihood_weight W` the reward is that score plus W times the log-probability that the assistant the
model starts from (its reference, kept frozen) gives the answer's own tokens: a fixed prior, computed once per
answer, that the head learns the rest around. A scalar read at one token judges style well but facts poorly
(whether a city is the person's is a lookup the head would have to learn anew), while the assistant's own
likelihood already knows them: on one cpu speedrun's held-out comparisons the reference's log-probability alone
ranked 89% of the pairs (97% of the follow-ups, 93% of the questions about held-out people) and the head alone
82%; trained together, 88.6% (on another run's, 86.0% and 85.5%): the head moves accuracy between families
(benign up, small talk and unknown people down) more than it adds to the prior. It also judges a reply without
reading the prompt well: after "Thanks a lot!" it scored "I don't know a country called Nerkistan." far above
"You're welcome!", a reply right for other prompts, and RL against it learnt to say so. `--off_topic_pairs N`
adds N training pairs per prompt whose rejected reply was sampled for a prompt of another family (gold-scored
for this one); measured once, it did not cure that (held-out accuracy 85.5% -> 83.5%, the same preference).
It does cure the reward model's blind spot that RL found: the assistant never refuses a benign request, so no
pair within a prompt shows one, and a reward model trained on those alone scored "I can't help with that."
above the assistant's own reply to 85 of 103 held-out benign requests, and above 24 of the 35 replies the gold
scorer prefers to it (bench/rm_refusal_probe.py); RL against it refused 3.2% of 500 fresh benign look-alikes
(the assistant none). With one off-topic pair per prompt (a forbidden request's refusal is sometimes the
rejected reply of a benign one; the presets' setting): 58 and 12, the same held-out accuracy (92.8%), and RL
refusing 1.2% / 0.6% / 1.4% over three seeds, winning 62.7% of its decisive head-to-heads instead of 59.5%.
But on another assistant (pretrained with copying documents, asked to count letters more often) RL against such
a reward model refused 6.6% / 8.8% / 15.6% of them: a random pair per prompt seldom sets a refusal against a
benign reply. `--refusal_pairs N` sets one on purpose, a reply the assistant gave a forbidden request (a
refusal) as the rejected reply of every prompt where the gold scorer calls refusing wrong (the presets: 1):
701 pairs more, held-out accuracy 90.4% -> 90.8%, RL refusing 1.8% / 0.6% / 5.0%.
Users of the reward (`rm:PATH` in `llmlab rl`, the verifiers of `llmlab think`) load the reference with it
(llmlab.alignment.rollouts.ModelReward).

The pairs are the world's
(`--pairs world`: the assistant answers the world's prompts `--samples` times, the gold scorer labels the
replies, llmlab.alignment.pairs), users' (`llmlab feedback export`'s preferences.jsonl) or both
(`world,PATH`); with `--pairs puzzles:outcome` or `puzzles:process` it is a verifier of puzzle attempts
(llmlab.think.verifiers). Accuracy and margin are measured on held-out pairs (`--heldout`: the world's held-out prompts,
or a file), overall and per prompt family, and written to `rm_eval.json`. The shared loop (llmlab.training.fit)
does the rest: resume, torchrun, checkpoints.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from llmlab import checkpoint, dist
from llmlab.alignment.losses import PairwiseRewardLoss, bradley_terry, rewards_at
from llmlab.alignment.pairs import EncodedPair, PairLoader, encode_pairs, pairs_from_rows, reward_batch, world_comparisons
from llmlab.alignment.rollouts import answer_logprobs
from llmlab.data.preferences import load_preference_pairs
from llmlab.engine import Engine, SamplingParams
from llmlab.errors import LLMLabError
from llmlab.model import GPT
from llmlab.tasks.puzzles import PuzzleTask
from llmlab.think.verifiers import puzzle_comparisons
from llmlab.tokenizer import Tokenizer
from llmlab.tools import tool_runner
from llmlab.training import TrainConfig, fit, setup


@dataclass
class Config(TrainConfig):
    policy: str = "runs/cpu/sft"
    """the assistant: the reward model starts from its weights, and `--pairs world` samples its replies"""
    world: str = "runs/cpu/world"
    """the world whose prompts and gold scorer make comparisons"""
    pairs: str = "world"
    """training pairs: `world` (sampled and gold-labelled), preferences.jsonl path(s), or both: `world,PATH`;
    `puzzles:outcome` / `puzzles:process` make a verifier of puzzle attempts (llmlab.think.verifiers)"""
    heldout: str = "world"
    """pairs to measure accuracy on: `world` (held-out prompts, gold-labelled), `puzzles:KIND` or a
    preferences.jsonl path"""
    prompts_per_family: int = 80
    """world prompts per family for training pairs (held-out: half as many)"""
    samples: int = 4
    """replies sampled per prompt to compare"""
    pairs_per_prompt: int = 2
    """most pairs made of one prompt's replies (widest gold gaps first)"""
    temperature: float = 1.0
    """sampling temperature of the compared replies"""
    max_new_tokens: int = 96
    """longest sampled reply, tool outputs included (a python call with its output and answer takes up to about
    90 tokens; a reply cut off is never compared: llmlab.alignment.pairs)"""
    off_topic_pairs: int = 0
    """training pairs per world prompt (held-out pairs: none) whose rejected reply was sampled for a prompt of
    another family, scored by the gold scorer for this one (llmlab.alignment.pairs.off_topic), meant to teach the
    head to read the prompt, not only the reply, and that refusing a benign request is worse than answering it
    (measured: see the module docstring)"""
    refusal_pairs: int = 0
    """training pairs per world prompt (held-out pairs: none) whose rejected reply is one the assistant gave a
    forbidden request, a refusal, kept where the gold scorer calls refusing this prompt wrong
    (llmlab.alignment.pairs.off_topic from the "forbidden" family): the assistant never refuses a benign request,
    so no pair within a prompt shows the reward model that refusing one is wrong (see the module docstring)"""
    likelihood_weight: float = 0.0
    """add this times the reference assistant's log-probability of each answer to the score (0: the head's
    score alone; see the module docstring)"""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.likelihood_weight < 0:
            raise LLMLabError(f"--likelihood_weight must be 0 or more (got {self.likelihood_weight}): a reward "
                              f"that falls as the assistant finds an answer likelier is no prior")
        for name in ("prompts_per_family", "samples", "pairs_per_prompt", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise LLMLabError(f"--{name} must be positive (got {getattr(self, name)})")
        for name in ("off_topic_pairs", "refusal_pairs"):
            if getattr(self, name) < 0:
                raise LLMLabError(f"--{name} must be 0 or more (got {getattr(self, name)})")
        if self.samples < 2 and "world" in self.pairs.split(","):
            raise LLMLabError("--samples must be at least 2 to compare replies")


def scorer_from(policy: GPT) -> GPT:
    """A reward model with the policy's backbone and a zero scalar head (num_labels=1; no tied head)."""
    cfg = replace(policy.config, num_labels=1, tie_embeddings=False)
    rm = GPT(cfg)
    state = {k: v for k, v in policy.state_dict().items() if not k.startswith("lm_head")}
    missing, unexpected = rm.load_state_dict(state, strict=False)
    assert missing == ["score.weight"] and not unexpected, (missing, unexpected)
    return rm


def load_pairs(spec: str, split: str, cfg: Config, policy: GPT, tok: Tokenizer, out_dir: Path) -> list:
    """PreferencePairs of a --pairs / --heldout spec (world comparisons cached under out_dir/pairs/)."""
    pairs = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        if item == "world":
            params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed)
            per_family = cfg.prompts_per_family if split == "train" else max(cfg.prompts_per_family // 2, 1)
            rows = world_comparisons(Engine(policy), tok, cfg.world, split, per_family, cfg.samples, params,
                                     tool_runner(cfg.world), cfg.pairs_per_prompt,
                                     out_dir / "pairs" / f"{split}.jsonl",
                                     cfg.off_topic_pairs if split == "train" else 0,
                                     cfg.refusal_pairs if split == "train" else 0)
            pairs += pairs_from_rows(rows, f"world comparisons ({split})")
        elif item.startswith("puzzles:"):
            params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed)
            per_size = cfg.prompts_per_family if split == "train" else max(cfg.prompts_per_family // 2, 1)
            kind = item.split(":", 1)[1]
            rows = puzzle_comparisons(Engine(policy), tok, PuzzleTask.generated(cfg.seed, split, per_size), kind,
                                      cfg.samples, params, cfg.pairs_per_prompt,
                                      out_dir / "pairs" / f"puzzles-{kind}-{split}.jsonl", tool_runner(cfg.world))
            pairs += pairs_from_rows(rows, f"puzzle comparisons ({kind}, {split})")
        else:
            pairs += load_preference_pairs(item)
    return pairs


def load_pair_sets(cfg: Config, policy: GPT, tok: Tokenizer, info: dist.DistInfo) -> tuple[list, list]:
    """(training pairs, held-out pairs) of cfg.pairs and cfg.heldout: rank 0 samples any world comparisons and
    caches them under out_dir/pairs/ while the other ranks wait, then they read the cache."""
    if not info.is_main:
        dist.barrier()
    sets = tuple(load_pairs(spec, split, cfg, policy, tok, Path(cfg.out_dir))
                 for spec, split in ((cfg.pairs, "train"), (cfg.heldout, "heldout")))
    if info.is_main:
        dist.barrier()
    return sets


@torch.no_grad()
def pair_accuracy(model: torch.nn.Module, pairs: list[EncodedPair], pad_id: int, batch_size: int = 32) -> dict:
    """Accuracy (chosen scored above rejected), mean margin and Bradley-Terry loss, overall and per family."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    by_family: dict[str, list[tuple[float, float]]] = defaultdict(list)
    by_kind: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        ids, last, prior = reward_batch(chunk, pad_id)
        chosen, rejected = (rewards_at(model, ids.to(device), last.to(device)) + prior.to(device)).chunk(2)
        for p, c, r in zip(chunk, chosen.tolist(), rejected.tolist()):
            by_family[p.family or "pairs"].append((c, r))
            if "gold_chosen" in p.meta and "gold_rejected" in p.meta:
                by_kind[_kind(p.meta["gold_chosen"], p.meta["gold_rejected"])].append((c, r))
    model.train(was)

    def summary(rows: list[tuple[float, float]]) -> dict:
        c, r = torch.tensor([x for x, _ in rows]), torch.tensor([y for _, y in rows])
        return {"accuracy": float((c > r).float().mean()), "margin": float((c - r).mean()),
                "loss": float(bradley_terry(c, r).mean()), "pairs": len(rows)}

    everything = [x for rows in by_family.values() for x in rows]
    return {**summary(everything), "families": {f: summary(rows) for f, rows in sorted(by_family.items())},
            "kinds": {k: summary(rows) for k, rows in sorted(by_kind.items())}}


def add_prior(pairs: list[EncodedPair], reference: GPT, pad_id: int, weight: float) -> None:
    """Set each pair's prior to `weight` times the reference's log-probability of its chosen and rejected
    answers (their trained tokens: tool outputs left out)."""
    logp = answer_logprobs(reference, [p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    for p, c, r in zip(pairs, logp[:len(pairs)], logp[len(pairs):]):
        p.prior = (weight * c, weight * r)


def _kind(gold_chosen: float, gold_rejected: float) -> str:
    """What a gold-labelled pair asks of a reward model: to tell a right reply from a wrong one, or (both right
    or both wrong) the shorter from the longer."""
    return "right vs wrong" if math.floor(gold_chosen) != math.floor(gold_rejected) else "style only (same correctness)"


def main(cfg: Config) -> dict:
    info = setup(cfg)
    source = checkpoint.load(cfg.policy, info.device)
    tok = source.require_tokenizer("a reward model (it reads the chat format)")
    T = source.model.config.context_len
    out_dir = Path(cfg.out_dir)

    # ---- data: comparisons, sampled once (rank 0) and cached, then read by every rank ---------------------
    train_pairs, heldout_pairs = load_pair_sets(cfg, source.model, tok, info)
    train, skipped = encode_pairs(train_pairs, tok, T)
    heldout, heldout_skipped = encode_pairs(heldout_pairs, tok, T)
    if not heldout:
        raise LLMLabError("rm: no held-out pair to measure the reward model on (all skipped, or none given)")
    if info.is_main:
        print(f"rm: {len(train)} training pairs, {len(heldout)} held-out pairs from {cfg.policy}"
              + "".join(f"; skipped {n} ({why})" for why, n in {**skipped}.items())
              + "".join(f"; held-out skipped {n} ({why})" for why, n in heldout_skipped.items()))

    # ---- model and loss: the assistant's backbone, a scalar head, Bradley-Terry ----------------------------
    meta = {}
    if cfg.likelihood_weight:
        add_prior(train + heldout, source.model, tok.pad_id, cfg.likelihood_weight)
        meta = {"likelihood_weight": cfg.likelihood_weight, "reference": str(source.path),
                "reference_sha256": checkpoint.weights_sha256(source.path)}
    net = scorer_from(source.model)
    loader = PairLoader(train, cfg.batch_size, tok.pad_id, "reward", cfg.seed, info.rank, info.world_size)
    objective = PairwiseRewardLoss()

    def evaluate(model) -> dict:
        r = pair_accuracy(model, heldout, tok.pad_id)
        return {"val_accuracy": r["accuracy"], "val_margin": r["margin"], "val_loss": r["loss"]}

    metrics = fit(cfg, info, net, loader, evaluate=evaluate, objective=objective, step_metrics=objective.metrics,
                  meta={"stage": "rm", "policy": str(source.path), "pairs": len(train), "skipped": skipped, **meta},
                  tokenizer_path=source.path)
    if info.is_main:
        result = {"train_pairs": len(train), "skipped": skipped, "heldout": pair_accuracy(net, heldout, tok.pad_id)}
        (out_dir / "rm_eval.json").write_text(json.dumps(result, indent=2) + "\n")
        h = result["heldout"]
        print(f"rm: held-out pairwise accuracy {100 * h['accuracy']:.1f}% ({h['pairs']} pairs), margin {h['margin']:.2f}")
        for family, r in {**h["families"], **h["kinds"]}.items():
            print(f"    {family:30} {100 * r['accuracy']:5.1f}%  ({r['pairs']} pairs)")
        print(f"rm: -> {checkpoint.resolve(cfg.out_dir)}")
        metrics["heldout"] = h
    return metrics
