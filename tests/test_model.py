"""The model: exact parity with Hugging Face's Llama/Qwen3 classes, KV-cache consistency, sizes and init."""

import pytest
import torch

from llmlab.errors import LLMLabError
from llmlab.model import GPT, GPTConfig, KVCache

transformers = pytest.importorskip("transformers")


def _random_model(cfg: GPTConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(cfg)
    for p in model.parameters():  # the default init zeroes some matrices; parity needs every path active
        torch.nn.init.normal_(p, std=0.2)
    return model.eval()


def _hf_twin(model: GPT):
    cfg = model.config
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn,
                  num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
                  max_position_embeddings=cfg.context_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
                  tie_word_embeddings=cfg.tie_embeddings, attention_bias=False)
    if cfg.qk_norm:
        hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=cfg.hdim, **common))
    else:
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(head_dim=cfg.hdim, mlp_bias=False, **common))
    sd = {k if k.startswith("lm_head") else "model." + k: v for k, v in model.state_dict().items()}
    result = hf.load_state_dict(sd, strict=False)
    assert not result.unexpected_keys and not result.missing_keys
    return hf.eval()


@pytest.mark.parametrize("qk_norm,tie,n_kv_head", [(False, False, 4), (True, False, 2), (True, True, 1), (False, True, 2)])
def test_logits_match_transformers(qk_norm, tie, n_kv_head):
    cfg = GPTConfig(vocab_size=300, n_layer=2, d_model=64, n_head=4, n_kv_head=n_kv_head, context_len=64,
                    qk_norm=qk_norm, tie_embeddings=tie)
    model = _random_model(cfg)
    hf = _hf_twin(model)
    ids = torch.randint(0, cfg.vocab_size, (3, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert ours.shape == (3, 50, 300)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_kv_cache_chunks_equal_full_forward():
    cfg = GPTConfig(vocab_size=200, n_layer=2, d_model=48, n_head=4, n_kv_head=2, context_len=64, qk_norm=True)
    model = _random_model(cfg)
    ids = torch.randint(0, 200, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(cfg, 2, 64)
        parts = [model(ids[:, a:b], cache) for a, b in [(0, 17), (17, 18), (18, 30), (30, 40)]]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=0)
    assert cache.length == 40


def test_left_padded_rows_compute_what_they_would_alone():
    cfg = GPTConfig(vocab_size=200, n_layer=2, d_model=48, n_head=4, n_kv_head=4, context_len=64)
    model = _random_model(cfg)
    short, long = [5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8]
    with torch.no_grad():
        cache = KVCache(cfg, 2, 16, pad_lens=torch.tensor([5, 0]))
        batched = model(torch.tensor([[0] * 5 + short, long]), cache)[:, -1]
        alone_short = model(torch.tensor([short]))[0, -1]
        alone_long = model(torch.tensor([long]))[0, -1]
    torch.testing.assert_close(batched[0], alone_short, atol=1e-5, rtol=0)
    torch.testing.assert_close(batched[1], alone_long, atol=1e-5, rtol=0)


def test_too_long_input_is_a_clear_error():
    model = GPT(GPTConfig(vocab_size=50, n_layer=1, d_model=16, n_head=2, n_kv_head=2, context_len=8))
    with pytest.raises(LLMLabError, match="exceeds the model's context of 8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_config_validation():
    with pytest.raises(LLMLabError, match="must divide"):
        GPTConfig(n_head=4, n_kv_head=3)
    with pytest.raises(LLMLabError, match="divisible"):
        GPTConfig(d_model=100, n_head=3, n_kv_head=3)


def test_init_is_deterministic_and_starts_near_uniform():
    cfg = GPTConfig(vocab_size=512, n_layer=2, d_model=64, n_head=4, n_kv_head=4, context_len=32)
    a, b = GPT(cfg), GPT(cfg)
    a.init_weights(seed=3)
    b.init_weights(seed=3)
    for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), na
    assert torch.count_nonzero(a.layers[0].mlp.down_proj.weight) == 0  # blocks start as the identity
    ids = torch.randint(0, 512, (4, 32))
    loss = torch.nn.functional.cross_entropy(a(ids).flatten(0, 1), ids.flatten())
    assert abs(loss.item() - torch.log(torch.tensor(512.0)).item()) < 0.1


def test_param_count_and_flops():
    cfg = GPTConfig(vocab_size=1000, n_layer=2, d_model=64, n_head=4, n_kv_head=2, context_len=128, ffn_hidden=192)
    model = GPT(cfg)
    kv = 2 * 16
    per_layer = 64 * 64 + 2 * 64 * kv + 64 * 64 + 3 * 64 * 192 + 2 * 64
    expected = 1000 * 64 * 2 + 2 * per_layer + 64
    assert model.num_params() == expected
    matmul = 2 * (per_layer - 2 * 64) + 1000 * 64
    assert model.flops_per_token() == 6 * matmul + 12 * 2 * 128 * 64
    tied = GPT(GPTConfig(vocab_size=1000, n_layer=2, d_model=64, n_head=4, n_kv_head=2, context_len=128,
                         ffn_hidden=192, tie_embeddings=True))
    assert tied.num_params() == expected - 1000 * 64
    assert tied.flops_per_token() == model.flops_per_token()
