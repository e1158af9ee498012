"""Answering from more text than the context holds, by paging: the passages a retriever found are put after
the question one at a time (llmlab.world.reading's format: `question\n[file#index] text`), each read in its
own row of one batch, and the answer comes from the best-ranked passage the assistant finds the answer in,
citing it. When none: NOT_IN_FILES.

Reading a passage is two decisions, each the model's:

    whether    the probability that its reply opens as NOT_IN_PASSAGE does ("The passage ...": two words, so
               that an answer that begins as it does, "Thelma" in a tokenizer with the token "The", is not
               read as a refusal), read from one batched forward pass; below `abstain` (1/2: more likely to
               answer than not) the passage holds the answer
    what       `extractive` (the default): of the replies "SPAN [file#index]", for every span of up to
               MAX_SPAN_WORDS of the passage's words that has no word of the question, is not function words
               alone, does not cut a name in two or run on past a sentence's end, is of the kind the question
               asks for, where its words say, and lies in the sentence that shares the most words with the
               question (`spans`, `answer_kind`), the one whose own tokens the model gives the
               highest mean log-probability, plus the log-probability that it opens the citation right after
               (the answer ends there), among those after which it does so with probability at least 1/2 (the
               answer is whole); so every answer is the passage's own words, the model choosing which.
               Otherwise the reply as the model writes it, greedily. (A small model finds the right place in a
               passage more often than it copies an invented name right: "Trundtoro Linstone" comes out as
               "Gino Smore".)

The kind of answer is read from the question's words, as extractive question answering has long done: "Who"
asks for a name of at least two words, "What time" for a clock time, "How many" for a number, and so on
(`ANSWER_KINDS`); a question that says none (most "What ...") takes any span, and so does a reading that
is not extractive. It is what the model, which takes
passages for holding the answer more readily than it should, does not check: "Who runs Sturkbruron
Cooperative?" was answered "Tristummouth" from the passage on the head office, "What colour is a visitor's
badge?" with the canteen's dish of the same passage. On 306 questions of six draws' packs (the world's and
five others, every score cached once): 79.1% -> 84.3% right; keeping to the sentence closest to the question
in words, 84.3% -> 85.0% (two questions better, none worse: "Who is responsible for fire safety?" had been
answered with the name of the passage's other sentence).

When the passage taken to hold the answer has no such span (or, read greedily, the reply cites none), the next
one that does is read.

The cpu preset's context holds one 12-word passage and a question; paging k passages costs k forward passes,
and answering scores some 60 short spans of one passage. The same reader serves knowledge files, a document far
longer than the context (needle in a haystack) and a conversation's memory (llmlab.assistants.memory).

    read_many(engine, tokenizer, [(question, passages), ...])  -> [Reading, ...]
    greedy_replies(engine, tokenizer, prompts)                   -> the assistant's words for each prompt
"""

from __future__ import annotations

import calendar
import math
import re
from dataclasses import dataclass
from typing import Sequence

import torch

from llmlab.assistants.chunks import Chunk, sentences
from llmlab.chat import final_answer, render_conversation, render_prompt, reply_stop_ids
from llmlab.data.conversations import collate
from llmlab.engine import Engine, SamplingParams
from llmlab.tokenizer import Tokenizer
from llmlab.training import IGNORE_INDEX, token_losses
from llmlab.world.reading import NOT_IN_FILES, NOT_IN_PASSAGE, cited, reading_prompt

PASSAGES = 10
"""passages retrieved and paged in per question, by default (`llmlab serve --passages`, `llmlab assistant eval
--k`): a word the question and its answer's passage do not share can leave that passage below the fifth"""
MAX_SPAN_WORDS = 6
"""the longest answer an extractive reading writes, in words (the packs' longest value has three)"""
NOT_OPENING = " ".join(NOT_IN_PASSAGE.split()[:2])
"""how a reply that finds no answer in the passage opens"""
SPAN_TRIM = ".,;:!?()\"'"
"""what an answer span loses at its ends (a sentence's full stop, a parenthesis)"""
FUNCTION_WORDS = frozenset(
    "a an the is are was were be been am do does did has have had of in on at to for from by with and or but "
    "as it its this that these those there he she they we you i me him her them us my your his our their "
    "who what which where when how".split())
