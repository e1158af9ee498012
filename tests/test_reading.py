"""Reading from passages: the fine-tuning conversations that teach it, the reader that pages passages in one at
a time and keeps the best-ranked answer, and the memory that pages a conversation's old turns back in."""

from __future__ import annotations

import dataclasses
import functools
import io
import random

import pytest

from llmlab.assistants.chunks import Chunk
from llmlab.assistants.memory import Memory, recall
from llmlab.assistants.reader import answer_kind, names, read_many, spans
from llmlab.engine import Engine
from llmlab.errors import LLMLabError
from llmlab.tokenizer import Tokenizer
from llmlab.world import load
from llmlab.world.config import WorldConfig
from llmlab.world.conversations import Pools, conversation, sft_conversations
from llmlab.world.entities import NameMaker
from llmlab.world.packs import make_packs, pack_chunks
from llmlab.world.reading import (NOT_IN_FILES, NOT_IN_PASSAGE, PASSAGE_WORDS, hard_negatives, memory_fact,
                                  reading_conversation, reading_draws)
from serving import ScriptModel, make_tokenizer


@pytest.fixture(scope="module")
def world(tiny_world_dir):
    return load(tiny_world_dir)


def test_reading_conversations_answer_from_their_passage_or_say_it_does_not(world):
    draws = reading_draws(world, n=3)
    rng, names = random.Random(0), NameMaker(random.Random(1))
    pools = Pools.for_sft(world)
    said = lambda r: conversation(world, r.choice(["qa", "small_talk"]), r, pools)[0]["content"]  # noqa: E731
    rows = [reading_conversation(rng, draws, names, said) for _ in range(400)]
    positives = negatives = 0
    for user, reply in ((r[0]["content"], r[1]["content"]) for r in rows):
        question, _, passage = user.partition("\n")
        cite, _, text = passage.partition("] ")
        if reply == NOT_IN_PASSAGE:
            negatives += 1
            continue
        positives += 1
        answer, _, cited = reply.rpartition(" ")
        assert cited == f"{cite}]" and answer in text  # the answer is copied from the passage it cites
    assert 0.5 < positives / len(rows) < 0.7
    # a negative's passage never holds the fact asked about: checked against the packs' own facts
    facts = {f.question: f for draw in draws for f, *_ in draw} | {f.seen: f for draw in draws for f, *_ in draw}
    for r in rows:
        question, _, passage = r[0]["content"].partition("\n")
        if question in facts and r[1]["content"] == NOT_IN_PASSAGE:
            assert facts[question].sentence not in passage


def test_hard_negatives_draw_each_passage_as_often_as_it_answers(world):
    for pack, facts in make_packs(world, seed="reading-0").items():
        chunks = pack_chunks(facts, PASSAGE_WORDS)
        hard = hard_negatives(facts, chunks)
        for f in facts:
            for q in (f.question, f.seen):
                assert sum(hard[q]) == pytest.approx(1, abs=1e-3)  # every question draws one
                assert all(w == 0 for w, c in zip(hard[q], chunks) if f.sentence in c.text)  # never its own
        held = [sum(f.sentence in c.text for f in facts) for c in chunks]
        drawn = [sum(w[j] for w in hard.values()) / len(hard) for j in range(len(chunks))]
        assert drawn == pytest.approx([h / sum(held) for h in held], abs=1e-3)
        # and hard where that balance leaves room (in a handbook every question names the company, and only four
        # passages do): a timetable's drawn negative shares more words with its question than a random one does
        words = lambda t: {w.strip("?.,").lower() for w in t.split()}  # noqa: E731
        hard_share = [sum(x * len(words(q) & words(c.text)) for c, x in zip(chunks, w)) / sum(w)
                      for q, w in hard.items()]
        any_share = [sum(len(words(q) & words(c.text)) for c, x in zip(chunks, w) if x > 0) / sum(x > 0 for x in w)
                     for q, w in hard.items()]
        assert sum(hard_share) > 1.2 * sum(any_share) or pack != "timetable"


def test_reading_never_shows_the_worlds_own_packs(world):
    own = {f.sentence for facts in make_packs(world).values() for f in facts}
    draws = reading_draws(world, n=5)
    read = {f.sentence for draw in draws for f, *_ in draw}
    company = make_packs(world)["handbook"][0].sentence.split(" was founded")[0]
    assert not any(company in sentence for sentence in read)
    assert len(own & read) < 0.2 * len(own)  # only sentences without a name may coincide ("Visitor badges are red.")


