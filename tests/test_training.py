"""The shared training loop and its pieces: accumulation equals one big batch; bits per byte is the right
arithmetic; fit resumes exactly, stops on a NaN loss keeping the last good checkpoint, refuses meaningless numbers."""

import math
from contextlib import nullcontext

import pytest
import torch

from llmlab import checkpoint
from llmlab.errors import LLMLabError
from llmlab.model import GPT, GPTConfig
from llmlab.optim import OptimConfig, build_optimizers
from llmlab.training import (IGNORE_INDEX, MetricsLog, TokenCrossEntropy, TrainConfig, evaluate_bpb, fit,
                             read_metrics, setup, split_pairs, split_rows, token_losses, train_step)

CFG = GPTConfig(vocab_size=50, n_layer=2, d_model=32, n_head=2, n_kv_head=2, context_len=16)


def _model(seed=0):
    torch.manual_seed(seed)
    m = GPT(CFG)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return m


def test_accumulated_micro_batches_equal_one_batch():
    ids = torch.randint(0, 50, (8, 17), generator=torch.Generator().manual_seed(1))
    targets = ids[:, 1:].clone()
    targets[0, :5] = IGNORE_INDEX  # uneven token counts per micro-batch must not change the mean
    whole, split = _model(), _model()
    opt_w, opt_s = build_optimizers(whole, OptimConfig()), build_optimizers(split, OptimConfig())
    loss_w, norm_w = train_step(whole, opt_w, [(ids[:, :-1], targets)], 1.0, nullcontext())
    loss_s, norm_s = train_step(split, opt_s, [(ids[:3, :-1], targets[:3]), (ids[3:, :-1], targets[3:])], 1.0, nullcontext())
    assert math.isclose(loss_w, loss_s, rel_tol=1e-5) and math.isclose(norm_w, norm_s, rel_tol=1e-4)
    for (name, a), (_, b) in zip(whole.named_parameters(), split.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)


def test_split_rows_cuts_every_tensor_into_consecutive_parts():
    batch = (torch.arange(14).view(7, 2), torch.arange(7))
    parts = split_rows(batch, 3)
    assert [len(p[1]) for p in parts] == [2, 2, 3]
    for i in range(2):
        assert torch.equal(torch.cat([p[i] for p in parts]), batch[i])
    assert len(split_rows(batch, 20)) == 7  # never an empty part


def test_split_pairs_keeps_each_chosen_row_with_its_rejected_row():
    # pair i: chosen row i (value i), rejected row P + i (value 100 + i)
    ids = torch.tensor([0, 1, 2, 3, 4, 100, 101, 102, 103, 104])
    parts = split_pairs((ids, ids * 2), 2)
    assert len(parts) == 2
    for part_ids, doubled in parts:
        chosen, rejected = part_ids.chunk(2)
        assert torch.equal(rejected, chosen + 100) and torch.equal(doubled, part_ids * 2)
    assert sorted(torch.cat([p[0] for p in parts]).tolist()) == ids.tolist()


@pytest.mark.parametrize("n_parts", [2, 3, 8])
def test_a_step_in_parts_is_the_step_on_the_whole_batch(n_parts):
    ids = torch.randint(0, 50, (8, 17), generator=torch.Generator().manual_seed(2))
    targets = ids[:, 1:].clone()
    targets[1, :9] = IGNORE_INDEX  # parts with unequal token counts: the mean is still over the whole step's
    whole, cut = _model(), _model()
    opt_w, opt_p = build_optimizers(whole, OptimConfig()), build_optimizers(cut, OptimConfig())
    loss_w, norm_w = train_step(whole, opt_w, [(ids[:, :-1], targets)], 1.0, nullcontext(), parts=1)
    loss_p, norm_p = train_step(cut, opt_p, [(ids[:4, :-1], targets[:4]), (ids[4:, :-1], targets[4:])], 1.0,
                                nullcontext(), parts=n_parts)
    assert math.isclose(loss_w, loss_p, rel_tol=1e-5) and math.isclose(norm_w, norm_p, rel_tol=1e-4)
    for (name, a), (_, b) in zip(whole.named_parameters(), cut.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)


