"""GPU benchmark: llmlab beside its references on one GPU, in one run.

1. Pretraining: tokens/s and MFU of llmlab's training step (the step `llmlab pretrain` runs: bf16 autocast,
   Muon + AdamW, gradient clipping; `torch.compile` unless --no_compile) at the gpu-small shape on random tokens,
   beside nanoGPT's unmodified `train.py` at the same shape (layers, width, heads, context, vocabulary, batch) on
   random tokens of the same vocabulary. MFU is against the bf16 matmul peak measured in the same run.
2. Decoding: the engine, eager and compiled, at batch 1 (greedy, 256 new tokens after 16) and batch 64 (a prompt
   of its own per row) against `transformers` `generate` on the same bf16 weights.
3. Serving: `llmlab serve` under 64 concurrent streaming clients, then one at a time (bench/b6_serve.py), on
   random weights of the same shape with the embedded world's tokenizer.

Needs no network and no ../shared: give nanoGPT's files with --nanogpt (a copy of ../shared/reference/nanoGPT
in an ignored folder of the checkout; its `data/llmlab_random/` is written there). Timings are medians after
warm-up steps; CUDA work is synchronised before each clock reading.

    python bench/gpu.py --nanogpt shared/nanoGPT                      # on the GPU (about 6 minutes)
    python bench/gpu.py --device cpu --small --nanogpt /tmp/nanoGPT   # checks the script itself on a CPU
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llmlab import checkpoint, presets  # noqa: E402
from llmlab.engine import Engine, SamplingParams  # noqa: E402
from llmlab.model import GPT, GPTConfig  # noqa: E402
from llmlab.optim import build_optimizers  # noqa: E402
from llmlab.tokenizer import Tokenizer  # noqa: E402
from llmlab.training import configure_torch, measure_peak_flops, train_step  # noqa: E402

WORLD_VOCAB = 8626
"""the vocabulary of the gpu-small world's tokenizer (as in the first GPU measurement)"""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def shape(args) -> tuple[GPTConfig, int]:
    """(model config, rows per step): the gpu-small preset's model, or a small one for a check on a CPU."""
    if args.small:
        return GPTConfig(vocab_size=512, n_layer=2, d_model=64, n_head=2, n_kv_head=2, context_len=128,
                         qk_norm=True), 4
    model = presets.gpu_small().pretrain.model
    return GPTConfig(**{**model.__dict__, "vocab_size": WORLD_VOCAB}), args.batch


def train_llmlab(args, cfg: GPTConfig, rows: int, device: torch.device) -> dict:
    """Median tokens/s and MFU of llmlab's training step."""
    opt_cfg = presets.gpu_small().pretrain.optim
    torch.manual_seed(0)
    model = GPT(cfg)
    model.init_weights(seed=0)
    model.to(device)
    optimizers = build_optimizers(model, opt_cfg)
    net = model if args.no_compile else torch.compile(model)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    gen = torch.Generator(device=device).manual_seed(1)
    T = cfg.context_len

    def batch():
        ids = torch.randint(0, cfg.vocab_size, (rows, T + 1), device=device, generator=gen)
        return ids[:, :-1], ids[:, 1:]

    times = []
    for i in range(args.warmup + args.steps):
        b = batch()
        sync(device)
        t0 = time.perf_counter()
        train_step(net, optimizers, [b], 1.0, autocast)
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    peak = measure_peak_flops(device)
    tok_s = rows * T / statistics.median(times)
    return {"tokens_per_s": tok_s, "mfu": model.flops_per_token(T) * tok_s / peak, "peak_flops": peak,
            "params": model.num_params(), "step_seconds": times}


