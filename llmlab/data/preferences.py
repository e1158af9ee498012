"""Preference pairs: a prompt and two answers to it, one preferred, read from JSONL (TRL's conversational format).

One JSON object per line (other keys, such as "source" or "model", are ignored):

    {"prompt":   [{"role": "user", "content": "What is 2*3?"}],
     "chosen":   [{"role": "assistant", "content": "6"}],
     "rejected": [{"role": "assistant", "content": "5"}]}

The prompt is a valid conversation (llmlab.chat.validate) that ends with a user message; chosen and rejected
are the assistant's continuations of it: assistant messages, with the tool messages that answer its calls
(`{"role": "tool", "content": "6"}` after an assistant message with `tool_calls`). Other keys of a line are kept
in `meta` (the world's comparisons carry "family" and their gold scores). `llmlab feedback export` writes such files from the web chat's
ratings, corrections and comparisons (llmlab.data.feedback).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from llmlab.chat import validate
from llmlab.fileio import write_atomic
from llmlab.errors import LLMLabError

KEYS = ("prompt", "chosen", "rejected")


@dataclass
class PreferencePair:
    prompt: list[dict]
    """the conversation so far, ending with the user message being answered"""
    chosen: list[dict]
    """the preferred assistant message(s)"""
    rejected: list[dict]
    """the dispreferred assistant message(s)"""
    meta: dict = field(default_factory=dict)
    """the line's other keys"""


def check_pair(row: object, where: str) -> PreferencePair:
    """A checked PreferencePair from one parsed line; LLMLabError prefixed with `where` otherwise."""
    if not isinstance(row, dict):
        raise LLMLabError(f"{where}: expected a JSON object with {', '.join(KEYS)}, got {type(row).__name__}")
    missing = [k for k in KEYS if k not in row]
    if missing:
        raise LLMLabError(f"{where}: missing key(s) {', '.join(missing)}: each line needs prompt, chosen and rejected")
    prompt = row["prompt"]
    try:
        validate(prompt)
    except LLMLabError as e:
        raise LLMLabError(f"{where}, prompt: {e}") from None
    if prompt[-1]["role"] != "user":
        raise LLMLabError(f"{where}: the prompt ends with a {prompt[-1]['role']} message: it must end with the user "
                          f"message that chosen and rejected answer")
    for key in ("chosen", "rejected"):
        answer = row[key]
        if not isinstance(answer, list) or not answer:
            raise LLMLabError(f"{where}: {key} must be a non-empty list of assistant messages, got {answer!r}")
        if any(not isinstance(m, dict) or m.get("role") not in ("assistant", "tool") for m in answer) \
                or answer[0].get("role") != "assistant":
            raise LLMLabError(f"{where}: {key} must hold the assistant's messages (and the tool messages answering its "
                              f"calls), starting with an assistant message, e.g. [{{'role': 'assistant', 'content': '...'}}]")
        try:
            validate(prompt + answer)
        except LLMLabError as e:
            raise LLMLabError(f"{where}, {key}: {e}") from None
    return PreferencePair(prompt=prompt, chosen=row["chosen"], rejected=row["rejected"],
                          meta={k: v for k, v in row.items() if k not in KEYS})


def load_preference_pairs(path: str | Path) -> list[PreferencePair]:
    """Every pair of a JSONL file (blank lines skipped); an LLMLabError naming the file and line otherwise."""
    path = Path(path)
    if not path.is_file():
        raise LLMLabError(f"no preference pairs at {path}: export them with `llmlab feedback export` or give the "
                          f"path of a JSONL file")
    pairs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise LLMLabError(f"{where}: not valid JSON ({e.msg} at column {e.colno}): write one JSON object "
                                  f"per line") from None
            pairs.append(check_pair(row, where))
    if not pairs:
        raise LLMLabError(f"{path} holds no preference pairs: rate, flag or compare answers in `llmlab serve` "
                          f"and export again")
    return pairs


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    """Write one JSON object per line atomically (temporary sibling, fsync, rename): a reader never sees half a
    file, and a killed writer leaves the previous file in place."""
    path = Path(path)
    write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode())
    return path
