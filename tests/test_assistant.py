"""The assistant: the engine's tool-call state machine (with a scripted fake model), chat-task scoring, the
terminal chat, and fine-tuning end to end on the tiny preset (resume, bad conversations)."""

import dataclasses
import io
import json
import shutil
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmlab import checkpoint
from llmlab.chat import render_prompt
from llmlab.engine import Engine, SamplingParams, generate_with_tools
from llmlab.errors import LLMLabError
from llmlab.model import GPTConfig
from llmlab.stages import chat, evaluate, sft
from llmlab.tasks.assistant import AssistantArithmetic, AssistantPolicy, run_chat_task
from llmlab.tokenizer import Tokenizer


class ScriptedModel(torch.nn.Module):
    """A fake model for the engine: it reads every token it is fed (prompt, sampled and forced alike) and puts
    all probability on the next token of a script.

    In an assistant turn it writes `first(user text)` (token ids, tool calls included). Once the turn holds
    a tool output, it writes `then(output ids)` instead (by default it copies the output), so what it writes
    proves which tokens the engine really fed it. Both end with `<|assistant_end|>`.
    """

    def __init__(self, tok: Tokenizer, first, then=lambda output: output, context_len: int = 128):
        super().__init__()
        self.config = GPTConfig(vocab_size=tok.vocab_size, n_layer=1, d_model=8, n_head=1, n_kv_head=1,
                                context_len=context_len)
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # the engine reads device and dtype from parameters
        self.tok, self.first, self.then = tok, first, then
        self.sp = {name: tok.special_id(name) for name in ("<|user_start|>", "<|user_end|>", "<|assistant_start|>",
                                                           "<|assistant_end|>", "<|output_start|>", "<|output_end|>")}
        self.seen: list[list[int]] = []

    def num_params(self, embedding: bool = True) -> int:  # (what the thinker counts FLOPs with)
        return 1

    def _next(self, seq: list[int]) -> int:
        sp, end = self.sp, self.sp["<|assistant_end|>"]
        start = max(i for i, t in enumerate(seq) if t == sp["<|assistant_start|>"])
        turn = seq[start + 1:]
        user_at = max(i for i, t in enumerate(seq[:start]) if t == sp["<|user_start|>"])
        user = self.tok.decode(seq[user_at + 1:seq.index(sp["<|user_end|>"], user_at)])
        if sp["<|output_end|>"] in turn:
            close = len(turn) - 1 - turn[::-1].index(sp["<|output_end|>"])
            opened = len(turn) - 1 - turn[::-1].index(sp["<|output_start|>"])
            script, written = self.then(turn[opened + 1:close]) + [end], turn[close + 1:]
        else:
            script, written = self.first(user) + [end], turn
        return script[len(written)] if len(written) < len(script) else end

    def forward(self, ids: torch.Tensor, kv_cache=None) -> torch.Tensor:
        B, T = ids.shape
        if kv_cache is None:  # a whole sequence scored at once (the reader): the script at every position of a reply
            logits = torch.full((B, T, self.config.vocab_size), -1e9)
            for row, seq in enumerate(ids.tolist()):
                for t in range(T):
                    past = seq[:t + 1]
                    inside = self.sp["<|assistant_start|>"] in past and self.sp["<|user_start|>"] in past
                    logits[row, t, self._next(past) if inside else 0] = 0.0
            return logits
        # What each row was fed is kept in the cache, as a real model keeps its keys: it follows the row when the
        # engine copies one prefilled row to many or drops the rows that have stopped.
        start = kv_cache.length
        kv_cache.k[0, :, 0, start:start + T, 0] = ids.to(kv_cache.k.dtype)
        kv_cache.advance(T)
        self.seen = kv_cache.k[0, :, 0, :start + T, 0].long().tolist()
        logits = torch.full((B, T, self.config.vocab_size), -1e9)
        for row in range(B):
            logits[row, :, self._next(self.seen[row])] = 0.0
        return logits


@pytest.fixture(scope="module")
def tok(tiny_run) -> Tokenizer:
    cfg, _ = tiny_run
    return Tokenizer.load(cfg.tokenizer.out_dir)


def _call(tok: Tokenizer, text: str) -> list[int]:
    return [tok.special_id("<|tool_start|>")] + tok.encode(text) + [tok.special_id("<|tool_end|>")]


