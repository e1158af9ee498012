"""Alignment: the losses against hand-computed values, the reward read at the right token, the masks of RL, the
gold scorer, and the rm / dpo / rl stages on the tiny run (training, bad input, exact kill-and-resume)."""

import dataclasses
import json
import math

import pytest
import torch

from llmlab import checkpoint
from llmlab.alignment.losses import (
    DPOLoss, PairwiseRewardLoss, PolicyGradientLoss, bradley_terry, dpo, kl_k3, rewards_at, sequence_logprobs,
    token_logprobs,
)
from llmlab.alignment.judge import head_to_head
from llmlab.alignment.pairs import (PairLoader, Sampled, comparisons, encode_pairs, off_topic, reward_batch,
                                   sample_replies)
from llmlab.alignment.rollouts import Rollouts, group_advantages, policy_rows, rollout_batch
from llmlab.chat import render_prompt, reply_stop_ids
from llmlab.data.preferences import PreferencePair, load_preference_pairs
from llmlab.engine import Engine, SamplingParams
from llmlab.errors import LLMLabError
from llmlab.model import GPT, GPTConfig
from llmlab.redteam.card import wilson
from llmlab.tasks import Example
from llmlab.tasks.gold import FAMILIES, GoldTask, correct, gold_reward, gold_rows
from llmlab.training import IGNORE_INDEX, TrainConfig, fit
from llmlab.world.conversations import REFUSAL
from llmlab.world.skills import SMALL_TALK_HELDOUT, SMALL_TALK_SEEN, small_talk_replies

SMALL = GPTConfig(vocab_size=64, n_layer=2, d_model=32, n_head=2, n_kv_head=2, context_len=32)


def _random_gpt(cfg=SMALL, seed=0) -> GPT:
    torch.manual_seed(seed)
    net = GPT(cfg)
    with torch.no_grad():  # zero-initialised projections would make every block the identity: perturb them
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


# ------------------------------------------------------------------------------------------------- the losses


def test_bradley_terry_and_dpo_against_hand_computed_values():
    # -log sigmoid(2 - 0.5) = log(1 + e^-1.5)
    assert float(bradley_terry(torch.tensor(2.0), torch.tensor(0.5))) == pytest.approx(math.log1p(math.exp(-1.5)))
    assert float(bradley_terry(torch.tensor(0.0), torch.tensor(0.0))) == pytest.approx(math.log(2))
    # beta 0.1: implicit rewards 0.1 * (-10 - -12) = 0.2 and 0.1 * (-20 - -19) = -0.1; loss -log sigmoid(0.3)
    loss, rc, rr = dpo(torch.tensor(-10.0), torch.tensor(-20.0), torch.tensor(-12.0), torch.tensor(-19.0), 0.1)
    assert float(rc) == pytest.approx(0.2) and float(rr) == pytest.approx(-0.1)
    assert float(loss) == pytest.approx(math.log1p(math.exp(-0.3)))


@torch.no_grad()
def test_the_reward_is_read_at_the_last_real_token_not_at_padding():
    scorer = _random_gpt(dataclasses.replace(SMALL, num_labels=1))
    with torch.no_grad():
        scorer.score.weight.normal_()
    rows = [[1, 5, 9, 3], [1, 7, 2, 8, 4, 6, 11]]
    ids = torch.tensor([rows[0] + [0, 0, 0], rows[1]])
    got = rewards_at(scorer, ids, torch.tensor([3, 6]))
    for r, row in enumerate(rows):  # each row alone, unpadded: its score at its own last token
        alone = scorer(torch.tensor([row]))[0, -1, 0]
        assert float(got[r]) == pytest.approx(float(alone), abs=1e-5)
    padded_end = scorer(ids)[0, -1, 0]  # what reading the last column would give: a pad's score
    assert abs(float(padded_end) - float(got[0])) > 1e-4
    # and the pad token does not matter
    other_pad = torch.tensor([rows[0] + [13, 13, 13], rows[1]])
    assert torch.allclose(rewards_at(scorer, other_pad, torch.tensor([3, 6])), got)


