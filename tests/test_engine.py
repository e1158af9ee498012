"""The engine against the naive full-recompute reference, and the sampling rules."""

import shutil

import pytest
import torch

from llmlab.engine import Engine, SamplingParams, generate_naive, sample_next
from llmlab.errors import LLMLabError
from llmlab.model import GPT, GPTConfig, KVCache


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=400, n_layer=2, d_model=64, n_head=4, n_kv_head=2, context_len=96, qk_norm=True))
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return m.eval()


def test_greedy_tokens_and_logits_match_naive(model):
    prompt = [3, 17, 99, 250, 4]
    params = SamplingParams(max_new_tokens=48, temperature=0.0)
    naive_tokens, naive_logits = generate_naive(model, prompt, params)
    steps = list(Engine(model).steps([prompt], params))
    assert [int(t[0]) for t, _ in steps] == naive_tokens
    assert len(set(naive_tokens)) > 3  # a degenerate repetition would make the comparison weak
    for (_, logits), ref in zip(steps, naive_logits):
        torch.testing.assert_close(logits[0], ref, atol=1e-5, rtol=0)


def test_batch_of_different_prompts_equals_each_alone(model):
    engine = Engine(model)
    params = SamplingParams(max_new_tokens=20, temperature=0.0)
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5, 4, 3, 2], [42]]
    assert engine.generate(prompts, params) == [engine.generate([p], params)[0] for p in prompts]


def test_seeded_sampling_is_reproducible_and_matches_naive(model):
    engine = Engine(model)
    params = SamplingParams(max_new_tokens=24, temperature=0.9, top_k=40, top_p=0.95, seed=7)
    prompt = [5, 6, 7]
    a = engine.generate([prompt] * 4, params)
    assert a == engine.generate([prompt] * 4, params)
    assert len({tuple(r) for r in a}) > 1  # rows of one batch are different samples
    assert engine.generate([prompt], params)[0] == generate_naive(model, prompt, params)[0]


def test_stop_tokens_end_rows_independently(model):
    engine = Engine(model)
    params = SamplingParams(max_new_tokens=30, temperature=0.0)
    prompts = [[1, 2, 3], [7, 7, 7, 7]]
    free = engine.generate(prompts, params)
    stop = free[0][4]  # a token the first row emits at step 5
    first = free[0].index(stop)
    columns = list(engine.stream(prompts, params, stop_ids=[stop]))
    assert columns[first][0] == stop and all(c[0] is None for c in columns[first + 1:])
    assert engine.generate(prompts, params, stop_ids=[stop])[0] == free[0][:first]


def test_rows_that_stop_leave_the_batch_and_the_others_compute_what_they_would_alone(model, monkeypatch):
    """Stopped rows are dropped from the cache as the batch runs (Engine.COMPACT_AT): the rows still running keep
    their tokens and logits, each as it would alone, and stopped rows are never yielded again."""
    engine = Engine(model)
    params = SamplingParams(max_new_tokens=24, temperature=0.0)
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5, 4, 3, 2], [42], [5, 6, 7], [300, 2], [11, 12, 13, 14]]
    alone = [list(engine.live_steps([p], params)) for p in prompts]
    stop_at = [3, 20, 1, 9, 5, 24]  # each row stops after this many tokens: the batch shrinks five times

    seen: list[list[int]] = [[] for _ in prompts]

    def stopped(rows, tokens):
        for r, x in zip(rows, tokens.tolist()):
            seen[r].append(x)
        return [len(seen[r]) == stop_at[r] for r in rows]

    shrinks, cache_rows = [], []
    select = KVCache.select
    monkeypatch.setattr(KVCache, "select", lambda cache, rows: (cache_rows.append(len(rows)), select(cache, rows))[1])
    for rows, tokens, logits in engine.live_steps(prompts, params, stopped=stopped):
        shrinks.append(len(rows))
        for r, x, lg in zip(rows, tokens.tolist(), logits):
            step = len(seen[r])
            assert x == int(alone[r][step][1][0])
            torch.testing.assert_close(lg, alone[r][step][2][0], atol=1e-5, rtol=0)
    assert [len(s) for s in seen] == stop_at
    assert shrinks[0] == 6 and shrinks[-1] == 1 and shrinks == sorted(shrinks, reverse=True)
    assert cache_rows and max(cache_rows) < 6  # rows really left the cache, not only the output


def test_generation_stops_at_the_context(model):
    params = SamplingParams(max_new_tokens=500, temperature=0.0)
    out = Engine(model).generate([[1] * 90], params)
    assert len(out[0]) == 96 - 90


