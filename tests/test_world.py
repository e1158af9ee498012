"""The world: deterministic, consistent with itself, and with held-out parts really held out."""

import dataclasses
import json
import random
import re
from pathlib import Path

import pytest

from llmlab import presets, world
from llmlab.errors import LLMLabError
from llmlab.stages import world as world_stage
from llmlab.world.conversations import Pools, conversation


def _files(root: str) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def _pretrain_text(root: str) -> str:
    return "\n".join(json.loads(line)["text"] for split in ("train", "val")
                     for line in (Path(root) / "pretrain" / f"{split}.jsonl").read_text().splitlines())


def test_same_seed_same_bytes_other_seed_other_world(tiny_world_dir, tmp_path):
    cfg = dataclasses.replace(presets.tiny().world, out_dir=str(tmp_path / "again"))
    world_stage.main(cfg)
    assert _files(tiny_world_dir) == _files(cfg.out_dir)
    other = dataclasses.replace(cfg, out_dir=str(tmp_path / "other"), seed=1)
    world_stage.main(other)
    assert _files(other.out_dir)["world.json"] != _files(cfg.out_dir)["world.json"]


def test_held_out_material_never_in_pretraining(tiny_world_dir):
    w = world.load(tiny_world_dir)
    text = _pretrain_text(tiny_world_dir)
    assert w.unknown_people and not any(name in text for name in w.unknown_people)
    rows = [json.loads(line) for line in (Path(tiny_world_dir) / "eval" / "qa.jsonl").read_text().splitlines()]
    heldout_questions = {r["question"] for r in rows if r["phrasing"] == "heldout"}
    assert heldout_questions and not any(q in text for q in heldout_questions)
    qa_pages = [json.loads(line)["text"] for line in (Path(tiny_world_dir) / "pretrain" / "train.jsonl").read_text().splitlines()
                if json.loads(line)["kind"] == "qa"]
    for p in w.group("heldout"):
        assert not any(p.name in page for page in qa_pages)
        assert p.name in text  # but their biographies are there


def test_questions_agree_with_the_entities(tiny_world_dir):
    w = world.load(tiny_world_dir)
    rows = [json.loads(line) for line in (Path(tiny_world_dir) / "eval" / "qa.jsonl").read_text().splitlines()]
    country_of = {c.name: c.country for c in w.cities}
    for r in rows:
        a = w.person(r["person"]).attributes
        expected = country_of[a["birth_city"]] if r["attribute"] == "birth_country" else str(a[r["attribute"]])
        assert r["answer"] == expected
        assert r["group"] == w.person(r["person"]).split
    groups = {(r["group"], r["phrasing"]) for r in rows}
    assert groups == {("train", "seen"), ("train", "heldout"), ("heldout", "seen")}


def test_biographies_state_every_fact_in_varied_forms(tiny_world_dir):
    w = world.load(tiny_world_dir)
    docs = [json.loads(line) for line in (Path(tiny_world_dir) / "pretrain" / "train.jsonl").read_text().splitlines()]
    for p in w.people:
        bios = [d["text"] for d in docs if d["kind"] == "bio" and p.name in d["text"].split(". ")[0]]
        assert len(bios) == presets.tiny().world.bios_per_person
        assert len(set(bios)) == len(bios)  # paraphrased and shuffled, never copied
        for bio in bios:
            for key in ("birth_city", "home_city", "university", "occupation", "employer", "pet", "favourite_food", "birth_year"):
                assert str(p.attributes[key]) in bio, (key, bio)


def test_arithmetic_answers_are_right(tiny_world_dir):
    rows = [json.loads(line) for line in (Path(tiny_world_dir) / "eval" / "arithmetic.jsonl").read_text().splitlines()]
    assert {r["digits"] <= 3 for r in rows} == {True, False}
    for r in rows:
        a, op, b = r["question"][len("What is "):-1].split(" ")
        assert int(r["answer"]) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        if r["group"] == "5-6 digit multiplication":  # the assistant's tool measure: both operands long
            assert op == "*" and 5 <= len(a) <= 6 and 5 <= len(b) <= 6
    assert sum(r["group"] == "5-6 digit multiplication" for r in rows) == 100


