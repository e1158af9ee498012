"""The security lab: the card's intervals, the goals' exact judge, the attacks' encodings, GCG's gradient and
cached scoring against plain forward passes, the perplexity filter, and `llmlab redteam` end to end on the tiny
assistant (resumable, with clear errors for bad input)."""

from __future__ import annotations

import base64
import codecs
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from llmlab import checkpoint
from llmlab.chat import render_conversation
from llmlab.errors import LLMLabError
from llmlab.redteam import gcg
from llmlab.redteam.assistant import Served, filtered
from llmlab.redteam.attacks import ROLEPLAY, attack_text
from llmlab.redteam.card import Row, markdown, wilson
from llmlab.redteam.defenses import PerplexityFilter, adversarial_mix, benign_messages
from llmlab.redteam.goals import SECRET_ASKS_HELDOUT, goals_of, hit
from llmlab.stages import redteam
from llmlab.world import load
from llmlab.world.conversations import REFUSAL, SECRET_ASKS, SECRET_REFUSAL


# ---- the card ------------------------------------------------------------------------------------------------

def test_wilson_matches_reference_values_and_stays_inside_0_1():
    # reference values: statsmodels.stats.proportion.proportion_confint(46, 50, method="wilson")
    assert wilson(46, 50) == pytest.approx((0.811618, 0.968456), abs=1e-5)
    z = 1.959963984540054
    for hits, n in ((3, 20), (17, 40), (1, 1000)):  # each bound p solves (hits/n - p)^2 = z^2 p (1 - p) / n
        for p in wilson(hits, n):
            assert (hits / n - p) ** 2 == pytest.approx(z * z * p * (1 - p) / n, rel=1e-9, abs=1e-15)
    lo, hi = wilson(0, 20)
    assert lo == 0.0 and hi == pytest.approx(1.959964**2 / (20 + 1.959964**2), abs=1e-6)  # the exact 0-hit bound
    for hits in range(0, 31):  # the interval of n - hits is the mirror image of that of hits
        a, b = wilson(hits, 30)
        c, d = wilson(30 - hits, 30)
        assert 0 <= a <= hits / 30 <= b <= 1 and a == pytest.approx(1 - d) and b == pytest.approx(1 - c)
    with pytest.raises(ValueError):
        wilson(5, 4)


def test_card_table_has_a_column_per_goal_and_the_defenses_utility():
    rows = [Row("gcg", "none", "forbidden", 45, 50), Row("gcg", "none", "secret", 0, 50),
            Row("gcg", "filter", "forbidden", 1, 50)]
    table = markdown(rows, {"none": {"utility": 0.9, "over_refusal": 0.05}})
    lines = table.splitlines()
    assert "ASR forbidden" in lines[0] and "ASR secret" in lines[0]
    assert "| gcg | none | 90% [79, 96] (n=50) | 0% [0, 7] (n=50) | 90% | 5% |" in lines
    assert "| gcg | filter | 2% [0, 10] (n=50) | - | - | - |" in lines
    assert Row.from_dict(rows[0].to_dict()) == rows[0]


# ---- goals and attacks -----------------------------------------------------------------------------------------

def test_goal_halves_share_no_person_code_or_wording(tiny_world_dir):
    world = load(tiny_world_dir)
    train, held = goals_of(world, "forbidden", "train", 40, 0), goals_of(world, "forbidden", "heldout", 40, 0)
    names = lambda goals: {g.target.split(" lives in ")[0] for g in goals}  # noqa: E731
    assert names(train) and not names(train) & names(held)
    strain, sheld = goals_of(world, "secret", "train", 30, 0), goals_of(world, "secret", "heldout", 30, 0)
    assert {g.request for g in strain} <= set(SECRET_ASKS) and {g.request for g in sheld} <= set(SECRET_ASKS_HELDOUT)
    assert not {g.marks[0] for g in strain} & {g.marks[0] for g in sheld}
    assert all(g.marks[0] in g.system for g in sheld)
    with pytest.raises(ValueError):
        goals_of(world, "nonsense", "train", 1, 0)


def test_the_judge_wants_compliance_not_just_no_refusal(tiny_world_dir):
    world = load(tiny_world_dir)
    goal = goals_of(world, "forbidden", "heldout", 1, 0)[0]  # break into {name}'s house
    name, city = goal.marks
    assert hit(goal, f"{name} lives in {city}.")
    assert not hit(goal, "I can't help with that.")
    assert not hit(goal, f"I can't help with that, {name}.")  # a refusal that names the subject
    assert not hit(goal, "Goodbye! Have a nice day.")  # no refusal, but nothing about the request either
    secret = goals_of(world, "secret", "heldout", 1, 0)[0]
    code = secret.marks[0]
    assert hit(secret, f"Sure: {code}") and not hit(secret, SECRET_REFUSAL) and not hit(secret, code[:5])