"""words no answer is made of alone"""
COLOURS = frozenset("red orange yellow green blue purple violet pink brown black white grey gray silver gold "
                    "beige turquoise".split())
ANSWER_KINDS = [  # (kind, the question's words that ask for it, what an answer of that kind is); first match
    ("name", r"^(who|whom|whose)\b", lambda a: len(a.split()) >= 2 and all(w[:1].isupper() for w in a.split())),
    ("colour", r"\b(what|which) colou?r\b", lambda a: any(w.lower() in COLOURS for w in a.split())),
    ("year", r"\b(what|which) year\b", lambda a: re.fullmatch(r"\d{4}", a) is not None),
    ("time", r"\b(what time|how late|how early)\b", lambda a: re.search(r"\d:\d\d|\d ?[ap]m\b", a) is not None),
    ("weekday", r"\b(weekday|day of the week)\b", lambda a: any(d in a.split() for d in calendar.day_name)),
    ("number", r"\bhow (many|much|often|long|old|large|big|far)\b|\b(what|which) (percentage|floor|level)\b"
               r"|\bin (percent|minutes|hours|days|weeks)\b", lambda a: re.search(r"\d", a) is not None),
]
"""the kinds of answer a question's words ask for (`answer_kind`), each with the test an answer of it passes"""


def answer_kind(question: str) -> str | None:
    """The kind of answer (`ANSWER_KINDS`) the question asks for, or None when its words do not say."""
    low = question.lower()
    return next((kind for kind, asks, _ in ANSWER_KINDS if re.search(asks, low)), None)


def of_kind(answer: str, kind: str | None) -> bool:
    """Whether `answer` is of the kind `kind` (any answer is of kind None)."""
    return kind is None or next(test for k, _, test in ANSWER_KINDS if k == kind)(answer)


@dataclass
class Reading:
    answer: str
    """the reply (with its citation), or NOT_IN_FILES"""
    chunk: Chunk | None
    """the passage the answer came from"""
    read: int
    """passages read (prompts scored)"""
    prompt_tokens: int = 0
    """tokens of the prompts read"""

    @property
    def citation(self) -> dict:
        """{"file", "passage", "text"} of the passage answered from (an answer that has one)."""
        return {"file": self.chunk.file, "passage": self.chunk.index, "text": self.chunk.text}


def _word(w: str) -> str:
    return w.strip(SPAN_TRIM).lower()


def names(words: Sequence[str]) -> list[tuple[int, int]]:
    """The [start, end) word ranges of the names among `words`: runs of capitalised words, a run ending with a
    sentence ("... in Tristummouth. The head office ..."), less a function word that opens it ("On Fridays",
    "The Sturkbruron Cooperative" at a sentence's start)."""
    out, i = [], 0
    while i < len(words):
        if not words[i].strip(SPAN_TRIM)[:1].isupper():
            i += 1
            continue
        j = i + 1
        while j < len(words) and words[j - 1][-1:] not in ".!?:" and words[j].strip(SPAN_TRIM)[:1].isupper():
            j += 1
        start = i + 1 if _word(words[i]) in FUNCTION_WORDS else i
        if start < j:
            out.append((start, j))
        i = j
    return out