def test_an_objective_without_split_is_computed_whole():
    calls = []

    class Whole(TokenCrossEntropy):
        split = None

        def loss_sum(self, model, batch):
            calls.append(batch[0].size(0))
            return super().loss_sum(model, batch)

    m = _model()
    ids = torch.randint(0, 50, (6, 17))
    train_step(m, build_optimizers(m, OptimConfig()), [(ids[:, :-1], ids[:, 1:])], 1.0, nullcontext(),
               objective=Whole(), parts=4)
    assert calls == [6]


def test_gradient_clipping_bounds_the_update():
    m = _model()
    opts = build_optimizers(m, OptimConfig())
    ids = torch.randint(0, 50, (4, 17))
    _, norm = train_step(m, opts, [(ids[:, :-1], ids[:, 1:])], 1e-3, nullcontext())
    assert norm > 1e-3  # reported before clipping


def test_bits_per_byte_is_nats_over_bytes():
    m = _model().eval()
    ids = torch.randint(1, 50, (2, 9), generator=torch.Generator().manual_seed(3))
    inputs, targets = ids[:, :-1], ids[:, 1:].clone()
    targets[1, 0] = 0  # a zero-byte (special) target is left out
    token_bytes = torch.arange(50) % 4  # some tokens 0..3 bytes
    bpb, loss = evaluate_bpb(m, [(inputs, targets)], token_bytes, nullcontext())
    with torch.no_grad():
        nats = token_losses(m, inputs, targets)
    nbytes = token_bytes[targets]
    keep = nbytes > 0
    assert math.isclose(bpb, float(nats[keep].sum()) / (math.log(2) * float(nbytes.sum())), rel_tol=1e-6)
    assert math.isclose(loss, float(nats[keep].mean()), rel_tol=1e-6)


def test_metrics_log_cuts_back_to_the_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    for step in range(1, 6):
        log.write(step=step, loss=1.0 / step)
    with open(path, "a") as f:
        f.write('{"step": 6, "lo')  # a line cut by a kill
    MetricsLog(path, resume_step=3).write(step=4, loss=0.0)
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4]


# ---- the one loop: fit ----------------------------------------------------------------------------------------

class _RandomTokens:
    """A batch source of fixed random rows, with a position that resumes."""

    def __init__(self, seed=0, batch=4, kill_at=None):
        self.gen_seed, self.batch, self.pos, self.kill_at = seed, batch, 0, kill_at

    def next_batch(self):
        if self.pos == self.kill_at:
            raise KeyboardInterrupt("killed")
        ids = torch.randint(0, CFG.vocab_size, (self.batch, CFG.context_len + 1),
                            generator=torch.Generator().manual_seed(self.gen_seed * 1000 + self.pos))
        self.pos += 1
        return ids[:, :-1], ids[:, 1:]

    def state_dict(self):
        return {"pos": self.pos, "batch_size": self.batch, "world_size": 1}

    def load_state_dict(self, state):
        self.pos = state["pos"]


class _BreaksAt(TokenCrossEntropy):
    """Cross-entropy whose value turns NaN from the n-th call on (what a learning rate far too high does)."""

    split = None  # whole micro-batches: one call per step

    def __init__(self, n):
        self.calls, self.n = 0, n

    def loss_sum(self, model, batch):
        self.calls += 1
        loss = super().loss_sum(model, batch)
        return loss * float("nan") if self.calls >= self.n else loss


