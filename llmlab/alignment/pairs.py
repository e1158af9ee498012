"""Comparisons: sampling them from an assistant and labelling them with the gold scorer, and feeding pairs to
the training loop (`PairLoader`: reward models and DPO).

`sample_replies` asks the assistant each prompt `k` times at temperature > 0 (the engine runs its tool calls)
and scores every reply with the task's reward (the gold scorer, llmlab.tasks.gold); `comparisons` pairs a better
reply with a worse one:
the best against the worst, then the next widest gaps, up to `per_prompt` pairs, equal scores never paired.
A reply cut off by the length limit is never paired: rendered as a turn it would end where the assistant never
ended it (a python call closed after "print(d.", an output cut to "4, "), and DPO's loss and its NLL term on
the chosen answer taught the assistant to stop there (with 48 new tokens, every date program was cut: DPO then
ended 100% of its weekday calls at "print(d.").
`off_topic` adds pairs whose rejected reply was sampled for a prompt of another family, scored by the gold
scorer for this prompt: within-prompt pairs never show a reply out of place, and a reward model trained on them
alone learnt which replies are right somewhere, not here (it scored "I don't know a country called Nerkistan."
far above "You're welcome!" after "Thanks a lot!", and RL against it said the first; these pairs, measured once,
did not change that, but they show it a refusal after a benign request, which within-prompt pairs never do:
llmlab.stages.rm). They are cached in a file of their own beside the comparisons (`world_comparisons`).
Rows are written in TRL's conversational format (llmlab.data.preferences), with the family and both gold scores
beside, so users' pairs (`llmlab feedback export`'s preferences.jsonl) and the world's train the same way.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from tqdm import tqdm

from llmlab.chat import parse_turn, render_conversation, render_prompt, reply_stop_ids, validate
from llmlab.data.conversations import collate
from llmlab.data.preferences import PreferencePair, check_pair, write_jsonl
from llmlab.engine import Engine, SamplingParams, generate_with_tools
from llmlab.errors import LLMLabError
from llmlab.tasks import that_fit
from llmlab.tasks.gold import GoldTask
from llmlab.tokenizer import Tokenizer


class Sampled(NamedTuple):
    """One sampled reply and how the task scores it."""

    ids: list[int]
    """the reply's tokens, tool outputs included, without the stop token"""
    reward: float
    correct: float
    finished: bool
    """False for a reply cut off by the length limit (no stop token: its ids are all the assistant wrote)"""


def sample_replies(engine: Engine, tok: Tokenizer, task: GoldTask, k: int, params: SamplingParams,
                   run_tool: Callable[[str], str] | None, batch_prompts: int = 16,
                   progress: Callable[[int], None] | None = None) -> list[tuple]:
    """[(example, [Sampled, ... k of them]), ...] for every example of `task` (any task with `reward` and
    `score`) that fits, in the task's order, `batch_prompts` prompts per engine call. Prompts are batched by
    length, so that a batch pads little; each reply has the room its own prompt leaves in the context."""
    examples, prompts, _ = that_fit(task, lambda e: render_prompt(tok, e.meta["messages"]), engine.model.config.context_len)
    stop = reply_stop_ids(tok)
    stops = set(stop)
    tool_start = tok.special_id("<|tool_start|>")
    order = sorted(range(len(examples)), key=lambda i: len(prompts[i]))
    out: list[tuple] = [()] * len(examples)
    for start in range(0, len(examples), batch_prompts):
        at = order[start:start + batch_prompts]
        chunk, chunk_prompts = [examples[i] for i in at], [prompts[i] for i in at]
        rows = [p for p in chunk_prompts for _ in range(k)]
        seeded = dataclasses.replace(params, seed=params.seed + start)
        replies, _ = generate_with_tools(engine, tok, rows, seeded, stop, run_tool, keep_stop=True)
        for i, example in enumerate(chunk):
            scored = []
            for ids in replies[i * k:(i + 1) * k]:
                finished = bool(ids) and ids[-1] in stops
                ids = ids[:-1] if finished else ids
                text, called = task.read(tok, ids), tool_start in ids
                reward, right = task.reward(example, text, called), task.score(example, text, called)
                scored.append(Sampled(ids, reward, right, finished))
            out[at[i]] = (example, scored)
        if progress:
            progress(len(chunk))
    return out


def comparisons(tok: Tokenizer, sampled: list[tuple], per_prompt: int = 2) -> list[dict]:
    """Preference rows from sampled replies: distinct finished replies of different gold rewards, widest gaps
    first."""
    rows = []
    for example, scored in sampled:
        unique: dict[tuple, tuple] = {}
        for ids, reward, _, finished in scored:
            if not finished:
                continue
            messages = parse_turn(tok, ids)
            if not _answer(example.meta["messages"], messages):
                continue
            unique.setdefault(tuple(ids), (messages, reward))
        candidates = sorted(unique.values(), key=lambda mr: -mr[1])
        gaps = sorted(((a, b) for a, b in itertools.combinations(candidates, 2) if a[1] > b[1]),
                      key=lambda ab: -(ab[0][1] - ab[1][1]))
        for (chosen, gc), (rejected, gr) in gaps[:per_prompt]:
            rows.append({"prompt": example.meta["messages"], "chosen": chosen, "rejected": rejected,
                         "family": example.group, "gold_chosen": gc, "gold_rejected": gr, "source": "world"})
    return rows


