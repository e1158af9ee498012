"""The feedback store (llmlab.server.store), its training data (llmlab.data.feedback, `llmlab feedback export`) and
the preference-pair loader."""

import dataclasses
import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from llmlab.data import Mixture, parse_corpus
from llmlab.data.conversations import ConversationLoader
from llmlab.data import feedback as export
from llmlab.data.feedback import preference_pairs, sft_conversations
from llmlab.data.preferences import PreferencePair, load_preference_pairs, write_jsonl
from llmlab.errors import LLMLabError
from llmlab.server.store import SCHEMA_VERSION, FeedbackStore
from llmlab.stages import feedback
from llmlab.tokenizer import train_tokenizer
from llmlab.training import IGNORE_INDEX


@pytest.fixture
def store(tmp_path):
    with FeedbackStore(tmp_path / "sub" / "feedback.db") as s:
        yield s


def _chat(store, *turns, system=""):
    """A conversation with alternating user/assistant messages; (conversation id, message ids)."""
    cid = store.create_conversation("t", system)["id"]
    roles = ["user", "assistant"]
    return cid, [store.add_message(cid, roles[i % 2], text)["id"] for i, text in enumerate(turns)]


def _roles_contents(conversation):
    return [(m["role"], m["content"]) for m in conversation["messages"]]


# ------------------------------------------------------------------------------------------------ conversations


def test_conversations_round_trip_and_list_newest_first(store, tmp_path):
    assert (tmp_path / "sub" / "feedback.db").is_file()  # parent dirs created
    a = store.create_conversation("first", "Be brief.")
    b = store.create_conversation("second")
    assert set(a) == {"id", "title", "system", "created", "updated"} and isinstance(a["id"], int)
    assert (a["title"], a["system"], b["system"]) == ("first", "Be brief.", "")
    assert [c["id"] for c in store.list_conversations()] == [b["id"], a["id"]]
    store.add_message(a["id"], "user", "hi")  # touches `updated`: a is now the newest
    assert [c["id"] for c in store.list_conversations()] == [a["id"], b["id"]]
    assert [c["id"] for c in store.list_conversations(limit=1)] == [a["id"]]
    assert "messages" not in store.list_conversations()[0]
    got = store.get_conversation(a["id"])
    assert got["title"] == "first" and _roles_contents(got) == [("user", "hi")]
    renamed = store.rename_conversation(a["id"], "renamed")
    assert renamed["title"] == "renamed" and store.get_conversation(a["id"])["title"] == "renamed"
    assert store.rename_conversation(9999, "x") is None and store.get_conversation(9999) is None
    assert json.loads(json.dumps(got)) == got  # plain JSON-able


def test_delete_conversation_removes_everything_it_owns(store):
    cid, (u, a1) = _chat(store, "q", "a1")
    a2 = store.add_message(cid, "assistant", "a2")["id"]
    store.rate(a1, 1)
    store.flag(a1, "wrong", "better")
    store.create_comparison(cid, a1, a2)
    other, _ = _chat(store, "keep me", "kept")
    assert store.delete_conversation(cid) is True
    assert store.delete_conversation(cid) is False
    assert store.get_conversation(cid) is None and store.get_message(u) is None
    db = sqlite3.connect(store.path)
    counts = {t: db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
              for t in ("messages", "ratings", "flags", "comparisons")}
    db.close()
    assert counts == {"messages": 2, "ratings": 0, "flags": 0, "comparisons": 0}  # only the other conversation's
    assert _roles_contents(store.get_conversation(other)) == [("user", "keep me"), ("assistant", "kept")]


# ---------------------------------------------------------------------------------------------------- messages