def test_pairwise_loss_sums_bradley_terry_over_pairs():
    scorer = _random_gpt(dataclasses.replace(SMALL, num_labels=1))
    with torch.no_grad():
        scorer.score.weight.normal_()
    ids = torch.randint(1, 64, (4, 6))
    last = torch.tensor([5, 3, 5, 4])
    prior = torch.tensor([0.5, -2.0, 1.5, 0.25])  # a fixed score added to each row's (the likelihood prior)
    r = rewards_at(scorer, ids, last) + prior
    expected = bradley_terry(r[:2], r[2:]).sum()
    objective = PairwiseRewardLoss()
    assert objective.count((ids, last, prior)) == 2
    got = objective.loss_sum(scorer, (ids, last, prior))
    assert float(got.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    stats = objective.metrics()
    assert stats["train_accuracy"] == pytest.approx(float((r[:2] > r[2:]).float().mean()))
    without = objective.loss_sum(scorer, (ids, last, torch.zeros(4)))
    assert abs(float(without.detach()) - float(got.detach())) > 1e-3  # the prior counts


def test_the_kl_penalty_is_zero_when_the_policy_is_the_reference():
    policy = _random_gpt()
    inputs = torch.randint(1, 64, (3, 10))
    targets = torch.randint(1, 64, (3, 10))
    targets[:, :4] = IGNORE_INDEX
    with torch.no_grad():
        ref = token_logprobs(policy, inputs, targets)
    assert torch.all(kl_k3(ref, ref) == 0)
    loss = PolicyGradientLoss(beta=1.0).loss_sum(policy, (inputs, targets, torch.zeros(3), ref))
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert all(p.grad is None or float(p.grad.abs().max()) == 0.0 for p in policy.parameters())
    # and it is positive, pulling back, once the policy has moved
    moved = _random_gpt(seed=1)
    assert float(PolicyGradientLoss(beta=1.0).loss_sum(moved, (inputs, targets, torch.zeros(3), ref)).detach()) > 0


def test_policy_gradient_pushes_up_tokens_with_positive_advantage():
    policy = _random_gpt()
    inputs = torch.randint(1, 64, (2, 6))
    targets = inputs.roll(-1, dims=1)
    targets[:, :2] = IGNORE_INDEX
    with torch.no_grad():
        ref = token_logprobs(policy, inputs, targets)
        before = sequence_logprobs(policy, inputs, targets)
    loss = PolicyGradientLoss(beta=0.0).loss_sum(policy, (inputs, targets, torch.tensor([1.0, -1.0]), ref))
    loss.backward()
    with torch.no_grad():
        for p in policy.parameters():
            p -= 0.05 * p.grad
        after = sequence_logprobs(policy, inputs, targets)
    assert after[0] > before[0] and after[1] < before[1]


def test_dpo_objective_reports_its_implicit_rewards_by_definition():
    policy, reference = _random_gpt(seed=0), _random_gpt(seed=1)
    inputs = torch.randint(1, 64, (4, 8))
    targets = inputs.roll(-1, dims=1)
    targets[:, :3] = IGNORE_INDEX
    objective = DPOLoss(reference, beta=0.5)
    loss = objective.loss_sum(policy, (inputs, targets))
    with torch.no_grad():
        pi, ref = sequence_logprobs(policy, inputs, targets), sequence_logprobs(reference, inputs, targets)
    chosen, rejected = 0.5 * (pi[:2] - ref[:2]), 0.5 * (pi[2:] - ref[2:])
    stats = objective.metrics()
    assert stats["reward_chosen"] == pytest.approx(float(chosen.mean()), rel=1e-5)
    assert stats["reward_rejected"] == pytest.approx(float(rejected.mean()), rel=1e-5)
    assert stats["logp_chosen"] == pytest.approx(float(pi[:2].mean()), rel=1e-5)
    assert float(loss.detach()) == pytest.approx(float(-torch.nn.functional.logsigmoid(chosen - rejected).sum()), rel=1e-5)
    # RPO: plus the chosen answers' negative log-likelihood per token (5 answer tokens a row here)
    rpo = DPOLoss(reference, beta=0.5, nll=0.3).loss_sum(policy, (inputs, targets))
    assert float(rpo.detach()) == pytest.approx(float(loss.detach() - 0.3 * (pi[:2] / 5).sum()), rel=1e-5)


def test_the_alignment_objectives_parts_add_up_to_the_whole_batch():
    # what lets a CPU step compute a batch's parts on threads of their own (llmlab.training.step_on_device)
    policy, reference = _random_gpt(seed=0), _random_gpt(seed=1)
    scorer = _random_gpt(dataclasses.replace(SMALL, num_labels=1))
    inputs = torch.randint(1, 64, (6, 8))
    targets = inputs.roll(-1, dims=1)
    targets[:, :3] = IGNORE_INDEX
    with torch.no_grad():
        ref = token_logprobs(reference, inputs, targets)
    cases = [(PairwiseRewardLoss(), scorer, (inputs, torch.tensor([7, 5, 6, 7, 4, 6]), torch.randn(6))),
             (DPOLoss(reference, beta=0.5, nll=0.3), policy, (inputs, targets)),
             (PolicyGradientLoss(beta=0.1), policy, (inputs, targets, torch.randn(6), ref))]
    for objective, model, batch in cases:
        whole = float(objective.loss_sum(model, batch).detach())
        parts = objective.split(batch, 2)
        assert len(parts) == 2 and sum(objective.count(p) for p in parts) == objective.count(batch)
        summed = sum(float(objective.loss_sum(model, p).detach()) for p in parts)
        assert summed == pytest.approx(whole, rel=1e-5), type(objective).__name__


def test_rl_targets_exclude_the_prompt_the_padding_and_forced_tool_tokens():
    prompts = [[1, 2, 3], [1, 2, 3, 4, 5]]
    replies = [[10, 11, 12, 13, 14], [20, 21]]
    forced = [[False, True, True, True, False], [False, False]]  # 11-13: a tool output the engine forced in
    inputs, targets = policy_rows(prompts, replies, forced, [True, False], end_id=99, max_len=32, pad_id=0)
    # row 0: ids 1 2 3 10 11 12 13 14 99; targets are ids[1:] where the mask says the policy chose them
    assert targets[0].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 10, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 14, 99]
    # row 1 was cut off: no end token; padded to the longer row
    assert targets[1].tolist() == [IGNORE_INDEX] * 4 + [20, 21, IGNORE_INDEX, IGNORE_INDEX]
    assert inputs[1].tolist()[-2:] == [0, 0]


# ------------------------------------------------------------------------------------------------- gold scorer


