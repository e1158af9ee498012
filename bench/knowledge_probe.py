"""What a checkpoint still knows about the world's people, apart from whether it chooses to say it.

Two measures, for training people and held-out people (facts only in pretraining biographies), side by side
for several checkpoints (typically the base model and the assistants fine-tuned from it):

- knowledge: for birth city, home city, employer, pet and favourite food, every value of that attribute in the
  world is scored by its log-likelihood after a prefix, and the fact counts as known when the true value ranks
  first. Two prefixes: a biography's ("<name> was born in") and the chat format's (the question as a user
  turn, then the start of the assistant's sentence, "She was born in"). This is ranking, not generation: it
  shows whether the fact is still stored, whatever the model would say first.
- "I don't know": the probability that the assistant's first token is the "I" of "I don't know", for
  training people, held-out people, unknown names, and strangers named with one real person's first name and
  another's surname, with the AUC of unknown names over held-out people (1.0: the model tells them apart
  perfectly; 0.5: not at all).
- recall confidence: for the same five biography prefixes, the softmax over the world's values of the
  log-likelihoods above, and its top probability. Per fact, and summed (in logs) over a person's five facts,
  the AUC of held-out people over unknown names, and over recombined names: how well the model's own outputs
  tell a person it knows from a stranger.
- a "known person" direction: a logistic-regression probe on each block's output, at the name's last token and
  at the end of the chat prompt, scored (AUC) on held-out people against unknown names. Fitted two ways: on the
  other held-out people and unknown names (is a direction there at all?), and on training people against the
  unknown names fine-tuning uses (what fine-tuning's labels can teach; held-out people must then land on the
  known side). Where every real name is whole tokens and no invented one is (the cpu preset's vocabulary),
  the name's tokens alone separate them in every block; where names split by frequency (a 2,048-token
  vocabulary on the cpu world), no block did (test AUC at most 0.72, 8 blocks as well), and fine-tuning
  could teach "I don't know" for strangers only together with held-out people.

    python bench/knowledge_probe.py runs/cpu/base runs/cpu/sft
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
from pathlib import Path

import torch

from llmlab import checkpoint
from llmlab import world as world_lib
from llmlab.chat import render_prompt
from llmlab.tasks.knowledge import GROUPS, PREFIXES, attribute_values, candidate_logprobs, rank_first, stored_knowledge
from llmlab.tokenizer import Tokenizer
from llmlab.world.text import QUESTIONS

# attribute -> (question, start of the assistant's sentence); {n} name, {s} pronoun, {p} possessive. The biography
# framing is llmlab.tasks.knowledge's, the one the report card uses.
CHAT_PROBES = {
    "birth_city": ("Where was {n} born?", "{s} was born in"),
    "home_city": ("Where does {n} live?", "{s} lives in"),
    "employer": ("Which company does {n} work for?", "{s} works for"),
    "pet": ("What pet does {n} have?", "{s} has a pet"),
    "favourite_food": ("What is the favourite food of {n}?", "{p} favourite food is"),
}


def chat_knowledge(model, tok: Tokenizer, world, people) -> float:
    """Share of facts whose true value ranks first after the question and the start of the assistant's answer."""
    right = 0
    for attribute, (question, sentence) in CHAT_PROBES.items():
        candidates = attribute_values(world, attribute)
        for p in people:
            prompt = render_prompt(tok, [{"role": "user", "content": question.format(n=p.name)}])
            start = sentence.format(s=p.pronoun.capitalize(), p=p.possessive.capitalize())
            right += rank_first(model, tok, prompt + tok.encode(start), candidates) == world.answer(p, attribute)
    return right / (len(people) * len(CHAT_PROBES))


@torch.no_grad()
def p_dont_know(model, tok: Tokenizer, names: list[str], seed: int) -> list[float]:
    rng = random.Random(seed)
    i_token = tok.encode("I")[0]
    out = []
    for name in names:
        attribute = rng.choice(list(QUESTIONS))
        q = rng.choice(QUESTIONS[attribute]["seen"]).format(name=name)
        ids = render_prompt(tok, [{"role": "user", "content": q}])
        out.append(torch.softmax(model(torch.tensor([ids]))[0, -1], -1)[i_token].item())
    return out