def test_message_round_trip(store):
    cid = store.create_conversation()["id"]
    u = store.add_message(cid, "user", "What is 2*3?")
    calls = [{"call": "calculator 2*3", "result": "6"}]
    a = store.add_message(cid, "assistant", "It is 6.", tool_calls=calls, model="sft-step-200",
                          settings={"temperature": 0.7, "top_k": 50})
    assert set(a) >= {"id", "conversation_id", "position", "role", "content", "tool_calls", "model", "settings",
                      "active", "rating", "flags", "created"}
    assert (u["position"], a["position"]) == (0, 1)
    assert (u["tool_calls"], u["settings"], u["model"]) == ([], {}, None)
    assert (a["role"], a["content"], a["tool_calls"], a["model"]) == ("assistant", "It is 6.", calls, "sft-step-200")
    assert a["settings"] == {"temperature": 0.7, "top_k": 50}
    assert (a["active"], a["rating"], a["flags"], a["conversation_id"]) == (True, 0, [], cid)
    assert store.get_message(a["id"]) == a and store.get_message(12345) is None
    assert store.get_conversation(cid)["messages"] == [u, a]


def test_add_message_rejects_bad_input(store):
    cid = store.create_conversation()["id"]
    with pytest.raises(LLMLabError, match="no conversation 999"):
        store.add_message(999, "user", "hi")
    with pytest.raises(LLMLabError, match="unknown role 'tool'"):
        store.add_message(cid, "tool", "6")
    with pytest.raises(LLMLabError, match="only assistant messages carry tool_calls"):
        store.add_message(cid, "user", "hi", tool_calls=[{"call": "calculator 1+1", "result": "2"}])
    with pytest.raises(LLMLabError, match="each tool call"):
        store.add_message(cid, "assistant", "hi", tool_calls=[{"call": "calculator 1+1"}])
    with pytest.raises(LLMLabError, match="JSON-serializable"):
        store.add_message(cid, "assistant", "hi", settings={"x": object()})
    assert store.get_conversation(cid)["messages"] == []  # nothing half-written


def test_inactive_messages_are_hidden_but_kept(store):
    cid, (u, a1) = _chat(store, "q", "first answer")
    old = store.deactivate_message(a1)
    assert old["active"] is False and store.get_message(a1)["active"] is False
    assert _roles_contents(store.get_conversation(cid)) == [("user", "q")]
    a2 = store.add_message(cid, "assistant", "second answer")  # a regeneration: same prompt as the first
    assert a2["position"] == 2 and a2["parent_id"] == u == store.get_message(a1)["parent_id"]
    assert _roles_contents(store.get_conversation(cid)) == [("user", "q"), ("assistant", "second answer")]
    store.add_message(cid, "user", "more")
    assert store.deactivate_after(cid, 0) == 2  # a2 and "more"; a1 already inactive
    assert _roles_contents(store.get_conversation(cid)) == [("user", "q")]
    assert store.get_message(a1)["content"] == "first answer"
    with pytest.raises(LLMLabError, match="no message 777"):
        store.deactivate_message(777)


def test_edit_replaces_the_message_and_deactivates_what_follows(store):
    cid, (u1, a1, u2, a2) = _chat(store, "hi", "hello", "capital of France?", "Lyon")
    new = store.edit_message(u2, "capital of Italy?")
    assert new["id"] not in (u1, a1, u2, a2) and new["role"] == "user" and new["active"] is True
    assert new["parent_id"] == a1 and new["position"] == 4
    assert _roles_contents(store.get_conversation(cid)) == [("user", "hi"), ("assistant", "hello"),
                                                            ("user", "capital of Italy?")]
    old_u2, old_a2 = store.get_message(u2), store.get_message(a2)  # kept for history, unchanged
    assert (old_u2["content"], old_u2["active"], old_a2["content"], old_a2["active"]) == \
        ("capital of France?", False, "Lyon", False)
    with pytest.raises(LLMLabError, match="only user messages can be edited"):
        store.edit_message(a1, "changed")


# ---------------------------------------------------------------------------------------------------- feedback