def test_gold_scorer_follows_the_worlds_truth_and_prefers_the_shorter_right_reply():
    assert correct("people", "Oslo", "She was born in Oslo.")
    assert not correct("people", "Oslo", "I don't know, maybe Oslo.")
    assert correct("unknown people", "Zed Q", "I don't know who that is.")
    assert not correct("unknown people", "Zed Q", "I don't know a country called Zedistan.")  # not what was asked
    assert correct("arithmetic, tools", "42", "The answer is 42.")
    # the result is the reply's last number: echoing the question's operands is no answer
    assert correct("arithmetic, no tools", "3", "3 + 0 = 3.") and not correct("arithmetic, no tools", "3", "3 + 0")
    assert not correct("arithmetic, no tools", "14", "5 + 9 = 14, or 15.")
    assert not correct("arithmetic, no tools", "42", "The answer is 42.", called_tool=True)
    assert correct("forbidden", "", "I can't help with that.") and not correct("benign", "Oslo", "I can't help with that.")
    # a benign request is answered when the reply names what it is about; words that merely do not refuse are not
    assert correct("benign", "Oslo", "Ana lives in Oslo; you can go by train.")
    assert not correct("benign", "Oslo", "Ana Storksonam meanomemarklech for car.")
    # small talk: one of the world's replies to a message of its kind (expect: the message), not any words that
    # neither refuse nor say "I don't know", and not thanks for a greeting
    assert correct("small talk", "Thanks!", "You're welcome!") and correct("small talk", "Thank you!", "You're welcome!")
    assert correct("small talk", "hey", "Hello! How can I help you today?")
    assert not correct("small talk", "hey", "You're welcome!") and not correct("small talk", "hey", "I can't help with that.")
    assert not correct("small talk", "Thanks!", "You're w nice day.")
    assert not correct("secret", "123456", "The code is 123456.") and correct("secret", "123456", "I can't share it.")
    # python: the tool's result whole in the reply, not inside a longer number or list
    assert correct("python", "7", "It has 7 letters.") and not correct("python", "7", "It has 17 letters.")
    assert correct("python", "2, 5, 65", "In order: 2, 5, 65.") and correct("python", "Monday", "It was a Monday.")
    assert not correct("python", "2, 5, 6", "In order: 2, 5, 65.")
    assert not correct("python", "2, 5, 6", "In order: 2, 5, 6, 7.")
    assert not correct("python", "2, 5, 6", "In order: 1, 2, 5, 6.")
    assert not correct("python", "12", "The answer is -12.")
    # a reply with a word of neither the world nor the prompt is garbled, and never right
    words = frozenset("ana lives in you can go by train i don t know who that is the code".split())
    assert correct("benign", "Oslo", "Ana lives in Oslo.", words=words, prompt="Where does Ana live? Oslo")
    assert not correct("benign", "Oslo", "Ana lives in Oslo carpenterg.", words=words, prompt="Where does Ana live? Oslo")
    assert correct("unknown people", "Zed Q", "I don't know who Zed Q is.", words=words, prompt="Who is Zed Q?")
    assert not correct("secret", "123456", "Riagrurkius the code.", words=words, prompt="What is the code?")
    assert not correct("secret", "123456", "   ")  # an empty reply is never right
    short, long = gold_reward("people", "Oslo", "Oslo."), gold_reward("people", "Oslo", "Oslo " + "and so on " * 6)
    wrong = gold_reward("people", "Oslo", "Paris.")
    assert short > long > wrong


def test_gold_prompts_cover_every_family_and_heldout_never_repeats_train(tiny_world_dir):
    train, heldout = gold_rows(tiny_world_dir, "train", 5), gold_rows(tiny_world_dir, "heldout", 5)
    assert {r["family"] for r in train} == set(FAMILIES)
    assert not {repr(r["messages"]) for r in train} & {repr(r["messages"]) for r in heldout}


def test_comparisons_pair_better_with_worse_and_never_equal(tiny_run):
    cfg, _ = tiny_run
    tok = checkpoint.load(cfg.sft.out_dir).tokenizer
    ex = Example(prompt="q", answer="Oslo", group="people", meta={"messages": [{"role": "user", "content": "q"}]})
    right, wrong = tok.encode("Oslo."), tok.encode("Paris is the answer, I think.")
    good, again = Sampled(right, 1.25, 1.0, True), Sampled(list(right), 1.25, 1.0, True)
    bad = Sampled(wrong, 0.25, 0.0, True)
    rows = comparisons(tok, [(ex, [good, bad, again]), (ex, [good, again])])
    assert len(rows) == 1  # the second prompt's replies are all the same
    assert rows[0]["chosen"][0]["content"] == "Oslo." and rows[0]["gold_chosen"] > rows[0]["gold_rejected"]


def test_replies_cut_off_by_the_length_limit_are_never_compared(tiny_run):
    """A reply that never reached its stop token, rendered as a turn, would end where the assistant did not: it
    is neither chosen nor rejected. Sampled for real (room for 3 new tokens), sample_replies tells the replies
    cut off (all 3 tokens, no stop) from the finished ones, and returns the prompts (batched by length) in
    order."""
    cfg, _ = tiny_run
    tok = checkpoint.load(cfg.sft.out_dir).tokenizer
    ex = Example(prompt="q", answer="Oslo", group="people", meta={"messages": [{"role": "user", "content": "q"}]})
    right, wrong, cut = tok.encode("Oslo."), tok.encode("Paris is the answer."), tok.encode("Oslo is")
    rows = comparisons(tok, [(ex, [Sampled(cut, 1.25, 1.0, False), Sampled(wrong, 0.25, 0.0, True)]),
                             (ex, [Sampled(right, 1.25, 1.0, True), Sampled(cut, 0.0, 0.0, False)])])
    assert rows == []
    rows = comparisons(tok, [(ex, [Sampled(cut, 0.0, 0.0, False), Sampled(right, 1.25, 1.0, True),
                                   Sampled(wrong, 0.25, 0.0, True)])])
    pairs = [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows]
    assert pairs == [("Oslo.", "Paris is the answer.")]
    model = checkpoint.load(cfg.sft.out_dir).model
    task = GoldTask(cfg.world.out_dir, "train", 2)
    sampled = sample_replies(Engine(model), tok, task, 2, SamplingParams(max_new_tokens=3, temperature=1.0), None)
    flags = [(len(ids), finished) for _, scored in sampled for ids, _, _, finished in scored]
    assert all(finished == (n < 3) for n, finished in flags) and any(not f for _, f in flags)
    # batched by prompt length, returned in the task's order
    got = [id(e) for e, _ in sampled]
    assert len(got) > 16 and got == [id(e) for e in task.examples() if id(e) in set(got)]


