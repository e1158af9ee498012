"""EleutherAI's lm-eval harness as a client of the server: its scores equal the model's own log-likelihoods.

Runs bench/lm_eval_world.py's pieces on a tiny world and a random-weight model: lm-eval's `local-completions`
model scores a 4-way birth-city task and generates greedy answers through a live server; the same
log-likelihoods and answers computed directly with the model must match, choice by choice.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from llmlab import checkpoint
from llmlab.server.app import ServerConfig, create_app
from llmlab.tokenizer import SPECIAL_TOKENS, Tokenizer
from serving import LiveServer, make_checkpoint, make_tokenizer

pytestmark = pytest.mark.slow
pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'lm-eval[api]')")

BENCH = Path(__file__).resolve().parents[1] / "bench" / "lm_eval_world.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("lm_eval_world", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_checkpoint(tmp_path: Path) -> Path:
    """The tiny model of tests/serving.py with every matrix random at unit scale (at init the blocks are the
    identity and the logits near zero, which would leave the choices' log-likelihoods nearly equal), and zero
    logits for the special tokens so that greedy answers never contain one (the server shows no text for them:
    a rule of the server, not what this test is about)."""
    tok_dir = tmp_path / "tokenizer"
    make_tokenizer(tok_dir)
    model = checkpoint.load_model(make_checkpoint(tok_dir, tmp_path / "init"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * p.shape[1] ** -0.5)
        model.lm_head.weight[: len(SPECIAL_TOKENS)] = 0.0
    return checkpoint.save_checkpoint(tmp_path / "ckpt", 1, model, tokenizer_path=tok_dir, meta={"stage": "test"})


def test_lm_eval_scores_equal_the_models_loglikelihoods(tmp_path, tiny_world_dir):
    bench = load_bench()
    ckpt = random_checkpoint(tmp_path)
    docs = bench.birth_city_docs(tiny_world_dir, people=10)
    assert len(docs) == 10 and all(d["choices"][d["gold"]] == d["answer"] for d in docs)
    task_dir = bench.write_tasks(docs, tmp_path / "lm_eval")
    hf_tok = bench.tokenizer_with_bos(ckpt, tmp_path / "hf_tokenizer")

    app = create_app(ServerConfig(checkpoint=str(ckpt), db=str(tmp_path / "feedback.db"), model_name="tiny",
                                  world=tiny_world_dir, tools=False))
    server = LiveServer(app)
    try:
        results = bench.run_lm_eval(server.url, "tiny", hf_tok, task_dir, [bench.MC_TASK, bench.GEN_TASK],
                                    max_length=128, num_concurrent=2, batch_size=3)
    finally:
        server.stop()

    model, tok = checkpoint.load_model(ckpt), Tokenizer.load(ckpt)
    direct = bench.choice_loglikelihoods(model, tok, docs)
    harness = bench.lm_eval_loglikelihoods(results, len(docs))
    assert [len(lls) for lls in harness] == [4] * len(docs)
    for got, want in zip(harness, direct):
        assert got == pytest.approx(want, abs=1e-4)
    # the choices are told apart by far more than float noise, so the accuracies are equal, not just close
    assert min(max(lls) - sorted(lls)[-2] for lls in direct) > 1e-3
    expected = bench.mc_accuracy(direct, docs)
    mc = results["results"][bench.MC_TASK]
    assert mc["acc,none"] == expected["acc"]
    assert mc["acc_norm,none"] == expected["acc_norm"]

    answers = bench.greedy_answers(model, tok, docs, stop_ids=[tok.bos_id])
    assert any(answers)  # the random model says something, so equal answers mean something
    assert bench.lm_eval_generations(results, len(docs)) == answers
    exact = sum(a == d["answer"] for a, d in zip(answers, docs)) / len(docs)
    assert results["results"][bench.GEN_TASK]["exact_match,strip"] == exact
