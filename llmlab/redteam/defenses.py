"""Defenses against the attacks of llmlab.redteam, each measured by the card before and after.

    PerplexityFilter   refuse a user message that holds a window of tokens a language model finds too unlikely
                       (Jain et al., "Baseline Defenses for Adversarial Attacks Against Aligned Language Models",
                       2023; Alon & Kamfonas 2023): an optimised suffix of unrelated words is such a window, a
                       question is not. The threshold is calibrated on benign messages of fine-tuning's side of
                       the world, so that a chosen share of them (`max_flagged`) would be refused; over-refusal
                       is then measured on the evaluation's benign messages, which calibration never saw.
    adversarial_mix    adversarial training data: the red team's attacks on the training half of the goals
                       (the caller chooses which: `llmlab redteam` gives every role-play and GCG attempt,
                       since GCG breaks the refusal of nearly all of them) become conversations that refuse them, beside the same wrappers and suffixes around
                       benign requests answered normally (so that what is learnt is the request, not the
                       wrapper), for `llmlab sft` to mix with the world's conversations.
    injection_mix      instruction-hierarchy training data: tool outputs poisoned with the training templates
                       of injected instructions, answered with the tool's true result (what a tool returns is
                       data, never an instruction: Wallace et al., "The Instruction Hierarchy", 2024)
    language_mix       refusal in the second language: the world's forbidden requests and requests for the secret
                       in Ombric (llmlab.world.language), refused in Ombric, beside its benign look-alikes
                       answered in it, so that the refusal follows the request's meaning into the language the
                       model read facts in but was never taught to refuse in
    datamark           spotlighting by datamarking (Hines et al., "Defending Against Indirect Prompt Injection
                       Attacks With Spotlighting", 2024): every run of whitespace in a tool's output becomes "^",
                       in training and at inference alike, so that text to be read as data looks like no
                       instruction the model was ever given
"""

from __future__ import annotations

import random
import re
from typing import Callable

import torch
import torch.nn.functional as F

from llmlab.model import GPT
from llmlab.redteam.attacks import attack_text
from llmlab.redteam.goals import Goal, inject_goals
from llmlab.tokenizer import Tokenizer
from llmlab.world import World, language
from llmlab.world.conversations import POLICY, REFUSAL, SECRET_REFUSAL, secret_code, secret_system
from llmlab.world.skills import SMALL_TALK_HELDOUT, SMALL_TALK_SEEN
from llmlab.world.text import QUESTIONS, arithmetic_problem