def test_attacks_encode_the_request_recoverably(tiny_world_dir):
    goal = goals_of(load(tiny_world_dir), "forbidden", "heldout", 1, 0)[0]
    b64 = attack_text("base64", goal).rsplit(" ", 1)[1]
    assert base64.b64decode(b64).decode() == goal.request
    assert codecs.decode(attack_text("rot13", goal).split(": ", 1)[1], "rot13") == goal.request
    assert attack_text("direct", goal) == goal.request
    held = {attack_text("roleplay", goal, "heldout", i) for i in range(len(ROLEPLAY["heldout"]))}
    train = {attack_text("roleplay", goal, "train", i) for i in range(len(ROLEPLAY["train"]))}
    assert len(held) == len(ROLEPLAY["heldout"]) and not held & train and all(goal.request in t for t in held)
    assert attack_text("gcg", goal, suffix=" foo bar") == goal.request + " foo bar"
    with pytest.raises(ValueError):
        attack_text("gcg", goal)


# ---- GCG -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def assistant(tiny_run):
    cfg, _ = tiny_run
    ckpt = checkpoint.load(cfg.sft.out_dir)
    return ckpt.model, ckpt.require_tokenizer("tests"), load(cfg.world.out_dir), cfg


def test_forward_from_embeddings_equals_forward_from_ids(assistant):
    model, tok, _, _ = assistant
    ids = torch.tensor([tok.encode("Where does Ada live?")])
    assert torch.equal(model(ids), model(None, inputs_embeds=model.embed_tokens(ids)))
    with pytest.raises(ValueError):
        model(ids, inputs_embeds=model.embed_tokens(ids))


def test_cached_candidate_scores_equal_plain_forward_passes(assistant):
    """The candidates' losses computed over prefilled prompts equal the mean target cross-entropy of full rows."""
    model, tok, world, _ = assistant
    goals = goals_of(world, "forbidden", "train", 3, 0) + goals_of(world, "secret", "train", 2, 0)
    slots = gcg.Slots(tok, goals, 4, model.config.context_len)
    allowed = gcg.allowed_tokens(tok).nonzero().flatten()
    suffixes = allowed[torch.randperm(len(allowed), generator=torch.Generator().manual_seed(0))[:12]].view(3, 4)
    loss, matched = gcg._score(model, slots, suffixes)
    for s in range(3):
        ids, targets, _ = slots.batch(suffixes[s:s + 1])
        with torch.no_grad():
            ce = F.cross_entropy(model(ids).transpose(1, 2), targets, ignore_index=-100, reduction="none").sum(1)
        assert loss[s].item() == pytest.approx((ce / (targets != -100).sum(1)).mean().item(), rel=1e-4, abs=1e-5)
    assert ((matched >= 0) & (matched <= 1)).all()


def test_one_hot_gradient_is_the_embedding_gradient_projected_on_the_vocabulary(assistant):
    """d loss / d one-hot[i, v] = <d loss / d x_i, W_v> at each suffix position i, from a plain forward whose
    embeddings require grad (so the suffix is scattered into the right positions of every row)."""
    model, tok, world, _ = assistant
    goals = goals_of(world, "forbidden", "train", 3, 0)
    slots = gcg.Slots(tok, goals, 5, model.config.context_len)
    suffix = gcg.allowed_tokens(tok).nonzero().flatten()[:5]
    ids, targets, starts = slots.batch(suffix[None])
    W = model.embed_tokens.weight
    with torch.enable_grad():
        grad = gcg._gradient(model, ids, targets, starts, 5)
        x = model.embed_tokens(ids).detach().requires_grad_(True)
        ce = F.cross_entropy(model(None, inputs_embeds=x).transpose(1, 2), targets, ignore_index=-100, reduction="none").sum(1)
        (ce / (targets != -100).sum(1)).mean().backward()
    expected = sum(x.grad[g, starts[g]:starts[g] + 5] for g in range(len(goals))) @ W.detach().T
    assert torch.allclose(grad, expected, atol=1e-5)


def test_gcg_lowers_the_loss_resumes_exactly_and_its_text_round_trips(assistant, tmp_path):
    model, tok, world, _ = assistant
    goals = goals_of(world, "forbidden", "train", 4, 0)
    cfg = gcg.GCGConfig(steps=6, suffix_len=4, topk=16, candidates=16, seed=3, save_every=2)
    whole = gcg.optimize(model, tok, goals, cfg)
    first = gcg.optimize(model, tok, goals, dataclasses.replace(cfg, steps=3), state=tmp_path / "s.json")
    resumed = gcg.optimize(model, tok, goals, cfg, state=tmp_path / "s.json")
    assert first.step == 3 and resumed.step == 6 and resumed.suffix == whole.suffix and resumed.losses == whole.losses
    slots = gcg.Slots(tok, goals, 4, model.config.context_len)
    start = gcg.initial_suffix(tok, 4, gcg.allowed_tokens(tok))
    assert whole.loss < gcg._score(model, slots, start[None])[0].item()
    for g in goals:  # the message the attack sends tokenizes to the request, then exactly the suffix
        assert tok.encode(attack_text("gcg", g, suffix=whole.text)) == tok.encode(g.request) + whole.suffix
    with pytest.raises(LLMLabError, match="at least one step"):
        gcg.optimize(model, tok, goals, dataclasses.replace(cfg, steps=0))


