"""Checkpoints: save -> load gives identical logits; saves are atomic; bad files give clear errors."""

import json

import pytest
import torch

from llmlab import checkpoint
from llmlab.errors import LLMLabError
from llmlab.model import GPT, GPTConfig
from llmlab.optim import OptimConfig, build_optimizers

CFG = GPTConfig(vocab_size=120, n_layer=2, d_model=32, n_head=2, n_kv_head=1, context_len=32, qk_norm=True)


def _trained(cfg=CFG, steps=3):
    torch.manual_seed(0)
    model = GPT(cfg)
    opts = build_optimizers(model, OptimConfig())
    ids = torch.randint(0, cfg.vocab_size, (4, 17))
    for _ in range(steps):
        torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
        for o in opts:
            o.step()
        model.zero_grad()
    return model, opts


def _save(out, step, model, opts=None, state=None):
    return checkpoint.save_checkpoint(out, step, model, tokenizer_path=None, meta={"stage": "test"},
                                      optimizers=opts, trainer_state=state)


@pytest.mark.parametrize("tie", [False, True])
def test_save_load_identical_logits(tmp_path, tie):
    cfg = GPTConfig(**{**CFG.to_dict(), "tie_embeddings": tie})
    model, opts = _trained(cfg)
    _save(tmp_path, 3, model, opts, {"step": 3})
    loaded = checkpoint.load_model(tmp_path)
    ids = torch.randint(0, cfg.vocab_size, (2, 20))
    assert torch.equal(model.eval()(ids), loaded(ids))
    assert loaded.config == cfg
    if tie:
        assert loaded.lm_head.weight is loaded.embed_tokens.weight


def test_training_state_round_trip_continues_identically(tmp_path):
    model, opts = _trained()
    saved_rng = torch.get_rng_state()
    _save(tmp_path, 3, model, opts, {"step": 3, "loader": {"pos": 7}})

    fresh = GPT(CFG)
    fresh_opts = build_optimizers(fresh, OptimConfig())
    torch.manual_seed(999)
    state = checkpoint.load_training_state(tmp_path, fresh, fresh_opts)
    assert state["loader"] == {"pos": 7} and state["step"] == 3
    assert torch.equal(torch.get_rng_state(), saved_rng)
    # one more identical step on both: weights stay bit-identical (optimizer moments were restored)
    ids = torch.randint(0, CFG.vocab_size, (4, 17), generator=torch.Generator().manual_seed(5))
    for m, os_ in ((model, opts), (fresh, fresh_opts)):
        torch.nn.functional.cross_entropy(m(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
        for o in os_:
            o.step()
    for (name, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(a, b), name


def test_latest_moves_only_after_a_complete_save(tmp_path, monkeypatch):
    model, opts = _trained()
    first = _save(tmp_path, 1, model, opts, {"step": 1})

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(checkpoint, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 2, model, opts, {"step": 2})
    monkeypatch.undo()
    assert checkpoint.resolve(tmp_path) == first
    checkpoint.load_model(tmp_path)  # still loadable
    second = _save(tmp_path, 2, model, opts, {"step": 2})  # and the next save cleans up the leftovers
    assert checkpoint.resolve(tmp_path) == second
    assert not list(tmp_path.glob(".tmp-*"))


def test_keeps_only_the_newest(tmp_path):
    model, _ = _trained(steps=0)
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, model)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-000003", "step-000004"]


def test_bad_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(LLMLabError, match="does not exist"):
        checkpoint.load_model(tmp_path / "nope")
    with pytest.raises(LLMLabError, match="is not a checkpoint"):
        checkpoint.load_model(tmp_path)
    model, _ = _trained(steps=0)
    ckpt = _save(tmp_path / "a", 1, model)
    (ckpt / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(LLMLabError, match="corrupt"):
        checkpoint.load_model(ckpt)


def test_other_model_shape_is_refused(tmp_path):
    model, opts = _trained()
    _save(tmp_path, 3, model, opts, {"step": 3})
    wider = GPT(GPTConfig(**{**CFG.to_dict(), "d_model": 64}))
    with pytest.raises(LLMLabError, match="another model shape.*d_model: checkpoint 32 vs asked 64"):
        checkpoint.load_training_state(tmp_path, wider, build_optimizers(wider, OptimConfig()))
    # a config.json that lies about the shape is caught when the tensors are loaded
    ckpt = checkpoint.resolve(tmp_path)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["d_model"] = 64
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LLMLabError, match="shape"):
        checkpoint.load_model(ckpt)