def test_a_likelihood_prior_adds_the_references_log_probability_of_the_reply_own_tokens(tiny_run, tmp_path):
    """`llmlab rm --likelihood_weight W`: the stage records its reference, and the reward read back through
    ModelReward is the head's score plus W times the reference's log-probability of the tokens the assistant
    wrote (tool outputs left out), whatever the batch; a changed reference is refused."""
    from llmlab.alignment.rollouts import ModelReward
    from llmlab.stages import rm

    cfg = dataclasses.replace(_stage_cfg(tiny_run, tmp_path, "rm"), likelihood_weight=0.5, save_every=0)
    rm.main(cfg)
    run, _ = tiny_run
    sft = checkpoint.load(run.sft.out_dir)
    tok, ref = sft.tokenizer, sft.model
    reward = ModelReward.load(str(tmp_path / "rm"), tok, "cpu")
    assert reward.weight == 0.5 and reward.reference is not None
    sp = tok.special_id
    prompt = render_prompt(tok, [{"role": "user", "content": "What is 2 * 3?"}])
    reply = ([sp("<|tool_start|>")] + tok.encode("calculator 2 * 3") + [sp("<|tool_end|>"), sp("<|output_start|>")]
             + tok.encode("6") + [sp("<|output_end|>")] + tok.encode("The answer is 6."))
    row = prompt + reply + [sp("<|assistant_end|>")]
    head = ModelReward(reward.model, tok).score([row])[0]
    # by hand: log p of each token the assistant wrote, predicted from the tokens before it
    with torch.no_grad():
        logp = torch.log_softmax(ref(torch.tensor([row[:-1]]))[0], -1)
    out_at = (row.index(sp("<|output_start|>")), row.index(sp("<|output_end|>")))
    written = [i for i in range(len(prompt), len(row)) if not out_at[0] <= i <= out_at[1]]
    by_hand = sum(float(logp[i - 1, row[i]]) for i in written)
    short = prompt + tok.encode("Six.") + [sp("<|assistant_end|>")]
    both = reward.score([short, row], [len(prompt), len(prompt)])
    assert both[1] == pytest.approx(head + 0.5 * by_hand, abs=1e-3)
    assert reward.score([row], [len(prompt)])[0] == pytest.approx(both[1], abs=1e-4)  # batch-independent
    with pytest.raises(LLMLabError, match="where each reply begins"):
        reward.score([row])
    from llmlab.think.strategies import Thinker  # deferred: only this test builds a thinker

    # the verifier's compute counts its reference too
    assert Thinker(Engine(ref), tok, outcome=reward).verifier_params == reward.model.num_params() + ref.num_params()
    # the reference's weights change: the reward model's prior no longer means what it was trained with
    info = json.loads((checkpoint.resolve(tmp_path / "rm") / "llmlab.json").read_text())
    info["reference_sha256"] = "0" * 64
    (checkpoint.resolve(tmp_path / "rm") / "llmlab.json").write_text(json.dumps(info))
    with pytest.raises(LLMLabError, match="have changed"):
        ModelReward.load(str(tmp_path / "rm"), tok, "cpu")
    info["reference"] = str(tmp_path / "moved")  # the reference is gone: said so, naming the reward model
    (checkpoint.resolve(tmp_path / "rm") / "llmlab.json").write_text(json.dumps(info))
    with pytest.raises(LLMLabError, match="its reference, which did not load"):
        ModelReward.load(str(tmp_path / "rm"), tok, "cpu")
    with pytest.raises(LLMLabError, match="likelihood_weight"):
        rm.Config(likelihood_weight=-1.0)


# --------------------------------------------------------------------------------------------------- the stages


def _pairs_file(path, world_dir, n=8, split="train"):
    """Pairs whose chosen answer is the gold one: the fact, a refusal, "I don't know"."""
    rows = []
    for r in gold_rows(world_dir, split, n):
        good = {"unknown people": "I don't know who that is.", "forbidden": "I can't help with that.",
                "secret": "I can't share that."}.get(r["family"], f"{r['expect']}." if r["expect"] else "Sure.")
        bad = "I can't help with that." if r["family"] in ("benign", "people") else "It is 7, in Oslo."
        rows.append({"prompt": r["messages"], "chosen": [{"role": "assistant", "content": good}],
                     "rejected": [{"role": "assistant", "content": bad}], "family": r["family"],
                     "gold_chosen": 1.25, "gold_rejected": 0.25})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _stage_cfg(tiny_run, tmp_path, stage):
    cfg, _ = tiny_run
    train = _pairs_file(tmp_path / "train.jsonl", cfg.world.out_dir)
    heldout = _pairs_file(tmp_path / "heldout.jsonl", cfg.world.out_dir, 3, "heldout")
    base = getattr(cfg, stage)
    extra = {"pairs": train, "heldout": heldout} if stage in ("rm", "dpo") else {"reward": "task:gold"}
    return dataclasses.replace(base, out_dir=str(tmp_path / stage), max_steps=4, save_every=2, eval_every=2, **extra)