def train_nanogpt(args, cfg: GPTConfig, rows: int, device: torch.device) -> dict | None:
    """nanoGPT's train.py at the same shape on random tokens: median tokens/s from its own step times."""
    if not args.nanogpt:
        return None
    folder = Path(args.nanogpt).resolve()
    if not (folder / "train.py").is_file():
        raise SystemExit(f"--nanogpt {args.nanogpt}: no train.py there (give a copy of ../shared/reference/nanoGPT)")
    data = folder / "data" / "llmlab_random"
    data.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 4_000_000), ("val", 200_000)):
        rng.integers(0, cfg.vocab_size, n, dtype=np.uint16).tofile(data / f"{split}.bin")
    with open(data / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": cfg.vocab_size}, f)
    flags = dict(dataset="llmlab_random", n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.d_model,
                 block_size=cfg.context_len, batch_size=rows, gradient_accumulation_steps=1, dropout=0.0, bias=False,
                 max_iters=args.warmup + args.steps, lr_decay_iters=args.warmup + args.steps, eval_interval=100_000,
                 eval_iters=1, log_interval=1, always_save_checkpoint=False, device=device.type,
                 dtype="bfloat16" if device.type == "cuda" else "float32", compile=not args.no_compile)
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "train.py", f"--out_dir={out}"] + [f"--{k}={v}" for k, v in flags.items()]
        proc = subprocess.run(cmd, cwd=folder, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"nanoGPT's train.py failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    steps = [(int(i), float(ms) / 1e3) for i, ms in re.findall(r"iter (\d+): loss [\d.]+, time ([\d.]+)ms", proc.stdout)]
    times = [s for i, s in steps if i >= args.warmup]
    if not times:
        raise SystemExit(f"nanoGPT's train.py printed no step times:\n{proc.stdout[-2000:]}")
    return {"tokens_per_s": rows * cfg.context_len / statistics.median(times), "step_seconds": times}


def decode(args, cfg: GPTConfig, device: torch.device) -> dict:
    """Batch-1 and batch-64 greedy decoding: the engine (eager, compiled) and transformers' generate."""
    from llmlab.export.hf import hf_model  # deferred: imports transformers

    torch.manual_seed(0)
    model = GPT(cfg)
    model.init_weights(seed=0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    hf = hf_model(model).to(device, dtype)  # the same weights, in the same dtype
    model = model.to(device, dtype).eval()
    gen = torch.Generator().manual_seed(1)
    results = {}
    for batch, new in ((1, args.new_tokens), (args.decode_batch, args.new_tokens // 2)):
        prompts = torch.randint(0, cfg.vocab_size, (batch, 16), generator=gen).tolist()
        params = SamplingParams(max_new_tokens=new, temperature=0.0)

        @torch.inference_mode()
        def hf_generate(prompts=prompts, new=new):
            ids = torch.tensor(prompts, device=device)
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, pad_token_id=0)
            return out[:, ids.size(1):].tolist()

        contenders = {"llmlab": lambda e=Engine(model): e.generate(prompts, params),
                      "llmlab_compiled": lambda e=Engine(model, compile=True): e.generate(prompts, params),
                      "transformers": hf_generate}
        for name, fn in contenders.items():
            out = fn()  # warm-up (compiles)
            times = []
            for _ in range(args.rounds):
                sync(device)
                t0 = time.perf_counter()
                out = fn()
                sync(device)
                times.append(time.perf_counter() - t0)
            tokens = sum(map(len, out))
            results[f"batch{batch}_{name}"] = tokens / statistics.median(times)
    return results


def serve(args, cfg: GPTConfig, device: torch.device) -> dict:
    """bench/b6_serve.py on random weights of the shape, with the embedded world's tokenizer."""
    from llmlab.stages import tokenizer, world

    with tempfile.TemporaryDirectory() as tmp:
        run = presets.tiny(str(Path(tmp) / "run")) if args.small else presets.cpu(str(Path(tmp) / "run"))
        world.main(run.world)
        tokenizer.main(run.tokenizer)
        tok_dir = run.tokenizer.out_dir
        model = GPT(GPTConfig(**{**cfg.__dict__, "vocab_size": Tokenizer.load(tok_dir).vocab_size}))
        model.init_weights(seed=0)
        ckpt = checkpoint.save_checkpoint(Path(tmp) / "model", 0, model, tokenizer_path=tok_dir,
                                          meta={"stage": "bench"})
        out = Path(tmp) / "serve.json"
        cmd = [sys.executable, str(ROOT / "bench" / "b6_serve.py"), "--checkpoint", str(ckpt), "--world",
               run.world.out_dir, "--clients", str(args.clients), "--seconds", str(args.serve_seconds),
               "--min_tokens", "64", "--max_tokens", "64", "--json", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise SystemExit(f"bench/b6_serve.py failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (a check of the script)")
    p.add_argument("--small", action="store_true", help="a small model instead of gpu-small's (for a CPU)")
    p.add_argument("--nanogpt", default="", help="nanoGPT's files (a copy of ../shared/reference/nanoGPT)")
    p.add_argument("--batch", type=int, default=32, help="rows per training step")
    p.add_argument("--warmup", type=int, default=10, help="training steps before the timed ones")
    p.add_argument("--steps", type=int, default=50, help="timed training steps")
    p.add_argument("--no_compile", action="store_true", help="train without torch.compile (both contenders)")
    p.add_argument("--new_tokens", type=int, default=256, help="new tokens at batch 1 (half at the larger batch)")
    p.add_argument("--decode_batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="timed decoding runs per contender")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--serve_seconds", type=float, default=20)
    p.add_argument("--only", default="train,decode,serve", help="sections to run")
    p.add_argument("--json", default="")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: run on a GPU machine, or check the script with --device cpu --small")
    device = torch.device(args.device)
    configure_torch()
    cfg, rows = shape(args)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"GPU benchmark on {name}: {cfg.n_layer} layers x {cfg.d_model}, {cfg.n_head} heads, context "
          f"{cfg.context_len}, vocabulary {cfg.vocab_size}, {rows} rows per step", flush=True)
    sections = set(args.only.split(","))
    result: dict = {"device": name, "config": cfg.__dict__}
    if "train" in sections:
        ours, ref = train_llmlab(args, cfg, rows, device), train_nanogpt(args, cfg, rows, device)
        result.update(train_llmlab=ours, train_nanogpt=ref)
        print(f"pretraining: llmlab {ours['tokens_per_s']:,.0f} tokens/s, MFU {100 * ours['mfu']:.1f}% of "
              f"{ours['peak_flops'] / 1e12:.1f} TFLOP/s measured", flush=True)
        if ref:
            print(f"             nanoGPT {ref['tokens_per_s']:,.0f} tokens/s: llmlab at "
                  f"{ours['tokens_per_s'] / ref['tokens_per_s']:.2f}x (target >= 1.0x, aim 1.3x; MFU >= 45%)")
        else:
            print("             nanoGPT: skipped (give --nanogpt DIR)")
    if "decode" in sections:
        rates = decode(args, cfg, device)
        result["decode"] = rates
        for b in (1, args.decode_batch):
            hf = rates[f"batch{b}_transformers"]
            line = ", ".join(f"{n} {rates[f'batch{b}_{n}']:,.0f} ({rates[f'batch{b}_{n}'] / hf:.1f}x)"
                             for n in ("llmlab", "llmlab_compiled"))
            print(f"decoding at batch {b}: {line}; transformers {hf:,.0f} tokens/s", flush=True)
        print("             targets: batch 1 >= 2,000 tokens/s and >= 10x transformers; batch 64 >= 100,000")
    if "serve" in sections:
        s = serve(args, cfg, device)
        result["serve"] = s
        print(f"serving, {args.clients} streaming clients: {s['concurrent_tokens_per_s']:,.0f} tokens/s "
              f"(one at a time {s['serial_tokens_per_s']:,.0f}: {s['ratio']:.1f}x), errors "
              f"{s['concurrent_errors'] + s['serial_errors']}, time to first token p50 "
              f"{s['concurrent_ttft_p50_s']:.3f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