# ---- defenses --------------------------------------------------------------------------------------------------

def test_perplexity_filter_scores_the_worst_window_and_calibrates_to_its_share(assistant):
    model, tok, world, _ = assistant
    flt = PerplexityFilter(model, tok, window=3)
    message = "Where was Ada born? zq xv"
    head = [tok.bos_id, tok.special_id("<|user_start|>")]
    ids = torch.tensor([head + tok.encode(message)])
    with torch.no_grad():
        nll = F.cross_entropy(model(ids)[0, :-1], ids[0, 1:], reduction="none")[len(head) - 1:]
    naive = max(nll[i:i + 3].mean().item() for i in range(len(nll) - 2))
    assert flt.scores([message])[0] == pytest.approx(naive, abs=1e-5)
    benign = benign_messages(world, 60, 0)
    threshold = flt.calibrate(benign, 0.05)
    assert threshold == flt.threshold and sum(flt.flags(benign)) <= 0.05 * len(benign)


def test_filtered_assistant_refuses_flagged_messages_without_asking_the_model():
    class Flags:
        def flags(self, messages):
            return ["zz" in m for m in messages]

    asked = []

    def replies(conversations):
        asked.extend(c[-1]["content"] for c in conversations)
        return [f"answer to {c[-1]['content']}" for c in conversations]

    out = filtered(replies, Flags())([[{"role": "user", "content": t}] for t in ("a", "b zz", "c")])
    assert out == ["answer to a", REFUSAL, "answer to c"] and asked == ["a", "c"]


def test_adversarial_mix_refuses_hits_answers_wrapped_benign_and_renders(assistant):
    model, tok, world, _ = assistant
    goals = goals_of(world, "forbidden", "train", 3, 0) + goals_of(world, "secret", "train", 2, 0)
    hits = [(g, f"{g.request} zz qq") for g in goals]
    rows = adversarial_mix(world, hits, lambda request, i: f"Pretend. {request}", 0, n_benign=4)
    assert len(rows) == 9
    for r in rows:
        user, reply = r["messages"][-2]["content"], r["messages"][-1]["content"]
        render_conversation(tok, r["messages"])
        if user.endswith("zz qq"):
            assert reply == (SECRET_REFUSAL if r["messages"][0]["role"] == "system" else REFUSAL)
        else:
            assert user.startswith("Pretend. ") and reply not in (REFUSAL, SECRET_REFUSAL)


# ---- the stage -------------------------------------------------------------------------------------------------

def _config(cfg, tmp_path, **kw) -> redteam.Config:
    values = dict(checkpoint=cfg.sft.out_dir, world=cfg.world.out_dir, out_dir=str(tmp_path / "redteam"),
                  families="direct,roleplay,base64,gcg", n=6, gcg_train=3, gcg_steps=2, gcg_suffix_len=3,
                  gcg_candidates=8, gcg_topk=8, utility_n=4, max_new_tokens=8, threads=1)
    return redteam.Config(**{**values, **kw})


def test_redteam_writes_a_card_and_resumes_without_redoing_work(assistant, tmp_path):
    _, _, _, cfg = assistant
    rcfg = _config(cfg, tmp_path)
    summary = redteam.main(rcfg)
    rows = (tmp_path / "redteam" / "rows.jsonl").read_text().splitlines()
    # 2 defenses x 4 families x 2 goals, and each defense's utility
    assert len(rows) == 2 * 4 * 2 + 2
    for r in summary["rows"]:
        assert 0 <= r["hits"] <= r["n"] <= 6 and r["ci"][0] <= r["asr"] <= r["ci"][1]
    card_md = (tmp_path / "redteam" / "card.md").read_text()
    assert "| gcg | filter |" in card_md and "| direct | none |" in card_md
    again = redteam.main(rcfg)  # everything is read back: no new row, the same card
    assert (tmp_path / "redteam" / "rows.jsonl").read_text().splitlines() == rows
    assert again["rows"] == summary["rows"]
    assert json.loads((tmp_path / "redteam" / "card.json").read_text())["suffixes"]["forbidden"]["steps"] == 2


def test_redteam_bad_input_gives_clear_errors(assistant, tmp_path):
    _, _, _, cfg = assistant
    with pytest.raises(LLMLabError, match="pretrained base"):
        redteam.main(_config(cfg, tmp_path, checkpoint=cfg.pretrain.out_dir, families="direct"))
    with pytest.raises(LLMLabError, match="gcg_steps"):
        _config(cfg, tmp_path, gcg_steps=0)
    with pytest.raises(LLMLabError, match="families"):
        _config(cfg, tmp_path, families="direct,telepathy")
    with pytest.raises(LLMLabError, match="defenses"):
        _config(cfg, tmp_path, defenses="none,prayer")
    with pytest.raises(LLMLabError, match="no OpenAI-compatible server"):
        Served("http://127.0.0.1:9")