@torch.no_grad()
def name_features(model, tok: Tokenizer, name: str) -> list[torch.Tensor]:
    """Per block: its output at the name's last token and at the prompt's last token, concatenated."""
    outputs = {}
    hooks = [b.register_forward_hook(lambda m, i, o, k=k: outputs.__setitem__(k, o)) for k, b in enumerate(model.layers)]
    head = render_prompt(tok, [{"role": "user", "content": f"Where was {name} born?"}])
    # the name's last token: the prompt cut after the name ends with it, then <|user_end|><|assistant_start|>
    at = len(render_prompt(tok, [{"role": "user", "content": f"Where was {name}"}])) - 3
    model(torch.tensor([head]))
    for h in hooks:
        h.remove()
    return [torch.cat([outputs[k][0, at], outputs[k][0, -1]]) for k in range(len(model.layers))]


def recall_confidence(model, tok: Tokenizer, world, names: list[str]) -> list[dict[str, float]]:
    """Per name: attribute -> top probability of the softmax over the world's values after its biography prefix."""
    candidates = {a: attribute_values(world, a) for a in PREFIXES}
    return [{a: torch.softmax(candidate_logprobs(model, tok, [tok.bos_id] + tok.encode(prefix.format(name=n)),
                                                 candidates[a]), 0).max().item() for a, prefix in PREFIXES.items()}
            for n in names]


def recall_auc(known: list[dict[str, float]], unknown: list[dict[str, float]]) -> tuple[float, float]:
    """(mean over attributes of the per-fact AUC, AUC of the summed log top probability): known over unknown."""
    per_fact = statistics.mean(auc([c[a] for c in known], [c[a] for c in unknown]) for a in PREFIXES)
    person = lambda c: sum(math.log(v) for v in c.values())  # noqa: E731
    return per_fact, auc([person(c) for c in known], [person(c) for c in unknown])


def probe_auc(model, tok: Tokenizer, fit: tuple[list[str], list[str]], test: tuple[list[str], list[str]]) -> list[float]:
    """Per block: AUC on `test` (known names, unknown names) of a logistic probe fitted on `fit` (the same)."""
    feats = {n: name_features(model, tok, n) for names in (*fit, *test) for n in names}
    out = []
    for k in range(len(model.layers)):
        x = torch.stack([feats[n][k] for n in fit[0] + fit[1]])
        y = torch.tensor([1.0] * len(fit[0]) + [0.0] * len(fit[1]))
        mu, sd = x.mean(0), x.std(0) + 1e-6
        x = (x - mu) / sd
        with torch.enable_grad():
            w, b = torch.zeros(x.shape[1], requires_grad=True), torch.zeros(1, requires_grad=True)
            opt = torch.optim.LBFGS([w, b], max_iter=200)

            def closure():
                opt.zero_grad()
                loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + 1e-2 * w.square().sum()
                loss.backward()
                return loss

            opt.step(closure)
        score = lambda names: (((torch.stack([feats[n][k] for n in names]) - mu) / sd) @ w + b).tolist()  # noqa: E731
        out.append(auc(score(test[0]), score(test[1])))
    return out