def test_the_sft_mix_reads_only_when_the_world_asks_for_it(world):
    assert not any(r["kind"] == "reading" for r in sft_conversations(world, 300, seed=0))
    reading_world = dataclasses.replace(world, config={**world.config, "sft_reading": 0.5})
    rows = sft_conversations(reading_world, 300, seed=0)
    assert 40 < sum(r["kind"] == "reading" for r in rows) < 160
    assert "sft_reading" not in WorldConfig().content()  # a world without reading is recorded as before


# ---- the reader, on a scripted model --------------------------------------------------------------------------

def reader_script(tok: Tokenizer, knows: dict[str, str]):
    """A model that reads: for a question `Q\\n[cite] text`, answers "VALUE [cite]" when the passage holds
    the word `knows[key]` of a key in Q, else NOT_IN_PASSAGE."""
    start, end = tok.special_id("<|assistant_start|>"), tok.special_id("<|assistant_end|>")
    user_start, user_end = tok.special_id("<|user_start|>"), tok.special_id("<|user_end|>")

    def script(seq: list[int]) -> int:
        if start not in seq:
            return tok.bos_id
        question, _, passage = tok.decode(seq[seq.index(user_start) + 1: seq.index(user_end)]).partition("\n")
        cite, _, text = passage[1:].partition("] ")
        value = next((v for k, v in knows.items() if k in question and v in text), None)
        plan = tok.encode(f"{value} [{cite}]" if value else NOT_IN_PASSAGE) + [end]
        written = seq[seq.index(start) + 1:]
        return plan[len(written)] if len(written) < len(plan) else end
    return script


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer.load(make_tokenizer(tmp_path_factory.mktemp("tok")).parent)


def test_the_reader_keeps_the_best_ranked_passage_that_answers(tok):
    engine = Engine(ScriptModel(tok.vocab_size, reader_script(tok, {"ferry": "09:30", "badge": "yellow"})))
    passages = [Chunk("a.txt", 0, "The car park is large."), Chunk("b.txt", 3, "The ferry leaves at 09:30."),
                Chunk("c.txt", 1, "Ferries: 09:30 daily.")]
    ferry, badge, none = read_many(engine, tok, [("When does the ferry leave?", passages),
                                                 ("What colour is the badge?", passages), ("Hi", [])])
    assert (ferry.answer, ferry.chunk.cite, ferry.read) == ("09:30 [b.txt#3]", "b.txt#3", 3)
    assert ferry.prompt_tokens > 0
    assert (badge.answer, badge.chunk, badge.read) == (NOT_IN_FILES, None, 3)
    assert (none.answer, none.read) == (NOT_IN_FILES, 0)
    # a passage too long for the context with the question is not read (the others are)
    long = Chunk("long.txt", 0, "ferry " * 200 + "09:30")
    assert read_many(engine, tok, [("When does the ferry leave?", [long, passages[1]])])[0].read == 1


def test_the_reader_reads_on_when_the_passage_it_took_has_no_whole_answer(tok):
    """A passage the model does not refuse ("Hello." is no refusal) but answers from no span of (no span is
    followed by the citation) is passed over for the next one the model takes to hold the answer."""
    script = reader_script(tok, {"ferry": "09:30"})
    start, end = tok.special_id("<|assistant_start|>"), tok.special_id("<|assistant_end|>")

    def decoy_says_hello(seq: list[int]) -> int:
        if start in seq and "decoy" in tok.decode(seq[:seq.index(start)]):
            plan, written = tok.encode("Hello.") + [end], seq[seq.index(start) + 1:]
            return plan[len(written)] if len(written) < len(plan) else end
        return script(seq)
    engine = Engine(ScriptModel(tok.vocab_size, decoy_says_hello))
    passages = [Chunk("a.txt", 0, "A decoy at 07:15."), Chunk("b.txt", 3, "The ferry leaves at 09:30.")]
    reading = read_many(engine, tok, [("When does the ferry leave?", passages)])[0]
    assert (reading.answer, reading.chunk.cite, reading.read) == ("09:30 [b.txt#3]", "b.txt#3", 2)


def test_answer_spans_keep_names_whole():
    text = "Dalthithel Saethvane is the fire safety officer. On Fridays the canteen serves mushroom risotto."
    words = text.split()
    assert [" ".join(words[a:b]) for a, b in names(words)] == ["Dalthithel Saethvane", "Fridays"]
    found = spans(text, "What is said?")
    assert "Dalthithel Saethvane" in found and "mushroom risotto" in found and "Fridays" in found
    assert "Saethvane" not in found and "Dalthithel" not in found  # a name cut in two is no answer
    assert not any(s.endswith(" is") or s.startswith("is ") for s in found)  # words of the question stay out
    # a name ends with its sentence; a function word opening a sentence is not part of the name after it
    words = "It was founded in Tristummouth. The Sturkbruron Cooperative has 833 staff.".split()
    assert [" ".join(words[a:b]) for a, b in names(words)] == ["Tristummouth.", "Sturkbruron Cooperative"]