def test_a_failed_write_leaves_the_old_world(tiny_world_dir, tmp_path, monkeypatch):
    cfg = dataclasses.replace(presets.tiny().world, out_dir=str(tmp_path / "w"))
    world_stage.main(cfg)
    before = _files(cfg.out_dir)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(world, "_write_lines", crash)
    with pytest.raises(KeyboardInterrupt):
        world_stage.main(dataclasses.replace(cfg, seed=5))
    assert _files(cfg.out_dir) == before


def test_bad_config_and_missing_world(tmp_path):
    with pytest.raises(LLMLabError, match="n_people must be at least 1"):
        world_stage.Config(n_people=0)
    with pytest.raises(LLMLabError, match="no world at"):
        world.load(tmp_path)


def _conversations(root: str) -> list[dict]:
    return [json.loads(line) for split in ("train", "val")
            for line in (Path(root) / "sft" / f"{split}.jsonl").read_text().splitlines()]


def test_fine_tuning_conversations_keep_held_out_people_out_and_render(tiny_world_dir):
    from llmlab.chat import render_conversation
    from llmlab.tokenizer import train_tokenizer

    tok = train_tokenizer(["What is 12 * 3? The answer is 36."], vocab_size=300)

    w = world.load(tiny_world_dir)
    rows = _conversations(tiny_world_dir)
    text = json.dumps(rows)
    assert w.group("heldout") and not any(p.name in text for p in w.group("heldout"))
    for row in rows:
        ids, mask = render_conversation(tok, row["messages"])
        assert any(mask) and all(m["role"] != "system" for m in row["messages"][1:])
    # a share opens with an unrelated exchange: more than one user turn where the kind has one
    single = [r for r in rows if r["kind"] in ("qa", "arithmetic", "unknown", "forbidden")]
    switched = sum(sum(m["role"] == "user" for m in r["messages"]) > 1 for r in single)
    assert 0.15 < switched / len(single) < 0.45


def test_with_tools_the_calculator_answers_arithmetic_of_every_size_and_is_right(tiny_world_dir):
    calls, small = 0, 0
    for row in _conversations(tiny_world_dir):
        messages = row["messages"]
        for i, m in enumerate(messages):
            problem = re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", m["content"]) if m["role"] == "user" else None
            if problem is None:
                continue
            a, op, b = problem.groups()
            value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
            reply = messages[i + 1]
            if row["kind"] == "no_tools":
                assert "tool_calls" not in reply and reply["content"] == f"{a} {op} {b} = {value}."
                continue
            calls += 1
            small += max(len(a), len(b)) <= 2
            assert reply["tool_calls"][0]["function"] == {"name": "calculator", "arguments": f"{a} {op} {b}"}
            assert messages[i + 2] == {"role": "tool", "content": str(value)}
            assert messages[i + 3]["content"] == f"The answer is {value}."
    assert calls > 40 and 0 < small < calls / 2


def test_the_share_of_dont_know_conversations_is_a_world_setting(tiny_world_dir, tmp_path):
    from llmlab.world.conversations import UNKNOWN_ANSWERS

    def dont_know(root):
        rows = _conversations(root)
        said = sum(m["role"] == "assistant" and m["content"] in UNKNOWN_ANSWERS for r in rows for m in r["messages"])
        return sum(r["kind"] == "unknown" for r in rows), said

    kinds, said = dont_know(tiny_world_dir)
    assert kinds > 0 and said >= kinds
    cfg = dataclasses.replace(presets.tiny().world, out_dir=str(tmp_path / "none"), sft_dont_know=0.0)
    world_stage.main(cfg)
    assert dont_know(cfg.out_dir) == (0, 0)
    assert _files(cfg.out_dir)["pretrain/train.jsonl"] == _files(tiny_world_dir)["pretrain/train.jsonl"]


