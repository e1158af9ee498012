"""The losses of alignment, as functions of tensors and as `Objective`s of the shared training loop.

    bradley_terry        -log sigmoid(r_chosen - r_rejected): a reward model from pairs (Bradley & Terry 1952;
                         InstructGPT's reward model loss)
    dpo                  -log sigmoid(beta * ((log pi_c - log ref_c) - (log pi_r - log ref_r))) (Rafailov et al.
                         2023); beta * (log pi - log ref) is each answer's implicit reward (`DPOLoss`: optionally
                         plus the chosen answer's negative log-likelihood per token, RPO)
    policy_gradient      -A * log pi(token) on the sampled tokens, plus beta times a per-token KL estimate to the
                         frozen reference (k3 = exp(ref - logp) - (ref - logp) - 1: unbiased, never negative, zero
                         when the policy is the reference)

A reward model reads its score at the last real token of each row (the `<|assistant_end|>` closing the reply),
never at padding: rows are right-padded, attention is causal, so the score there sees exactly the sequence.
"""

from __future__ import annotations

import threading

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmlab.training import IGNORE_INDEX, split_pairs, split_rows, token_losses


def token_logprobs(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(target) of every position (B, T), 0 where the target is IGNORE_INDEX; with a temperature, of the
    distribution softmax(logits / temperature) that sampling at that temperature draws from."""
    if temperature == 1.0:
        return -token_losses(model, inputs, targets)
    logits = model(inputs) / temperature
    return -F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                            reduction="none").view_as(targets)


def sequence_logprobs(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of log p over each row's targets (B,): the log-probability of the trained part of the sequence."""
    return token_logprobs(model, inputs, targets).sum(dim=-1)


def rewards_at(model: nn.Module, ids: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """A scorer's (num_labels=1) score of each row (B,), read at position last[b], the row's last real token."""
    scores = model(ids)[..., 0]  # (B, T)
    return scores.gather(1, last[:, None]).squeeze(1)


def bradley_terry(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Per-pair loss -log sigmoid(chosen - rejected): the negative log-likelihood that the chosen answer wins."""
    return -F.logsigmoid(chosen - rejected)


def dpo(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
        ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair DPO loss, implicit reward of the chosen answer, of the rejected one); log-probabilities are
    sums over each answer's tokens."""
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    return -F.logsigmoid(chosen_reward - rejected_reward), chosen_reward, rejected_reward


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) at tokens sampled from the policy (Schulman's k3):
    exp(ref - logp) - (ref - logp) - 1 >= 0, zero where they agree; its gradient pulls the policy back."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


class _Stats:
    """Running sums of detached numbers for the metrics log, read and reset once per step."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.n = 0
        self.lock = threading.Lock()  # a CPU step computes a batch's parts on several threads

    def add(self, n: int, **values: torch.Tensor) -> None:
        sums = {k: float(v.detach().sum()) for k, v in values.items()}
        with self.lock:
            for k, v in sums.items():
                self.sums[k] = self.sums.get(k, 0.0) + v
            self.n += n

    def read(self) -> dict:
        out = {k: v / max(self.n, 1) for k, v in self.sums.items()}
        self.sums, self.n = {}, 0
        return out


class PairwiseRewardLoss:
    """Objective of a reward model: a batch is (ids (2P, T), last (2P,), prior (2P,)), the P chosen rows then
    the P rejected ones, and a fixed score added to each row's (llmlab.alignment.pairs.EncodedPair.prior); the
    loss is Bradley-Terry summed over the P pairs. `metrics()` gives the step's accuracy and margin."""

    split = staticmethod(split_pairs)

    def __init__(self) -> None:
        self.stats = _Stats()

    def count(self, batch: tuple[torch.Tensor, ...]) -> int:
        return batch[0].size(0) // 2

    def loss_sum(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        ids, last, prior = batch
        r = rewards_at(model, ids, last) + prior
        chosen, rejected = r.chunk(2)
        self.stats.add(chosen.numel(), train_accuracy=(chosen > rejected).float(), train_margin=chosen - rejected)
        return bradley_terry(chosen, rejected).sum()

    def metrics(self) -> dict:
        return self.stats.read()


class DPOLoss:
    """Objective of DPO: a batch is (inputs (2P, T), targets (2P, T)), chosen rows then rejected rows, targets
    only on the answers' tokens; `reference` is the frozen model the policy started from. With `nll` > 0, plus
    `nll` times the chosen answer's negative log-likelihood per token (RPO, Pang et al. 2024; TRL's
    `rpo_alpha`): DPO alone may lower the chosen answers' likelihood too, moving it to answers in neither set."""

    split = staticmethod(split_pairs)

    def __init__(self, reference: nn.Module, beta: float, nll: float = 0.0):
        self.reference, self.beta, self.nll = reference.eval().requires_grad_(False), beta, nll
        self.stats = _Stats()

    def count(self, batch: tuple[torch.Tensor, ...]) -> int:
        return batch[0].size(0) // 2

    def loss_sum(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        inputs, targets = batch
        policy = sequence_logprobs(model, inputs, targets)
        with torch.no_grad():
            ref = sequence_logprobs(self.reference, inputs, targets)
        pc, pr = policy.chunk(2)
        rc, rr = ref.chunk(2)
        losses, chosen_reward, rejected_reward = dpo(pc, pr, rc, rr, self.beta)
        self.stats.add(pc.numel(), logp_chosen=pc, logp_rejected=pr, reward_chosen=chosen_reward,
                       reward_rejected=rejected_reward, train_accuracy=(chosen_reward > rejected_reward).float())
        if self.nll:
            tokens = (targets[:pc.numel()] != IGNORE_INDEX).sum(dim=-1).clamp(min=1)
            losses = losses - self.nll * pc / tokens
        return losses.sum()

    def metrics(self) -> dict:
        return self.stats.read()


class PolicyGradientLoss:
    """Objective of on-policy RL: a batch is (inputs, targets, advantages (B,), ref_logp (B, T)); targets are
    the sampled reply tokens the policy chose (prompt, padding and forced tool outputs are IGNORE_INDEX). The
    loss summed over trained tokens is -A * log pi(token) + beta * k3(token); the loop divides by their count
    (each token weighs the same, so long replies are not discounted per token). pi is the distribution the
    replies were sampled from, at the rollouts' `temperature` (ref_logp must be at the same temperature); the
    greedy reply, its argmax, is the same at every temperature."""

    split = staticmethod(split_rows)

    def __init__(self, beta: float, temperature: float = 1.0):
        self.beta, self.temperature = beta, temperature
        self.stats = _Stats()

    def count(self, batch: tuple[torch.Tensor, ...]) -> int:
        return int((batch[1] != IGNORE_INDEX).sum())

    def loss_sum(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        inputs, targets, advantages, ref_logp = batch
        trained = targets != IGNORE_INDEX
        logp = token_logprobs(model, inputs, targets, self.temperature)
        kl = kl_k3(logp, ref_logp) * trained
        pg = -advantages[:, None] * logp * trained
        self.stats.add(inputs.size(0), kl_per_reply=kl.sum(-1))
        return (pg + self.beta * kl).sum()

    def metrics(self) -> dict:
        return self.stats.read()