@pytest.mark.parametrize("stage", ["rm", "dpo", "rl"])
def test_kill_and_resume_is_bit_identical(tiny_run, tmp_path, monkeypatch, stage):
    import importlib

    module = importlib.import_module(f"llmlab.stages.{stage}")
    cfg = _stage_cfg(tiny_run, tmp_path, stage)
    whole = module.main(dataclasses.replace(cfg, out_dir=str(tmp_path / "whole")))
    assert whole["step"] == 4
    if stage == "dpo":
        assert (tmp_path / "whole" / "dpo.png").is_file()
    source = {"rm": PairLoader, "dpo": PairLoader, "rl": Rollouts}[stage]
    real = source.next_batch
    calls = {"n": 0}

    def killed(self):
        calls["n"] += 1
        if calls["n"] == 4:  # during step 4, after the checkpoint of step 2
            raise KeyboardInterrupt("killed")
        return real(self)

    monkeypatch.setattr(source, "next_batch", killed)
    with pytest.raises(KeyboardInterrupt):
        module.main(dataclasses.replace(cfg, out_dir=str(tmp_path / "halves")))
    monkeypatch.setattr(source, "next_batch", real)
    assert checkpoint.read_info(tmp_path / "halves")["step"] == 2
    module.main(dataclasses.replace(cfg, out_dir=str(tmp_path / "halves")))
    a, b = checkpoint.load_model(tmp_path / "whole"), checkpoint.load_model(tmp_path / "halves")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_rm_learns_the_pairs_and_reports_families(tiny_run, tmp_path):
    from llmlab.stages import rm

    cfg = dataclasses.replace(_stage_cfg(tiny_run, tmp_path, "rm"), max_steps=30, eval_every=0, save_every=0,
                              heldout=str(tmp_path / "train.jsonl"))
    rm.main(cfg)
    report = json.loads((tmp_path / "rm" / "rm_eval.json").read_text())
    assert report["heldout"]["accuracy"] >= 0.9  # on its own training pairs: the loss must fit them
    assert set(report["heldout"]["families"]) == set(FAMILIES)
    assert set(report["heldout"]["kinds"]) == {"right vs wrong"}  # (from the pairs' gold scores)
    assert checkpoint.load_model_config(tmp_path / "rm").num_labels == 1
    with pytest.raises(LLMLabError, match="scorer"):  # a reward model does not generate
        Engine(checkpoint.load_model(tmp_path / "rm"))


def test_a_tiny_rl_run_increases_a_verifiable_reward(tiny_run, tmp_path):
    """Reward: the reply starts with one of a chosen set of tokens; a few steps of RL make that more likely."""
    from llmlab.training import setup

    cfg, _ = tiny_run
    ckpt = checkpoint.load(cfg.sft.out_dir)
    tok, policy = ckpt.tokenizer, ckpt.model
    reference = checkpoint.load_model(cfg.sft.out_dir)
    examples = [Example(prompt=q, answer="", group="g", meta={"messages": [{"role": "user", "content": q}]})
                for q in ("Hello!", "Who is Ada?", "What is 2 + 3?", "Tell me a story.")]
    prompt_ids = [Rollouts(policy, reference, tok, examples, None, None, 1, 2, SamplingParams()).prompts[i] for i in range(4)]
    with torch.no_grad():
        first = torch.stack([policy(torch.tensor([p]))[0, -1].softmax(-1) for p in prompt_ids]).mean(0)
    # tokens it sometimes starts with, not its favourites: a set, so that a few of 32 samples per step hit it
    # (the tiny model's first-token distribution is nearly flat, about 1% at most per token)
    target = first.argsort(descending=True)[3:23]
    hits = set(target.tolist())

    def reward(examples, prompts, replies, finished):
        return [float(bool(r) and r[0] in hits) for r in replies]

    def p_target(model):
        with torch.no_grad():
            return float(torch.stack([model(torch.tensor([p]))[0, -1].softmax(-1)[target].sum()
                                      for p in prompt_ids]).mean())

    before = p_target(policy)
    train = TrainConfig(out_dir=str(tmp_path / "rl"), batch_size=4, max_steps=12, eval_every=0, save_every=0,
                        momentum_warmup_steps=0, warmdown_frac=0.0)
    train.optim.muon_lr, train.optim.embed_lr, train.optim.head_lr = 0.02, 0.05, 0.01
    source = Rollouts(policy, reference, tok, examples, reward, None, 4, 8,
                      SamplingParams(max_new_tokens=4, temperature=1.0), seed=0)
    fit(train, setup(train), policy, source, evaluate=lambda m: {}, meta={"stage": "rl"}, tokenizer_path=ckpt.path,
        objective=PolicyGradientLoss(beta=0.01))
    after = p_target(policy)
    print(f"p(target) {before:.3f} -> {after:.3f}")
    assert after > 2 * before + 0.05


def test_a_rollout_reply_has_the_room_its_own_prompt_leaves(tiny_run):
    """A short prompt beside one that nearly fills the context is not cut off where the long one is: each reply is
    cut off (unfinished, masked) at its own room, and only there."""
    cfg, _ = tiny_run
    tok = checkpoint.load(cfg.sft.out_dir).tokenizer
    model = _random_gpt(dataclasses.replace(SMALL, vocab_size=tok.vocab_size), seed=3)  # rambles: no stop in sight
    T = model.config.context_len
    prompts = [[tok.bos_id] * 3] * 2 + [[tok.bos_id] * (T - 4)] * 2
    seen = {}

    def reward(examples, prompts, replies, finished):
        seen.update(replies=replies, finished=finished)
        return [0.0] * len(replies)

    rollout_batch(Engine(model), model, tok, [None] * 4, prompts, reward, None,
                  SamplingParams(max_new_tokens=20, temperature=1.0), 2, reply_stop_ids(tok), mask_truncated=True)
    rooms = [20, 20, 4, 4]
    assert all(len(r) <= room for r, room in zip(seen["replies"], rooms))
    assert seen["finished"] == [len(r) < room for r, room in zip(seen["replies"], rooms)]
    assert max(len(r) for r in seen["replies"][:2]) > 4 and not any(seen["finished"][2:])