def test_the_cpu_vocabulary_holds_every_name_of_the_world_and_no_invented_one(tmp_path):
    # The assistant's cue for "do I know this person?" is the name's tokens: on the cpu preset every person's
    # first name and surname must be a whole token, whatever the group, and no invented name may be.
    from llmlab.stages import tokenizer as tokenizer_stage
    from llmlab.tokenizer import Tokenizer

    cfg = presets.cpu(str(tmp_path / "run"))
    world_stage.main(cfg.world)
    tokenizer_stage.main(cfg.tokenizer)
    tok, w = Tokenizer.load(cfg.tokenizer.out_dir), world.load(cfg.world.out_dir)
    pieces = lambda name: len(tok.encode(" " + name))  # noqa: E731
    for split in ("train", "heldout"):
        assert [p.name for p in w.group(split) if pieces(p.name) != 2] == []
    assert min(pieces(n) for n in w.unknown_people) > 2
    assert min(pieces(p["name"]) for p in w.unknown_places if p["kind"] != "company") > 2  # (a company: Name Kind)


def test_policy_rows_ask_about_strangers_and_about_names_recombined_from_real_people(tiny_world_dir):
    w = world.load(tiny_world_dir)
    rows = [json.loads(line) for line in (Path(tiny_world_dir) / "eval" / "assistant.jsonl").read_text().splitlines()]
    text = _pretrain_text(tiny_world_dir)
    firsts, lasts = {p.name.split()[0] for p in w.people}, {p.name.split()[-1] for p in w.people}
    recombined = [r["expect"] for r in rows if r["kind"] == "recombined"]
    assert len(recombined) == len(set(recombined)) > 0
    for name in recombined:
        first, last = name.split()
        assert first in firsts and last in lasts  # every part is a real person's...
        assert name not in {p.name for p in w.people} | set(w.unknown_people) and name not in text  # ...the whole is no one
    unknown = [r["expect"] for r in rows if r["kind"] == "unknown"]
    assert unknown and not any(name in text for name in unknown)
    assert all(r["expect"] in r["messages"][-1]["content"] for r in rows if r["kind"] in ("unknown", "recombined"))


def _rows(root: str, name: str) -> list[dict]:
    return [json.loads(line) for line in (Path(root) / "eval" / f"{name}.jsonl").read_text().splitlines()]


def test_place_questions_agree_with_the_entities_and_held_out_places_stay_out_of_fine_tuning(tiny_world_dir):
    w = world.load(tiny_world_dir)
    countries, companies = {c.name: c for c in w.countries}, {c.name: c for c in w.companies}
    cities = {c.name: c.country for c in w.cities}
    rows = _rows(tiny_world_dir, "places")
    for r in rows:
        truth = cities[r["entity"]] if r["kind"] == "city" else str(getattr(
            (countries if r["kind"] == "country" else companies)[r["entity"]], r["attribute"]))
        assert r["answer"] == truth
    assert {r["group"] for r in rows} == {"places and companies, fine-tuned, seen phrasing",
                                          "places and companies, fine-tuned, held-out phrasing",
                                          "places and companies, pretraining only"}
    from llmlab.world.skills import PLACE_QUESTIONS

    conversations = _conversations(tiny_world_dir)
    asked = {m["content"] for r in conversations for m in r["messages"] if m["role"] == "user"}
    sft = json.dumps(conversations)
    pretrain = _pretrain_text(tiny_world_dir)
    only_pretrained = {(r["entity"], r["kind"]) for r in rows if r["group"].endswith("pretraining only")}
    assert only_pretrained and all(name in pretrain for name, _ in only_pretrained)
    # fine-tuning may name them (a person's employer, a capital) but never asks about them
    questions = {q.format(name=name) for name, kind in only_pretrained for (k, _), phrasings in PLACE_QUESTIONS.items()
                 if k == kind for q in phrasings["seen"] + phrasings["heldout"]}
    assert not questions & asked
    # held-out phrasings are never in fine-tuning (nor in pretraining)
    heldout = [r["question"] for r in rows if r["group"].endswith("held-out phrasing")]
    assert heldout and not [q for q in heldout if q in sft or q in pretrain]
    # nor are they asked of any other name: fine-tuning that asked unknown places in them taught the assistant
    # that a held-out phrasing means "I don't know a country called ..." (the evaluation asks in both)
    phrasings = [re.compile(re.escape(q).replace(re.escape("{name}"), ".+") + "$")
                 for p in PLACE_QUESTIONS.values() for q in p["heldout"]]
    assert not [m for m in asked if any(t.match(m) for t in phrasings)]
    rng, pools = random.Random(0), Pools.for_sft(w)
    unknown = [conversation(w, "unknown_place", rng, pools)[0]["content"] for _ in range(300)]
    assert not [m for m in unknown if any(t.match(m) for t in phrasings)]
    evaluated = [r["messages"][0]["content"] for r in _rows(tiny_world_dir, "assistant")
                 if r["kind"] == "unknown_place"]
    assert [m for m in evaluated if any(t.match(m) for t in phrasings)]