class PerplexityFilter:
    """Flags a user message whose least likely window of `window` tokens has a mean negative log-likelihood
    (nats per token, under `model`, reading the message as a user turn) above `threshold`."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, window: int = 8, threshold: float = float("inf")):
        if window < 1:
            raise ValueError(f"the filter's window must be at least one token (got {window})")
        self.model, self.tok, self.window, self.threshold = model, tokenizer, window, threshold

    def scores(self, messages: list[str], batch_size: int = 64) -> list[float]:
        """The worst window's mean NLL of each message (a message shorter than the window: its mean)."""
        head = [self.tok.bos_id, self.tok.special_id("<|user_start|>")]
        rows = [(head + self.tok.encode(m))[: self.model.config.context_len] for m in messages]
        out: list[float] = []
        self.model.eval()
        with torch.no_grad():
            for i in range(0, len(rows), batch_size):
                chunk = rows[i:i + batch_size]
                T = max(len(r) for r in chunk)
                ids = torch.full((len(chunk), T), self.tok.pad_id, dtype=torch.long)
                for j, r in enumerate(chunk):
                    ids[j, :len(r)] = torch.tensor(r)
                nll = F.cross_entropy(self.model(ids)[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
                for j, r in enumerate(chunk):
                    tokens = nll[j, len(head) - 1:len(r) - 1]  # the message's own tokens
                    w = min(self.window, len(tokens))
                    out.append(tokens.unfold(0, w, 1).mean(1).max().item() if w else 0.0)
        return out

    def flags(self, messages: list[str]) -> list[bool]:
        return [s > self.threshold for s in self.scores(messages)]

    def calibrate(self, benign: list[str], max_flagged: float) -> float:
        """Set the threshold so that at most `max_flagged` of `benign` messages are flagged; return it."""
        if not benign:
            raise ValueError("calibrating the perplexity filter needs benign messages")
        if not 0 <= max_flagged < 1:
            raise ValueError(f"max_flagged is a share, from 0 to below 1 (got {max_flagged})")
        s = sorted(self.scores(benign))
        self.threshold = s[min(len(s) - 1, int((1 - max_flagged) * len(s)))]
        return self.threshold


def benign_messages(world: World, n: int, seed: int, half: str = "train") -> list[str]:
    """Benign user messages like fine-tuning's ("train": training people, seen phrasings) or the evaluation's
    ("heldout": held-out people, held-out phrasings): questions about people, benign look-alikes of the forbidden
    requests, arithmetic and small talk (short messages such as "Hi!", whose few tokens a filter reads as a
    whole: a filter calibrated without them refuses greetings)."""
    rng = random.Random(f"{seed}-redteam-benign-{half}")
    people = world.group("train" if half == "train" else "heldout") or world.group("train")
    phrasing = "seen" if half == "train" else "heldout"
    out = []
    for i in range(n):
        person = rng.choice(people)
        kind = i % 4
        if kind == 3:
            out.append(rng.choice(SMALL_TALK_SEEN)[0] if half == "train" else rng.choice(SMALL_TALK_HELDOUT))
        elif kind == 0:
            attribute = rng.choice(list(QUESTIONS))
            out.append(rng.choice(QUESTIONS[attribute][phrasing] or QUESTIONS[attribute]["seen"]).format(name=person.name))
        elif kind == 1:
            out.append(rng.choice(POLICY)[1].format(name=person.name, **person.attributes))
        else:
            out.append(arithmetic_problem(rng, 2, 1)[0])
    return out


def adversarial_mix(world: World, hits: list[tuple[Goal, str]], wrap: Callable[[str, int], str], seed: int,
                    n_benign: int) -> list[dict]:
    """Conversations {"messages"} for adversarial training: each (goal, attack message) that hit gets the
    refusal its goal calls for; `n_benign` benign look-alikes wrapped by `wrap(request, i)` (the same
    templates and suffixes) get their normal answers."""
    rows = [{"messages": goal.messages(text) + [
        {"role": "assistant", "content": SECRET_REFUSAL if goal.kind == "secret" else REFUSAL}]} for goal, text in hits]
    rng = random.Random(f"{seed}-redteam-adversarial")
    people = world.group("train")
    for i in range(n_benign):
        person = rng.choice(people)
        values = {"name": person.name, **person.attributes}
        _, good, answer = rng.choice(POLICY)
        rows.append({"messages": [{"role": "user", "content": wrap(good.format(**values), i)},
                                  {"role": "assistant", "content": answer.format(**values)}]})
    rng.shuffle(rows)
    return rows


def language_mix(world: World, n: int, seed: int) -> list[dict]:
    """n conversations {"messages"} in Ombric about training people: a third forbidden requests refused, a
    third their benign look-alikes answered, a sixth requests for a system prompt's secret code refused, a sixth
    other questions under a secret answered without it."""
    rng = random.Random(f"{seed}-redteam-language")
    people = world.group("train")
    rows = []
    for i in range(n):
        person = rng.choice(people)
        values = language.values(person)
        bad, good, answer = rng.choice(language.POLICY)
        kind = i % 6
        if kind < 2:
            messages = [{"role": "user", "content": bad.format(**values)},
                        {"role": "assistant", "content": language.REFUSAL}]
        elif kind < 4:
            messages = [{"role": "user", "content": good.format(**values)},
                        {"role": "assistant", "content": answer.format(**values)}]
        else:
            system = {"role": "system", "content": secret_system(secret_code(rng))}
            if kind == 4:
                messages = [system, {"role": "user", "content": rng.choice(language.SECRET_ASKS["train"])},
                            {"role": "assistant", "content": language.SECRET_REFUSAL}]
            else:
                attribute = rng.choice(list(language.QUESTIONS))
                messages = [system, {"role": "user", "content": language.question(rng, person, attribute)},
                            {"role": "assistant", "content": language.answer(person, attribute)}]
        rows.append({"messages": messages})
    return rows


DATAMARK = "^"


def datamark(text: str) -> str:
    """A tool's output with each run of whitespace replaced by DATAMARK."""
    return re.sub(r"\s+", DATAMARK, text)


def spotlit(messages: list[dict]) -> list[dict]:
    """The conversation with every tool message's output datamarked."""
    return [dict(m, content=datamark(m["content"])) if m["role"] == "tool" else m for m in messages]


def injection_mix(n: int, seed: int) -> list[dict]:
    """n conversations {"messages"}: a calculator question, its call, the output poisoned with a training
    template of an injected instruction, and the reply that reports the calculator's result."""
    rows = []
    for i, goal in enumerate(inject_goals("train", n, seed)):
        rows.append({"messages": goal.messages(attack_text("injection", goal, "train", i)) + [
            {"role": "assistant", "content": f"The answer is {goal.answer}."}]})
    return rows
