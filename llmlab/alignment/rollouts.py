"""On-policy rollouts for RL, and the rewards they are scored by.

`Rollouts` is the RL stage's batch source: each `next_batch` takes the next prompts of a seeded permutation,
samples `group_size` replies to each with the policy through the engine (tools run inside the engine, so RL can
teach tool use; the tool outputs it forced in are masked out of the loss), scores them with a reward, and
returns (inputs, targets, advantages, reference log-probabilities) for `PolicyGradientLoss`. Its sampling seed
is a function of the run's seed, the step and the rank, so a resumed run samples what the killed one would have.

Rewards (`parse_reward`): `task:NAME` is a task's exact reward (task:gold, the gold scorer of
llmlab.tasks.gold), `rm:PATH` a reward model's score of the whole conversation (with its likelihood prior when
it was trained with one: `ModelReward`), and `A*w,B*v` their weighted sum.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Callable, Protocol, Sequence

import torch

from llmlab import checkpoint
from llmlab.alignment.losses import rewards_at, sequence_logprobs, token_logprobs
from llmlab.alignment.pairs import right_padded
from llmlab.chat import ToolSpans, final_answer, render_prompt, reply_stop_ids
from llmlab.data.conversations import collate
from llmlab.engine import Engine, SamplingParams, generate_with_tools, reply_room
from llmlab.errors import LLMLabError
from llmlab.model import GPT
from llmlab.tasks import Example, that_fit
from llmlab.tasks.chain import TEMPLATES, ChainTask
from llmlab.tasks.gold import GoldTask
from llmlab.tokenizer import Tokenizer


class Reward(Protocol):
    def __call__(self, examples: Sequence[Example], prompts: Sequence[list[int]], replies: Sequence[list[int]],
                 finished: Sequence[bool]) -> list[float]:
        """One reward per row: the example asked, its prompt ids, the reply's ids (tool outputs included, no
        stop token) and whether the reply ended (False: cut off by the length limit)."""


class TaskReward:
    """A task's `reward(example, final words, called_tool)`; a reply cut off by the length limit is scored as
    it stands (usually wrong: its answer never came)."""

    def __init__(self, task, tok: Tokenizer):
        self.task, self.tok = task, tok
        self.tool_start = tok.special_id("<|tool_start|>")

    def __call__(self, examples, prompts, replies, finished) -> list[float]:
        return [self.task.reward(e, final_answer(self.tok, r), self.tool_start in r) for e, r in zip(examples, replies)]


def written_mask(tok: Tokenizer, prompt_len: int, row: list[int]) -> list[bool]:
    """Which tokens of prompt + assistant turn the assistant wrote: the turn's tokens after `prompt_len`, less
    each `<|output_start|>...<|output_end|>` span (the engine forces tool outputs), as a conversation's training
    mask marks them."""
    spans = ToolSpans(tok)
    turn = [spans.push(t) not in ("output", "output_start", "output_end") for t in row[prompt_len:]]
    return [False] * prompt_len + turn


@torch.no_grad()
def answer_logprobs(model: GPT, rows: Sequence[tuple[list[int], list[int]]], pad_id: int,
                    batch_size: int = 64) -> list[float]:
    """log p(the answer) under `model` of each (ids, mask) row: the sum over the tokens its mask marks."""
    device = next(model.parameters()).device
    out: list[float] = []
    for start in range(0, len(rows), batch_size):
        inputs, targets = collate(list(rows[start:start + batch_size]), pad_id)
        out += sequence_logprobs(model, inputs.to(device), targets.to(device)).tolist()
    return out


class ModelReward:
    """A reward model's score of prompt + reply + `<|assistant_end|>`, read at that last token. A reward model
    trained with a likelihood prior (`llmlab rm --likelihood_weight W`) adds W times the log-probability that
    its reference (the assistant it started from) gives the reply's own tokens, as in training."""

    def __init__(self, model: GPT, tok: Tokenizer, batch_size: int = 64, reference: GPT | None = None,
                 weight: float = 0.0):
        if model.config.num_labels != 1:
            raise LLMLabError("rm: the reward model must be a scorer with one output (a checkpoint of `llmlab rm`)")
        if weight and reference is None:
            raise LLMLabError("a reward model with a likelihood prior needs its reference model")
        self.model, self.tok, self.batch_size = model.eval(), tok, batch_size
        self.reference, self.weight = (reference.eval() if reference is not None else None), weight
        self.end = tok.special_id("<|assistant_end|>")

    @classmethod
    def load(cls, path: str, tok: Tokenizer, device) -> "ModelReward":
        """A checkpoint of `llmlab rm`, with its reference when it was trained with a likelihood prior."""
        model = load_reward_model(path, tok, device)
        info = checkpoint.read_info(checkpoint.resolve(path))
        weight = float(info.get("likelihood_weight", 0.0))
        reference = None
        if weight:
            try:
                ref = checkpoint.load(info["reference"], device)
            except LLMLabError as e:
                raise LLMLabError(f"the reward model {path} adds the log-likelihood of its reference, which did not "
                                  f"load: {e}") from None
            if checkpoint.weights_sha256(ref.path) != info.get("reference_sha256"):
                raise LLMLabError(f"the reward model {path} adds the log-likelihood of its reference "
                                  f"{info['reference']}, whose weights have changed since it was trained")
            reference = ref.model
        return cls(model, tok, reference=reference, weight=weight)

    @torch.no_grad()
    def score(self, rows: list[list[int]], starts: Sequence[int] | None = None) -> list[float]:
        """Each row's score; `starts[i]` is where row i's assistant turn begins (needed for the prior)."""
        device = next(self.model.parameters()).device
        rows = [r[:self.model.config.context_len] for r in rows]
        out = []
        for start in range(0, len(rows), self.batch_size):
            ids, last = right_padded(rows[start:start + self.batch_size], self.tok.pad_id)
            out += rewards_at(self.model, ids.to(device), last.to(device)).tolist()
        if self.weight:
            if starts is None:
                raise LLMLabError("this reward model's likelihood prior needs where each reply begins")
            masked = [(r, written_mask(self.tok, s, r)) for r, s in zip(rows, starts)]
            prior = answer_logprobs(self.reference, masked, self.tok.pad_id, self.batch_size)
            out = [o + self.weight * p for o, p in zip(out, prior)]
        return out

    def __call__(self, examples, prompts, replies, finished) -> list[float]:
        return self.score([list(p) + list(r) + [self.end] for p, r in zip(prompts, replies)], [len(p) for p in prompts])


