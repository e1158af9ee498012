"""`llmlab eval`: measure a checkpoint on the world's tasks, base and assistant side by side.

A base model (a pretraining checkpoint) is asked through `Q: <question>\\nA:` framing, the form of the world's
Q/A pages; an assistant (a fine-tuned checkpoint) through the chat format, with the engine running its tool
calls. Both also get `knowledge` (llmlab.tasks.knowledge): how many facts of training and held-out people the
weights still hold, ranked by likelihood, whatever the model would say. `--mode both` runs both framings on one
checkpoint. Results go to `<checkpoint dir>/eval.json` (or `--out`) and are printed as a table.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from llmlab import checkpoint
from llmlab.engine import Engine, newline_ids
from llmlab.errors import LLMLabError
from llmlab.tasks import Example, Task, run_task
from llmlab.tasks.assistant import (
    AssistantArithmetic, AssistantPlaces, AssistantPolicy, AssistantPython, AssistantQA, run_chat_task,
)
from llmlab.tasks.knowledge import stored_knowledge
from llmlab.tasks.puzzles import PuzzleTask
from llmlab.tasks.world_qa import WorldArithmetic, WorldQA
from llmlab.tokenizer import Tokenizer
from llmlab.tools import tool_runner
from llmlab.training import configure_torch


@dataclass
class Config:
    checkpoint: str = "runs/cpu/sft"
    """checkpoint to evaluate"""
    world: str = "runs/cpu/world"
    """world directory whose eval/ rows are used"""
    mode: str = "auto"
    """base (Q:/A: framing), chat (conversations with tools), both, or auto (chat for fine-tuned checkpoints)"""
    per_group: int = 100
    """examples per group of each task"""
    out: str = ""
    """where to write the results JSON (default: eval.json next to the checkpoint's `latest`)"""
    threads: int = 0
    """CPU threads for torch (0 = one per core that other processes leave free, following the load)"""

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "base", "chat", "both"):
            raise LLMLabError(f"eval: mode must be auto, base, chat or both (got {self.mode!r})")
        if self.per_group < 1:
            raise LLMLabError(f"eval: per_group must be positive (got {self.per_group})")


class _AsQA(Task):
    """A chat task asked of a base model: the system prompt as a line, earlier exchanges as `Q: ...`/`A: ...`
    lines, then `Q: <last user message>\nA:`."""

    def __init__(self, task: Task):
        self.task, self.name = task, task.name
        self._examples = []
        for e in task.examples():
            lines = []
            for m in e.meta["messages"][:-1]:
                if m["role"] == "system":
                    lines.append(m["content"] + "\n")
                elif m["role"] in ("user", "assistant"):
                    lines.append(f"{'Q' if m['role'] == 'user' else 'A'}: {m['content']}\n")
            prompt = "".join(lines) + f"Q: {e.meta['messages'][-1]['content']}\nA:"
            self._examples.append(Example(prompt=prompt, answer=e.answer, group=e.group, meta=e.meta))

    def examples(self) -> list[Example]:
        return self._examples

    def score(self, example: Example, completion: str) -> float:
        return self.task.score(example, completion)


def evaluate_base(engine: Engine, tok: Tokenizer, world: str, per_group: int) -> dict:
    """Every task in Q:/A: framing, greedy, stopping at the end of the line."""
    stops = [tok.bos_id] + newline_ids(tok)
    return {
        "world_qa": run_task(WorldQA(world, per_group=per_group), engine, tok, stop_ids=stops),
        "arithmetic": run_task(WorldArithmetic(world, per_group=per_group // 2), engine, tok, stop_ids=stops),
        "policy": run_task(_AsQA(AssistantPolicy(world, per_group=per_group)), engine, tok, max_new_tokens=24, stop_ids=stops),
        "places": run_task(_AsQA(AssistantPlaces(world, per_group=per_group)), engine, tok, stop_ids=stops),
    }


def evaluate_chat(engine: Engine, tok: Tokenizer, world: str, per_group: int) -> dict:
    """Every task as a conversation; the engine runs tool calls (but not for arithmetic without tools)."""
    tool = tool_runner(world)
    room = engine.model.config.context_len  # a program, its output and the answer: up to the end of the context
    return {
        "world_qa": run_chat_task(AssistantQA(world, per_group=per_group), engine, tok, tool),
        "arithmetic_with_tools": run_chat_task(AssistantArithmetic(world, tools=True, per_group=per_group // 2), engine, tok, tool),
        "arithmetic_without_tools": run_chat_task(AssistantArithmetic(world, tools=False, per_group=per_group // 2), engine, tok, None),
        "policy": run_chat_task(AssistantPolicy(world, per_group=per_group), engine, tok, tool),
        "places": run_chat_task(AssistantPlaces(world, per_group=per_group), engine, tok, tool),
        "python": run_chat_task(AssistantPython(world, per_group=max(per_group // 3, 1)), engine, tok, tool,
                                max_new_tokens=room),
        "puzzles": run_chat_task(PuzzleTask(world, per_group=max(per_group // 2, 1)), engine, tok, tool,
                                 max_new_tokens=room),
    }


def main(cfg: Config) -> dict:
    configure_torch(cfg.threads)
    t0 = time.perf_counter()
    ckpt = checkpoint.load(cfg.checkpoint)
    model, tok = ckpt.model, ckpt.require_tokenizer("evaluation on the world's tasks")
    engine = Engine(model)
    mode = cfg.mode
    if mode == "auto":
        mode = "chat" if ckpt.info.get("stage") != "pretrain" else "base"
    results: dict = {"checkpoint": str(ckpt.path)}
    knowledge = stored_knowledge(model, tok, cfg.world, per_group=cfg.per_group // 2)  # the same in both framings
    if mode in ("base", "both"):
        results["base"] = evaluate_base(engine, tok, cfg.world, cfg.per_group) | {"knowledge": knowledge}
    if mode in ("chat", "both"):
        results["chat"] = evaluate_chat(engine, tok, cfg.world, cfg.per_group) | {"knowledge": knowledge}
    results["seconds"] = time.perf_counter() - t0
    out = Path(cfg.out) if cfg.out else Path(cfg.checkpoint) / "eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    for framing in ("base", "chat"):
        for name, r in results.get(framing, {}).items():
            groups = ", ".join(f"{g} {100 * a:.0f}%" for g, a in r["groups"].items())
            print(f"{framing:4} {name}: {groups}")
            traits = "; ".join(f"{g}: " + ", ".join(f"{t} {100 * v:.0f}%" for t, v in ts.items())
                               for g, ts in r.get("traits", {}).items())
            if traits:
                print(f"{'':4} {name}: {traits}")
    print(f"eval: {results['seconds']:.0f} s -> {out}")
    return results