def off_topic(tok: Tokenizer, sampled: list[tuple], task: GoldTask, per_prompt: int, seed: int = 0,
              from_family: str | None = None) -> list[dict]:
    """Preference rows of each prompt's best reply against up to `per_prompt` distinct replies sampled for prompts
    of other families (when `from_family` is given, replies right for a prompt of that family: "forbidden" gives
    refusals), each scored by the gold scorer for this prompt and kept when it scores lower."""
    rng = random.Random(f"{seed}-off-topic" if from_family is None else f"{seed}-from-{from_family}")
    tool_start = tok.special_id("<|tool_start|>")
    by_family: dict[str, list[int]] = {}
    for i, (example, _) in enumerate(sampled):
        by_family.setdefault(example.group, []).append(i)
    others_of = {f: [i for family, items in by_family.items() if family != f and from_family in (None, family)
                     for i in items] for f in by_family}
    rows = []
    for example, scored in sampled:
        done = [s for s in scored if s.finished]
        if not done:
            continue
        best_ids, best, _, _ = max(done, key=lambda s: s.reward)
        chosen = parse_turn(tok, best_ids)
        others = others_of[example.group]
        if not others or not _answer(example.meta["messages"], chosen):
            continue
        used = {tuple(best_ids)}
        for i in rng.sample(others, min(per_prompt, len(others))):
            replies = sampled[i][1]
            if from_family is not None:  # the replies right for their own prompt only (a forbidden one's: refusals)
                top = max(r.reward for r in replies)
                replies = [r for r in replies if r.reward == top]
            ids, _, _, finished = rng.choice(replies)
            if tuple(ids) in used or not finished:
                continue
            used.add(tuple(ids))
            reward = task.reward(example, task.read(tok, ids), tool_start in ids)
            rejected = parse_turn(tok, ids)
            if reward < best and _answer(example.meta["messages"], rejected):
                rows.append({"prompt": example.meta["messages"], "chosen": chosen, "rejected": rejected,
                             "family": example.group, "gold_chosen": best, "gold_rejected": reward,
                             "source": "world, off-topic" if from_family is None else f"world, {from_family}"})
    return rows


def _answer(prompt: list[dict], answer: list[dict]) -> bool:
    """Whether a parsed reply can be compared: not empty (no answer), and a valid turn after the prompt (a
    malformed one, an output with no call, has no messages)."""
    return any(m.get("content") or m.get("tool_calls") for m in answer) and _valid(prompt, answer)


def _valid(prompt: list[dict], answer: list[dict]) -> bool:
    if answer[0]["role"] != "assistant":
        return False
    try:
        validate(prompt + answer)
    except LLMLabError:
        return False
    return True


@dataclass
class EncodedPair:
    chosen: tuple[list[int], list[int]]
    """(ids, loss mask) of the prompt and the chosen answer"""
    rejected: tuple[list[int], list[int]]
    family: str = ""
    meta: dict = field(default_factory=dict)
    prior: tuple[float, float] = (0.0, 0.0)
    """a fixed score added to the reward model's, chosen and rejected (llmlab.stages.rm: the reference's
    weighted log-likelihood of each answer; 0 without one)"""


def encode_pairs(pairs: list[PreferencePair], tok: Tokenizer, max_len: int) -> tuple[list[EncodedPair], dict[str, int]]:
    """(the pairs rendered, {reason: count} of those skipped): chosen identical to rejected, an answer with no
    text and no tool call, or a conversation longer than max_len tokens."""
    encoded, skipped = [], {}

    def skip(reason: str) -> None:
        skipped[reason] = skipped.get(reason, 0) + 1

    for pair in pairs:
        if any(not any(m.get("content") or m.get("tool_calls") for m in answer) for answer in (pair.chosen, pair.rejected)):
            skip("an empty answer")
            continue
        chosen = render_conversation(tok, pair.prompt + pair.chosen)
        rejected = render_conversation(tok, pair.prompt + pair.rejected)
        if chosen[0] == rejected[0]:
            skip("chosen equals rejected")
        elif max(len(chosen[0]), len(rejected[0])) > max_len:
            skip(f"longer than the context ({max_len} tokens)")
        else:
            encoded.append(EncodedPair(chosen, rejected, str(pair.meta.get("family", "")), pair.meta))
    return encoded, skipped


