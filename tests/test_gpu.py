"""The GPU path against the reference paths: bf16 decoding against the naive full recompute, the compiled decode
step against the eager one, training steps on the GPU against the same steps on the CPU (fp32, but for Muon's
iteration, in bf16 on a GPU), and FSDP2 in one process on the GPU against a plain run. Marked `gpu` and skipped where torch sees no GPU, so the default suite
passes on a CPU-only machine; `LLMLAB_TEST_DEVICE=cpu python -m pytest tests/test_gpu.py` runs them on the CPU
instead, which checks the tests themselves (not the GPU)."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from llmlab.engine import Engine, SamplingParams, generate_naive
from llmlab.model import GPT, GPTConfig
from llmlab.optim import OptimConfig, build_optimizers
from llmlab.training import train_step

DEVICE = os.environ.get("LLMLAB_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CFG = GPTConfig(vocab_size=512, n_layer=4, d_model=256, n_head=4, n_kv_head=2, context_len=256, qk_norm=True)


def _model(dtype: torch.dtype = torch.float32, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    m = GPT(CFG)
    with torch.no_grad():  # random weights of a trained model's scale (zero-initialised projections make blocks
        for p in m.parameters():  # the identity): logits then spread out and greedy choices are rarely near ties
            p.normal_(0.0, 0.3 if p.dim() > 1 else 1.0)
    return m.to(DEVICE, dtype).eval()


def _follow(steps: list[tuple[int, torch.Tensor]], reference: list[tuple[int, torch.Tensor]], rel: float) -> int:
    """Walk two greedy decodes together: logits within rel x the reference's spread at every step, the same token
    until the reference faces a near tie (top-2 gap within twice that tolerance), where rounding may pick either.
    Returns the steps compared."""
    for i, ((token, logits), (ref_token, ref_logits)) in enumerate(zip(steps, reference)):
        logits, ref_logits = logits.float().cpu(), ref_logits.float().cpu()
        tol = rel * float(ref_logits.std())
        torch.testing.assert_close(logits, ref_logits, atol=tol, rtol=0, msg=f"step {i}")
        if token != ref_token:
            top2 = ref_logits.topk(2).values
            assert float(top2[0] - top2[1]) <= 2 * tol, f"step {i}: {token} != {ref_token} without a near tie"
            return i + 1
    return len(reference)


def test_bf16_engine_follows_the_naive_reference():
    model = _model(torch.bfloat16)
    params = SamplingParams(max_new_tokens=64, temperature=0.0)
    prompt = [3, 17, 99, 250, 4, 8, 311]
    tokens, logits = generate_naive(model, prompt, params)
    steps = [(int(t[0]), lg[0]) for t, lg in Engine(model).steps([prompt], params)]
    assert _follow(steps, list(zip(tokens, logits)), rel=0.05) >= 16


def test_compiled_decode_step_follows_the_eager_one_in_a_padded_batch():
    model = _model(torch.float32)
    params = SamplingParams(max_new_tokens=48, temperature=0.0)
    prompts = [[1, 2, 3], list(range(10, 60)), [42], [7, 7, 7, 7, 9]]
    eager, compiled = Engine(model), Engine(model, compile=True)

    def decode(engine):
        rows = [[] for _ in prompts]
        for live, tokens, logits in engine.live_steps(prompts, params):
            for r, t, lg in zip(live, tokens.tolist(), logits):
                rows[r].append((t, lg))
        return rows

    for got, ref in zip(decode(compiled), decode(eager)):
        assert _follow(got, ref, rel=1e-3) == len(ref) == 48


def test_training_steps_on_the_gpu_match_the_cpu_in_fp32():
    cpu_model = GPT(CFG)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in cpu_model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    dev_model = copy.deepcopy(cpu_model).to(DEVICE)
    cfg = OptimConfig()
    cpu_opt, dev_opt = build_optimizers(cpu_model, cfg), build_optimizers(dev_model, cfg)
    start = {name: p.detach().clone() for name, p in cpu_model.named_parameters()}
    g = torch.Generator().manual_seed(2)
    fp32 = torch.autocast("cpu", enabled=False)
    for _ in range(3):
        ids = torch.randint(0, CFG.vocab_size, (4, 65), generator=g)
        batch = (ids[:, :-1], ids[:, 1:])
        cpu_loss, cpu_norm = train_step(cpu_model, cpu_opt, [batch], 1.0, fp32)
        dev_loss, dev_norm = train_step(dev_model, dev_opt, [tuple(t.to(DEVICE) for t in batch)], 1.0, fp32)
        assert abs(dev_loss - cpu_loss) <= 1e-4 * cpu_loss and abs(dev_norm - cpu_norm) <= 1e-3 * cpu_norm
    for (name, p), q in zip(cpu_model.named_parameters(), dev_model.parameters()):
        moved = (p.detach() - start[name]).norm()
        assert moved > 0, name
        # the same updates: Adam with eps 1e-10 turns rounding noise in near-zero gradients into whole steps, so
        # the comparison is on each tensor's update as a whole; and on a GPU Muon orthogonalises in bf16, whose
        # updates differ from the CPU's fp32 ones by about 3% (2.95% after these three steps, the bf16 iteration
        # run on the CPU)
        assert (q.detach().cpu() - p.detach()).norm() <= 6e-2 * moved, name


def test_fsdp2_in_one_process_on_the_gpu_reproduces_a_plain_run(tiny_world_dir, tmp_path):
    from llmlab import presets
    from llmlab.stages import tokenizer

    tok_cfg = presets.tiny(str(tmp_path)).tokenizer
    tok_cfg.corpus, tok_cfg.out_dir = tiny_world_dir, str(tmp_path / "tokenizer")
    tokenizer.main(tok_cfg)
    losses = {}
    for name, launcher in (("plain", [sys.executable, "-m", "llmlab"]),
                           ("fsdp", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                     "--nproc_per_node=1", "-m", "llmlab"])):
        out = tmp_path / name
        args = ["pretrain", "--preset", "tiny", "--corpus", tiny_world_dir, "--tokenizer", tok_cfg.out_dir,
                "--out_dir", str(out), "--max_steps", "12", "--batch_size", "8", "--eval_every", "6",
                "--device", DEVICE] + (["--parallel", "fsdp"] if name == "fsdp" else [])
        proc = subprocess.run(launcher + args, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [r["loss"] for r in rows if "loss" in r]
    assert len(losses["plain"]) == len(losses["fsdp"]) == 12
    assert max(abs(a - b) for a, b in zip(losses["plain"], losses["fsdp"])) <= 1e-3 * losses["plain"][0]