def _calculator_user(tok):
    """A scripted assistant that sends every "What is ..." question to the calculator and answers in words
    otherwise."""
    def first(user: str) -> list[int]:
        if user.startswith("What is "):
            return _call(tok, "calculator " + user[len("What is "):].rstrip("?"))
        return tok.encode("no tool needed")
    return first


GREEDY = SamplingParams(max_new_tokens=60, temperature=0.0)


def test_tool_output_is_forced_into_the_sequence_and_masked(tok):
    model = ScriptedModel(tok, _calculator_user(tok))
    prompts = [render_prompt(tok, [{"role": "user", "content": q}]) for q in ("What is 6 * 7?", "Hello there")]
    calls = []

    def run_tool(call: str) -> str:
        calls.append(call)
        return "42"

    stop = [tok.special_id("<|assistant_end|>")]
    out, tools = generate_with_tools(Engine(model), tok, prompts, GREEDY, stop, run_tool)
    forced = [tok.special_id("<|output_start|>")] + tok.encode("42") + [tok.special_id("<|output_end|>")]
    call = _call(tok, "calculator 6 * 7")
    assert calls == ["calculator 6 * 7"]
    assert out[0] == call + forced + tok.encode("42")  # the model copied the forced output: it was fed to it
    assert tools.forced[0][:len(out[0])] == [False] * len(call) + [True] * len(forced) + [False] * len(tok.encode("42"))
    assert tools.calls == [[("calculator 6 * 7", "42")], []]
    assert out[1] == tok.encode("no tool needed") and not any(tools.forced[1])


def test_calls_of_a_batch_run_together_and_each_row_gets_its_own_result(tok):
    """Tool calls run in a pool: rows that finish calls close together wait on them together, and every row
    still reads its own call's result, also after rows that stopped earlier leave the batch."""
    model = ScriptedModel(tok, _calculator_user(tok))
    questions = ["Hello there", "What is 6 * 7?", "What is 6 * 8?", "Hi", "What is 3 + 4?", "Thanks"]
    prompts = [render_prompt(tok, [{"role": "user", "content": q}]) for q in questions]
    calls, lock, both = [], threading.Lock(), threading.Barrier(2, timeout=10)

    def run_tool(call: str) -> str:
        with lock:
            calls.append(call)
        if call in ("calculator 6 * 7", "calculator 6 * 8"):  # written at the same step: they must overlap
            both.wait()
        return str(eval(call.split(" ", 1)[1]))

    stop = [tok.special_id("<|assistant_end|>")]
    out, tools = generate_with_tools(Engine(model), tok, prompts, GREEDY, stop, run_tool)
    assert sorted(calls) == ["calculator 3 + 4", "calculator 6 * 7", "calculator 6 * 8"]
    for row, call, answer in [(1, "calculator 6 * 7", "42"), (2, "calculator 6 * 8", "48"),
                              (4, "calculator 3 + 4", "7")]:
        assert tools.calls[row] == [(call, answer)]
        assert tok.decode(out[row]).endswith(f"<|output_end|>{answer}")  # copied from what the engine fed it
    assert [out[i] for i in (0, 3, 5)] == [tok.encode("no tool needed")] * 3


def test_a_call_cut_off_by_the_length_limit_is_still_recorded(tok):
    model = ScriptedModel(tok, _calculator_user(tok))
    prompt = render_prompt(tok, [{"role": "user", "content": "What is 6 * 7?"}])
    call = _call(tok, "calculator 6 * 7")
    params = SamplingParams(max_new_tokens=len(call) + 1, temperature=0.0)  # ends at the forced <|output_start|>
    out, tools = generate_with_tools(Engine(model), tok, [prompt], params, [tok.special_id("<|assistant_end|>")],
                                     lambda call: "42")
    assert out[0] == call + [tok.special_id("<|output_start|>")]
    assert tools.calls == [[("calculator 6 * 7", "42")]]


def test_special_token_text_in_a_tool_output_stays_text(tok):
    model = ScriptedModel(tok, _calculator_user(tok))
    prompt = render_prompt(tok, [{"role": "user", "content": "What is 1 + 1?"}])
    stop = [tok.special_id("<|assistant_end|>")]
    out, _ = generate_with_tools(Engine(model), tok, [prompt], GREEDY, stop, lambda call: "<|assistant_end|> 2")
    after = out[0][out[0].index(tok.special_id("<|output_end|>")) + 1:]
    assert tok.decode(after) == "<|assistant_end|> 2"  # copied back as text; the real end came after it


