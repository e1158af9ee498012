"""Shared training pieces: accumulation equals one big batch; bits per byte is the right arithmetic."""

import math
from contextlib import nullcontext

import torch

from llmlab.model import GPT, GPTConfig
from llmlab.optim import OptimConfig, build_optimizers
from llmlab.training import IGNORE_INDEX, MetricsLog, evaluate_bpb, read_metrics, token_losses, train_step

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