class WeightedReward:
    def __init__(self, parts: list[tuple[float, Reward]]):
        self.parts = parts

    def __call__(self, examples, prompts, replies, finished) -> list[float]:
        total = [0.0] * len(replies)
        for weight, reward in self.parts:
            total = [t + weight * r for t, r in zip(total, reward(examples, prompts, replies, finished))]
        return total


def load_reward_model(path: str, tok: Tokenizer, device) -> GPT:
    """A reward model checkpoint, checked to be a scorer trained with the policy's tokenizer."""
    rm = checkpoint.load(path, device)
    if rm.model.config.num_labels != 1:
        raise LLMLabError(f"{rm.path} is not a reward model (no scalar head): train one with `llmlab rm`")
    rm_tok = rm.require_tokenizer("scoring the policy's replies")
    if rm_tok.hf.to_str() != tok.hf.to_str():
        raise LLMLabError(f"the reward model {rm.path} was trained with another tokenizer than the policy's: "
                          f"its scores of these token ids would mean nothing; train it from this assistant")
    return rm.model


TASKS = ("gold", "chain")


def task_by_name(name: str, world_dir: str, split: str, per_group: int):
    """A task with a reward: `gold` (the world's prompt families, per_group of each) or `chain` (two-step word
    problems with the calculator, per_group of each of its seven templates)."""
    if name == "gold":
        return GoldTask(world_dir, split, per_group)
    if name == "chain":
        return ChainTask(split, per_group * len(TEMPLATES))
    raise LLMLabError(f"unknown task {name!r}: choose one of {', '.join(TASKS)}")