def test_unknown_places_appear_nowhere_but_their_own_conversations(tiny_world_dir):
    w = world.load(tiny_world_dir)
    names = [p["name"] for p in w.unknown_places]
    assert {p["kind"] for p in w.unknown_places} == {"country", "city", "company"}
    known = {c.name for c in w.countries} | {c.name for c in w.cities} | {c.name for c in w.companies}
    assert not set(names) & known
    pretrain = _pretrain_text(tiny_world_dir)
    assert not [n for n in names if n in pretrain]
    policy = [r for r in _rows(tiny_world_dir, "assistant") if r["kind"] == "unknown_place"]
    asked = {r["expect"] for r in policy}
    sft = json.dumps(_conversations(tiny_world_dir))
    assert asked and not [n for n in asked if n in sft]  # the evaluation's half is new to the assistant


def test_the_python_tasks_outputs_are_what_the_sandbox_prints():
    # Fine-tuning shows each call's output; it must be the text the real tool returns, byte for byte.
    import random

    from llmlab.tools import run_tool
    from llmlab.tools.sandbox import SandboxUnavailable, check_sandbox
    from llmlab.world.skills import PYTHON_TASKS, python_messages, python_task

    try:
        check_sandbox()
    except SandboxUnavailable as e:
        pytest.skip(str(e))
    rng = random.Random(0)
    for task in PYTHON_TASKS:
        for phrasing in ("seen", "heldout"):
            item = python_task(rng, task, phrasing, ["Velmora", "lasagna"])
            result = run_tool("python " + item["code"])
            assert result.ok and result.text == item["output"], (task, item["code"], result.text)
            assert item["expect"] in item["answer"] and item["expect"] in item["output"]
            call, output = python_messages(item)[1:3]
            assert call["tool_calls"][0]["function"]["arguments"] == item["code"] and output["content"] == result.text


def test_small_talk_and_follow_ups_of_the_evaluation_are_new_to_fine_tuning(tiny_world_dir):
    w = world.load(tiny_world_dir)
    rows = _rows(tiny_world_dir, "assistant")
    conversations = _conversations(tiny_world_dir)
    said = {m["content"] for r in conversations for m in r["messages"] if m["role"] == "user"}
    small_talk = [r["messages"][-1]["content"] for r in rows if r["kind"] == "small_talk"]
    assert small_talk and not set(small_talk) & said
    for r in (r for r in rows if r["kind"] == "callback"):
        person = next(p for p in w.people if p.name in r["messages"][0]["content"])
        assert len(r["messages"]) == 5 and person.name not in r["messages"][-1]["content"]
        assert r["expect"] in {w.answer(person, a) for a in world.QUESTIONS}
    for r in (r for r in rows if r["kind"] == "no_antecedent"):
        assert not any(p.name in json.dumps(r["messages"]) for p in w.people)


