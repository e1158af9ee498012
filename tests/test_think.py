"""System 2: the number puzzles' ground truth, the verifiers' labels, and the strategies' budgets and compute."""

import dataclasses
import itertools
import json
import random
from fractions import Fraction

import pytest

from test_assistant import ScriptedModel, _call

from llmlab import checkpoint
from llmlab.alignment.rollouts import load_reward_model
from llmlab.chat import parse_turn, render_conversation, render_prompt
from llmlab.engine import Engine, SamplingParams, generate_with_tools, newline_ids
from llmlab.data.preferences import write_jsonl
from llmlab.errors import LLMLabError
from llmlab.stages import rm, think
from llmlab.tasks.puzzles import PuzzleTask, claimed, puzzle_example, reply_conclusion
from llmlab.think.strategies import Thinker
from llmlab.think.verifiers import attempt_pairs, solver_attempts
from llmlab.tools.calculator import calculate
from llmlab.world.puzzles import (
    ASKS, MAX_VALUE, NO_SOLUTION, Puzzle, as_calls, check, from_calls, level, moves, parse_question, puzzles,
    solution_text, solvable,
)


def _brute(numbers: tuple, target: int) -> bool:
    """Reachability by trying every order of combining, independently of the solver's memoised search."""
    if len(numbers) == 1:
        return numbers[0] == target
    for i, j in itertools.combinations(range(len(numbers)), 2):
        a, b = max(numbers[i], numbers[j]), min(numbers[i], numbers[j])
        rest = [n for k, n in enumerate(numbers) if k not in (i, j)]
        for c in (a + b, a - b, a * b, Fraction(a, b)):
            if c.denominator == 1 if isinstance(c, Fraction) else True:
                c = int(c)
                if 1 <= c <= MAX_VALUE and _brute(tuple(rest + [c]), target):
                    return True
    return False


def test_the_solver_agrees_with_brute_force_and_its_solutions_check():
    rng = random.Random(0)
    for _ in range(60):
        p = Puzzle(tuple(sorted(rng.randint(1, 9) for _ in range(rng.choice([3, 4])))), rng.randint(10, 60))
        assert solvable(p.numbers, p.target) == _brute(p.numbers, p.target), p
        text = solution_text(p, rng)
        verdict = check(p, text)
        assert verdict.solved
        if text == NO_SOLUTION:
            assert verdict.says_no_solution
        else:
            assert verdict.steps == [True] * (len(p.numbers) - 1) and verdict.answer == str(p.target)


def test_check_labels_each_step_and_stops_trusting_after_the_first_bad_one():
    p = Puzzle((2, 3, 4, 9), 25)  # 9 - 2 = 7 keeps it solvable (7 * 3 + 4); 7 and 12 cannot make 25
    assert check(p, "9 - 2 = 7, left 3 4 7\n4 * 3 = 12, left 7 12\n12 + 7 = 19, left 19").steps == [True, False, False]
    # a wrong sum: invalid even though the later lines are arithmetic that holds
    assert check(p, "9 + 2 = 12, left 3 4 12\n12 + 4 = 16, left 3 16\n16 + 3 = 19, left 19").steps == [False] * 3
    # a number it does not have, and a "left" list that lies
    assert check(p, "8 - 2 = 6, left 3 4 6").steps == [False]
    assert check(p, "9 - 2 = 7, left 3 7").steps == [False]
    right = check(p, "9 - 2 = 7, left 3 4 7\n4 - 3 = 1, left 1 7\n7 * 1 = 7, left 7")
    assert right.steps == [True, False, False] and not right.solved  # valid arithmetic, wrong end
    assert check(p, NO_SOLUTION).says_no_solution and not check(p, NO_SOLUTION).solved
    assert check(Puzzle((1, 1, 1), 50), "There is no solution.").solved


