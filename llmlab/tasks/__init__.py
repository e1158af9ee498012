"""Tasks: examples with exact scoring, shared by evaluation now and by RL and red-teaming later.

A `Task` lists `Example`s (a prompt, the reference answer, metadata for grouping) and scores a completion.
`run_task` generates completions with the engine in batches and reports accuracy per group.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Sequence

from llmlab.engine import Engine, SamplingParams
from llmlab.tokenizer import Tokenizer


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str
    group: str
    """results are reported per group (e.g. "train people, seen phrasing")"""
    meta: dict = field(default_factory=dict, hash=False, compare=False)


def normalize(text: str) -> str:
    """Case, surrounding whitespace and a trailing period do not count."""
    return text.strip().rstrip(".").strip().lower()


class Task:
    name: str = "task"

    def examples(self) -> Sequence[Example]:
        raise NotImplementedError

    def score(self, example: Example, completion: str) -> float:
        """1.0 for a correct completion, 0.0 otherwise (exact match after normalisation by default)."""
        return float(normalize(completion) == normalize(example.answer))


def that_fit(task: Task, encode: Callable[[Example], list[int]], context_len: int
             ) -> tuple[list[Example], list[list[int]], int]:
    """(the task's examples whose prompt, `encode(example)`, leaves room for a reply in the context, their
    prompts, how many did not fit): a small model's context may be shorter than a world's longest conversations."""
    kept = [(e, p) for e in task.examples() if len(p := encode(e)) < context_len]
    return [e for e, _ in kept], [p for _, p in kept], len(task.examples()) - len(kept)


def run_task(task: Task, engine: Engine, tokenizer: Tokenizer, max_new_tokens: int = 16, batch_size: int = 64,
             stop_ids: Sequence[int] = ()) -> dict:
    """Greedy completions for every example; returns {"accuracy": overall, "groups": {group: accuracy},
    "samples": a few (prompt, completion, answer, score) rows, "skipped": examples too long for the context}."""
    examples, all_prompts, skipped = that_fit(task, lambda e: [tokenizer.bos_id] + tokenizer.encode(e.prompt),
                                              engine.model.config.context_len)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    scores: dict[str, list[float]] = defaultdict(list)
    samples = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        prompts = all_prompts[start:start + batch_size]
        completions = engine.generate(prompts, params, stop_ids)
        for example, ids in zip(chunk, completions):
            text = tokenizer.decode(ids)
            s = task.score(example, text)
            scores[example.group].append(s)
            if len(samples) < 8 and start == 0:
                samples.append({"prompt": example.prompt, "completion": text, "answer": example.answer, "score": s})
    everything = [s for group in scores.values() for s in group]
    return {
        "task": task.name,
        "accuracy": sum(everything) / max(len(everything), 1),
        "n": len(everything),
        "groups": {g: sum(v) / len(v) for g, v in sorted(scores.items())},
        "samples": samples,
        "skipped": skipped,
    }
