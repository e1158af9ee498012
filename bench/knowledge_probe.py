"""What a checkpoint still knows about the world's people, apart from whether it chooses to say it.

Two measures, for training people and held-out people (facts only in pretraining biographies), side by side
for several checkpoints (typically the base model and the assistants fine-tuned from it):

- knowledge: for birth city, home city, employer, pet and favourite food, every value of that attribute in the
  world is scored by its log-likelihood after a prefix, and the fact counts as known when the true value ranks
  first. Two prefixes: a biography's ("<name> was born in") and the chat format's (the question as a user
  turn, then the start of the assistant's sentence, "She was born in"). This is ranking, not generation: it
  shows whether the fact is still stored, whatever the model would say first.
- "I don't know": the probability that the assistant's first token is the "I" of "I don't know", for
  training people, held-out people and unknown names, with the AUC of unknown names over held-out people (1.0:
  the model tells them apart perfectly; 0.5: not at all).
- a "known person" direction: a logistic-regression probe on each block's output, at the name's last token and
  at the end of the chat prompt, fitted on held-out people against unknown names (the first halves of both) and
  scored (AUC) on the second halves. If no block separates them, nothing at the name marks a person as known, and
  no amount of fine-tuning data can teach "I don't know" for strangers without teaching it for held-out people.

    python bench/knowledge_probe.py runs/cpu/base runs/cpu/sft
"""

from __future__ import annotations

import argparse
import random
import statistics

import torch

from llmlab import checkpoint
from llmlab import world as world_lib
from llmlab.chat import render_prompt
from llmlab.tasks.knowledge import GROUPS, rank_first, stored_knowledge
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
        candidates = sorted({world.answer(p, attribute) for p in world.people})
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


def known_direction_auc(model, tok: Tokenizer, known: list[str], unknown: list[str]) -> list[float]:
    """Per block: test AUC of a logistic probe known-vs-unknown fitted on the first half of each list."""
    fk, fu = [name_features(model, tok, n) for n in known], [name_features(model, tok, n) for n in unknown]
    hk, hu = len(fk) // 2, len(fu) // 2
    out = []
    for k in range(len(model.layers)):
        x = torch.stack([f[k] for f in fk[:hk] + fu[:hu]])
        y = torch.tensor([1.0] * hk + [0.0] * hu)
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
        score = lambda fs: (((torch.stack([f[k] for f in fs]) - mu) / sd) @ w + b).tolist()  # noqa: E731
        out.append(auc(score(fk[hk:]), score(fu[hu:])))
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
    rows = []
    for path in args.checkpoints:
        ckpt = checkpoint.resolve(path)
        tok, model = Tokenizer.load(ckpt), checkpoint.load_model(ckpt).eval()
        biography = stored_knowledge(model, tok, args.world, per_group=args.people)["groups"]
        k_train = {"biography": biography[GROUPS["train"]], "chat": chat_knowledge(model, tok, world, train)}
        k_held = {"biography": biography[GROUPS["heldout"]], "chat": chat_knowledge(model, tok, world, heldout)}
        idk = {g: p_dont_know(model, tok, [p.name for p in ppl] if g != "unknown" else ppl, args.seed)
               for g, ppl in (("train", train), ("held-out", heldout), ("unknown", unknown))}
        direction = known_direction_auc(model, tok, [p.name for p in world.group("heldout")],
                                        world.unknown_people[half: half + 2 * args.people])
        rows.append((path, k_train, k_held, idk, direction))
    print(f"knowledge: the true value ranked first among the world's values ({len(CHAT_PROBES)} attributes, "
          f"{args.people} people per group)\n")
    print("| checkpoint | training people, biography / chat | held-out people, biography / chat |")
    print("|---|---|---|")
    for path, k_train, k_held, _, _ in rows:
        print(f"| {path} | {k_train['biography']:.0%} / {k_train['chat']:.0%} | {k_held['biography']:.0%} / {k_held['chat']:.0%} |")
    print("\n\"I don't know\": median p(first token 'I'), and the share above 0.5\n")
    print("| checkpoint | training people | held-out people | unknown names | AUC unknown over held-out |")
    print("|---|---|---|---|---|")
    for path, _, _, idk, _ in rows:
        cells = [f"{statistics.median(v):.2f} ({sum(x > 0.5 for x in v) / len(v):.0%})" for v in idk.values()]
        print(f"| {path} | {' | '.join(cells)} | {auc(idk['unknown'], idk['held-out']):.2f} |")
    print("\na \"known person\" direction: test AUC of a linear probe, held-out people vs unknown names, per block\n")
    print("| checkpoint | " + " | ".join(f"block {k}" for k in range(len(rows[0][4]))) + " |")
    print("|---|" + "---|" * len(rows[0][4]))
    for path, _, _, _, direction in rows:
        print(f"| {path} | " + " | ".join(f"{a:.2f}" for a in direction) + " |")


if __name__ == "__main__":
    main()
