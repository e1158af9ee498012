"""LoRA adapters: written here, saved in PEFT's format, and equal to PEFT's own LoRA on the Hugging Face export."""

from __future__ import annotations

import copy
import json
import os
import random

import pytest
import torch

from llmlab.errors import LLMLabError
from llmlab.export import export_hf
from llmlab.lora import (ALL_LINEAR, AdapterBank, BankedLinear, add_lora, adapter_state, load_adapter, lora_modules,
                         merge_lora, save_adapter)
from llmlab.model import GPT, GPTConfig
from llmlab.tokenizer import train_tokenizer

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def tok():
    rng = random.Random(0)
    words = "the a of to she he lives in born city river Ada Karst answer number".split()
    return train_tokenizer([" ".join(rng.choice(words) for _ in range(10)) for _ in range(200)], vocab_size=300)


def _base(tok, qk_norm=True, d_model=64, seed=0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_layer=2, d_model=d_model, n_head=4, n_kv_head=2,
                          context_len=64, qk_norm=qk_norm))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return model.eval()


def _perturb(model, seed=1) -> None:
    """B starts at zero (the adapter changes nothing); give every update a value so that parity means something."""
    gen = torch.Generator().manual_seed(seed)
    for m in lora_modules(model).values():
        m.lora_B.weight.data.copy_(torch.randn(m.lora_B.weight.shape, generator=gen) * 0.3)


@pytest.mark.parametrize("qk_norm,targets", [(True, ("q_proj", "v_proj")), (False, ALL_LINEAR)],
                         ids=["qwen3-qv", "llama-all-linear"])
def test_adapter_loads_in_peft_onto_the_hf_export_with_the_same_logits(tok, tmp_path, qk_norm, targets):
    base = _base(tok, qk_norm)
    export_hf(base, tok, tmp_path / "hf")
    adapted = copy.deepcopy(base)
    ids = torch.randint(10, tok.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = base(ids)
    add_lora(adapted, r=4, alpha=8, targets=targets)
    with torch.no_grad():
        assert torch.equal(adapted(ids), before)  # B = 0: the adapter starts as the identity
    _perturb(adapted)
    save_adapter(adapted, tmp_path / "adapter", base=str(tmp_path / "hf"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["target_modules"] == sorted(targets)

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    theirs = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        ours, their_logits = adapted(ids), theirs(ids).logits
    assert (ours - before).abs().max() > 0.1  # the adapter matters...
    torch.testing.assert_close(their_logits, ours, atol=1e-4, rtol=0)  # ...and PEFT computes the same

    again = load_adapter(copy.deepcopy(base), tmp_path / "adapter")  # round trip through the files
    with torch.no_grad():
        assert torch.equal(again(ids), ours)
        merged = merge_lora(again)
        assert not lora_modules(merged)
        torch.testing.assert_close(merged(ids), ours, atol=1e-5, rtol=0)


def test_only_the_adapter_trains_and_it_is_small(tok):
    model = _base(tok)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    add_lora(model, r=2, alpha=4)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = torch.randint(10, tok.vocab_size, (2, 16))
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
    merged_names = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(merged_names[k], v) for k, v in frozen.items())  # the base never moved
    size = sum(t.numel() for t in adapter_state(model).values())
    assert 0 < size < 0.1 * sum(v.numel() for v in frozen.values())


def test_an_adapter_for_another_base_or_no_adapter_is_refused(tok, tmp_path):
    adapted = _base(tok)
    add_lora(adapted, r=2)
    old = os.umask(0o022)
    try:
        save_adapter(adapted, tmp_path / "a")
    finally:
        os.umask(old)
    assert {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "a").iterdir()} == {
        "adapter_config.json": 0o644, "adapter_model.safetensors": 0o644, "llmlab_adapter.json": 0o644}
    with pytest.raises(LLMLabError, match="another base .*d_model 64 vs 32"):
        load_adapter(_base(tok, d_model=32), tmp_path / "a")
    with pytest.raises(LLMLabError, match="no adapter at"):
        load_adapter(_base(tok), tmp_path / "missing")
    with pytest.raises(LLMLabError, match="not layers of the model"):
        add_lora(_base(tok), targets=("c_attn",))


def test_sft_with_lora_trains_the_adapter_resumes_and_loads_merged(tiny_run, tmp_path):
    import dataclasses

    from llmlab import checkpoint
    from llmlab.stages import sft

    cfg, _ = tiny_run
    lcfg = dataclasses.replace(cfg.sft, out_dir=str(tmp_path / "lora"), lora_r=4, lora_alpha=8.0, max_steps=2,
                               save_every=2, eval_every=0, threads=1)
    sft.main(lcfg)
    sft.main(dataclasses.replace(lcfg, max_steps=4))  # resumes from step 2: the adapter and its optimizer state
    info = checkpoint.read_info(checkpoint.resolve(tmp_path / "lora"))
    assert info["step"] == 4 and info["lora"] == {"r": 4, "alpha": 8.0, "targets": ["k_proj", "o_proj", "q_proj", "v_proj"]}
    merged = checkpoint.load(tmp_path / "lora").model  # a plain GPT, the adapter folded in
    assert not lora_modules(merged)
    base = checkpoint.load(cfg.sft.base).model
    again = load_adapter(checkpoint.load(cfg.sft.base).model, tmp_path / "lora" / "adapter")
    record = json.loads((tmp_path / "lora" / "adapter" / "llmlab_adapter.json").read_text())
    assert record["base_weights_sha256"] == checkpoint.read_info(cfg.sft.base)["weights_sha256"]  # its base, exactly
    ids = torch.randint(10, base.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), again(ids), atol=1e-5, rtol=0)
        assert (merged(ids) - base(ids)).abs().max() > 0  # it learned something, and only in the adapter
    untouched = {k: v for k, v in base.state_dict().items() if not k.endswith(("q_proj.weight", "k_proj.weight",
                                                                              "v_proj.weight", "o_proj.weight"))}
    assert all(torch.equal(merged.state_dict()[k], v) for k, v in untouched.items())