def test_answer_spans_are_of_the_kind_the_question_asks_for():
    text = ("Oreivelyrel Fustindfield runs the Cooperative, founded in 2003 in Tristummouth. Visitor badges are "
            "yellow. The last bus leaves at 22:40 on Thursday, 833 staff")
    assert spans(text, "Who runs the Cooperative?") == ["Oreivelyrel Fustindfield"]  # not "Tristummouth"
    assert spans(text, "In which year was the Cooperative set up?") == ["2003"]
    assert set(spans(text, "What colour is a visitor's badge?")) == {
        s for s in spans(text, "What is a visitor's badge like?") if "yellow" in s.split()}
    assert all(":" in s for s in spans(text, "How late does the last bus depart?"))
    assert all("Thursday" in s.split() for s in spans(text, "On which weekday does the last bus leave?"))
    how_many = spans(text, "How many staff are there?")
    assert "833" in how_many and all(any(ch.isdigit() for ch in s) for s in how_many)
    # a question whose words ask for no kind keeps every span, and so does one about the user's own numbers
    assert answer_kind("What is covered in week 2?") is None and answer_kind("What is my locker number?") is None
    assert "Tristummouth" in spans(text, "Where is the head office?")


def test_answer_spans_come_from_the_sentence_closest_to_the_question():
    text = "Heimel Gouzeinby handles payroll questions. Dalthithel Saethvane is the fire safety officer."
    assert spans(text, "Who is responsible for fire safety?") == ["Dalthithel Saethvane"]
    assert spans(text, "Who handles payroll?") == ["Heimel Gouzeinby"]
    assert set(spans(text, "Who works there?")) == {"Heimel Gouzeinby", "Dalthithel Saethvane"}  # no word shared


def test_a_model_that_does_not_read_answers_from_no_passage(tok):
    """A model that never says "The passage does not say" and never cites (a base model, a chat model fine-tuned
    without reading) would be taken to find every answer if refusing were the only test: the answer must also
    end where the model opens the citation."""
    end = tok.special_id("<|assistant_end|>")

    def hello(seq: list[int]) -> int:
        start = tok.special_id("<|assistant_start|>")
        plan = tok.encode("Hello.") + [end]
        written = seq[seq.index(start) + 1:] if start in seq else []
        return plan[len(written)] if len(written) < len(plan) else end
    engine = Engine(ScriptModel(tok.vocab_size, hello))
    reading = read_many(engine, tok, [("When does the ferry leave?", [Chunk("b.txt", 3, "The ferry leaves at 09:30.")])])[0]
    assert (reading.answer, reading.chunk, reading.read) == (NOT_IN_FILES, None, 1)


def test_memory_pages_an_old_fact_back_in_and_can_be_seen_edited_and_forgotten(tok, tmp_path):
    engine = Engine(ScriptModel(tok.vocab_size, reader_script(tok, {"locker": "4821"})))
    memory = Memory()
    first = memory.add("My locker number is 4821.")
    for i in range(60):
        memory.add(f"Tell me about the weather on day {i}.")
    question = "What is my locker number?"
    memory.add(question)  # the question itself is stored too, but never read as its own answer
    assert all(c.text != f"You said: {question}" for c in memory.search(question))
    reading = recall(engine, tok, memory, question)
    assert reading is not None and reading.answer == f"4821 [memory#{first}]"
    memory.edit(first, "My locker number is 77.")
    assert recall(engine, tok, memory, question) is None  # the edited entry no longer holds 4821
    memory.forget(first)
    assert all(c.index != first for c in memory.passages())
    with pytest.raises(LLMLabError, match="no entry"):
        memory.forget(first)
    memory.save(tmp_path / "memory.json")
    assert Memory.load(tmp_path / "memory.json").entries == memory.entries
    assert Memory.load(tmp_path / "absent.json").entries == []
    (tmp_path / "bad.json").write_text('{"entries": [1, 2]}')
    with pytest.raises(LLMLabError, match="not a memory file"):
        Memory.load(tmp_path / "bad.json")


# ---- the measurements (llmlab.assistants.evals), on a model that reads perfectly -----------------------------