def test_each_row_has_its_own_room(model):
    """A short prompt beside a long one generates to its own end of the context, or its own budget, with the
    tokens and logits it has alone; rows past the context leave the cache before its positions run out."""
    engine = Engine(model)
    params = SamplingParams(max_new_tokens=500, temperature=0.0)
    prompts = [[1] * 90, [4, 5, 6], list(range(10, 60)), [7] * 93]
    alone = [list(engine.live_steps([p], params)) for p in prompts]
    assert [len(a) for a in alone] == [6, 93, 46, 3]
    got: list[list[tuple]] = [[] for _ in prompts]
    for rows, tokens, logits in engine.live_steps(prompts, params):
        for r, x, lg in zip(rows, tokens.tolist(), logits):
            got[r].append((x, lg))
    for g, a in zip(got, alone):
        assert [x for x, _ in g] == [int(t[0]) for _, t, _ in a]
        for (_, lg), (_, _, ref) in zip(g, a):
            torch.testing.assert_close(lg, ref[0], atol=1e-5, rtol=0)
    budgets = [2, 40, 0, 500]
    lengths = [0] * len(prompts)
    for rows, _, _ in engine.live_steps(prompts, params, budgets=budgets):
        for r in rows:
            lengths[r] += 1
    assert lengths == [2, 40, 0, 3]
    with pytest.raises(LLMLabError, match="one integer >= 0 per prompt"):
        list(engine.live_steps(prompts, params, budgets=[1, 2]))


def test_prompt_longer_than_context_is_a_clear_error(model):
    with pytest.raises(LLMLabError, match="does not fit the model's context"):
        Engine(model).generate([[1] * 96], SamplingParams())
    with pytest.raises(LLMLabError, match="empty prompt"):
        Engine(model).generate([[]], SamplingParams())


def test_top_k_and_top_p_filter():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    gen = torch.Generator().manual_seed(0)
    seen_k = {int(sample_next(logits, SamplingParams(temperature=1.0, top_k=2), gen)) for _ in range(200)}
    assert seen_k == {0, 1}
    probs = logits.softmax(-1)[0]  # 0.64, 0.24, 0.09, ...: top_p=0.8 keeps the first two
    assert probs[0] < 0.8 < probs[0] + probs[1]
    seen_p = {int(sample_next(logits, SamplingParams(temperature=1.0, top_p=0.8), gen)) for _ in range(200)}
    assert seen_p == {0, 1}
    assert int(sample_next(logits, SamplingParams(temperature=0.0), None)) == 0


@pytest.mark.parametrize("top_k, top_p, temperature", [(0, 1.0, 1.0), (3, 1.0, 0.7), (0, 0.9, 1.3), (4, 0.8, 1.0)])
def test_sampling_frequencies_match_the_filtered_distribution(top_k, top_p, temperature):
    logits = torch.tensor([2.0, -1.0, 0.5, 1.5, 0.0, 1.0])
    # the distribution by definition: temperature, keep the top k, then the smallest prefix reaching top_p
    probs = (logits / temperature).softmax(-1)
    order = probs.argsort(descending=True)
    keep = torch.zeros_like(probs, dtype=torch.bool)
    kept = probs[order][: top_k or len(logits)]
    kept = kept / kept.sum()
    for rank, token in enumerate(order[: len(kept)]):
        keep[token] = kept[:rank].sum() < top_p
    expected = torch.where(keep, probs, 0.0)
    expected = expected / expected.sum()
    n = 40_000
    gen = torch.Generator().manual_seed(0)
    tokens = sample_next(logits.expand(n, -1), SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p), gen)
    freq = torch.bincount(tokens, minlength=len(logits)).float() / n
    assert torch.all(freq[~keep] == 0)
    assert torch.allclose(freq, expected, atol=0.01)


def test_bad_sampling_params():
    with pytest.raises(LLMLabError):
        SamplingParams(temperature=-1)
    with pytest.raises(LLMLabError):
        SamplingParams(top_p=0)


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="torch.compile needs a C++ compiler on CPU")
def test_compiled_decode_matches_eager(model):
    """The compiled decode step (packed weights, tensor positions) against the eager engine: batch 1, a padded
    batch, and a refresh of the packed weights after the model changes."""
    params = SamplingParams(max_new_tokens=40, temperature=0.0)
    eager, compiled = Engine(model), Engine(model, compile=True)
    prompts = [[3, 17, 99, 250, 4], [7, 7, 1], [300, 2, 5, 9, 11, 13, 60]]
    for batch in ([prompts[0]], prompts):
        ref = list(eager.steps(batch, params))
        out = list(compiled.steps(batch, params))
        assert [t.tolist() for t, _ in out] == [t.tolist() for t, _ in ref]
        for (_, logits), (_, ref_logits) in zip(out, ref):
            torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)  # in place: the packed copy is stale and must be rebuilt
    try:
        assert compiled.generate([prompts[0]], params) == eager.generate([prompts[0]], params)
    finally:
        with torch.no_grad():
            model.lm_head.weight.mul_(-1.0)
