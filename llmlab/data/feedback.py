"""Training data from what users said in the web chat: preference pairs and fine-tuning conversations, read
from a snapshot of the feedback store (llmlab.server.store) of `llmlab serve`; `llmlab feedback export` writes them as JSONL
(llmlab.stages.feedback documents the sources and the formats).

An answer's prompt is what the model saw when it wrote it: the conversation's system prompt, then the chain of
messages that were active when the answer was added (each message records its parent), so later edits and
regenerations do not change it. Rows that are not valid conversations (llmlab.chat.validate), such as an answer
with tool calls and no text, are left out; assistant messages keep their text only.

Nothing is left out silently: each function also returns the rows of the store its sources read and did not
use, as `Skipped` (which row, which output, why). The preferences read every comparison, every flag and every
answer rated +1 or -1; the SFT conversations read every flag and every answer rated +1. A row left out of
one output may still be in the other (an answer rated +1 with no -1 beside it gives no pair, but its
conversation may be an SFT row).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass

from llmlab.chat import validate
from llmlab.errors import LLMLabError
from llmlab.server.store import Snapshot

# why a row is left out: one fixed text per cause, so that the export can count rows by reason
UNDECIDED = "the comparison is not decided yet: no answer was chosen"
IDENTICAL = "the two answers are identical: no preference to learn"
SAME_CORRECTION = "the correction is the flagged answer's own text: no preference to learn"
NO_CORRECTION = "a flag without a correction: no better answer to learn from"
UNPAIRED = "no other answer to the same prompt in its conversation is rated the other way: no pair"
NOT_AFTER_USER = "its prompt does not end with a user message"
DUPLICATE = "the same pair as one found before (the first of comparison, correction, rating is kept)"
INVALID = "not a valid conversation (see detail)"
INACTIVE = "the answer is no longer in its conversation (regenerated, edited away, or not chosen)"
NOT_ALL_GOOD = "not every answer in its conversation is rated +1"


@dataclass(frozen=True)
class Skipped:
    """A row of the feedback store that one output leaves out, and why."""

    output: str
    """"preferences" or "sft" """
    kind: str
    """"comparison", "flag" or "rating" (an answer's rating)"""
    id: int
    """the comparison's or the flag's id; for a rating, the rated message's"""
    conversation_id: int
    reason: str
    """one of this module's reason constants (IDENTICAL, NO_CORRECTION, ...)"""
    detail: str = ""
    """more about this row (the validation error, the pair it duplicates)"""


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


def _invalid(*conversations: list[dict]) -> str | None:
    """The validation error of the first conversation that is not valid, or None."""
    try:
        for conversation in conversations:
            validate(conversation)
    except LLMLabError as e:
        return str(e)
    return None


def preference_pairs(snap: Snapshot) -> tuple[list[dict], list[Skipped]]:
    """Preference pairs in TRL's conversational format from a store's snapshot (see llmlab.stages.feedback for
    the sources), and the rows left out: pairs that are not valid conversations or whose two answers are the
    same text, and a pair found by several sources is kept once, under the first of comparison, correction,
    rating. A rating is left out when none of the pairs it takes part in is kept."""
    messages = snap.messages
    skipped = []
    # (kind, row id, source, prompt, chosen text, rejected message, chosen message or None)
    found = []
    for c in snap.comparisons:
        if c["chosen"] is None:
            skipped.append(Skipped("preferences", "comparison", c["id"], c["conversation_id"], UNDECIDED))
            continue
        chosen = messages[c["chosen"]]
        rejected = messages[c["message_b"] if c["chosen"] == c["message_a"] else c["message_a"]]
        found.append(("comparison", c["id"], "comparison", _prompt(snap, chosen), chosen["content"], rejected, chosen))
    for f in snap.flags:
        flagged = messages[f["message_id"]]
        if f["correction"] is None:
            skipped.append(Skipped("preferences", "flag", f["id"], flagged["conversation_id"], NO_CORRECTION))
            continue
        found.append(("flag", f["id"], "correction", _prompt(snap, flagged), f["correction"], flagged, None))
    groups = defaultdict(lambda: {1: [], -1: []})  # answers to the same prompt in one conversation, by rating
    rated = [m for m in sorted(messages.values(), key=lambda m: m["id"])
             if m["role"] == "assistant" and m["rating"] in (1, -1)]
    for m in rated:
        prompt = _prompt(snap, m)
        groups[(m["conversation_id"], json.dumps(prompt))][m["rating"]].append((m, prompt))
    for group in groups.values():
        for good, prompt in group[1]:
            for bad, _ in group[-1]:
                found.append(("rating", good["id"], "rating", prompt, good["content"], bad, good))

    pairs, seen = [], {}  # seen: a kept pair's key -> its source
    ratings_kept, rating_drops = set(), {}  # rated message id -> the first reason one of its pairs was dropped
    for kind, row_id, source, prompt, chosen_text, rejected, chosen in found:
        row = {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen_text}],
               "rejected": [{"role": "assistant", "content": rejected["content"]}]}
        key = json.dumps(row, sort_keys=True)
        detail = ""
        if chosen_text == rejected["content"]:
            reason = SAME_CORRECTION if kind == "flag" else IDENTICAL
        elif not prompt or prompt[-1]["role"] != "user":
            reason = NOT_AFTER_USER
        elif key in seen:
            reason, detail = DUPLICATE, f"the same pair as a {seen[key]}"
        elif (error := _invalid(prompt + row["chosen"], prompt + row["rejected"])) is not None:
            reason, detail = INVALID, error
        else:
            seen[key] = source
            pairs.append({**row, "source": source, "model": rejected["model"],
                          "chosen_model": chosen["model"] if chosen else None,
                          "conversation_id": rejected["conversation_id"]})
            if kind == "rating":
                ratings_kept.update((row_id, rejected["id"]))
            continue
        if kind == "rating":
            for mid in (row_id, rejected["id"]):
                rating_drops.setdefault(mid, (reason, detail))
        else:
            skipped.append(Skipped("preferences", kind, row_id, rejected["conversation_id"], reason, detail))
    for m in rated:
        if m["id"] not in ratings_kept:
            reason, detail = rating_drops.get(m["id"], (UNPAIRED, ""))
            skipped.append(Skipped("preferences", "rating", m["id"], m["conversation_id"], reason, detail))
    return pairs, skipped