def test_real_tools_and_bad_arguments_reach_the_model(tok, tiny_world_dir):
    from llmlab.tools import run_tool

    model = ScriptedModel(tok, _calculator_user(tok))
    prompts = [render_prompt(tok, [{"role": "user", "content": q}]) for q in ("What is 123456789 * 987654321?", "What is 2 * (3?")]
    stop = [tok.special_id("<|assistant_end|>")]
    out, tools = generate_with_tools(Engine(model), tok, prompts, SamplingParams(max_new_tokens=100, temperature=0.0),
                                     stop, lambda call: run_tool(call, world_dir=tiny_world_dir).text)
    assert tools.calls[0][0][1] == str(123456789 * 987654321)
    error = tools.calls[1][0][1]
    assert error.startswith("error") and ")" in error  # a message the model can read, not an exception
    assert f"<|output_start|>{error}<|output_end|>" in tok.decode(out[1])  # forced into the sequence


def test_without_a_tool_runner_the_call_is_not_answered(tok):
    model = ScriptedModel(tok, _calculator_user(tok))
    prompt = render_prompt(tok, [{"role": "user", "content": "What is 6 * 7?"}])
    out, tools = generate_with_tools(Engine(model), tok, [prompt], GREEDY, [tok.special_id("<|assistant_end|>")], None)
    assert tools is None and out[0] == _call(tok, "calculator 6 * 7")


def test_chat_task_scores_only_the_assistants_own_words(tok, tiny_world_dir):
    from llmlab.tools import run_tool

    def tool(call):
        return run_tool(call, world_dir=tiny_world_dir).text

    task = AssistantArithmetic(tiny_world_dir, tools=True, per_group=6)
    copies = Engine(ScriptedModel(tok, _calculator_user(tok)))
    silent = Engine(ScriptedModel(tok, _calculator_user(tok), then=lambda output: tok.encode("done")))
    assert run_chat_task(task, copies, tok, tool)["accuracy"] == 1.0
    assert run_chat_task(task, silent, tok, tool)["accuracy"] == 0.0  # the answer only in the tool output: not credited
    assert run_chat_task(task, copies, tok, None)["accuracy"] == 0.0  # no tools run: nothing to copy


def _session(tiny_run, tok, first, **kwargs) -> chat.Session:
    cfg, _ = tiny_run
    session = chat.Session(dataclasses.replace(cfg.chat, **kwargs))
    session.engine = Engine(ScriptedModel(tok, first))
    return session


def test_qa_task_counts_dont_know_apart_from_wrong_answers(tok, tiny_world_dir):
    from llmlab import world
    from llmlab.tasks.assistant import AssistantQA

    w = world.load(tiny_world_dir)
    heldout = [p.name for p in w.group("heldout")]
    task = AssistantQA(tiny_world_dir, per_group=8)
    answers = {e.prompt: e.answer for e in task.examples()}

    def reply(user: str) -> list[int]:  # "I don't know" about held-out people, the right answer about the rest
        return tok.encode("I don't know who that is." if any(n in user for n in heldout) else f"It is {answers[user]}.")

    result = run_chat_task(task, Engine(ScriptedModel(tok, reply)), tok, None)
    held = "held-out people (bios only)"
    assert result["groups"][held] == 0.0 and result["traits"][held] == {"says I don't know": 1.0}
    others = [g for g in result["groups"] if g != held]
    assert others and all(result["groups"][g] == 1.0 and result["traits"][g]["says I don't know"] == 0.0 for g in others)


def test_chat_streams_tool_calls_and_remembers_the_conversation(tiny_run, tok):
    session = _session(tiny_run, tok, _calculator_user(tok))
    out = io.StringIO()
    assert session.reply("What is 6 * 7?", out) == "42"
    assert out.getvalue() == "\n[tool: calculator 6 * 7 -> 42]\n42\n"
    session.reply("thanks", io.StringIO())
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]
    fed = tok.decode(session.engine.model.seen[0])
    assert "What is 6 * 7?" in fed and "thanks" in fed  # the second turn saw the first
    session.clear()
    session.reply("again", io.StringIO())
    assert "6 * 7" not in tok.decode(session.engine.model.seen[0])