def test_rate_round_trip_and_validation(store):
    _, (u, a) = _chat(store, "q", "a")
    assert store.rate(a, 1)["rating"] == 1
    assert store.rate(a, -1)["rating"] == -1 and store.get_message(a)["rating"] == -1
    assert store.rate(a, 0)["rating"] == 0
    for bad in (2, -2, True, 0.5, "1"):
        with pytest.raises(LLMLabError, match="-1, 0 or 1"):
            store.rate(a, bad)
    with pytest.raises(LLMLabError, match="only assistant answers are rated"):
        store.rate(u, 1)
    with pytest.raises(LLMLabError, match="no message 404"):
        store.rate(404, 1)
    assert store.get_message(a)["rating"] == 0


def test_flag_round_trip_and_validation(store):
    _, (u, a) = _chat(store, "capital of France?", "Lyon")
    flagged = store.flag(a, "wrong", "Paris.")
    assert [(f["reason"], f["correction"]) for f in flagged["flags"]] == [("wrong", "Paris.")]
    store.flag(a, " rude ", "   ")  # a blank correction is none; the reason is stripped
    assert [(f["reason"], f["correction"]) for f in store.get_message(a)["flags"]] == \
        [("wrong", "Paris."), ("rude", None)]
    with pytest.raises(LLMLabError, match="non-empty reason"):
        store.flag(a, "  ")
    with pytest.raises(LLMLabError, match="only assistant answers are flagged"):
        store.flag(u, "spam")
    assert len(store.get_message(a)["flags"]) == 2


def test_comparison_choose_deactivates_the_other(store):
    cid, (u,) = _chat(store, "say hi")
    a = store.add_message(cid, "assistant", "Hello A", model="ma")
    b = store.add_message(cid, "assistant", "Hello B", model="mb")
    assert a["parent_id"] == b["parent_id"] == u  # both answer the user message
    comp = store.create_comparison(cid, a["id"], b["id"])
    assert comp == {"id": comp["id"], "conversation_id": cid, "message_a": a["id"], "message_b": b["id"],
                    "chosen": None, "created": comp["created"]}
    assert store.get_comparison(comp["id"]) == comp and store.get_comparison(999) is None
    chosen = store.choose(comp["id"], b["id"])
    assert chosen["chosen"] == b["id"] and store.get_comparison(comp["id"])["chosen"] == b["id"]
    assert _roles_contents(store.get_conversation(cid)) == [("user", "say hi"), ("assistant", "Hello B")]
    assert store.get_message(a["id"])["active"] is False
    store.choose(comp["id"], a["id"])  # changing one's mind swaps them
    assert _roles_contents(store.get_conversation(cid)) == [("user", "say hi"), ("assistant", "Hello A")]
    with pytest.raises(LLMLabError, match=f"choose {a['id']} or {b['id']}"):
        store.choose(comp["id"], u)
    with pytest.raises(LLMLabError, match="no comparison"):
        store.choose(999, a["id"])
    with pytest.raises(LLMLabError, match="not an assistant message of conversation"):
        store.create_comparison(cid, u, a["id"])
    _, (_, c) = _chat(store, "q", "c")
    with pytest.raises(LLMLabError, match="not an assistant message of conversation"):
        store.create_comparison(cid, a["id"], c)
    later = store.add_message(cid, "user", "and again?")
    d = store.add_message(cid, "assistant", "again")
    assert later["id"] == d["parent_id"]
    with pytest.raises(LLMLabError, match="answer different prompts"):
        store.create_comparison(cid, a["id"], d["id"])


# ------------------------------------------------------------------------------------------------------ export