def sft_conversations(snap: Snapshot) -> tuple[list[dict], list[Skipped]]:
    """Fine-tuning conversations {"messages", "source"} from a store's snapshot: each correction as the answer
    after its prompt ("correction"), and each conversation whose active answers are all rated +1 ("rating"), up
    to its last answer; and the rows left out (flags without a correction, answers rated +1 whose conversation
    is not such a row, invalid ones). Assistant messages keep their text only (tool calls are dropped)."""
    conversations, skipped = [], []
    for f in snap.flags:
        flagged = snap.messages[f["message_id"]]
        if f["correction"] is None:
            skipped.append(Skipped("sft", "flag", f["id"], flagged["conversation_id"], NO_CORRECTION))
            continue
        conversation = _prompt(snap, flagged) + [{"role": "assistant", "content": f["correction"]}]
        if (error := _invalid(conversation)) is not None:
            skipped.append(Skipped("sft", "flag", f["id"], flagged["conversation_id"], INVALID, error))
            continue
        conversations.append({"messages": conversation, "source": "correction"})
    active, good = defaultdict(list), defaultdict(list)  # by conversation: its active messages, its +1 answers
    for m in sorted(snap.messages.values(), key=lambda m: (m["conversation_id"], m["position"])):
        if m["active"]:
            active[m["conversation_id"]].append(m)
        if m["role"] == "assistant" and m["rating"] == 1:
            good[m["conversation_id"]].append(m)
    for cid in sorted(active.keys() | good.keys()):
        msgs = active[cid]
        answers = [m for m in msgs if m["role"] == "assistant"]
        reason, error = None, ""
        if not answers or any(m["rating"] != 1 for m in answers):
            reason = NOT_ALL_GOOD
        else:
            upto = msgs[:msgs.index(answers[-1]) + 1]
            system = snap.conversations[cid]["system"]
            head = [{"role": "system", "content": system}] if system and upto[0]["role"] != "system" else []
            conversation = head + [{"role": m["role"], "content": m["content"]} for m in upto]
            if (error := _invalid(conversation)) is None:
                conversations.append({"messages": conversation, "source": "rating"})
            else:
                reason = INVALID
        for m in good[cid]:
            if not m["active"]:
                skipped.append(Skipped("sft", "rating", m["id"], cid, INACTIVE))
            elif reason is not None:
                skipped.append(Skipped("sft", "rating", m["id"], cid, reason, error))
    return conversations, skipped
