"""B2 against llama.cpp: llama.cpp running llmlab's GGUF export gives the same greedy tokens as llmlab's engine;
decode speed of both at batch 1 (BENCHMARKS.md B2: "within 2x of llama.cpp on the GGUF export").

Exports a checkpoint to GGUF (fp32) in a temporary folder, loads it with llama-cpp-python (not a dependency of
llmlab: `pip install llama-cpp-python`, which compiles llama.cpp), and decodes greedily at batch 1 from the same
prompt ids in both engines, for a fixed number of tokens (no stop token). Also checks that llama.cpp tokenizes
the prompt text as llmlab does (the "qwen2" pre-tokenizer named in the file). Timed: the whole generate call
(prefill of the short prompt included); tokens/s = new tokens / seconds, median over rounds, runs alternating.
llmlab runs eager and compiled (`Engine(compile=True)`, as in B2).

    python bench/b2_llamacpp.py                                   # runs/cpu/sft
    python bench/b2_llamacpp.py --checkpoint runs/cpu/base --prompt "Q: Where was" --new_tokens 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from llmlab import checkpoint
from llmlab.engine import Engine, SamplingParams
from llmlab.export import export_gguf
from llmlab.training import configure_torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="runs/cpu/sft")
    p.add_argument("--prompt", default="Q: Where was", help="text after <|bos|>")
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5, help="timed runs of each engine (after one warm-up run)")
    p.add_argument("--json", type=str, default="")
    args = p.parse_args()
    try:
        import llama_cpp
    except ImportError:
        raise SystemExit("this benchmark needs llama-cpp-python: pip install llama-cpp-python") from None
    configure_torch()

    ckpt = checkpoint.load(args.checkpoint)
    model, tok = ckpt.model, ckpt.require_tokenizer("this benchmark")
    prompt = [tok.bos_id] + tok.encode(args.prompt)
    new_tokens = min(args.new_tokens, model.config.context_len - len(prompt))
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    threads = torch.get_num_threads()

    tmp = tempfile.TemporaryDirectory()  # kept until the end: llama.cpp maps the file
    path = export_gguf(model, tok, Path(tmp.name) / "gguf", source=ckpt)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=model.config.context_len, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    arch = "qwen3" if model.config.qk_norm else "llama"
    print(f"B2 vs llama.cpp: {ckpt} ({model.num_params() / 1e6:.1f}M parameters, arch {arch}), "
          f"{len(prompt)}-token prompt, {new_tokens} new tokens greedy, {threads} threads")
    same_tokenization = llm.tokenize(args.prompt.encode(), add_bos=False, special=False) == prompt[1:]
    print(f"  llama.cpp tokenizes the prompt as llmlab: {same_tokenization}")

    engine, compiled = Engine(model), Engine(model, compile=True)

    def run_llmlab() -> list[int]:
        return engine.generate([prompt], params)[0]

    def run_llmlab_compiled() -> list[int]:
        return compiled.generate([prompt], params)[0]

    def run_llama_cpp() -> list[int]:
        llm.reset()  # no reuse of the previous round's KV cache
        out = []
        for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
            out.append(token)
            if len(out) == new_tokens:
                break
        return out

    contenders = {"llmlab": run_llmlab, "llmlab_compiled": run_llmlab_compiled, "llama.cpp": run_llama_cpp}
    outputs = {name: fn() for name, fn in contenders.items()}  # warm-up (and torch.compile's one-off compile)
    ours, theirs = outputs["llmlab"], outputs["llama.cpp"]
    equal = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    print(f"  greedy tokens equal for the first {equal}/{new_tokens} "
          f"(llmlab compiled: {'the same tokens' if outputs['llmlab_compiled'] == ours else 'OTHER TOKENS'})")
    print(f"  llmlab:    {tok.decode(outputs['llmlab'])!r}")
    print(f"  llama.cpp: {tok.decode(outputs['llama.cpp'])!r}")

    times = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    tok_s = {name: new_tokens / statistics.median(t) for name, t in times.items()}
    print(f"\n{'':16}{'tokens/s (median)':>18}{'llama.cpp / this':>18}")
    for name, rate in tok_s.items():
        print(f"{name:16}{rate:18.0f}{tok_s['llama.cpp'] / rate:17.1f}x")
    if args.json:
        result = {"tokens_equal": equal, "new_tokens": new_tokens, "same_tokenization": same_tokenization,
                  **{f"{name}_tok_s": rate for name, rate in tok_s.items()}, "seconds": times, "args": vars(args)}
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    del llm
    tmp.cleanup()


if __name__ == "__main__":
    main()