def _adapter(tok, path, r, targets, seed):
    adapted = _base(tok)
    add_lora(adapted, r=r, alpha=2.0 * r, targets=targets, seed=seed)
    _perturb(adapted, seed)
    save_adapter(adapted, path)
    return load_adapter(_base(tok), path)  # the model the adapter makes, alone


def test_a_bank_batches_rows_of_different_adapters_as_each_model_alone(tok, tmp_path):
    """Two adapters of different ranks and layers over one base: a batch whose rows go through adapter 1, the
    base and adapter 2 gives each row the logits of its own model, and an int or no `use` at all too."""
    alone = [_base(tok), _adapter(tok, tmp_path / "a", 4, ("q_proj", "v_proj"), 1),
             _adapter(tok, tmp_path / "b", 2, ALL_LINEAR, 2)]
    model = _base(tok)
    bank = AdapterBank(model)
    assert (bank.add(tmp_path / "a", "a"), bank.add(tmp_path / "b", "b"), len(bank)) == (1, 2, 3)
    ids = torch.randint(0, tok.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    order = [1, 0, 2]
    with torch.no_grad():
        want = torch.cat([alone[i](ids[row:row + 1]) for row, i in enumerate(order)])
        with bank.use(order):
            got = model(ids)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert (got[0] - alone[0](ids[:1])[0]).abs().max() > 1e-2  # the adapters change what they touch
        with bank.use(2):
            torch.testing.assert_close(model(ids), alone[2](ids), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(model(ids), alone[0](ids), atol=0, rtol=0)  # outside `use`: the base


def test_a_bank_refuses_an_adapter_for_another_base_and_stays_as_it_was(tok, tmp_path):
    other = _base(tok, d_model=32)
    add_lora(other, r=2)
    save_adapter(other, tmp_path / "other")
    bank = AdapterBank(_base(tok))
    with pytest.raises(LLMLabError, match="another base"):
        bank.add(tmp_path / "other")
    with pytest.raises(LLMLabError, match="no adapter at"):
        bank.add(tmp_path / "missing")
    same_shape = _base(tok)  # trained on a base of this shape, but of other weights (another fine-tune)
    add_lora(same_shape, r=2)
    save_adapter(same_shape, tmp_path / "sibling", base_sha256="ab" * 32)
    with pytest.raises(LLMLabError, match="the same shape, other weights"):
        bank.add(tmp_path / "sibling", base_sha256="cd" * 32)
    assert len(bank) == 1 and not any(isinstance(m, BankedLinear) for m in bank.model.modules())
    assert bank.add(tmp_path / "sibling", base_sha256="ab" * 32) == 1  # its own base
    with pytest.raises(LLMLabError, match="no adapter 2"):
        with bank.use([0, 2]):
            pass