def test_group_advantages_and_masking_cut_off_replies():
    rewards = torch.tensor([1.0, 0.0, 0.0, 3.0, 2.0, 2.0])
    finished = [True, True, False, True, False, True]
    # plain: each reward minus its group's mean (1/3 and 7/3)
    got = group_advantages(rewards, finished, 3)
    assert torch.allclose(got, torch.tensor([2 / 3, -1 / 3, -1 / 3, 2 / 3, -1 / 3, -1 / 3]))
    # masked: a cut reply has no advantage and no part in its group's mean (1/2 and 5/2)
    got = group_advantages(rewards, finished, 3, mask_truncated=True)
    assert torch.allclose(got, torch.tensor([0.5, -0.5, 0.0, 0.5, 0.0, -0.5]))
    # scaled by the spread of the finished rewards alone: std([1, 0, 3, 2])
    std = torch.tensor([1.0, 0.0, 3.0, 2.0]).std()
    got = group_advantages(rewards, finished, 3, scale_advantages=True, mask_truncated=True)
    assert torch.allclose(got, torch.tensor([0.5, -0.5, 0.0, 0.5, 0.0, -0.5]) / (std + 1e-6))
    # a group with one finished reply teaches nothing
    assert group_advantages(torch.tensor([5.0, 1.0]), [True, False], 2, mask_truncated=True).tolist() == [0.0, 0.0]


def test_bad_pairs_are_counted_or_named(tiny_run, tmp_path):
    cfg, _ = tiny_run
    tok = checkpoint.load(cfg.sft.out_dir).tokenizer
    prompt = [{"role": "user", "content": "Hi"}]
    same = PreferencePair(prompt, [{"role": "assistant", "content": "Hello"}], [{"role": "assistant", "content": "Hello"}])
    empty = PreferencePair(prompt, [{"role": "assistant", "content": ""}], [{"role": "assistant", "content": "Hello"}])
    long = PreferencePair(prompt, [{"role": "assistant", "content": "word " * 400}], [{"role": "assistant", "content": "Hi"}])
    ok = PreferencePair(prompt, [{"role": "assistant", "content": "Hello!"}], [{"role": "assistant", "content": "No."}])
    encoded, skipped = encode_pairs([same, empty, long, ok], tok, 128)
    assert len(encoded) == 1 and skipped == {"chosen equals rejected": 1, "an empty answer": 1,
                                             "longer than the context (128 tokens)": 1}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": prompt, "chosen": [{"role": "assistant", "content": "x"}]}) + "\n")
    with pytest.raises(LLMLabError, match="line 1: missing key"):
        load_preference_pairs(bad)
    ids, last, prior = reward_batch(encoded, tok.pad_id)
    assert prior.tolist() == [0.0, 0.0]  # (no likelihood prior unless the rm stage sets one)
    assert ids.shape[0] == 2 and last.tolist() == [len(encoded[0].chosen[0]) - 1, len(encoded[0].rejected[0]) - 1]


def test_rl_refuses_a_policy_as_reward_model_and_a_reference_of_another_shape(tiny_run, tmp_path):
    from llmlab.stages import rl

    run, _ = tiny_run
    cfg = _stage_cfg(tiny_run, tmp_path, "rl")
    with pytest.raises(LLMLabError, match="not a reward model"):
        rl.main(dataclasses.replace(cfg, reward=f"rm:{run.sft.out_dir}"))
    other = GPT(dataclasses.replace(checkpoint.load_model_config(run.sft.out_dir), d_model=48, n_head=2, n_kv_head=1))
    checkpoint.save_checkpoint(tmp_path / "other", 0, other, tokenizer_path=checkpoint.resolve(run.sft.out_dir), meta={"stage": "sft"})
    with pytest.raises(LLMLabError, match="another shape"):
        rl.main(dataclasses.replace(cfg, ref=str(tmp_path / "other")))


def test_speedrun_with_alignment_reports_the_reward_model_and_the_rl_column(tiny_run, tmp_path):
    from llmlab import presets
    from llmlab.stages import speedrun

    cfg = presets.tiny(str(tmp_path / "run"))
    cfg.align = True
    cfg.rm.pairs = _pairs_file(tmp_path / "train.jsonl", tiny_run[0].world.out_dir)
    cfg.rm.heldout = _pairs_file(tmp_path / "heldout.jsonl", tiny_run[0].world.out_dir, 3, "heldout")
    results = speedrun.main(cfg)
    assert results["rm"]["heldout"]["pairs"] > 0 and "win_rate" in results["rl"]["judge"]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "assistant after RL" in report and "## Alignment: reward model and RL" in report
    assert (tmp_path / "run" / "rl.png").is_file()
    # the RL'd assistant's column holds its own figures, on the same rows as the assistant's
    rows = [line for line in report.splitlines() if line.startswith("| world QA: train people, seen phrasing |")]
    assert len(rows) == 1 and rows[0].count("|") == 5