def perfect_reader(tok: Tokenizer, facts: dict[str, list[str]]):
    """A model that reads without error: a pack question (a key of `facts`) is answered when the passage holds
    one of its answers; "What is my X?" when the passage says "My X is V."; else NOT_IN_PASSAGE. Asked anything
    without a passage, it says "Hello."."""
    start, end = tok.special_id("<|assistant_start|>"), tok.special_id("<|assistant_end|>")
    user_start, user_end = tok.special_id("<|user_start|>"), tok.special_id("<|user_end|>")

    def script(seq: list[int]) -> int:
        if start not in seq:
            return tok.bos_id
        last = len(seq) - 1 - seq[::-1].index(user_start)
        question, _, passage = tok.decode(seq[last + 1: last + seq[last:].index(user_end)]).partition("\n")
        cite, _, text = passage[1:].partition("] ")
        value = next((a for a in facts.get(question, []) if a in text), None)
        if "my " in question and "My " in text:
            thing = question.split("my ", 1)[1].rstrip("?").removesuffix(" was")
            said = text.split("My ", 1)[1].rstrip(".")
            value = said.split(" is ", 1)[1] if said.split(" is ", 1)[0] == thing else None
        reply = (f"{value} [{cite}]" if value else NOT_IN_PASSAGE) if passage else "Hello."
        plan = tok.encode(reply) + [end]
        written = seq[len(seq) - 1 - seq[::-1].index(start) + 1:]
        return plan[len(written)] if len(written) < len(plan) else end
    return script


def test_needle_paging_finds_what_truncation_loses(world, tok):
    from llmlab.assistants.evals import needle

    facts = {}  # (two draws may ask the same question, "How often does line 12 run?", with other answers)
    for i in range(2):
        for f in (f for fs in make_packs(world, seed=f"needle-{i}").values() for f in fs):
            facts.setdefault(f.question, []).append(f.answer)
    engine = Engine(ScriptModel(tok.vocab_size, perfect_reader(tok, facts), context_len=256))
    grid = needle(engine, tok, world, lengths=(1, 6), depths=(0.0, 1.0), per_cell=2)
    assert all(v == 1.0 for row in grid["paging"].values() for v in row.values()), grid
    assert grid["truncation"][6][1.0] == 1.0 and grid["truncation"][6][0.0] == 0.0  # only the end survives


def test_memory_recall_far_beyond_the_context(world, tok, monkeypatch):
    from llmlab.assistants import evals
    from llmlab.assistants.evals import memory_recall

    # the test tokenizer spells an invented name in many more tokens than a real one: room for the longest reply
    monkeypatch.setattr(evals, "read_many", functools.partial(read_many, max_new_tokens=64))
    engine = Engine(ScriptModel(tok.vocab_size, perfect_reader(tok, {}), context_len=256))
    result = memory_recall(engine, tok, world, turns=(2, 50), n=6)
    assert result["memory"] == {2: 1.0, 50: 1.0} and result["false_recall"] == {2: 0.0, 50: 0.0}
    assert result["truncation"][50] == 0.0  # the scripted model, without memory, never says the value


def test_chat_answers_from_memory_long_after_the_turn_left_the_context(tmp_path, tok, monkeypatch):
    from llmlab.stages.chat import Config, Session
    from serving import make_checkpoint

    ckpt = make_checkpoint(make_tokenizer(tmp_path / "tok").parent, tmp_path / "ckpt")
    monkeypatch.setattr("llmlab.assistants.memory.read_many", functools.partial(read_many, max_new_tokens=64))
    session = Session(Config(checkpoint=str(ckpt), world=str(tmp_path / "no-world"), tools=False,
                             memory_file=str(tmp_path / "memory.json")))
    session.engine = Engine(ScriptModel(tok.vocab_size, perfect_reader(tok, {}), context_len=128))
    out = io.StringIO()
    session.reply("My locker number is 4821.", out)
    for i in range(30):
        session.reply(f"Tell me about day {i}.", out)
    assert all(m["content"] != "My locker number is 4821." for m in session.messages)  # long out of the context
    assert session.reply("What is my locker number?", out) == "4821 [memory#0]"
    assert Memory.load(tmp_path / "memory.json").entries[0] == "My locker number is 4821."  # kept on disk
    session.edit("0 My locker number is 77.")
    assert session.reply("What is my locker number?", out) == "77 [memory#0]"
    assert Memory.load(tmp_path / "memory.json").entries[0] == "My locker number is 77."
    session.forget("0")
    assert "[memory#0]" not in session.reply("What is my locker number?", out)
    with pytest.raises(LLMLabError, match="no entry"):
        session.forget("0")


def test_a_memory_fact_is_about_the_thing_its_statement_names_whatever_its_question_says():
    from llmlab.world.reading import MEMORY_THINGS, told_thing

    rng, names = random.Random(0), NameMaker(random.Random(1))
    things = {thing for thing, _ in MEMORY_THINGS}
    for _ in range(200):
        said, question, _ = memory_fact(rng, names)
        assert told_thing(said) in things and told_thing(said) in question