def parse_reward(spec: str, tok: Tokenizer, world_dir: str, device, split: str = "train") -> Reward:
    """`task:NAME` (gold or chain), `rm:PATH`, or a weighted sum of them: `rm:runs/cpu/rm*1.0,task:gold*0.5`."""
    parts: list[tuple[float, Reward]] = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        term, _, weight = item.partition("*")
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            raise LLMLabError(f"--reward: the weight of {item!r} is not a number") from None
        kind, _, arg = term.partition(":")
        if kind == "task" and arg in TASKS:
            parts.append((w, TaskReward(task_by_name(arg, world_dir, split, 1), tok)))
        elif kind == "rm" and arg:
            parts.append((w, ModelReward.load(arg, tok, device)))
        else:
            raise LLMLabError(f"--reward: {item!r} is not task:gold, task:chain or rm:PATH (weighted: rm:PATH*0.5,task:gold*1)")
    if not parts:
        raise LLMLabError("--reward is empty: give task:gold, rm:PATH or a weighted sum of them")
    return parts[0][1] if len(parts) == 1 and parts[0][0] == 1.0 else WeightedReward(parts)


@dataclass
class RolloutStats:
    reward: float = 0.0
    zero_spread: float = 0.0
    """share of groups whose finished replies' rewards are all equal, or with fewer than two finished (they
    teach nothing: every advantage is 0)"""
    reply_tokens: float = 0.0
    finished: float = 0.0
    gold: float | None = None
    """the task's own reward of the same replies, when the trained reward is another (a reward model)"""