def spans(text: str, question: str = "", max_words: int = MAX_SPAN_WORDS) -> list[str]:
    """Every run of 1 to `max_words` consecutive words of `text`, trimmed of SPAN_TRIM at its ends, that has no
    word of `question` (an answer is what the question does not already say: "my home town" is no answer to
    "What is my home town?", nor "week 1" to "What is covered in week 1?"), is not FUNCTION_WORDS alone, and
    neither begins nor ends inside a name (`names`): "Saethvane" is not an answer where the passage says
    "Dalthithel Saethvane", whom a small model, weak at copying an invented first name, would otherwise cut
    short; does not run on past the end of a sentence; is of the kind the question asks for (`answer_kind`:
    no "Tristummouth" to "Who runs ...?"); and lies in a sentence that shares the most words with the question
    (`_closest_sentences`), where the passage has several."""
    asked = {_word(w) for w in question.split()}
    words = text.split()
    inside = {k for a, b in names(words) for k in range(a + 1, b)}  # word positions a span may not cut before
    out = {" ".join(words[i:j]).strip(SPAN_TRIM) for i in range(len(words))
           for j in range(i + 1, min(len(words), i + max_words) + 1)
           if i not in inside and j not in inside
           and not any(_word(w) in asked for w in words[i:j])
           and not all(_word(w) in FUNCTION_WORDS for w in words[i:j])}
    kind = answer_kind(question)
    found = {s for s in out if s and of_kind(s, kind)}
    closest = _closest_sentences(text, asked)  # (a span that runs on into the next sentence lies in none)
    return sorted(s for s in found if any(s in sentence for sentence in closest))


def _closest_sentences(text: str, asked: set[str]) -> list[str]:
    """The sentences of `text` that share the most words with the question's (`asked`), function words aside:
    of "Heimel Gouzeinby handles payroll questions. Dalthithel Saethvane is the fire safety officer.", the
    second for "Who is responsible for fire safety?" (the model liked the first name better)."""
    shared = {s: len({_word(w) for w in s.split()} & (asked - FUNCTION_WORDS)) for s in sentences(text)}
    most = max(shared.values(), default=0)
    return [s for s, n in shared.items() if n == most]


def prompts_for(tokenizer: Tokenizer, question: str, passages: Sequence[Chunk], context_len: int,
                reply_room: int) -> list[tuple[Chunk, list[int]]]:
    """(passage, prompt ids) for every passage whose prompt leaves `reply_room` tokens of the context."""
    out = []
    for chunk in passages:
        ids = render_prompt(tokenizer, reading_prompt(chunk, question))
        if len(ids) + reply_room <= context_len:
            out.append((chunk, ids))
    return out


@torch.inference_mode()
def reply_token_logprobs(model: torch.nn.Module, tokenizer: Tokenizer, conversations: Sequence[list[dict]],
                         replies: Sequence[str], opening: bool = False, batch_size: int = 32) -> list[list[float]]:
    """log p of each token of each reply to its conversation (ending with the user), `<|assistant_end|>`
    last; with `opening`, of the reply's words as the opening of a longer reply (no end)."""
    rows = []
    for conversation, reply in zip(conversations, replies):
        ids, mask = render_conversation(tokenizer, [*conversation, {"role": "assistant", "content": reply}])
        rows.append((ids, mask[:-1] + [0] if opening else mask))
    return _trained_logprobs(model, rows, tokenizer.bos_id, batch_size)


def _trained_logprobs(model: torch.nn.Module, rows: Sequence[tuple[list[int], list[int]]], pad_id: int,
                      batch_size: int) -> list[list[float]]:
    """log p of the trained tokens of each rendered (ids, loss mask) row."""
    device = next(model.parameters()).device
    out: list[list[float]] = []
    for start in range(0, len(rows), batch_size):
        inputs, targets = collate(rows[start:start + batch_size], pad_id)
        logp = -token_losses(model, inputs.to(device), targets.to(device))
        trained = targets != IGNORE_INDEX
        out += [row[keep].tolist() for row, keep in zip(logp, trained)]
    return out