def _fit(tmp_path, objective=None, kill_at=None, **overrides):
    cfg = TrainConfig(**{"out_dir": str(tmp_path / "run"), "batch_size": 4, "max_steps": 6, "save_every": 2,
                         "eval_every": 0, "device": "cpu", **overrides})
    info = setup(cfg)
    net = GPT(CFG)
    net.init_weights(seed=0)
    return fit(cfg, info, net, _RandomTokens(kill_at=kill_at), evaluate=lambda model: {"val_marker": 1.0},
               meta={"stage": "test"}, tokenizer_path=None, objective=objective)


def test_fit_trains_saves_and_resumes_to_identical_weights(tmp_path):
    whole = _fit(tmp_path / "a")
    assert whole["step"] == 6 and whole["val_marker"] == 1.0 and whole["tokens_seen"] == 6 * 4 * CFG.context_len
    halves = tmp_path / "c"
    with pytest.raises(KeyboardInterrupt):
        _fit(halves, kill_at=5)  # killed during step 6, after the checkpoint of step 4
    assert checkpoint.read_info(halves / "run")["step"] == 4
    _fit(halves)  # resumes at step 4 with the data position, optimizer state and RNG
    a = checkpoint.load(tmp_path / "a" / "run").model
    c = checkpoint.load(halves / "run").model
    for (name, x), (_, y) in zip(a.state_dict().items(), c.state_dict().items()):
        assert torch.equal(x, y), name
    assert checkpoint.read_info(halves / "run")["step"] == 6


def test_a_loss_that_becomes_nan_stops_the_run_naming_the_flags_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(LLMLabError, match=r"loss became nan at step 5.*--optim.muon_lr.*step-000004"):
        _fit(tmp_path, objective=_BreaksAt(5))
    ckpt = checkpoint.load(tmp_path / "run")  # finite weights, checksum intact
    assert ckpt.info["step"] == 4


def test_reading_the_loss_every_few_steps_trains_and_logs_the_same(tmp_path):
    """--log_every 4: the host reads the losses every 4 steps (and before each checkpoint), yet metrics.jsonl has
    the same row for every step and the weights are the same bits; a loss that turns NaN between reads is caught
    at the next, naming its own step, before anything after it is saved."""
    every = _fit(tmp_path / "a", max_steps=9, save_every=0)
    fours = _fit(tmp_path / "b", max_steps=9, save_every=0, log_every=4)
    rows = [read_metrics(tmp_path / d / "run" / "metrics.jsonl") for d in "ab"]
    assert [(r["step"], r.get("loss"), r.get("grad_norm")) for r in rows[0]] == \
        [(r["step"], r.get("loss"), r.get("grad_norm")) for r in rows[1]]
    assert len([r for r in rows[1] if "loss" in r]) == 9 and every["loss"] == fours["loss"]
    a, b = (checkpoint.load(tmp_path / d / "run").model.state_dict() for d in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(LLMLabError, match=r"loss became nan at step 5.*step-000004"):  # read at step 6
        _fit(tmp_path / "c", objective=_BreaksAt(5), max_steps=12, save_every=4, log_every=3)
    assert checkpoint.read_info(tmp_path / "c" / "run")["step"] == 4


@pytest.mark.parametrize("field, value, flag", [
    ("batch_size", 0, "--batch_size"), ("warmdown_frac", float("nan"), "--warmdown_frac"),
    ("grad_clip", -1.0, "--grad_clip"), ("device", "tpu9", "--device"), ("parallel", "zero", "--parallel"),
    ("keep_checkpoints", -1, "--keep_checkpoints"), ("parts", -1, "--parts")])
def test_train_config_refuses_meaningless_numbers(field, value, flag):
    with pytest.raises(LLMLabError, match=flag):
        TrainConfig(out_dir="x", **{field: value})


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf")])
def test_optim_config_refuses_meaningless_learning_rates(value):
    with pytest.raises(LLMLabError, match="--optim.muon_lr"):
        OptimConfig(muon_lr=value)


def test_out_dir_naming_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(LLMLabError, match="--out_dir"):
        TrainConfig(out_dir=str(tmp_path / "file"))
