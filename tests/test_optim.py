"""Optimizers and schedules."""

import torch

from llmlab.model import GPT, GPTConfig
from llmlab.optim import Muon, OptimConfig, build_optimizers, lr_multiplier, newton_schulz, newton_schulz_batched


def test_newton_schulz_orthogonalises():
    G = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    X = newton_schulz(G)
    s = torch.linalg.svdvals(X)
    assert X.shape == G.shape
    assert s.min() > 0.6 and s.max() < 1.25  # singular values pushed near 1
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    cos = torch.nn.functional.cosine_similarity(X.flatten(), (U @ Vh).flatten(), dim=0)
    assert cos > 0.95  # and the direction is that of U V^T


def test_every_parameter_in_exactly_one_group():
    for tie in (False, True):
        model = GPT(GPTConfig(vocab_size=100, n_layer=2, d_model=32, n_head=2, n_kv_head=2, context_len=16,
                              qk_norm=True, tie_embeddings=tie))
        adamw, muon = build_optimizers(model, OptimConfig())
        ids = [id(p) for opt in (adamw, muon) for g in opt.param_groups for p in g["params"]]
        assert sorted(ids) == sorted(id(p) for p in model.parameters())
        assert all(p.dim() == 2 for g in muon.param_groups for p in g["params"])
        assert isinstance(muon, Muon)


def test_lr_schedule_shape():
    total = 100
    lrs = [lr_multiplier(s, total, warmup_steps=10, warmdown_frac=0.3, final_frac=0.1) for s in range(total)]
    assert lrs[0] == 0.1 and lrs[9] == 1.0  # linear warmup
    assert lrs[10:70] == [1.0] * 60  # flat
    assert all(a > b for a, b in zip(lrs[70:], lrs[71:]))  # strictly decaying warmdown
    assert abs(lrs[-1] - (0.1 + 0.9 / 30)) < 1e-12


def test_training_reduces_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, n_layer=2, d_model=32, n_head=2, n_kv_head=2, context_len=16))
    opts = build_optimizers(model, OptimConfig())
    ids = torch.randint(0, 64, (8, 17))
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        for o in opts:
            o.step()
        model.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_muon_on_the_gpu_orthogonalises_same_shape_matrices_together_as_one_by_one():
    """`newton_schulz_batched` (the GPU path) in fp32 is `newton_schulz` matrix by matrix, tall and wide alike; in
    bf16 it stays within a few percent."""
    torch.manual_seed(0)
    for shape in [(64, 64), (96, 32), (32, 96)]:
        G = torch.randn(3, *shape)
        one_by_one = torch.stack([newton_schulz(g) for g in G])
        torch.testing.assert_close(newton_schulz_batched(G, dtype=torch.float32), one_by_one, atol=1e-5, rtol=0)
        b16 = newton_schulz_batched(G, dtype=torch.bfloat16)
        assert b16.dtype == torch.float32 and (b16 - one_by_one).norm() <= 0.05 * one_by_one.norm()
