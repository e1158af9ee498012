"""Checkpoints: save -> load gives identical logits; saves are atomic; bad files give clear errors."""

import json
import os

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


class Killed(BaseException):
    """A kill: not an OSError, so nothing in the save (not even rmtree's ignore_errors) can swallow it."""


FS_OPS = ("mkdir", "rename", "replace", "link", "unlink", "rmdir")


def _kill_at(monkeypatch, k: int) -> list[str]:
    """Make the k-th filesystem operation of what follows die (k = -1: count them and let all run)."""
    done: list[str] = []

    def wrap(name, fn):
        def op(*args, **kwargs):
            if len(done) == k:
                raise Killed(f"killed before {name} #{k}")
            done.append(name)
            return fn(*args, **kwargs)
        return op

    for name in FS_OPS:
        monkeypatch.setattr(os, name, wrap(name, getattr(os, name)))
    monkeypatch.setattr(checkpoint, "write_durably", wrap("write", checkpoint.write_durably))
    monkeypatch.setattr(checkpoint, "write_atomic", wrap("write_atomic", checkpoint.write_atomic))
    return done


@pytest.mark.parametrize("again", [False, True], ids=["new-step", "same-step-again"])
def test_a_kill_at_every_point_of_a_save_leaves_a_loadable_latest(tmp_path, monkeypatch, again):
    """Saving step 2 over a run whose `latest` is step 2 (a finished stage run again) or saving a new step 3:
    killed before each filesystem operation in turn, `latest` still names a complete checkpoint, and the next
    save succeeds and cleans up."""
    model, opts = _trained()
    moved, _ = _trained(steps=4)
    step = 2 if again else 3

    monkeypatch.setattr(os, "fsync", lambda fd: None)  # the order of operations is under test, not the disk

    def run_once(out, k):
        _save(out, 1, model, opts, {"step": 1})
        _save(out, 2, model, opts, {"step": 2})
        with pytest.MonkeyPatch.context() as mp:
            done = _kill_at(mp, k)
            try:
                _save(out, step, moved, opts, {"step": step})
            except Killed:
                pass
        return done

    n_ops = len(run_once(tmp_path / "count", -1))
    assert n_ops > 10  # every write, rename and removal is counted
    ids = torch.randint(0, CFG.vocab_size, (1, 8))
    for k in range(n_ops + 1):
        out = tmp_path / f"kill-{k}"
        run_once(out, k)
        loaded = checkpoint.load(out)  # the checksum is verified too
        assert loaded.info["step"] in (2, step)
        logits = loaded.model(ids)
        if again:  # the old step 2 or the new one, whole
            assert torch.equal(logits, model.eval()(ids)) or torch.equal(logits, moved.eval()(ids)), k
        else:
            assert torch.equal(logits, (moved if loaded.info["step"] == step else model).eval()(ids)), k
        _save(out, step + 1, moved, opts, {"step": step + 1})  # the next save works and leaves nothing behind
        assert checkpoint.resolve(out).name == f"step-{step + 1:06d}"
        assert not [p.name for p in out.iterdir() if p.name.startswith(".")], k


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


def test_weights_that_changed_on_disk_are_refused(tmp_path):
    model, _ = _trained(steps=0)
    ckpt = _save(tmp_path, 1, model)
    data = bytearray((ckpt / "model.safetensors").read_bytes())
    data[-3] ^= 0x10  # one bit of one weight
    (ckpt / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(LLMLabError, match="sha256 differs"):
        checkpoint.load(tmp_path)
    assert checkpoint.load(tmp_path, verify=False).model is not None  # the check can be skipped


def test_weights_that_are_not_finite_are_refused_at_save_and_load(tmp_path):
    model, _ = _trained(steps=0)
    ckpt = _save(tmp_path, 1, model)
    with torch.no_grad():
        model.norm.weight[0] = float("nan")
    with pytest.raises(LLMLabError, match="NaN or infinite"):
        _save(tmp_path, 2, model)
    assert checkpoint.resolve(tmp_path) == ckpt  # the good checkpoint stays latest
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(ckpt / "model.safetensors"))
    tensors["norm.weight"][0] = float("inf")
    save_file(tensors, str(ckpt / "model.safetensors"))
    with pytest.raises(LLMLabError, match="NaN or infinite"):
        checkpoint.load(ckpt, verify=False)


@pytest.mark.parametrize("content", [b"\xff\xfe\x00binary", b"../../etc\n", b"\n"])
def test_a_latest_file_that_is_not_a_name_gives_a_clear_error(tmp_path, content):
    model, _ = _trained(steps=0)
    _save(tmp_path, 1, model)
    (tmp_path / "latest").write_bytes(content)
    with pytest.raises(LLMLabError, match="latest"):
        checkpoint.load(tmp_path)


def test_load_gives_model_tokenizer_and_info_of_one_directory(tmp_path):
    from llmlab.tokenizer import MIN_VOCAB, train_tokenizer
    tok = train_tokenizer(["hello world, a tiny corpus for a tiny tokenizer"] * 20, vocab_size=MIN_VOCAB + 20)
    tok.save(tmp_path / "tok")
    model, _ = _trained(GPTConfig(**{**CFG.to_dict(), "vocab_size": tok.vocab_size}), steps=0)
    ckpt = checkpoint.save_checkpoint(tmp_path / "run", 5, model, tokenizer_path=tmp_path / "tok", meta={"stage": "x"})
    loaded = checkpoint.load(tmp_path / "run")
    assert loaded.path == ckpt and loaded.info["step"] == 5 and loaded.info["stage"] == "x"
    assert loaded.tokenizer.encode("hello world") == tok.encode("hello world")
    assert not loaded.model.training
