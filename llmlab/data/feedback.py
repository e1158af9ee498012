"""Training data from what users said in the web chat: preference pairs and fine-tuning conversations, read
from a snapshot of the feedback store (llmlab.server.store) of `llmlab serve`; `llmlab feedback export` writes them as JSONL
(llmlab.stages.feedback documents the sources and the formats).

An answer's prompt is what the model saw when it wrote it: the conversation's system prompt, then the chain of
messages that were active when the answer was added (each message records its parent), so later edits and
regenerations do not change it. Rows that are not valid conversations (llmlab.chat.validate), such as an answer
with tool calls and no text, are left out; assistant messages keep their text only.
"""

from __future__ import annotations

import json
from collections import defaultdict

from llmlab.chat import validate
from llmlab.errors import LLMLabError
from llmlab.server.store import Snapshot


def _prompt(snap: Snapshot, answer: dict) -> list[dict]:
    """What the model saw when it wrote `answer`: the conversation's system prompt, then the chain of parents
    (the active messages at the time it was added), as {"role", "content"}."""
    chain = []
    mid = answer["parent_id"]
    while mid is not None:
        chain.append(snap.messages[mid])
        mid = snap.messages[mid]["parent_id"]
    prompt = [{"role": m["role"], "content": m["content"]} for m in reversed(chain)]
    system = snap.conversations[answer["conversation_id"]]["system"]
    if system and not (prompt and prompt[0]["role"] == "system"):
        prompt.insert(0, {"role": "system", "content": system})
    return prompt


def _valid(*conversations: list[dict]) -> bool:
    try:
        for conversation in conversations:
            validate(conversation)
    except LLMLabError:
        return False
    return True


def preference_pairs(snap: Snapshot) -> list[dict]:
    """Preference pairs in TRL's conversational format from a store's snapshot (see llmlab.stages.feedback for
    the sources); pairs that are not valid conversations are left out, and a pair found by several sources is
    kept once, under the first of comparison, correction, rating."""
    messages = snap.messages
    found = []  # (source, prompt, chosen text, rejected message, chosen message or None)
    for c in snap.comparisons:
        if c["chosen"] is None:
            continue
        chosen = messages[c["chosen"]]
        rejected = messages[c["message_b"] if c["chosen"] == c["message_a"] else c["message_a"]]
        found.append(("comparison", _prompt(snap, chosen), chosen["content"], rejected, chosen))
    for f in snap.flags:
        if f["correction"] is not None:
            flagged = messages[f["message_id"]]
            found.append(("correction", _prompt(snap, flagged), f["correction"], flagged, None))
    groups = defaultdict(lambda: {1: [], -1: []})  # answers to the same prompt in one conversation, by rating
    for m in sorted(messages.values(), key=lambda m: m["id"]):
        if m["role"] == "assistant" and m["rating"] in (1, -1):
            prompt = _prompt(snap, m)
            groups[(m["conversation_id"], json.dumps(prompt))][m["rating"]].append((m, prompt))
    for group in groups.values():
        for good, prompt in group[1]:
            for bad, _ in group[-1]:
                found.append(("rating", prompt, good["content"], bad, good))

    pairs, seen = [], set()
    for source, prompt, chosen_text, rejected, chosen in found:
        row = {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen_text}],
               "rejected": [{"role": "assistant", "content": rejected["content"]}]}
        key = json.dumps(row, sort_keys=True)
        if key in seen or chosen_text == rejected["content"] or not prompt or prompt[-1]["role"] != "user":
            continue
        if not _valid(prompt + row["chosen"], prompt + row["rejected"]):
            continue
        seen.add(key)
        pairs.append({**row, "source": source, "model": rejected["model"],
                      "chosen_model": chosen["model"] if chosen else None,
                      "conversation_id": rejected["conversation_id"]})
    return pairs


def sft_conversations(snap: Snapshot) -> list[dict]:
    """Fine-tuning conversations {"messages", "source"} from a store's snapshot: each correction as the answer
    after its prompt ("correction"), and each conversation whose active answers are all rated +1 ("rating"), up
    to its last answer. Assistant messages keep their text only (tool calls are dropped); invalid ones are left
    out."""
    found = []
    for f in snap.flags:
        if f["correction"] is not None:
            prompt = _prompt(snap, snap.messages[f["message_id"]])
            found.append((prompt + [{"role": "assistant", "content": f["correction"]}], "correction"))
    active = defaultdict(list)
    for m in sorted(snap.messages.values(), key=lambda m: (m["conversation_id"], m["position"])):
        if m["active"]:
            active[m["conversation_id"]].append(m)
    for cid, msgs in active.items():
        answers = [m for m in msgs if m["role"] == "assistant"]
        if not answers or any(m["rating"] != 1 for m in answers):
            continue
        upto = msgs[:msgs.index(answers[-1]) + 1]
        system = snap.conversations[cid]["system"]
        head = [{"role": "system", "content": system}] if system and upto[0]["role"] != "system" else []
        found.append((head + [{"role": m["role"], "content": m["content"]} for m in upto], "rating"))
    return [{"messages": conversation, "source": source} for conversation, source in found if _valid(conversation)]