def _feedback_scenario(store) -> tuple[list[dict], list[dict]]:
    """One conversation per pair source plus rated ones; (expected preference pairs, expected SFT rows)."""
    # (a) a side-by-side comparison: B chosen; also rated B +1 / A -1, which must not give a second pair
    c1, _ = _chat(store, "say hi")
    a = store.add_message(c1, "assistant", "Hello A", model="ma")["id"]
    b = store.add_message(c1, "assistant", "Hello B", model="mb")["id"]
    store.choose(store.create_comparison(c1, a, b)["id"], b)
    store.rate(b, 1)
    store.rate(a, -1)
    # (b) a correction, after which the user edited the question: the pair keeps the question it answered
    c2, (u2, lyon) = _chat(store, "capital of France?", "Lyon", system="Be brief.")
    store.flag(lyon, "wrong", "Paris.")
    store.flag(lyon, "rude")  # no correction: no pair
    store.edit_message(u2, "capital of Spain?")
    # (c) an answer rated -1, regenerated and rated +1
    c3, (_, five) = _chat(store, "What is 2*3?", "5", system="Be brief.")
    store.rate(five, -1)
    store.deactivate_message(five)
    six = store.add_message(c3, "assistant", "6", model="m2")["id"]
    store.rate(six, 1)
    store.add_message(c3, "user", "thanks")  # unanswered: cut from the SFT row
    # rated +1 throughout: an SFT row; one answer unrated: none
    _, (_, x, _, y) = _chat(store, "hi", "hello", "bye", "goodbye")
    store.rate(x, 1)
    store.rate(y, 1)
    _, (_, z, _, _) = _chat(store, "hi", "hey", "bye", "later")
    store.rate(z, 1)
    # an answer that is only a tool call has no text: its pair is not a valid conversation and is left out
    c6, (_,) = _chat(store, "12*12?")
    call = store.add_message(c6, "assistant", "", tool_calls=[{"call": "calculator 12*12", "result": "144"}])
    store.rate(call["id"], 1)
    store.deactivate_message(call["id"])
    store.rate(store.add_message(c6, "assistant", "124")["id"], -1)
    pairs = [
        {"prompt": [{"role": "user", "content": "say hi"}], "chosen": [{"role": "assistant", "content": "Hello B"}],
         "rejected": [{"role": "assistant", "content": "Hello A"}], "source": "comparison", "model": "ma",
         "chosen_model": "mb", "conversation_id": c1},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "capital of France?"}],
         "chosen": [{"role": "assistant", "content": "Paris."}], "rejected": [{"role": "assistant", "content": "Lyon"}],
         "source": "correction", "model": None, "chosen_model": None, "conversation_id": c2},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2*3?"}],
         "chosen": [{"role": "assistant", "content": "6"}], "rejected": [{"role": "assistant", "content": "5"}],
         "source": "rating", "model": None, "chosen_model": "m2", "conversation_id": c3},
    ]
    sft = [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "capital of France?"},
                      {"role": "assistant", "content": "Paris."}], "source": "correction"},
        {"messages": [{"role": "user", "content": "say hi"}, {"role": "assistant", "content": "Hello B"}],
         "source": "rating"},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2*3?"},
                      {"role": "assistant", "content": "6"}], "source": "rating"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                      {"role": "user", "content": "bye"}, {"role": "assistant", "content": "goodbye"}],
         "source": "rating"},
    ]
    return pairs, sft


def test_export_gives_the_exact_pairs_and_sft_rows(store):
    pairs, sft = _feedback_scenario(store)
    snapshot = store.snapshot()
    assert preference_pairs(snapshot)[0] == pairs
    assert sft_conversations(snapshot)[0] == sft


def _described(snapshot, skipped) -> list[tuple]:
    """Skipped rows as (output, kind, what the row is about, reason): a rating by its answer's text, a flag by
    its reason, a comparison by its two answers."""
    flags = {f["id"]: f for f in snapshot.flags}
    comparisons = {c["id"]: c for c in snapshot.comparisons}
    text = {m["id"]: m["content"] for m in snapshot.messages.values()}

    def about(s):
        if s.kind == "rating":
            return text[s.id]
        if s.kind == "flag":
            return flags[s.id]["reason"]
        return text[comparisons[s.id]["message_a"]] + " | " + text[comparisons[s.id]["message_b"]]

    return sorted((s.output, s.kind, about(s), s.reason) for s in skipped)