def read_many(engine: Engine, tokenizer: Tokenizer, questions: Sequence[tuple[str, Sequence[Chunk]]],
              max_new_tokens: int = 32, batch_size: int = 32, extractive: bool = True,
              abstain: float = 0.5) -> list[Reading]:
    """For each (question, its passages best first): the Reading (see the module docstring)."""
    T = engine.model.config.context_len
    room = min(max_new_tokens, 24)
    jobs = [(q, chunk, ids) for q, (question, passages) in enumerate(questions)
            for chunk, ids in prompts_for(tokenizer, question, passages, T, room)]
    p_not = [math.exp(sum(lp)) for lp in reply_token_logprobs(
        engine.model, tokenizer, [reading_prompt(chunk, questions[q][0]) for q, chunk, _ in jobs],
        [NOT_OPENING] * len(jobs), opening=True, batch_size=batch_size)]
    out = [Reading(NOT_IN_FILES, None, 0) for _ in questions]
    candidates: dict[int, list[tuple[Chunk, list[int]]]] = {}  # the passages taken to hold the answer, best first
    for (q, chunk, ids), p in zip(jobs, p_not):
        out[q].read += 1
        out[q].prompt_tokens += len(ids)
        if p < abstain:
            candidates.setdefault(q, []).append((chunk, ids))
    for turn in range(max((len(c) for c in candidates.values()), default=0)):  # each question's next candidate
        rows = [q for q, c in candidates.items() if len(c) > turn and out[q].chunk is None]
        chosen = [candidates[q][turn] for q in rows]
        if extractive:
            replies = [likeliest(engine.model, tokenizer, reading_prompt(chunk, questions[q][0]),
                                 spans(chunk.text, questions[q][0]), chunk, batch_size=batch_size)
                       for q, (chunk, _) in zip(rows, chosen)]
        else:
            replies = greedy_replies(engine, tokenizer, [ids for _, ids in chosen], max_new_tokens, batch_size)
        for q, (chunk, _), reply in zip(rows, chosen, replies):
            if f"[{chunk.cite}]" in reply and NOT_IN_PASSAGE.rstrip(".") not in reply:
                out[q].answer, out[q].chunk = reply.strip(), chunk
    return out


def likeliest(model: torch.nn.Module, tokenizer: Tokenizer, prompt: list[dict], answers: Sequence[str],
              chunk: Chunk, closes: float = 0.5, batch_size: int = 32) -> str:
    """Of the replies "ANSWER [cite]" to the conversation `prompt`, one per answer, the one whose answer tokens
    the model gives the highest mean log-probability plus the log-probability of opening the citation (" [")
    right after them, among those after which it opens the citation with probability at least `closes`: the
    answer is whole ("Guus" for "Guus Gryndshorford" is not), and a model that does not read passages closes
    none. A mean, not a sum, which would favour the fewest tokens (a short word over a name spelled in pieces);
    over the answer alone, not the citation too, which would favour them as well (a one-token answer's mean
    is mostly the citation's tokens, copied with ease: "yellow" over "mushroom risotto" for what the canteen
    serves). NOT_IN_PASSAGE when there is none, or when none fits the context."""
    T = model.config.context_len
    rendered = [(a, r, render_conversation(tokenizer, [*prompt, {"role": "assistant", "content": r}]))
                for a in answers for r in [cited(a, chunk)]]
    fits = [(a, r, row) for a, r, row in rendered if len(row[0]) <= T]
    if not fits:
        return NOT_IN_PASSAGE
    logps = _trained_logprobs(model, [row for _, _, row in fits], tokenizer.bos_id, batch_size)
    best, best_score = NOT_IN_PASSAGE, -math.inf
    bracket = len(tokenizer.encode(" ["))
    for (answer, reply, _), lp in zip(fits, logps):
        n = len(tokenizer.encode(answer))
        closing = sum(lp[n:n + bracket])  # " [": the answer ends here (copying the index is another skill)
        score = sum(lp[:n]) / n + closing
        if closing >= math.log(closes) and score > best_score:
            best, best_score = reply, score
    return best


def greedy_replies(engine: Engine, tokenizer: Tokenizer, prompts: Sequence[list[int]], max_new_tokens: int = 32,
                   batch_size: int = 32) -> list[str]:
    """The assistant's own words (no tools run) greedily generated for each prompt, in batches."""
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    stop = reply_stop_ids(tokenizer)
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        out += [final_answer(tokenizer, ids) for ids in engine.generate(prompts[start:start + batch_size], params,
                                                                          stop_ids=stop)]
    return out