def auc(pos: list[float], neg: list[float]) -> float:
    return sum((a > b) + 0.5 * (a == b) for a in pos for b in neg) / (len(pos) * len(neg))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="+", help="checkpoint directories (a run dir with `latest`, or a step dir)")
    ap.add_argument("--world", default="runs/cpu/world")
    ap.add_argument("--people", type=int, default=40, help="people per group")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    world = world_lib.load(args.world)
    train, heldout = world.group("train")[: args.people], world.group("heldout")[: args.people]
    half = len(world.unknown_people) // 2  # the second half: never in fine-tuning (llmlab.world.conversations)
    unknown = world.unknown_people[half: half + args.people]
    # strangers named with one real person's first name and another's surname (the world's policy rows)
    policy = [json.loads(line) for line in (Path(args.world) / "eval" / "assistant.jsonl").read_text().splitlines()]
    recombined = [r["expect"] for r in policy if r["kind"] == "recombined"][: args.people]
    rows = []
    for path in args.checkpoints:
        ckpt = checkpoint.load(path)
        tok, model = ckpt.require_tokenizer("the probe"), ckpt.model
        biography = stored_knowledge(model, tok, args.world, per_group=args.people)["groups"]
        k_train = {"biography": biography[GROUPS["train"]], "chat": chat_knowledge(model, tok, world, train)}
        k_held = {"biography": biography[GROUPS["heldout"]], "chat": chat_knowledge(model, tok, world, heldout)}
        idk = {g: p_dont_know(model, tok, names, args.seed) for g, names in (
            ("train", [p.name for p in train]), ("held-out", [p.name for p in heldout]), ("unknown", unknown),
            ("recombined", recombined)) if names}
        held_conf = recall_confidence(model, tok, world, [p.name for p in heldout])
        recall = (*recall_auc(held_conf, recall_confidence(model, tok, world, unknown)),
                  *(recall_auc(held_conf, recall_confidence(model, tok, world, recombined)) if recombined else (None, None)))
        # known-vs-unknown probes, always scored on the second halves of the held-out people and of `unknown_b`
        held_names = [p.name for p in world.group("heldout")]
        unknown_b = world.unknown_people[half: half + 2 * args.people]
        test = (held_names[len(held_names) // 2:], unknown_b[len(unknown_b) // 2:])
        direction = {
            "held-out": probe_auc(model, tok, (held_names[: len(held_names) // 2], unknown_b[: len(unknown_b) // 2]), test),
            "training": probe_auc(model, tok, ([p.name for p in world.group("train")], world.unknown_people[:half]), test)}
        rows.append((path, k_train, k_held, idk, recall, direction))
    print(f"knowledge: the true value ranked first among the world's values ({len(CHAT_PROBES)} attributes, "
          f"{args.people} people per group)\n")
    print("| checkpoint | training people, biography / chat | held-out people, biography / chat |")
    print("|---|---|---|")
    for path, k_train, k_held, *_ in rows:
        print(f"| {path} | {k_train['biography']:.0%} / {k_train['chat']:.0%} | {k_held['biography']:.0%} / {k_held['chat']:.0%} |")
    print("\n\"I don't know\": median p(first token 'I'), and the share above 0.5\n")
    print("| checkpoint | training people | held-out people | unknown names | names recombined from real ones "
          "| AUC unknown over held-out |")
    print("|---|---|---|---|---|---|")
    for path, _, _, idk, *_ in rows:
        cells = [f"{statistics.median(v):.2f} ({sum(x > 0.5 for x in v) / len(v):.0%})" if v else "-"
                 for v in (idk.get(g, []) for g in ("train", "held-out", "unknown", "recombined"))]
        print(f"| {path} | {' | '.join(cells)} | {auc(idk['unknown'], idk['held-out']):.2f} |")
    print("\nrecall confidence: AUC of held-out people over strangers, by the top probability among the world's values\n")
    print("| checkpoint | over unknown names: one fact (mean over the five) | five facts together "
          "| over recombined names: one fact | five facts together |")
    print("|---|---|---|---|---|")
    for path, _, _, _, recall, _ in rows:
        print(f"| {path} | " + " | ".join("-" if a is None else f"{a:.3f}" for a in recall) + " |")
    n_blocks = max(len(r[5]["held-out"]) for r in rows)
    print("\na \"known person\" direction: test AUC of a linear probe, held-out people vs unknown names, per block\n")
    print("| checkpoint | probe fitted on | " + " | ".join(f"block {k}" for k in range(n_blocks)) + " |")
    print("|---|---|" + "---|" * n_blocks)
    for path, *_, direction in rows:
        for fitted, label in (("held-out", "other held-out people"), ("training", "training people (fine-tuning's labels)")):
            cells = [f"{a:.2f}" for a in direction[fitted]] + [""] * (n_blocks - len(direction[fitted]))
            print(f"| {path} | {label} | " + " | ".join(cells) + " |")

if __name__ == "__main__":
    main()
