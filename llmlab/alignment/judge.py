"""Head to head by the gold scorer: two assistants answer the same held-out prompts (greedy, tools run by the
engine), and the gold reward decides each prompt: a win, a loss or a tie. The win rate leaves ties out; its
Wilson 95% interval says how closely the few decisive prompts pin it down (most are ties: greedy replies that
training did not change)."""

from __future__ import annotations

from collections import defaultdict
from typing import Callable

from llmlab.alignment.pairs import sample_replies
from llmlab.chat import final_answer
from llmlab.engine import Engine, SamplingParams
from llmlab.model import GPT
from llmlab.redteam.card import wilson
from llmlab.tasks.gold import GoldTask
from llmlab.tokenizer import Tokenizer


def gold_replies(model: GPT, tok: Tokenizer, task: GoldTask, run_tool: Callable[[str], str] | None,
                 max_new_tokens: int = 96, batch_size: int = 64) -> list[dict]:
    """Greedy replies to every example that fits: {"family", "reply", "reward", "correct", "words"} each."""
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    out = []
    sampled = sample_replies(Engine(model), tok, task, 1, params, run_tool, batch_size)
    for example, [(ids, reward, correct, _)] in sampled:
        text = final_answer(tok, ids)
        out.append({"family": example.group, "reply": text, "reward": reward, "correct": correct,
                    "words": len(text.split())})
    return out


def head_to_head(a: list[dict], b: list[dict]) -> dict:
    """A's record against B on the same prompts (the lists of `gold_replies`, in the same order): wins, losses,
    ties, win rate without ties (and its 95% interval), and per family A's and B's accuracy and mean reward."""
    wins = sum(x["reward"] > y["reward"] for x, y in zip(a, b))
    losses = sum(x["reward"] < y["reward"] for x, y in zip(a, b))
    families: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for x, y in zip(a, b):
        f = families[x["family"]]
        f["a_correct"].append(x["correct"])
        f["b_correct"].append(y["correct"])
        f["a_reward"].append(x["reward"])
        f["b_reward"].append(y["reward"])
    mean = lambda v: sum(v) / max(len(v), 1)  # noqa: E731
    return {"wins": wins, "losses": losses, "ties": len(a) - wins - losses,
            "win_rate": wins / (wins + losses) if wins + losses else float("nan"),
            "win_rate_interval": list(wilson(wins, wins + losses)),
            "a_reward": mean([x["reward"] for x in a]), "b_reward": mean([y["reward"] for y in b]),
            "a_accuracy": mean([x["correct"] for x in a]), "b_accuracy": mean([y["correct"] for y in b]),
            "a_words": mean([x["words"] for x in a]), "b_words": mean([y["words"] for y in b]),
            "families": {name: {k: mean(v) for k, v in f.items()} for name, f in sorted(families.items())}}
