"""What custom assistants are measured on, with the world's ground truth (`llmlab assistant eval`):

    pack_accuracy   the knowledge packs' questions (llmlab.world.packs) answered with the pack's files (BM25, or
                    the hybrid of BM25 and a dense retriever that `index` makes,
                    the top k passages paged in one at a time: llmlab.assistants.reader) and without them
                    (the question alone), exact answers; faithfulness: answers whose value is in the passage
                    they cite
    needle          a needle-in-a-haystack grid: one fact of a pack the model never read (the needle, a sentence
                    that says on its own what its question asks about: `Fact.standalone`) put at a
                    depth of a long document of the world's text (the haystack, 1x to 100x the context);
                    answered by paging (the document chunked, retrieved, read) and by plain truncation (the
                    document's end that fits the context, as one passage: what a model without paging sees)
    memory_recall   a fact the user told N turns earlier ("My locker number is 4821."), asked back after N-1
                    turns of other talk, some of them other facts of the same kind; answered with the
                    conversation's memory (llmlab.assistants.memory) and with the oldest turns dropped to fit
                    the context (what `llmlab chat` did before it had a memory)
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Callable

from llmlab.assistants.chunks import Chunk, chunk_text
from llmlab.assistants.memory import Memory
from llmlab.assistants.reader import PASSAGES, greedy_replies, read_many
from llmlab.assistants.retrieval import BM25, Retriever
from llmlab.chat import fit_context, render_prompt
from llmlab.engine import Engine
from llmlab.tokenizer import Tokenizer
from llmlab.world.conversations import Pools, conversation
from llmlab.world.core import World
from llmlab.world.entities import NameMaker
from llmlab.world.packs import make_packs, pack_chunks
from llmlab.world.reading import PASSAGE_WORDS, memory_fact, reading_prompt, told_thing

ACK = "I will remember that."


def _replies(engine: Engine, tok: Tokenizer, conversations: list[list[dict]]) -> list[str]:
    """Greedy replies (no tools) to conversations that end with the user."""
    return greedy_replies(engine, tok, [render_prompt(tok, c) for c in conversations], max_new_tokens=24)


def pack_accuracy(engine: Engine, tok: Tokenizer, world: World, k: int = PASSAGES, phrasing: str = "question",
                  extractive: bool = True, index: Callable[[list[str]], Retriever] = BM25) -> dict:
    """Accuracy with the pack's files and without them, faithfulness and retrieval recall, per pack and overall;
    `extractive`: how the reader words its answers (llmlab.assistants.reader); `index(passages)`: the retriever
    of a pack's passages."""
    questions, facts, packs = [], [], []
    for pack, pack_facts in make_packs(world).items():
        chunks = pack_chunks(pack_facts, PASSAGE_WORDS)
        ranker = index([c.text for c in chunks])
        for f in pack_facts:
            q = getattr(f, phrasing)
            questions.append((q, [chunks[i] for i in ranker.rank(q, k)]))
            facts.append(f)
            packs.append(pack)
    with_files = read_many(engine, tok, questions, extractive=extractive)
    without = _replies(engine, tok, [[{"role": "user", "content": q}] for q, _ in questions])
    rows = [{"pack": pack, "question": q[0], "answer": f.answer, "with_files": r.answer,
             "cited": r.chunk.cite if r.chunk else None, "without_files": w,
             "right": f.answer in r.answer, "right_without": f.answer in w,
             "faithful": r.chunk is not None and f.answer in r.answer and f.answer in r.chunk.text,
             "retrieved": any(f.sentence in c.text for c in q[1])}
            for pack, q, f, r, w in zip(packs, questions, facts, with_files, without)]

    def share(key: str, subset: list[dict]) -> float:
        return sum(r[key] for r in subset) / max(len(subset), 1)

    answered = [r for r in rows if r["cited"]]
    by_pack = defaultdict(list)
    for r in rows:
        by_pack[r["pack"]].append(r)
    return {"k": k, "phrasing": phrasing, "extractive": extractive, "n": len(rows), "with_files": share("right", rows),
            "without_files": share("right_without", rows), "recall": share("retrieved", rows),
            "faithfulness": share("faithful", answered) if answered else 0.0,
            "packs": {p: {"with_files": share("right", rs), "without_files": share("right_without", rs), "n": len(rs)}
                      for p, rs in by_pack.items()},
            "rows": rows}


def _haystack_sentences(world: World) -> list[str]:
    """The sentences of the world's validation biographies, stories and encyclopedia entries, each ending in a
    full stop."""
    _, val = world.pretrain_documents()
    texts = [d["text"] for d in val if d["kind"] in ("bio", "story", "encyclopedia")]
    return [s.rstrip(".") + "." for t in texts for s in t.replace("\n", " ").split(". ") if s.strip()]