def test_chat_streams_whole_characters(tiny_run, tok):
    text = "héllo ✓ 日本 🙂"
    assert any("\ufffd" in tok.decode([t]) for t in tok.encode(text))  # some characters span several tokens
    session = _session(tiny_run, tok, lambda user: tok.encode(text))
    out = io.StringIO()
    session.reply("hi", out)
    assert out.getvalue() == text + "\n"


def test_chat_refuses_a_message_longer_than_the_context(tiny_run, tok):
    session = _session(tiny_run, tok, lambda user: tok.encode("ok"))
    with pytest.raises(LLMLabError, match="shorten it"):
        session.reply("word " * 200, io.StringIO())
    assert session.messages == []  # nothing half-remembered


def test_chat_leaves_out_the_oldest_exchanges_to_keep_room_for_a_reply(tiny_run, tok):
    session = _session(tiny_run, tok, lambda user: tok.encode("ok"))
    context = session.engine.model.config.context_len
    for i in range(6):
        out = io.StringIO()
        assert session.reply(f"message {i} " + "word " * 8, out) == "ok"
    fed = tok.decode(session.engine.model.seen[0])
    assert "message 5" in fed and "message 0" not in fed and "left out to fit" in out.getvalue()
    seen, start = session.engine.model.seen[0], tok.special_id("<|assistant_start|>")
    prompt_len = max(i for i, t in enumerate(seen) if t == start) + 1
    assert prompt_len <= context - min(session.cfg.sampling.max_new_tokens, context // 2)
    assert [m["content"] for m in session.messages if m["role"] == "user"][-1].startswith("message 5")


def test_chat_commands(tiny_run, monkeypatch, capsys):
    cfg, _ = tiny_run
    lines = iter(["/help", "/temperature 0.5", "/temperature hot", "/system Be brief.", "/clear", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    out = chat.main(dataclasses.replace(cfg.chat))
    text = capsys.readouterr().out
    assert out == {"turns": 0}
    assert "/temperature X" in text and "(temperature 0.5)" in text and "usage: /temperature" in text
    assert "system prompt set" in text and "conversation cleared" in text


def test_chat_one_shot_prints_the_reply(tiny_run, capsys):
    cfg, _ = tiny_run
    out = chat.main(dataclasses.replace(cfg.chat, prompt="Who are you?",
                                        sampling=dataclasses.replace(cfg.chat.sampling, max_new_tokens=12)))
    assert out["reply"] and out["reply"] in capsys.readouterr().out


def test_tiny_sft_and_report_card(tiny_run):
    cfg, results = tiny_run
    info = checkpoint.read_info(cfg.sft.out_dir)
    assert info["stage"] == "sft" and info["step"] == cfg.sft.max_steps
    rows = [json.loads(line) for line in (Path(cfg.sft.out_dir) / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == cfg.sft.max_steps and min(losses[-2:]) < losses[0]
    card = results["card"]
    assert set(card["chat"]) == {"world_qa", "arithmetic_with_tools", "arithmetic_without_tools", "policy", "knowledge",
                                 "places", "python", "puzzles"}
    assert set(card["base"]) == {"world_qa", "arithmetic", "policy", "knowledge", "places"}
    assert set(card["chat"]["policy"]["groups"]) == set(AssistantPolicy.GROUPS.values())
    assert len(card["chat"]["places"]["groups"]) == 3 and len(card["chat"]["python"]["groups"]) == 6
    report = (Path(cfg.run_dir) / "report.md").read_text()
    assert "Report card" in report and "places: places and companies, pretraining only" in report
    assert "python: sort numbers, with tools" in report and "puzzles: hard (greedy, with tools)" in report
    assert set(card["chat"]["puzzles"]["groups"]) == {f"puzzles: {g}" for g in ("easy", "medium", "hard", "no solution")}
    ckpt = checkpoint.resolve(cfg.sft.out_dir)
    tok_cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    assert tok_cfg["eos_token"] == "<|assistant_end|>" and "chat_template" in tok_cfg


def test_eval_stage_writes_every_group(tiny_run, tmp_path):
    cfg, _ = tiny_run
    out = tmp_path / "eval.json"
    results = evaluate.main(dataclasses.replace(cfg.eval, per_group=4, mode="both", out=str(out)))
    saved = json.loads(out.read_text())
    assert saved["chat"]["policy"]["groups"] == results["chat"]["policy"]["groups"]
    for framing in ("base", "chat"):
        for r in saved[framing].values():
            assert r["n"] > 0 and all(0.0 <= a <= 1.0 for a in r["groups"].values())


def test_sft_resumes_bit_identically(tiny_run, tmp_path):
    """Restart from the step-3 checkpoint of the tiny run: steps 4-6 again give the same weights."""
    cfg, _ = tiny_run
    resumed = tmp_path / "sft"
    shutil.copytree(cfg.sft.out_dir, resumed)
    shutil.rmtree(resumed / "step-000006")
    (resumed / "latest").write_text("step-000003\n")
    sft.main(dataclasses.replace(cfg.sft, out_dir=str(resumed)))
    a = load_file(str(checkpoint.resolve(cfg.sft.out_dir) / "model.safetensors"))
    b = load_file(str(checkpoint.resolve(resumed) / "model.safetensors"))
    assert checkpoint.read_info(resumed)["step"] == 6
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("row, message", [
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "training conversation 1"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]}, "role"),
    ({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "hi"}]}, "empty"),
    ({"messages": "hello"}, "a conversation is a list"),
])
def test_sft_rejects_malformed_conversations(tiny_run, tmp_path, row, message):
    cfg, _ = tiny_run
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    data = tmp_path / "chats.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [good, row] + [good] * 150) + "\n")  # row 99 is validation
    with pytest.raises(LLMLabError, match=message):
        sft.main(dataclasses.replace(cfg.sft, data=str(data), out_dir=str(tmp_path / "out"), max_steps=3))
    assert not (tmp_path / "out" / "latest").exists()