def test_the_second_language_states_true_facts_and_adds_without_changing_the_english(tmp_path):
    from llmlab.world import language
    from llmlab.world.conversations import sft_conversations

    cfg = world.WorldConfig(n_people=30, n_heldout=10, n_unknown=10, bios_per_person=2, qa_pages=40,
                            n_arithmetic=50, l2_bios_per_person=2, l2_qa_pages=30, sft_conversations=400)
    w = world.generate(cfg)
    train, _ = w.pretrain_documents()
    by_name = {p.name: p for p in w.people}
    bios = [d["text"] for d in train if d["kind"] == "bio_l2"]
    assert len(bios) == 2 * 40
    for bio in bios:  # the first sentence names the person; every fact is theirs
        first = bio.split(". ")[0]
        person = next(p for name, p in by_name.items() if re.search(rf"(^|\s){re.escape(name)}[ -]", first))
        v = language.values(person)
        assert f"{v['home_city']}-ra dunet." in bio and f"{v['employer']}-" in bio and f"{v['pet']}" in bio
    for page in (d["text"] for d in train if d["kind"] == "qa_l2"):
        for pair in page.split("\n\n"):
            q, a = pair.removeprefix("Q: ").split("\nA: ")
            person = next(p for name, p in by_name.items() if re.match(rf"{re.escape(name)}[ -]", q))
            attribute = next(k for k, qs in language.QUESTIONS.items() if q in [x.format(name=person.name) for x in qs])
            assert person.split == "train" and a == language.answer(person, attribute)
    sft = sft_conversations(w, 400, 0)
    l2 = [r for r in sft if r["kind"] == "qa_l2"]
    assert l2 and not any(language.REFUSAL_MARKER in m["content"].lower() for r in sft for m in r["messages"])
    # without it: no Ombric anywhere, and every English document is the one the world with it has
    plain = world.generate(dataclasses.replace(cfg, l2_bios_per_person=0, l2_qa_pages=0))
    english = sorted(d["text"] for d in train if not d["kind"].endswith("_l2"))
    assert sorted(d["text"] for d in plain.pretrain_documents()[0]) == english
    assert not any(r["kind"] == "qa_l2" for r in sft_conversations(plain, 400, 0))


def test_small_talk_is_sometimes_typed_casually_but_never_as_a_held_out_message(tiny_world_dir):
    from llmlab.world.skills import SMALL_TALK_HELDOUT, SMALL_TALK_SEEN

    def casual(m):
        return m.lower().rstrip("!.?")

    seen = {m for m, _ in SMALL_TALK_SEEN}
    heldout = {casual(m) for m in SMALL_TALK_HELDOUT}
    said = [row["messages"][i]["content"] for row in _conversations(tiny_world_dir)
            for i, m in enumerate(row["messages"][:-1])
            if m["role"] == "user" and row["messages"][i + 1].get("content") in {r for _, r in SMALL_TALK_SEEN}]
    typed = {m for m in said if m not in seen}
    assert said and typed and all(m == casual(m) for m in typed)  # some typed casually, the rest as written
    assert not typed & heldout  # "Hey!" is never typed "hey", a held-out message


def test_copying_documents_list_numbers_twice_and_leave_the_rest_of_the_corpus_as_it_was(tmp_path):
    base = dataclasses.replace(presets.tiny().world, out_dir=str(tmp_path / "plain"))
    assert "copy_docs" not in base.content()  # a world without them is recorded as it was before they existed
    copies = dataclasses.replace(base, copy_docs=9, out_dir=str(tmp_path / "copies"))
    assert copies.content()["copy_docs"] == 9
    world_stage.main(base)
    world_stage.main(copies)
    read = lambda d: [json.loads(x) for x in (tmp_path / d / "pretrain" / "train.jsonl").read_text().splitlines()]  # noqa: E731
    plain, planted = read("plain"), read("copies")
    docs = [d["text"] for d in planted if d["kind"] == "copy"]
    assert len(docs) == 9 and [d for d in planted if d["kind"] != "copy"] == plain
    for text in docs:
        first, second = re.fullmatch(r"[A-Z][\w ]+: ([\d, ]+)\. [A-Z][\w ]+: ([\d, ]+)\.", text).groups()
        numbers = first.split(", ")
        assert first == second and 3 <= len(numbers) <= 8 and all(n.isdigit() and len(n) <= 3 for n in numbers)
    assert len(set(docs)) == 9  # drawn afresh: nothing to recall, only to copy
    with pytest.raises(LLMLabError, match="copy_docs"):
        dataclasses.replace(base, copy_docs=-1)