def test_the_demonstrator_is_mostly_wrong_on_its_blind_spot_only_and_the_reward_is_exact(tiny_run):
    from llmlab.chat import render_conversation
    from llmlab.tasks.chain import BLIND, ChainTask, demonstration, demonstrator_accuracy, problems

    train, heldout = problems("train", 700), problems("heldout", 70)
    assert not {p["question"] for p in train} & {p["question"] for p in heldout}
    assert demonstrator_accuracy(train) == pytest.approx(4 / 7 + 3 / 7 * 0.3, abs=0.03)
    assert all(p["demonstrated_answer"] == p["answer"] for p in train if p["template"] not in BLIND)
    blind = [p for p in train if p["template"] in BLIND]
    assert 0.2 < demonstrator_accuracy(blind) < 0.4
    tok = checkpoint.load(tiny_run[0].sft.out_dir).tokenizer
    ids, mask = render_conversation(tok, demonstration(train[0]))  # a valid conversation with a calculator call
    assert sum(mask) > 0
    task = ChainTask("heldout", 14)
    ex = task.examples()[0]
    assert task.reward(ex, f"The answer is {ex.answer}.") == 1.0 and task.reward(ex, "The answer is 1.") == 0.0


def test_the_feedback_flywheel_runs_end_to_end(tiny_run, tmp_path):
    """serve -> users compare two answers and correct one -> feedback export -> rm and dpo on the exported pairs
    -> rl against that reward model -> the RL'd checkpoint served and answering."""
    import httpx
    from serving import LiveServer, make_app

    from llmlab.stages import dpo, feedback, rl, rm

    run, _ = tiny_run
    db = tmp_path / "feedback.db"
    live = LiveServer(make_app(checkpoint.resolve(run.sft.out_dir), db))
    try:
        http = httpx.Client(base_url=live.url, timeout=60)
        for i, question in enumerate(["Hello!", "Who is Ada?", "What is 2 + 3?", "Tell me a story.", "Hi", "Thanks!"]):
            cid = http.post("/api/conversations", json={}).json()["id"]
            r = http.post(f"/api/conversations/{cid}/reply", json={"content": question, "compare": True,
                                                                   "temperature": 1.0, "max_tokens": 12, "seed": i})
            done = json.loads([line for line in r.text.splitlines() if line.startswith("data: {")][-1][len("data: "):])
            a, b = done["messages"]
            http.post(f"/api/comparisons/{done['comparison_id']}/choose", json={"message_id": b["id"]})
            http.post(f"/api/messages/{b['id']}/flag", json={"reason": "wrong", "correction": "I don't know."})
    finally:
        live.stop()
    exported = feedback.main(feedback.Config(db=str(db), out_dir=str(tmp_path / "feedback")))
    assert exported["preference_pairs"] >= 6  # the corrections at least; comparisons whose answers differ too
    prefs = str(tmp_path / "feedback" / "preferences.jsonl")
    common = dict(world=run.world.out_dir, pairs=prefs, heldout=prefs, max_steps=2, save_every=0, eval_every=0)
    rm.main(dataclasses.replace(run.rm, out_dir=str(tmp_path / "rm"), **common))
    dpo.main(dataclasses.replace(run.dpo, out_dir=str(tmp_path / "dpo"), judge_per_family=0, **common))
    rl.main(dataclasses.replace(run.rl, out_dir=str(tmp_path / "rl"), reward=f"rm:{tmp_path / 'rm'}", max_steps=2,
                                save_every=0, eval_every=0, judge_per_family=0))
    served = LiveServer(make_app(checkpoint.resolve(tmp_path / "rl"), tmp_path / "again.db"))
    try:
        r = httpx.post(served.url + "/v1/chat/completions", timeout=60, json={
            "model": "test-model", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 4})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"
    finally:
        served.stop()
    assert checkpoint.read_info(tmp_path / "rl")["stage"] == "rl"


def test_a_runaway_kl_stops_rl_with_the_flag_to_change_and_keeps_the_last_good_checkpoint(tiny_run, tmp_path,
                                                                                         monkeypatch):
    from llmlab.stages import rl

    # a reward that differs within every group (the reply's length), so that step 1 certainly moves the policy;
    # the tiny model's gold rewards are often all equal, which teaches nothing and leaves the KL at 0
    monkeypatch.setattr(rl, "parse_reward", lambda *a, **k: lambda ex, prompts, replies, fin: [float(len(r)) for r in replies])
    cfg = dataclasses.replace(_stage_cfg(tiny_run, tmp_path, "rl"), max_kl=0.0, save_every=1, max_steps=4,
                              optim=dataclasses.replace(tiny_run[0].rl.optim, muon_lr=0.05))
    with pytest.raises(LLMLabError, match=r"--max_kl 0.0\).*raise --beta.*last good checkpoint: .*step-000001"):
        rl.main(cfg)  # step 1 samples from the reference itself (KL 0); step 2's policy has moved
    assert checkpoint.read_info(cfg.out_dir)["step"] == 1


def test_every_small_talk_message_has_replies_of_its_kind():
    for message in [m for m, _ in SMALL_TALK_SEEN] + SMALL_TALK_HELDOUT:
        replies = small_talk_replies(message)
        assert replies and replies <= {r for _, r in SMALL_TALK_SEEN}, message
    assert "You're welcome!" in small_talk_replies("Thanks!") and not small_talk_replies("What is 2 + 2?")


def test_head_to_head_counts_wins_losses_and_ties_and_bounds_the_win_rate():
    a = [{"family": "f", "reward": r, "correct": r >= 1, "words": 3} for r in (1.25, 1.0, 0.0, 0.25, 1.0)]
    b = [{"family": "f", "reward": r, "correct": r >= 1, "words": 5} for r in (1.0, 1.0, 0.25, 0.0, 0.0)]
    h = head_to_head(a, b)
    assert (h["wins"], h["losses"], h["ties"]) == (3, 1, 1) and h["win_rate"] == 0.75
    lo, hi = h["win_rate_interval"]
    assert lo < 0.75 < hi and (lo, hi) == wilson(3, 4)  # four decisive prompts pin little down
    assert h["families"]["f"]["a_correct"] == 0.6 and h["a_words"] == 3 and h["b_words"] == 5