def test_rules_keep_every_number_a_whole_number_from_1_to_max():
    for numbers in [(1, 2, 3), (5, 5, 9, 9), (1, 1, 7, 8)]:
        for s in moves(numbers):
            assert s.a >= s.b and 1 <= s.result <= MAX_VALUE and len(s.left) == len(numbers) - 1
            assert s.left == tuple(sorted(s.left))
    assert not any(s.op == "-" for s in moves((4, 4)))  # 4 - 4 = 0 is not allowed
    assert [s.result for s in moves((3, 7)) if s.op == "/"] == []  # 7 / 3 leaves a remainder


def test_levels_and_splits_are_what_they_say(tiny_world_dir):
    hard = puzzles(0, "heldout", 20, 4, "hard", 1.0)
    assert len(hard) == 20 and all(level(p) == "hard" and solvable(p.numbers, p.target) for p in hard)
    train = set(puzzles(0, "train", 200, 4))
    assert not train & set(puzzles(0, "heldout", 200, 4))
    rows = [json.loads(line) for line in open(f"{tiny_world_dir}/eval/puzzles.jsonl")]
    groups = {r["group"] for r in rows}
    assert groups == {"puzzles: easy", "puzzles: medium", "puzzles: hard", "puzzles: no solution"}
    assert all(solvable(tuple(r["numbers"]), r["target"]) == (r["group"] != "puzzles: no solution") for r in rows)
    assert not {(tuple(r["numbers"]), r["target"]) for r in rows} & {(p.numbers, p.target) for p in train}


def test_claimed_reads_the_conclusion_without_checking_it():
    p = Puzzle((2, 3, 4, 9), 21)
    a = "9 - 2 = 7, left 3 4 7\n4 - 3 = 1, left 1 7\n7 * 3 = 21, left 21"  # wrong arithmetic, claims 21
    b = "4 - 3 = 1, left 1 7 9\n9 - 2 = 7, left 3 4 7\n7 * 3 = 21, left 21"
    assert claimed(p, a) is not None and claimed(p, "9 - 2 = 7, left 3 4 7") is None
    first, second, last = a.split("\n")
    assert claimed(p, a) == claimed(p, "\n".join([second, first, last]))  # order aside
    assert claimed(p, a) != claimed(p, b)
    assert claimed(p, NO_SOLUTION) == "no solution"


def test_verifier_pairs_put_the_exactly_better_attempt_first(tiny_run):
    cfg, _ = tiny_run
    tok = checkpoint.load(cfg.sft.out_dir).require_tokenizer("test")
    e = puzzle_example("Make 25 from 2, 3, 4 and 9.", (2, 3, 4, 9), 25, "puzzles: hard")
    good = "9 - 2 = 7, left 3 4 7\n4 - 1 = 3, left 3 3 7\n3 * 7 = 21, left 21"  # second step uses a 1 it lacks
    solved = "4 * 3 = 12, left 2 9 12\n12 + 9 = 21, left 2 21"
    steps = ["9 - 2 = 7, left 3 4 7", "4 - 3 = 1, left 1 7", "7 + 1 = 8, left 8"]
    attempts = [(e, [good, "\n".join(steps), solved])]
    task = PuzzleTask(None)
    outcome = attempt_pairs(task, attempts, "outcome", 10)
    assert outcome == []  # no attempt solves it (the last leaves two numbers)
    process = attempt_pairs(task, attempts, "process", 10)
    assert process, "the first steps differ in label"
    for row in process:
        chosen, rejected = from_calls(row["chosen"]), from_calls(row["rejected"])
        assert row["chosen"][0]["tool_calls"][0]["function"] == {"name": "calculator", "arguments": "9 - 2"}
        assert chosen.count("\n") == rejected.count("\n")  # same depth
        assert check(Puzzle((2, 3, 4, 9), 25), chosen).steps[-1] and not check(Puzzle((2, 3, 4, 9), 25), rejected).steps[-1]