class Rollouts:
    """The RL batch source (see the module's docstring). `batch_size` prompts per rank per micro-batch,
    `group_size` replies each; advantages are each reward minus its group's mean."""

    def __init__(self, policy: GPT, reference: GPT, tok: Tokenizer, examples: list[Example], reward: Reward,
                 run_tool: Callable[[str], str] | None, batch_size: int, group_size: int, params: SamplingParams,
                 seed: int = 0, rank: int = 0, world_size: int = 1, scale_advantages: bool = False,
                 gold: Reward | None = None, mask_truncated: bool = False):
        T = policy.config.context_len
        self.examples, self.prompts, skipped = that_fit(_Listed(examples), lambda e: render_prompt(tok, e.meta["messages"]), T)
        if not self.examples:
            raise LLMLabError("rl: no prompt leaves room for a reply in the model's context")
        self.skipped = skipped
        self.engine, self.reference, self.tok = Engine(policy), reference.eval().requires_grad_(False), tok
        self.reward, self.run_tool = reward, run_tool
        self.B, self.G, self.params, self.seed = batch_size, group_size, params, seed
        self.scale_advantages, self.gold, self.mask_truncated = scale_advantages, gold, mask_truncated
        self.rank, self.world_size = rank, world_size
        self.drawn = 0  # prompts drawn, all ranks counted
        self.batches = 0
        self.stats = RolloutStats()
        self._perm: tuple[int, list[int]] = (-1, [])
        self.stop = reply_stop_ids(tok)

    def _example(self, at: int) -> int:
        n = len(self.examples)
        epoch = at // n
        if self._perm[0] != epoch:
            order = list(range(n))
            random.Random(f"{self.seed}-rollouts-{epoch}").shuffle(order)
            self._perm = (epoch, order)
        return self._perm[1][at % n]

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        chosen = [self._example(self.drawn + k) for k in range(self.B * self.world_size) if k % self.world_size == self.rank]
        self.drawn += self.B * self.world_size
        seed = (self.seed * 1_000_003 + self.batches * 7_919 + self.rank) % 2**63
        self.batches += 1
        examples = [self.examples[i] for i in chosen for _ in range(self.G)]
        prompts = [self.prompts[i] for i in chosen for _ in range(self.G)]
        batch, stats, replies = rollout_batch(self.engine, self.reference, self.tok, examples, prompts, self.reward,
                                     self.run_tool, replace(self.params, seed=seed), self.G, self.stop,
                                     self.scale_advantages, self.mask_truncated)
        if self.gold is not None:  # the replies are the last batch's: score them again by the gold reward
            stats.gold = sum(self.gold(examples, prompts, replies, [True] * len(examples))) / len(examples)
        self.stats = stats
        return batch

    def state_dict(self) -> dict:
        return {"drawn": self.drawn, "batches": self.batches, "batch_size": self.B, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        self.drawn, self.batches = state["drawn"], state["batches"]


class _Listed:
    def __init__(self, examples: list[Example]):
        self._examples = examples

    def examples(self) -> list[Example]:
        return self._examples


def policy_rows(prompts: Sequence[list[int]], replies: Sequence[list[int]], forced: Sequence[list[bool]],
                finished: Sequence[bool], end_id: int, max_len: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of prompt + reply (+ `end_id` when the reply finished), right-padded: targets are the
    reply's tokens that the policy sampled, and the end token; the prompt, padding and the tokens the engine
    forced (tool outputs) are IGNORE_INDEX."""
    rows = []
    for prompt, reply, f, done in zip(prompts, replies, forced, finished):
        ids = list(prompt) + list(reply) + ([end_id] if done else [])
        mask = [0] * len(prompt) + [int(not x) for x in f] + ([1] if done else [])
        rows.append((ids[:max_len], mask[:max_len]))
    return collate(rows, pad_id)


def group_advantages(rewards: torch.Tensor, finished: Sequence[bool], group_size: int,
                     scale_advantages: bool = False, mask_truncated: bool = False) -> torch.Tensor:
    """Each reward minus its group's mean (rows come in groups of `group_size`), over the batch's standard
    deviation with `scale_advantages`; with `mask_truncated`, unfinished replies get 0 and are left out of the
    means and the deviation (see `rollout_batch`)."""
    groups = rewards.view(-1, group_size)
    done = torch.tensor([f or not mask_truncated for f in finished], dtype=torch.float32).view(-1, group_size)
    mean = (groups * done).sum(dim=1, keepdim=True) / done.sum(dim=1, keepdim=True).clamp(min=1)
    advantages = ((groups - mean) * done).flatten()
    kept = rewards[done.flatten() > 0]
    if scale_advantages and kept.numel() > 1:
        advantages = advantages / (kept.std() + 1e-6)
    return advantages


def rollout_batch(engine: Engine, reference: GPT, tok: Tokenizer, examples: list[Example], prompts: list[list[int]],
                  reward: Reward, run_tool, params: SamplingParams, group_size: int, stop: Sequence[int],
                  scale_advantages: bool = False,
                  mask_truncated: bool = False) -> tuple[tuple[torch.Tensor, ...], RolloutStats, list[list[int]]]:
    """Sample a reply per row (rows come in groups of `group_size` with the same prompt), score them, and build
    (inputs, targets, advantages, ref_logp): targets are the policy's own reply tokens and the stop token that
    ended the reply; prompt, padding and forced tool outputs are IGNORE_INDEX. Also returns the stats and the
    replies. Advantages are rewards minus their group's mean, divided by the standard deviation of the whole
    batch's rewards with `scale_advantages` (the reward's units then do not set the step size; per group it
    would favour groups that barely differ).

    With `mask_truncated` (TRL's mask_truncated_completions, DAPO's overlong filtering), a reply cut off by the
    length limit has advantage 0 and is left out of its group's mean and the batch's spread: its answer never
    came, and the limit is --max_new_tokens or the room its prompt leaves, not the reply's doing. Compared with
    cut ones, a reply that ended early won: RL against a reward model learnt to end its weekday programs at
    `print(d.` (weekday 100% -> 50% on the report card)."""
    replies, tools = generate_with_tools(engine, tok, prompts, params, stop, run_tool)
    T = engine.model.config.context_len
    finished = [len(r) < room for r, room in zip(replies, reply_room(prompts, params, T))]
    rewards = torch.tensor(reward(examples, prompts, replies, finished), dtype=torch.float32)
    advantages = group_advantages(rewards, finished, group_size, scale_advantages, mask_truncated)
    forced = [tools.forced[i][:len(r)] if tools is not None else [False] * len(r) for i, r in enumerate(replies)]
    inputs, targets = policy_rows(prompts, replies, forced, finished, tok.special_id("<|assistant_end|>"), T, tok.pad_id)
    device = engine.device
    inputs, targets = inputs.to(device), targets.to(device)
    with torch.no_grad():
        ref_logp = token_logprobs(reference, inputs, targets, params.temperature)
    silent = (advantages.view(-1, group_size) == 0).all(dim=1)
    stats = RolloutStats(reward=float(rewards.mean()), zero_spread=float(silent.float().mean()),
                         reply_tokens=sum(map(len, replies)) / len(replies), finished=sum(finished) / len(finished))
    return (inputs, targets, advantages.to(device), ref_logp), stats, replies