def test_export_reports_each_row_it_leaves_out_and_why(store):
    _feedback_scenario(store)
    # a comparison between two identical answers, one not decided, a correction that repeats the answer
    c7, _ = _chat(store, "pick one")
    same = [store.add_message(c7, "assistant", "Same.")["id"] for _ in range(2)]
    store.choose(store.create_comparison(c7, *same)["id"], same[1])
    c8, _ = _chat(store, "again?")
    store.create_comparison(c8, *(store.add_message(c8, "assistant", t)["id"] for t in ("x", "y")))
    _, (_, blue) = _chat(store, "color?", "blue")
    store.flag(blue, "unsure", "blue")
    snapshot = store.snapshot()
    pairs, skipped_pairs = preference_pairs(snapshot)
    sft, skipped_sft = sft_conversations(snapshot)
    assert len(pairs) == 3 and len(sft) == 5  # the scenario's, and the repeated correction as an SFT row
    assert _described(snapshot, skipped_pairs) == sorted([
        ("preferences", "comparison", "Same. | Same.", export.IDENTICAL),
        ("preferences", "comparison", "x | y", export.UNDECIDED),
        ("preferences", "flag", "rude", export.NO_CORRECTION),
        ("preferences", "flag", "unsure", export.SAME_CORRECTION),
        # rated B +1 and A -1 besides choosing B: the comparison's pair, written once
        ("preferences", "rating", "Hello A", export.DUPLICATE),
        ("preferences", "rating", "Hello B", export.DUPLICATE),
        # +1 with no -1 to the same prompt
        ("preferences", "rating", "hello", export.UNPAIRED),
        ("preferences", "rating", "goodbye", export.UNPAIRED),
        ("preferences", "rating", "hey", export.UNPAIRED),
        # the tool call with no text against "124": not a valid conversation
        ("preferences", "rating", "", export.INVALID),
        ("preferences", "rating", "124", export.INVALID),
    ])
    assert _described(snapshot, skipped_sft) == sorted([
        ("sft", "flag", "rude", export.NO_CORRECTION),
        ("sft", "rating", "hey", export.NOT_ALL_GOOD),  # "later" is not rated
        ("sft", "rating", "", export.INACTIVE),  # regenerated into "124"
    ])
    assert export.IDENTICAL == "the two answers are identical: no preference to learn"
    details = {(s.reason, s.detail) for s in skipped_pairs if s.reason in (export.INVALID, export.DUPLICATE)}
    assert (export.DUPLICATE, "the same pair as a comparison") in details
    assert any(r == export.INVALID and "empty content" in d for r, d in details)
    # each skipped row names its conversation
    assert {s.conversation_id for s in skipped_pairs if s.kind == "comparison"} == {c7, c8}


def test_export_stage_round_trips_through_the_loaders(store, tmp_path, capsys):
    pairs, sft = _feedback_scenario(store)
    out = tmp_path / "out"
    result = feedback.main(feedback.Config(db=str(store.path), out_dir=str(out)))  # while the store is open
    assert result["preference_pairs"] == 3 and result["sft_conversations"] == 4
    assert result["pairs_by_source"] == {"comparison": 1, "correction": 1, "rating": 1}
    assert result["sft_by_source"] == {"correction": 1, "rating": 3}
    # what was left out: counted per reason, printed, and each row in skipped.jsonl
    assert result["skipped_by_reason"] == {
        "preferences": {f"rating: {export.UNPAIRED}": 3, f"rating: {export.DUPLICATE}": 2,
                        f"rating: {export.INVALID}": 2, f"flag: {export.NO_CORRECTION}": 1},
        "sft": {f"flag: {export.NO_CORRECTION}": 1, f"rating: {export.NOT_ALL_GOOD}": 1,
                f"rating: {export.INACTIVE}": 1},
    }
    printed = capsys.readouterr().out
    assert "left out of preferences.jsonl: 8 rows" in printed and "left out of sft.jsonl: 3 rows" in printed
    assert f"     3  rating: {export.UNPAIRED}" in printed and str(out / "skipped.jsonl") in printed
    rows = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    snapshot = store.snapshot()
    assert rows == [dataclasses.asdict(s) for s in preference_pairs(snapshot)[1] + sft_conversations(snapshot)[1]]
    assert sorted(r["output"] for r in rows) == ["preferences"] * 8 + ["sft"] * 3
    assert [json.loads(line) for line in (out / "preferences.jsonl").read_text().splitlines()] == pairs
    loaded = load_preference_pairs(out / "preferences.jsonl")
    assert loaded == [PreferencePair(p["prompt"], p["chosen"], p["rejected"],
                                     {k: v for k, v in p.items() if k not in ("prompt", "chosen", "rejected")}) for p in pairs]

    # sft.jsonl through the SFT stage's own path: parse_corpus(column="messages") -> Mixture -> ConversationLoader
    mixture = Mixture(parse_corpus(str(out / "sft.jsonl"), column="messages"))
    docs = mixture.documents("train")
    assert [next(docs) for _ in sft] == [row["messages"] for row in sft]
    tok = train_tokenizer(["hello goodbye say hi capital of France Paris What is 2*3 Be brief"] * 20, vocab_size=300)
    inputs, targets = ConversationLoader(mixture, tok, batch_size=4, seq_len=128).next_batch()
    assert inputs.shape[0] == 4 and ((targets != IGNORE_INDEX).sum(dim=1) > 0).all()  # every row trains