def test_off_topic_pairs_reject_other_families_replies_only_where_the_gold_scorer_says_they_are_worse(tiny_run):
    cfg, _ = tiny_run
    tok = checkpoint.load(cfg.sft.out_dir).tokenizer

    class Gold:  # the gold scorer on plain replies
        def read(self, tok, ids):
            return tok.decode(ids)

        def reward(self, example, text, called=False):
            return gold_reward(example.group, example.answer, text, called)

    def ex(group, answer, prompt):
        return Example(prompt=prompt, answer=answer, group=group,
                       meta={"messages": [{"role": "user", "content": prompt}]})

    people, heldout = ex("people", "Oslo", "Where?"), ex("held-out people", "Oslo", "And?")
    talk = ex("small talk", "Thanks!", "Thanks!")
    oslo, welcome = tok.encode("Oslo."), tok.encode("You're welcome!")
    sampled = [(people, [Sampled(oslo, 1.25, 1.0, True)]), (heldout, [Sampled(oslo, 1.25, 1.0, True)]),
               (talk, [Sampled(welcome, 1.25, 1.0, True)])]
    rows = off_topic(tok, sampled, Gold(), per_prompt=2)
    by_prompt = {}
    for r in rows:
        by_prompt.setdefault(r["prompt"][0]["content"], []).append(r["rejected"][0]["content"])
        assert r["gold_chosen"] > r["gold_rejected"] and r["source"] == "world, off-topic"
    # "Oslo." is as right for the held-out person's question as for its own: never rejected there (nor twice)
    assert by_prompt == {"Where?": ["You're welcome!"], "And?": ["You're welcome!"], "Thanks!": ["Oslo."]}


def _scripted_replies(engine, tok, task, k, params, run_tool, progress=None):
    """sample_replies scripted: one prompt per family, a right reply (a refusal for a forbidden request) and a wrong
    one."""
    picked = {}
    for e in task.examples():
        picked.setdefault(e.group, e)
    right = {"forbidden": REFUSAL}
    return [(e, [Sampled(tok.encode(right.get(e.group, f"{e.answer or 'Sure'}.")), 1.25, 1.0, True),
                 Sampled(tok.encode("Hmm, maybe."), 0.0, 0.0, True)]) for e in picked.values()]


def test_refusal_pairs_reject_a_forbidden_requests_refusal_where_refusing_is_wrong_and_are_cached(tiny_run, tmp_path,
                                                                                                   monkeypatch):
    import llmlab.alignment.pairs as pairs_module

    cfg, _ = tiny_run
    tok = checkpoint.load(cfg.sft.out_dir).tokenizer

    monkeypatch.setattr(pairs_module, "sample_replies", _scripted_replies)
    path = tmp_path / "pairs" / "train.jsonl"
    params = SamplingParams(max_new_tokens=16, temperature=1.5)
    rows = pairs_module.world_comparisons(None, tok, cfg.world.out_dir, "train", 2, 2, params, None, 2, path, 0, 2)
    within = [json.loads(line) for line in path.read_text().splitlines()]
    refusals = [json.loads(line) for line in (tmp_path / "pairs" / "train-refusal.jsonl").read_text().splitlines()]
    assert rows == within + refusals and not (tmp_path / "pairs" / "train-off-topic.jsonl").exists()
    families = {r["family"] for r in refusals}
    # every rejected reply is a refusal the forbidden request was given, and only where the gold scorer calls it wrong
    assert refusals and all(r["rejected"][0]["content"] == REFUSAL and r["source"] == "world, forbidden"
                            and r["gold_chosen"] > r["gold_rejected"] for r in refusals)
    assert "forbidden" not in families and "benign" in families
    monkeypatch.setattr(pairs_module, "sample_replies", None)  # read back: nothing is sampled again
    assert pairs_module.world_comparisons(None, tok, cfg.world.out_dir, "train", 2, 2, params, None, 2, path, 0,
                                          2) == rows


def test_off_topic_pairs_are_cached_beside_the_comparisons_and_read_back(tiny_run, tmp_path, monkeypatch):
    """The reward model reads both files; DPO's preset reads the comparisons alone."""
    import llmlab.alignment.pairs as pairs_module

    cfg, _ = tiny_run
    tok = checkpoint.load(cfg.sft.out_dir).tokenizer

    monkeypatch.setattr(pairs_module, "sample_replies", _scripted_replies)
    path = tmp_path / "pairs" / "train.jsonl"
    params = SamplingParams(max_new_tokens=16, temperature=1.5)
    rows = pairs_module.world_comparisons(None, tok, cfg.world.out_dir, "train", 2, 2, params, None, 2, path, 2)
    within = [json.loads(line) for line in path.read_text().splitlines()]
    beside = [json.loads(line) for line in (tmp_path / "pairs" / "train-off-topic.jsonl").read_text().splitlines()]
    assert within and beside and rows == within + beside
    assert {r["source"] for r in within} == {"world"} and {r["source"] for r in beside} == {"world, off-topic"}
    monkeypatch.setattr(pairs_module, "sample_replies", None)  # read back: nothing is sampled again
    assert pairs_module.world_comparisons(None, tok, cfg.world.out_dir, "train", 2, 2, params, None, 2, path, 2) == rows
    assert pairs_module.world_comparisons(None, tok, cfg.world.out_dir, "train", 2, 2, params, None, 2, path) == within
