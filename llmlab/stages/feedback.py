"""`llmlab feedback export`: turn what users said in the web chat into training data.

    llmlab feedback export --db runs/cpu/feedback.db --out_dir runs/cpu/feedback

reads the feedback store of `llmlab serve` (llmlab.server.store; safe while the server runs) and writes two
JSONL files of training data into out_dir (built by llmlab.data.feedback), and a third of the rows they left out:

preferences.jsonl, for preference tuning (llmlab.data.preferences.load_preference_pairs, TRL's format):

    {"prompt": [...], "chosen": [{"role": "assistant", ...}], "rejected": [...],
     "source": ..., "model": ..., "chosen_model": ..., "conversation_id": ...}

- "comparison": two answers shown side by side and the one the user picked;
- "correction": a flagged answer with the answer the user wrote (chosen) instead of it (rejected);
- "rating": two answers to the same prompt in one conversation (e.g. an answer and its regeneration), one
  rated +1 and the other -1 (every +1 against every -1).
The prompt is what the model saw when it wrote the answer: the conversation's system prompt, then the chain of
messages that were active when the answer was added (each message records its parent), so later edits and
regenerations do not change it. "rating" pairs group answers whose prompts are equal. "model" is the model
of the rejected answer (always a model's), "chosen_model" that of the chosen one (null for a correction).

sft.jsonl, for `llmlab sft --data runs/cpu/feedback/sft.jsonl` (a `messages` column, like the world's):

    {"messages": [...], "source": "correction" | "rating"}

- "correction": the prompt of each corrected answer followed by the correction;
- "rating": each conversation whose active answers are all rated +1, up to its last answer.
Messages are {"role", "content"}; assistant tool calls are dropped (the text after them is kept), and a row
that is not a valid conversation (an answer with no text) is left out. A pair found by several sources is
written once.

skipped.jsonl: every row of the store that an output left out, and why (llmlab.data.feedback.Skipped; the
command also prints how many per output and reason):

    {"output": "preferences" | "sft", "kind": "comparison" | "flag" | "rating", "id": ..., "conversation_id": ...,
     "reason": "the two answers are identical: no preference to learn", "detail": ...}

`id` is the comparison's or the flag's, or for a rating the rated message's. The reasons: a comparison not
decided yet or between two identical answers; a flag without a correction, or whose correction is the answer's
own text; an answer rated +1 or -1 with no answer to the same prompt rated the other way (no pair), or one
that is no longer in its conversation, or whose conversation has answers not rated +1 (no SFT row); a pair
already found by another source; a prompt that does not end with a user message; a row that is not a valid
conversation (`detail` says why).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from llmlab.data.feedback import Skipped, preference_pairs, sft_conversations
from llmlab.data.preferences import write_jsonl
from llmlab.errors import LLMLabError
from llmlab.server.store import FeedbackStore

ACTIONS = ("export",)


@dataclass
class Config:
    action: str = "export"
    """what to do: export (write preferences.jsonl, sft.jsonl and skipped.jsonl from the feedback store)"""
    db: str = "runs/cpu/feedback.db"
    """the feedback store written by `llmlab serve`"""
    out_dir: str = "runs/cpu/feedback"
    """where preferences.jsonl, sft.jsonl and skipped.jsonl are written"""

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise LLMLabError(f"feedback: unknown action {self.action!r}: use one of {', '.join(ACTIONS)}")


def main(cfg: Config) -> dict:
    # ---- read the store ----------------------------------------------------------------------------------
    db = Path(cfg.db)
    if not db.is_file():
        raise LLMLabError(f"no feedback store at {db}: run `llmlab serve` and rate, flag or compare some answers "
                          f"first, or pass --db PATH")
    with FeedbackStore(db) as store:
        snapshot = store.snapshot()  # one consistent view for both files
    (pairs, skipped_pairs), (sft, skipped_sft) = preference_pairs(snapshot), sft_conversations(snapshot)
    skipped = skipped_pairs + skipped_sft

    # ---- write ---------------------------------------------------------------------------------------------
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    preferences_path = write_jsonl(out_dir / "preferences.jsonl", pairs)
    sft_path = write_jsonl(out_dir / "sft.jsonl", sft)
    skipped_path = write_jsonl(out_dir / "skipped.jsonl", [asdict(s) for s in skipped])
    pair_sources = dict(Counter(p["source"] for p in pairs))
    sft_sources = dict(Counter(c["source"] for c in sft))

    def by_source(counts: dict) -> str:
        return ", ".join(f"{n} {source}" for source, n in sorted(counts.items())) or "none"

    print(f"feedback: {len(pairs)} preference pairs ({by_source(pair_sources)}), {len(sft)} SFT conversations "
          f"({by_source(sft_sources)}) -> {out_dir}")
    skipped_by_reason = {"preferences": _by_reason(skipped_pairs), "sft": _by_reason(skipped_sft)}
    for output, counts in skipped_by_reason.items():
        if counts:
            print(f"  left out of {output}.jsonl: {sum(counts.values())} rows")
            for reason, n in counts.items():
                print(f"  {n:6d}  {reason}")
    if skipped:
        print(f"  each of them, and why: {skipped_path}")
    return {"preference_pairs": len(pairs), "sft_conversations": len(sft), "pairs_by_source": pair_sources,
            "sft_by_source": sft_sources, "skipped_by_reason": skipped_by_reason,
            "preferences": str(preferences_path), "sft": str(sft_path), "skipped": str(skipped_path)}


def _by_reason(skipped: list[Skipped]) -> dict[str, int]:
    """How many rows were left out per kind and reason ("comparison: the two answers are identical: ..."), most
    first."""
    return dict(Counter(f"{s.kind}: {s.reason}" for s in skipped).most_common())