def test_feedback_stage_errors(tmp_path):
    with pytest.raises(LLMLabError, match="no feedback store at .*llmlab serve"):
        feedback.main(feedback.Config(db=str(tmp_path / "missing.db"), out_dir=str(tmp_path / "out")))
    assert not (tmp_path / "missing.db").exists()
    with pytest.raises(LLMLabError, match="unknown action 'import'"):
        feedback.Config(action="import")


# ------------------------------------------------------------------------------------------------------ loader


def _pair_line(**override) -> str:
    row = {"prompt": [{"role": "user", "content": "2*3?"}], "chosen": [{"role": "assistant", "content": "6"}],
           "rejected": [{"role": "assistant", "content": "5"}], "source": "x"}
    return json.dumps({**row, **override}) + "\n"


@pytest.mark.parametrize("bad, message", [
    ("{not json\n", "line 3: not valid JSON"),
    ('["a list"]\n', "line 3: expected a JSON object"),
    (json.dumps({"prompt": [{"role": "user", "content": "q"}], "chosen": []}) + "\n", "line 3: missing key.*rejected"),
    (_pair_line(prompt=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]),
     "line 3: the prompt ends with a assistant"),
    (_pair_line(prompt=[{"role": "assistant", "content": "a"}]), "line 3, prompt: .*must start with a user"),
    (_pair_line(chosen=[]), "line 3: chosen must be a non-empty list"),
    (_pair_line(rejected=[{"role": "user", "content": "x"}]), "line 3: rejected must hold the assistant.s messages"),
    (_pair_line(rejected=[{"role": "tool", "content": "6"}]), "line 3: rejected must hold .*starting with an assistant"),
    (_pair_line(chosen=[{"role": "assistant", "content": ""}]), "line 3, chosen: .*empty content"),
])
def test_loader_errors_name_the_line(tmp_path, bad, message):
    path = tmp_path / "p.jsonl"
    path.write_text(_pair_line() + "\n" + bad)  # a blank line 2 is skipped but counted
    with pytest.raises(LLMLabError, match=message) as e:
        load_preference_pairs(path)
    assert str(path) in str(e.value)


def test_loader_missing_and_empty_files(tmp_path):
    with pytest.raises(LLMLabError, match="no preference pairs at .*llmlab feedback export"):
        load_preference_pairs(tmp_path / "none.jsonl")
    write_jsonl(tmp_path / "empty.jsonl", [])
    assert (tmp_path / "empty.jsonl").read_text() == ""
    with pytest.raises(LLMLabError, match="holds no preference pairs"):
        load_preference_pairs(tmp_path / "empty.jsonl")


# ------------------------------------------------------------------------------------- file, threads, durability