def needle(engine: Engine, tok: Tokenizer, world: World, lengths: tuple[float, ...] = (1, 3, 10, 30, 100),
           depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0), per_cell: int = 8, k: int = PASSAGES,
           seed: int = 0, index: Callable[[list[str]], Retriever] = BM25) -> dict:
    """{"paging" | "truncation": {length: {depth: accuracy}}} (see the module docstring); lengths are in
    multiples of the model's context, in tokens of the haystack. Each of the `per_cell` needles sits in a
    stretch of text of its own (so that a cell is not one passage's luck), at every depth of it."""
    T = engine.model.config.context_len
    rng = random.Random(f"{seed}-needle")
    pool = _haystack_sentences(world)
    needles = [rng.choice([f for f in rng.choice(list(make_packs(world, seed=f"needle-{i}").values())) if f.standalone])
               for i in range(per_cell)]
    sizes = [len(tok.encode(" " + s)) for s in pool]
    cells, paging_q, trunc_q, answers = [], [], [], []
    for length in lengths:
        for f in needles:  # each needle in its own stretch of the world's text, the same one at every depth
            i, hay, n_tokens = rng.randrange(len(pool)), [], 0
            while n_tokens < length * T:
                hay.append(pool[i % len(pool)])
                n_tokens += sizes[i % len(pool)]
                i += 1
            for depth in depths:
                at = round(depth * len(hay))
                doc = " ".join(hay[:at] + [f.sentence] + hay[at:])
                chunks = chunk_text(doc, "document", PASSAGE_WORDS)
                paging_q.append((f.question, [chunks[i] for i in index([c.text for c in chunks]).rank(f.question, k)]))
                trunc_q.append((f.question, [_tail(tok, doc, f.question, T)]))
                cells.append((length, depth))
                answers.append(f.answer)
    out = {}
    for method, questions in (("paging", paging_q), ("truncation", trunc_q)):
        readings = read_many(engine, tok, questions)
        grid: dict = defaultdict(lambda: defaultdict(list))
        for (length, depth), a, r in zip(cells, answers, readings):
            grid[length][depth].append(a in r.answer)
        out[method] = {length: {depth: sum(v) / len(v) for depth, v in row.items()} for length, row in grid.items()}
    out["context_len"], out["per_cell"] = T, per_cell
    return out


def _tail(tok: Tokenizer, doc: str, question: str, T: int, reply_room: int = 24) -> Chunk:
    """The end of `doc` that fits the context with the question and a reply, as one passage."""
    words = doc.split()
    lo, hi = 0, len(words)  # the fewest leading words to cut so that the rest fits
    while lo < hi:
        mid = (lo + hi) // 2
        chunk = Chunk("document", 0, " ".join(words[mid:]))
        ids = render_prompt(tok, reading_prompt(chunk, question))
        if len(ids) + reply_room <= T:
            hi = mid
        else:
            lo = mid + 1
    return Chunk("document", 0, " ".join(words[lo:]))


def memory_recall(engine: Engine, tok: Tokenizer, world: World, turns: tuple[int, ...] = (1, 5, 10, 50, 100),
                  n: int = 40, other_facts: float = 0.2, seed: int = 0) -> dict:
    """{"memory" | "truncation": {N: accuracy}, "false_recall": {N: share}} (see the module docstring);
    false_recall: how often a question the memory does not hold (about a person of the world) is answered
    from memory all the same."""
    T = engine.model.config.context_len
    rng = random.Random(f"{seed}-memory")
    names = NameMaker(rng)
    pools = Pools.for_sft(world)
    results: dict = {"memory": {}, "truncation": {}, "false_recall": {}}
    for N in turns:
        truncated, memories, questions, answers, unrelated = [], [], [], [], []
        for _ in range(n):
            said, question, answer = memory_fact(rng, names)
            thing = told_thing(said)
            messages = [{"role": "user", "content": said}, {"role": "assistant", "content": ACK}]
            for _ in range(N - 1):
                if rng.random() < other_facts:
                    other = memory_fact(rng, names)
                    while told_thing(other[0]) == thing:
                        other = memory_fact(rng, names)
                    messages += [{"role": "user", "content": other[0]}, {"role": "assistant", "content": ACK}]
                else:
                    messages += conversation(world, rng.choice(["qa", "small_talk", "place_qa"]), rng, pools)[-2:]
            memory = Memory()
            for m in messages:
                if m["role"] == "user":
                    memory.add(m["content"])
            memories.append(memory)
            unrelated.append(conversation(world, "qa", rng, pools)[0]["content"])
            questions.append(question)
            answers.append(answer)
            truncated.append(fit_context(tok, messages + [{"role": "user", "content": question}], T, 24)[0])
        readings = read_many(engine, tok, [(q, m.search(q)) for q, m in zip(questions, memories)])
        plain = _replies(engine, tok, truncated)
        wrong = read_many(engine, tok, [(q, m.search(q)) for q, m in zip(unrelated, memories)])
        results["false_recall"][N] = sum(r.chunk is not None for r in wrong) / n
        results["memory"][N] = sum(a in r.answer for a, r in zip(answers, readings)) / n
        results["truncation"][N] = sum(a in p for a, p in zip(answers, plain)) / n
    return results