def _verifier(tiny_run, tmp_path, kind):
    """A verifier of `kind` trained by `llmlab rm` on pairs made from solutions and corrupted solutions (the tiny
    assistant's own attempts are rarely valid enough to pair)."""
    cfg, _ = tiny_run
    tok = checkpoint.load(cfg.sft.out_dir).require_tokenizer("test")
    rng = random.Random(0)
    attempts = []
    for p in puzzles(0, "train", 12, 3):
        if solvable(p.numbers, p.target):
            good = solution_text(p, rng)
            bad = good.replace(" = ", " = 1", 1)
            attempts.append((puzzle_example(p.question(rng), p.numbers, p.target, "puzzles: easy"), [good, bad]))
    path = tmp_path / f"{kind}.jsonl"
    write_jsonl(path, attempt_pairs(PuzzleTask(None), attempts, kind, 4))
    rcfg = dataclasses.replace(rm.Config(), policy=cfg.sft.out_dir, world=cfg.world.out_dir,
                               out_dir=str(tmp_path / kind), pairs=str(path), heldout=str(path),
                               max_steps=3, batch_size=4, eval_every=0, save_every=0)
    rm.main(rcfg)
    return rcfg.out_dir


def test_strategies_stay_within_budget_and_count_their_compute(tiny_run, tmp_path):
    cfg, _ = tiny_run
    prm = _verifier(tiny_run, tmp_path, "process")
    ckpt = checkpoint.load(cfg.sft.out_dir)
    tok = ckpt.require_tokenizer("test")
    thinker = Thinker(Engine(ckpt.model), tok, process=load_reward_model(prm, tok, "cpu"), give_up=NO_SOLUTION,
                      max_new_tokens=24, step_tokens=8, max_steps=3)
    messages = [{"role": "user", "content": "Make 21 from 2, 3, 4 and 9."}]
    texts, c = thinker.sample(messages, 5, seed=1)
    assert len(texts) == 5 and c.generated <= 5 * 24
    searched = False
    for n in (1, 4, 8):
        a = thinker.answer(messages, "beam", n, seed=3)
        width = max(n // min(4, n), 1)
        # at most width x expand proposals of at most step_tokens each, per level, for max_steps levels
        assert a.compute.generated <= 3 * width * min(4, n) * 8
        assert a.text and (a.compute.scored > 0) == bool(a.candidates)  # a reply, or the give-up answer
        searched = searched or bool(a.candidates)
        assert all(t.count("\n") < 3 for t, _ in a.candidates)
    assert searched  # the verifier weighed some proposal
    vote = thinker.pick(messages, ["x", "There is no solution.", "There is no solution."], "vote")
    assert vote.text == "There is no solution." and vote.candidates[0][1] == 2.0
    with pytest.raises(LLMLabError, match="outcome"):
        thinker.answer(messages, "orm", 4)
    for bad in (0, 10 ** 6):
        with pytest.raises(LLMLabError, match="budget"):
            thinker.answer(messages, "vote", bad)


def test_think_stage_refuses_bad_input(tiny_run, tmp_path):
    with pytest.raises(LLMLabError, match="budget"):
        think.Config(budget=0)
    with pytest.raises(LLMLabError, match="unknown"):
        think.Config(eval=True, strategies="vote,mcts")
    with pytest.raises(LLMLabError, match="budgets"):
        think.Config(eval=True, budgets="1,two")
    with pytest.raises(LLMLabError, match="verify_budgets.*12 probes"):
        think.Config(verify=True, verify_budgets="4,13")
    with pytest.raises(LLMLabError, match="max_flagged"):
        think.Config(verify=True, max_flagged=1.0)
    cfg, _ = tiny_run
    with pytest.raises(LLMLabError, match="not a reward model"):  # a verifier must be a scorer
        think.main(think.Config(checkpoint=cfg.sft.out_dir, process=cfg.sft.out_dir, prompt="Make 5 from 1, 2 and 3."))


def test_the_compute_optimal_policy_spends_samples_only_where_the_problem_is_hard():
    from llmlab.think.curves import compute_optimal

    def row(hard: bool) -> dict:
        pts = [{"strategy": "vote", "budget": 1, "correct": 0.0 if hard else 1.0, "tokens": 10.0, "flops": 1.0},
               {"strategy": "vote", "budget": 8, "correct": 1.0, "tokens": 80.0, "flops": 8.0}]
        return {"group": "g", "difficulty": 1.0 if hard else -1.0, "pilot_tokens": 0.0, "points": pts}

    rows = [row(hard) for hard in (False, False, True, True) * 2]  # calibration and test halves alike
    levels = {r["tokens"]: r for r in compute_optimal(rows, bins=2)}
    assert levels[10.0]["fixed"]["accuracy"] == 0.5 and levels[10.0]["policy"]["accuracy"] == 0.5
    top = levels[80.0]
    assert top["fixed"]["choice"] == ["vote", 8] and top["fixed"]["tokens"] == 80.0
    assert top["policy"]["accuracy"] == 1.0 and top["policy"]["tokens"] == 45.0  # 1 sample for easy, 8 for hard
    assert top["policy"]["choice"] == {"0": ["vote", 1], "1": ["vote", 8]}
    # the pilot's 10 tokens are the first replies a sampling strategy reads: counted once, not on top of them
    piloted = [dict(r, pilot_tokens=10.0) for r in rows]
    top = {r["tokens"]: r for r in compute_optimal(piloted, bins=2)}[80.0]
    assert top["policy"]["tokens"] == 45.0 and top["policy"]["accuracy"] == 1.0
    greedy = [dict(r, points=[dict(p, strategy="greedy") for p in r["points"]]) for r in piloted]
    assert all(r["policy"]["tokens"] > 45.0 for r in compute_optimal(greedy, bins=2))  # greedy reads no pilot reply


# ---- verify-then-answer ------------------------------------------------------------------------------------------

def test_the_name_is_read_from_every_question_phrasing():
    from llmlab.think.recall import name_in
    from llmlab.world.text import QUESTIONS

    for phrasings in QUESTIONS.values():
        for question in phrasings["seen"] + phrasings["heldout"]:
            assert name_in(question.format(name="Oranddriaa Teilridge")) == "Oranddriaa Teilridge", question
    assert name_in("What is 12 + 30?") is None and name_in("Hello!") is None


def _recall_thinker(tiny_run):
    from llmlab import world as world_lib
    from llmlab.think.recall import Recall

    cfg, _ = tiny_run
    ckpt = checkpoint.load(cfg.sft.out_dir)
    world = world_lib.load(cfg.world.out_dir)
    thinker = Thinker(Engine(ckpt.model), ckpt.tokenizer)
    return thinker, Recall(ckpt.model, ckpt.tokenizer, world), world


def test_recall_confidence_is_the_mean_of_its_probes_and_calibration_lets_through_the_known(tiny_run):
    from llmlab.think.recall import PROBES, calibrate
    from llmlab.world.conversations import recombined_names

    _, recall, world = _recall_thinker(tiny_run)
    known = [p.name for p in world.people[:10]]
    for name in known[:3] + list(recombined_names(world, random.Random("t"), 60))[:3]:
        values = [p for p, _ in recall.probe(name)]
        assert len(values) == len(PROBES) and all(0 < p <= 1 for p in values)
        for k in (1, 4, len(PROBES)):
            assert recall.confidence(name, k)[0] == pytest.approx(sum(values[:k]) / k)
    for max_flagged in (0.0, 0.2):
        t = calibrate(recall, known, 6, max_flagged)
        assert sum(recall.confidence(n, 6)[0] < t for n in known) <= max_flagged * len(known)
    strangers = list(recombined_names(world, random.Random("t"), 60))
    assert len(strangers) >= 5 and len(set(strangers)) == len(strangers)
    assert not set(strangers) & ({p.name for p in world.people} | set(world.unknown_people))


def test_verify_says_dont_know_below_the_threshold_and_answers_greedily_above_it(tiny_run):
    from llmlab.think.recall import DONT_KNOW

    thinker, recall, world = _recall_thinker(tiny_run)
    question = [{"role": "user", "content": f"Where does {world.people[0].name} live?"}]
    with pytest.raises(LLMLabError, match="calibrated"):
        thinker.answer(question, "verify", 4)
    greedy = thinker.answer(question, "greedy", 1).text
    thinker.calibrate(recall, [p.name for p in world.people[:4]], 4)
    thinker.thresholds[4] = 1.01  # nobody is that sure: every named person is a stranger
    a = thinker.answer(question, "verify", 4)
    assert a.text == DONT_KNOW and a.compute.generated == 0 and a.compute.processed > 0
    thinker.thresholds[4] = 0.0  # everybody passes: the greedy answer, the probes' reading added
    a = thinker.answer(question, "verify", 4)
    assert a.text == greedy and a.compute.processed > thinker.answer(question, "greedy", 1).compute.processed
    unnamed = [{"role": "user", "content": "What is 2 + 3?"}]
    thinker.thresholds[4] = 1.01
    assert thinker.answer(unnamed, "verify", 4).text == thinker.answer(unnamed, "greedy", 1).text


# ---- reasoning_effort on the API ----------------------------------------------------------------------------------

def test_the_api_thinks_at_the_effort_asked_and_reports_its_compute(tiny_run, tmp_path):
    import httpx

    from llmlab import world as world_lib
    from llmlab.server.app import ServerConfig, create_app
    from serving import LiveServer

    cfg, _ = tiny_run
    app = create_app(ServerConfig(checkpoint=cfg.sft.out_dir, world=cfg.world.out_dir, recall=cfg.pretrain.out_dir,
                                  db=str(tmp_path / "f.db"), model_name="m"))
    live = LiveServer(app)
    url = live.url + "/v1/chat/completions"
    person = world_lib.load(cfg.world.out_dir).people[0].name
    try:
        def ask(content, **extra):
            body = {"model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": 16, "seed": 3, **extra}
            return httpx.post(url, json=body, timeout=120)

        r = ask("Tell me a story.", reasoning_effort="low").json()
        thought = r["reasoning"]
        assert (thought["strategy"], thought["budget"]) == ("vote", 4) and len(thought["candidates"]) <= 4
        assert r["choices"][0]["message"]["content"] == thought["candidates"][0]["text"]  # the most voted reply
        assert r["usage"]["completion_tokens_details"]["reasoning_tokens"] == thought["generated_tokens"] > 0
        r = ask(f"Where does {person} live?", reasoning_effort="high").json()
        assert (r["reasoning"]["strategy"], r["reasoning"]["budget"]) == ("verify", 12)
        streamed = ask("Tell me a story.", reasoning_effort="low", stream=True).text
        assert json.dumps(thought["candidates"][0]["text"])[1:-1] in streamed and streamed.endswith("data: [DONE]\n\n")
        assert ask("Hi", reasoning_effort="low", n=2).status_code == 422
        assert ask("Hi", reasoning_effort="extreme").status_code == 422
    finally:
        live.stop()


def test_a_solution_is_written_as_calculator_calls_and_read_back_as_its_lines(tiny_run):
    cfg, _ = tiny_run
    tok = checkpoint.load(cfg.sft.out_dir).require_tokenizer("test")
    rng = random.Random(3)
    for p in puzzles(0, "train", 20, 4):
        text = solution_text(p, rng)
        messages = [{"role": "user", "content": p.question(rng)}] + as_calls(text)
        assert from_calls(messages[1:]) == text
        if text == NO_SOLUTION:
            assert messages[1:] == [{"role": "assistant", "content": NO_SOLUTION}]
            continue
        calls = [m["tool_calls"][0]["function"]["arguments"] for m in messages if m.get("tool_calls")]
        results = [m["content"] for m in messages if m["role"] == "tool"]
        assert len(calls) == len(p.numbers) - 1 and results == [calculate(c) for c in calls]  # the calculator's own results
        ids, mask = render_conversation(tok, messages)
        turn = ids[len(render_prompt(tok, messages[:1])):]
        assert from_calls(parse_turn(tok, turn)) == text  # the tokens read back: what the checker sees
        assert check(p, PuzzleTask(None).read(tok, turn)).solved
        assert sum(mask) == len(turn) - sum(2 + len(tok.encode(r)) for r in results)  # outputs are the engine's
    assert as_calls("I think 7 + 5 = 13, left 13")[1]["content"] == "13"  # a claimed step is a call: the tool answers it


def test_the_engine_computes_each_step_and_the_thinker_reads_the_whole_turn(tiny_run):
    """A scripted assistant calls the calculator with 9 - 2 and writes the rest of the step: the text the thinker
    scores holds the calculator's result, beam search continues an open turn, and a tool's output never stops a
    row."""
    cfg, _ = tiny_run
    tok = checkpoint.load(cfg.sft.out_dir).require_tokenizer("test")
    model = ScriptedModel(tok, lambda user: _call(tok, "calculator 9 - 2"),
                          then=lambda out: tok.encode(", left 3 4 7\n"))
    run = lambda call: calculate(call.split(" ", 1)[1])  # noqa: E731
    thinker = Thinker(Engine(model), tok, run_tool=run, give_up=NO_SOLUTION, max_new_tokens=40, step_tokens=30,
                      max_steps=1)
    messages = [{"role": "user", "content": "Make 25 from 2, 3, 4 and 9."}]
    texts, _ = thinker.sample(messages, 2, seed=0)
    assert texts == ["9 - 2 = 7, left 3 4 7"] * 2
    a, strategy, budget = thinker.respond(messages, 3)  # chat's /think and the API's reasoning_effort
    assert (strategy, budget, a.text) == ("claim", 3, "9 - 2 = 7, left 3 4 7")
    other = [{"role": "user", "content": "What is 9 - 2?"}]  # not a puzzle: the words after the last output
    assert thinker.sample(other, 1, seed=0)[0] == [", left 3 4 7"]
    assert check(Puzzle((2, 3, 4, 9), 25), texts[0]).steps == [True]  # 4 * 7 - 3
    # the open turn beam search continues from: the prompt, the step as the engine wrote it, no end of turn
    opened = thinker._open_turn(messages, texts[0] + "\n")
    assert opened[-1] != tok.special_id("<|assistant_end|>") and tok.decode(opened).endswith("left 3 4 7\n")
    stops = newline_ids(tok)
    out, tools = generate_with_tools(Engine(model), tok, [render_prompt(tok, messages)],
                                     SamplingParams(max_new_tokens=40, temperature=0.0), stops,
                                     lambda call: "7\n7", keep_stop=True)
    assert tools.calls[0] == [("calculator 9 - 2", "7\n7")]
    # the forced newline did not stop the row, the assistant's own did (and is kept)
    assert out[0][-1] in stops and from_calls(parse_turn(tok, out[0])) == "9 - 2 = 7\n7, left 3 4 7\n"


def test_a_puzzle_is_read_from_every_phrasing_and_claim_lets_one_solution_outvote_giving_up(tiny_run):
    rng = random.Random(0)
    for p in puzzles(0, "train", 10, 4) + puzzles(0, "train", 10, 3):
        listed = ", ".join(map(str, p.numbers[:-1])) + f" and {p.numbers[-1]}"
        assert all(parse_question(ask.format(target=p.target, numbers=listed)) == p for ask in ASKS)
        assert parse_question(p.question(rng)) == p
    assert parse_question("What is 12 * 7?") is None
    cfg, _ = tiny_run
    ckpt = checkpoint.load(cfg.sft.out_dir)
    thinker = Thinker(Engine(ckpt.model), ckpt.tokenizer)  # (no give_up answer set: a puzzle's is known)
    messages = [{"role": "user", "content": "Make 25 from 2, 3, 4 and 9."}]
    solved = "9 - 2 = 7, left 3 4 7\n7 * 4 = 28, left 3 28\n28 - 3 = 25, left 25"
    missed = "9 + 2 = 11, left 3 4 11\n11 * 3 = 33, left 4 33\n33 - 4 = 29, left 29"  # concludes nothing
    replies = [NO_SOLUTION, missed, solved, NO_SOLUTION, NO_SOLUTION]
    assert reply_conclusion(messages, solved) == claimed(Puzzle((2, 3, 4, 9), 25), solved)
    assert thinker.pick(messages, replies, "vote").text == NO_SOLUTION  # the majority gave up
    assert thinker.pick(messages, replies, "claim").text == solved  # one claimed solution outweighs them
    assert thinker.pick(messages, [NO_SOLUTION, missed], "claim").text == NO_SOLUTION  # no claim: giving up votes
    other = [{"role": "user", "content": "Hello"}]  # not a puzzle: the reply itself is the conclusion
    assert thinker.pick(other, ["Hi!", "Hello!", "Hi!"], "claim").text == "Hi!"
    assert thinker.as_reply(other, "Hi!") == [{"role": "assistant", "content": "Hi!"}]
    assert thinker.as_reply(messages, solved) == as_calls(solved)


def test_solver_attempts_hold_the_solution_corrupted_prefixes_and_complete_misses():
    task = PuzzleTask.generated(0, "train", 8)
    for example, texts in solver_attempts(task):
        p = Puzzle(tuple(example.meta["numbers"]), example.meta["target"])
        verdicts = [check(p, t) for t in texts]
        assert verdicts[0].solved and not any(v.solved for v in verdicts[1:])
        complete = [v for v in verdicts[1:] if v.answer]  # every step allowed and one number left
        assert complete and all(v.answer != str(p.target) for v in complete)
        for v in verdicts[1:]:
            if not v.answer:  # a corrupted prefix: right up to its last step, which is the first wrong one
                assert not v.steps[-1] and all(v.steps[:-1])


def test_sequential_stops_at_the_first_round_with_a_claim_and_otherwise_spends_its_budget(tiny_run):
    cfg, _ = tiny_run
    tok = checkpoint.load(cfg.sft.out_dir).require_tokenizer("test")
    run = lambda call: calculate(call.split(" ", 1)[1])  # noqa: E731
    solver = ScriptedModel(tok, lambda user: _call(tok, "calculator 9 - 2"), then=lambda out: tok.encode(", left 7"))
    quitter = ScriptedModel(tok, lambda user: tok.encode(NO_SOLUTION))
    claims = [{"role": "user", "content": "Make 7 from 9 and 2."}]
    for model, budget, drawn in ((solver, 16, 4), (quitter, 10, 10)):
        thinker = Thinker(Engine(model), tok, run_tool=run, give_up=NO_SOLUTION)
        a = thinker.answer(claims, "sequential", budget, seed=0)
        one = thinker.sample(claims, 1, seed=0)[1].generated  # (every reply of a scripted model is as long)
        assert a.compute.generated == drawn * one  # rounds of 4 until a claim (the last round cut to the budget)
        assert a.text == ("9 - 2 = 7, left 7" if model is solver else NO_SOLUTION)


def test_the_sequential_policy_is_reported_apart_from_the_fixed_strategies():
    from llmlab.think.curves import compute_optimal

    def row(hard: bool) -> dict:
        pts = [{"strategy": "claim", "budget": 8, "correct": 1.0, "tokens": 80.0, "flops": 8.0},
               {"strategy": "sequential", "budget": 8, "correct": 1.0, "tokens": 80.0 if hard else 40.0, "flops": 1.0}]
        return {"group": "g", "difficulty": 1.0 if hard else -1.0, "pilot_tokens": 40.0, "points": pts}

    rows = [row(hard) for hard in (False, False, True, True) * 2]  # calibration and test halves alike
    (level,) = compute_optimal(rows, bins=2)
    assert level["fixed"]["choice"] == ["claim", 8]  # never the sequential policy
    assert level["sequential"] == {"choice": ["sequential", 8], "accuracy": 1.0, "tokens": 60.0}