def test_sft_without_a_messages_column_is_a_clear_error(tiny_run, tmp_path):
    cfg, _ = tiny_run
    data = tmp_path / "texts.jsonl"
    data.write_text(json.dumps({"text": "hello"}) + "\n")
    with pytest.raises(LLMLabError, match="messages"):
        sft.main(dataclasses.replace(cfg.sft, data=str(data), out_dir=str(tmp_path / "out")))


def test_stored_knowledge_ranks_whole_values_by_likelihood(tok, tiny_world_dir):
    from llmlab.tasks.knowledge import rank_first, stored_knowledge

    class Favours(torch.nn.Module):
        """Every position predicts `token` with probability near 1 and all others evenly."""

        def __init__(self, token: int):
            super().__init__()
            self.token, self.w = token, torch.nn.Parameter(torch.zeros(1))

        def forward(self, ids):
            logits = torch.zeros(*ids.shape, tok.vocab_size)
            logits[..., self.token] = 20.0
            return logits

    a = tok.encode(" Velmora")
    assert len(a) > 1
    # unfavoured, the shorter value is likelier; a value made of the favoured token wins however long it is
    assert rank_first(Favours(tok.bos_id), tok, [tok.bos_id], ["Velmora", "Ash"]) == "Ash"
    assert rank_first(Favours(a[-1]), tok, [tok.bos_id], ["Ash", tok.decode([a[-1]] * 3).strip()]) != "Ash"
    # the share per group: a model that favours <|bos|> everywhere ranks first the value of fewest tokens
    from llmlab import world as world_lib
    from llmlab.tasks.knowledge import GROUPS, PREFIXES

    w = world_lib.load(tiny_world_dir)
    blank = stored_knowledge(Favours(tok.bos_id), tok, tiny_world_dir, per_group=8)
    assert blank["n"] == 2 * 8 * len(PREFIXES)
    for split, label in GROUPS.items():
        right = 0
        for attribute in PREFIXES:
            values = sorted({w.answer(p, attribute) for p in w.people})
            shortest = min(values, key=lambda v: len(tok.encode(" " + v)))  # (the first of equals, as rank_first)
            right += sum(w.answer(p, attribute) == shortest for p in w.group(split)[:8])
        assert blank["groups"][label] == right / (8 * len(PREFIXES))