def test_bad_files_are_refused(tmp_path):
    text = tmp_path / "notes.db"
    text.write_text("these are my notes, not a database\n" * 100)
    with pytest.raises(LLMLabError, match="not a feedback store"):
        FeedbackStore(text)
    assert text.read_text().startswith("these are my notes")  # left alone
    other = tmp_path / "other.db"
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE stuff (x)")
    db.commit()
    db.close()
    with pytest.raises(LLMLabError, match="not a feedback store .*stuff"):
        FeedbackStore(other)
    newer = tmp_path / "newer.db"
    FeedbackStore(newer).close()
    db = sqlite3.connect(newer)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(LLMLabError, match="newer than this llmlab reads.*upgrade"):
        FeedbackStore(newer)
    with pytest.raises(LLMLabError, match="is a directory"):
        FeedbackStore(tmp_path)


def test_reopen_keeps_data_and_wal_mode(tmp_path):
    path = tmp_path / "f.db"
    with FeedbackStore(path) as s:
        cid, (u, a) = _chat(s, "q", "a")
        s.rate(a, 1)
    with FeedbackStore(path) as s:
        assert s.get_message(a)["rating"] == 1 and len(s.get_conversation(cid)["messages"]) == 2
        assert s._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert s._db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert s._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL: commits fsync the WAL
    with pytest.raises(LLMLabError, match="closed"):
        s.get_message(a)


def test_eight_threads_writing_concurrently(store):
    cid = store.create_conversation("busy")["id"]
    errors = []

    def write(k: int) -> None:
        try:
            for i in range(50):
                m = store.add_message(cid, "assistant" if i % 2 else "user", f"t{k}-{i}")
                if m["role"] == "assistant":
                    store.rate(m["id"], 1)
                store.list_conversations()  # reads interleaved with the writes
        except Exception as e:  # collected: an exception in a thread would otherwise be lost
            errors.append(e)

    threads = [threading.Thread(target=write, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    db = sqlite3.connect(store.path)
    rows = db.execute("SELECT position, content FROM messages WHERE conversation_id = ?", (cid,)).fetchall()
    n_ratings = db.execute("SELECT COUNT(*) FROM ratings WHERE rating = 1").fetchone()[0]
    db.close()
    assert len(rows) == 400 and sorted(p for p, _ in rows) == list(range(400))
    assert {c for _, c in rows} == {f"t{k}-{i}" for k in range(8) for i in range(50)}
    assert n_ratings == 200


CHILD = """
import sys
from llmlab.server.store import FeedbackStore
store = FeedbackStore(sys.argv[1])
cid = store.create_conversation("durable")["id"]
print("conversation", cid, flush=True)
for i in range(100000):
    m = store.add_message(cid, "user", f"q{i}")
    print("message", m["id"], flush=True)
    a = store.add_message(cid, "assistant", f"a{i}")
    store.rate(a["id"], 1 if i % 2 else -1)
    print("rated", a["id"], 1 if i % 2 else -1, flush=True)
"""


def test_acknowledged_writes_survive_kill_9(tmp_path):
    path = tmp_path / "durable.db"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE, text=True)
    lines = []
    deadline = time.monotonic() + 15
    while len(lines) < 150 and time.monotonic() < deadline:  # kill it mid-stream, while it is writing
        line = child.stdout.readline()
        if not line:
            break
        lines.append(line.split())
    child.send_signal(signal.SIGKILL)
    lines += [line.split() for line in child.stdout.read().splitlines()]  # acknowledged just before the kill
    child.wait()
    assert child.returncode == -signal.SIGKILL and len(lines) >= 150

    with FeedbackStore(path) as s:
        assert s._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        cid = int(lines[0][1])
        assert s.get_conversation(cid)["title"] == "durable"
        for kind, mid, *rating in lines[1:]:
            message = s.get_message(int(mid))
            assert message is not None, f"acknowledged message {mid} lost"
            if kind == "rated":
                assert message["rating"] == int(rating[0])