def right_padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, T) right-padded with pad_id, last (B,)): each row's last real token, where a scorer reads it."""
    ids = torch.full((len(rows), max(len(r) for r in rows)), pad_id, dtype=torch.int64)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
    return ids, torch.tensor([len(r) - 1 for r in rows])


def reward_batch(pairs: list[EncodedPair], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids (2P, T) right-padded, last (2P,), prior (2P,)): the chosen rows, then the rejected rows, each row's
    last real token (where a reward model's score is read) and its fixed prior score."""
    ids, last = right_padded([p.chosen[0] for p in pairs] + [p.rejected[0] for p in pairs], pad_id)
    return ids, last, torch.tensor([p.prior[0] for p in pairs] + [p.prior[1] for p in pairs])


def policy_batch(pairs: list[EncodedPair], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of the chosen rows then the rejected rows, targets on the answers' own tokens."""
    return collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)


class PairLoader:
    """Batches of P pairs per rank, a new seeded permutation each epoch; `kind` "reward" gives `reward_batch`,
    "policy" gives `policy_batch`. Every rank draws the global batch of P x W pairs and keeps pairs r, r+W, ...,
    so the position is global and a run resumes exactly."""

    def __init__(self, pairs: list[EncodedPair], batch_size: int, pad_id: int, kind: str, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if not pairs:
            raise LLMLabError("no preference pairs to train on (all were skipped, or none were given)")
        if kind not in ("reward", "policy"):
            raise ValueError(kind)
        self.pairs, self.P, self.pad_id, self.kind = pairs, batch_size, pad_id, kind
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.drawn = 0  # pairs drawn, all ranks counted
        self._perm: tuple[int, list[int]] = (-1, [])

    def _order(self, epoch: int) -> list[int]:
        if self._perm[0] != epoch:
            order = list(range(len(self.pairs)))
            random.Random(f"{self.seed}-{epoch}").shuffle(order)
            self._perm = (epoch, order)
        return self._perm[1]

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        mine = []
        n = len(self.pairs)
        for k in range(self.P * self.world_size):
            at = self.drawn + k
            if k % self.world_size == self.rank:
                mine.append(self.pairs[self._order(at // n)[at % n]])
        self.drawn += self.P * self.world_size
        return (reward_batch if self.kind == "reward" else policy_batch)(mine, self.pad_id)

    def state_dict(self) -> dict:
        return {"drawn": self.drawn, "batch_size": self.P, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        self.drawn = state["drawn"]


def world_comparisons(engine: Engine, tok: Tokenizer, world_dir: str, split: str, per_family: int, k: int,
                      params: SamplingParams, run_tool, per_prompt: int, path,
                      off_topic_per_prompt: int = 0, refusal_per_prompt: int = 0) -> list[dict]:
    """The world's gold-labelled comparisons of `split`, sampled from the engine's model, cached in `path`
    (written atomically; an existing file is read back, so a resumed run trains on the same pairs), and with
    `off_topic_per_prompt` that many `off_topic` pairs per prompt, cached beside it in `<path stem>-off-topic.jsonl`:
    a reward model learns from both, while DPO on the off-topic ones as well won less (three seeds at beta 0.1:
    56.5% of its decisive head-to-heads against 63.3% on the comparisons alone), and its preset reads `path`
    alone. `refusal_per_prompt`: that many pairs per prompt whose rejected reply is one the model gave a forbidden
    request (`off_topic` from the "forbidden" family: a refusal, kept where refusing is wrong), cached in
    `<path stem>-refusal.jsonl`."""
    path = Path(path)
    extras = [(path.with_name(f"{path.stem}-{name}.jsonl"), n, family) for name, n, family in
              (("off-topic", off_topic_per_prompt, None), ("refusal", refusal_per_prompt, "forbidden")) if n]
    cached = [path] + [file for file, _, _ in extras]
    if all(file.is_file() for file in cached):
        return [json.loads(line) for file in cached
                for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    task = GoldTask(world_dir, split, per_family)
    with tqdm(total=len(task.examples()), desc=f"comparisons ({split})", dynamic_ncols=True) as bar:
        sampled = sample_replies(engine, tok, task, k, params, run_tool, progress=bar.update)
    cut = sum(not s.finished for _, scored in sampled for s in scored)
    if cut:
        print(f"comparisons ({split}): {cut} of {len(sampled) * k} replies cut off at {params.max_new_tokens} new "
              f"tokens or the end of the context, never compared (raise --max_new_tokens to compare them)")
    rows = comparisons(tok, sampled, per_prompt)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(path, rows)
    for file, n, family in extras:
        more = off_topic(tok, sampled, task, n, params.seed, from_family=family)
        write_jsonl(file, more)
        rows += more
    return rows


def pairs_from_rows(rows: list[dict], where: str) -> list[PreferencePair]:
    """Rows in the file format, checked as the file reader checks them."""
    return [check_pair(r, f"{where}, row {i}") for i, r in enumerate(rows, start=1)]