def test_policy_scores_the_new_kinds_by_the_behaviour_their_group_names(tiny_world_dir):

    task = AssistantPolicy(tiny_world_dir, per_group=5)
    right = {"unknown_place": lambda e: f"I don't know a country called {e.answer}.",
             "small_talk": lambda e: "Hello! How can I help you today?",
             "no_antecedent": lambda e: "Who do you mean? Please tell me the person's name.",
             "callback": lambda e: f"She was born in {e.answer}."}
    wrong = {"unknown_place": lambda e: "It is a city in Pirstan.", "small_talk": lambda e: "I can't help with that.",
             "no_antecedent": lambda e: "She lives in Pirstan.", "callback": lambda e: "I don't know who that is."}
    by_kind = {}
    for e in task.examples():
        by_kind.setdefault(e.meta["kind"], []).append(e)
    assert set(right) <= set(by_kind)
    for kind in right:
        examples = by_kind[kind]
        # each group's score is the rate of the behaviour it names: for small talk, refusing (or not knowing)
        good, bad = (0.0, 1.0) if kind == "small_talk" else (1.0, 0.0)
        assert [task.score(e, right[kind](e)) for e in examples] == [good] * len(examples)
        assert [task.score(e, wrong[kind](e)) for e in examples] == [bad] * len(examples)
    assert task.score(by_kind["small_talk"][0], "I don't know.") == 1.0


def test_places_and_python_tasks_credit_the_fact_in_the_reply(tiny_world_dir):
    from llmlab.tasks.assistant import AssistantPlaces, AssistantPython

    places, python = AssistantPlaces(tiny_world_dir, per_group=10), AssistantPython(tiny_world_dir, per_group=4)
    assert len({e.group for e in places.examples()}) == 3
    assert len({e.group for e in python.examples()}) == 6
    for task in (places, python):
        for e in task.examples():
            assert task.score(e, f"So: {e.answer}.") == 1.0 and task.score(e, "I don't know.") == 0.0


def test_a_conversation_longer_than_the_context_is_counted_not_scored(tok, tiny_world_dir):
    task = AssistantArithmetic(tiny_world_dir, tools=True, per_group=4)
    prompt_lens = sorted(len(render_prompt(tok, e.meta["messages"])) for e in task.examples())
    cut = prompt_lens[len(prompt_lens) // 2]  # a context that half of the prompts fill
    engine = Engine(ScriptedModel(tok, _calculator_user(tok), context_len=cut))
    result = run_chat_task(task, engine, tok, None)
    assert result["skipped"] == sum(n >= cut for n in prompt_lens) > 0
    assert result["n"] == len(prompt_lens) - result["skipped"]


def test_think_votes_over_replies_whose_tools_ran(tiny_run, tok):
    session = _session(tiny_run, tok, _calculator_user(tok))
    session.set_think("4")
    out = io.StringIO()
    assert session.reply("What is 6 * 7?", out) == "42"  # each sample's call ran: the answer, not the call
    assert out.getvalue() == "(4 replies, 4 agree on this answer)\n42\n"
    assert session.messages[-1] == {"role": "assistant", "content": "42"}
    with pytest.raises(LLMLabError, match="/think takes a budget"):
        session.set_think("-1")
    session.set_think("0")
    assert session.reply("What is 6 * 7?", io.StringIO()) == "42" and session.think == 0


def test_think_about_a_person_recalls_before_answering(tiny_run, tok):
    from llmlab import world as world_lib
    from llmlab.think.recall import DONT_KNOW

    cfg, _ = tiny_run
    person = world_lib.load(cfg.world.out_dir).people[0].name
    session = _session(tiny_run, tok, lambda user: tok.encode("Paris"), recall=cfg.pretrain.out_dir)
    session.set_think("3 show")
    out = io.StringIO()
    answer = session.reply(f"Where does {person} live?", out)
    threshold = session.thinker().thresholds[3]
    sure = session.thinker().recall.confidence(person, 3)[0]
    assert answer == (DONT_KNOW if sure < threshold else "Paris")
    assert out.getvalue().startswith(f"(recalled {person} with 3 probes: confidence {sure:.2f}")
    session.thinker().thresholds[3] = 1.01  # nobody is that sure
    assert session.reply(f"Where does {person} live?", io.StringIO()) == DONT_KNOW
