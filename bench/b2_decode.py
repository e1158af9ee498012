"""B2: decode speed at batch 1: the llmlab engine against `transformers` `generate` on the same weights.

The B2 shape of BENCHMARKS.md (vocab 8192, d_model 256, 6 layers, 4 heads of 64, SwiGLU 768, untied, random
weights: 9.3M parameters); greedy decoding of 256 new tokens after a 16-token prompt, KV cache on. Timed: the
whole `generate` call (prefill of 16 tokens included), tokens/s = 256 / seconds. The same weights are loaded
into Hugging Face's `Qwen3ForCausalLM` (llmlab's tensor names are Qwen3's), and the runs alternate between the
contenders so that a slow moment of the machine hits all of them. Both engines must produce the same tokens.

    python bench/b2_decode.py               # llmlab eager, llmlab compiled, transformers; 5 rounds
    python bench/b2_decode.py --no_hf       # without transformers
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from llmlab.engine import Engine, SamplingParams
from llmlab.export.hf import hf_model
from llmlab.model import GPT, GPTConfig
from llmlab.training import configure_torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--new_tokens", type=int, default=256)
    p.add_argument("--prompt_len", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5, help="timed runs of each contender (after one warm-up run)")
    p.add_argument("--no_hf", action="store_true", help="skip the transformers reference")
    p.add_argument("--json", type=str, default="")
    args = p.parse_args()
    configure_torch()

    cfg = GPTConfig(vocab_size=8192, n_layer=6, d_model=256, n_head=4, n_kv_head=4, ffn_hidden=768,
                    context_len=args.prompt_len + args.new_tokens + 16, qk_norm=True, tie_embeddings=False)
    torch.manual_seed(0)
    model = GPT(cfg)
    model.init_weights(seed=0)
    prompt = torch.randint(0, cfg.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0)
    print(f"B2: {model.num_params() / 1e6:.1f}M parameters, {args.prompt_len}-token prompt, {args.new_tokens} new "
          f"tokens greedy, {torch.get_num_threads()} threads")

    contenders = {"llmlab": Engine(model).generate, "llmlab_compiled": Engine(model, compile=True).generate}
    if not args.no_hf:
        hf = hf_model(model)

        @torch.inference_mode()
        def hf_generate(prompts, params):
            ids = torch.tensor(prompts)
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=params.max_new_tokens,
                              min_new_tokens=params.max_new_tokens, do_sample=False, pad_token_id=0)
            return out[:, ids.size(1):].tolist()

        contenders["transformers"] = hf_generate

    outputs, times = {}, {name: [] for name in contenders}
    for name, fn in contenders.items():  # warm-up (the compiled engine compiles here)
        t0 = time.perf_counter()
        outputs[name] = fn([prompt], params)[0]
        print(f"  warm-up {name}: {time.perf_counter() - t0:.1f} s")
    for name, out in outputs.items():
        same = sum(a == b for a, b in zip(out, outputs["llmlab"]))
        print(f"  {name}: {same}/{args.new_tokens} tokens equal to llmlab eager")
    for _ in range(args.rounds):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            fn([prompt], params)
            times[name].append(time.perf_counter() - t0)

    tok_s = {name: args.new_tokens / statistics.median(t) for name, t in times.items()}
    print(f"\n{'':18}{'tokens/s (median)':>18}{'vs transformers':>17}")
    for name, rate in tok_s.items():
        ratio = f"{rate / tok_s['transformers']:.2f}x" if "transformers" in tok_s else "-"
        print(f"{name:18}{rate:18.0f}{ratio:>17}")
    print("target: >= 5x transformers (reference machine: transformers 93 tokens/s)")
    if args.json:
        result = {f"{name}_tok_s": rate for name, rate in tok_s.items()}
        if "transformers" in tok_s:
            result["speedup_compiled"] = tok_s["llmlab_compiled"] / tok_s["transformers"]
            result["speedup_eager"] = tok_s["llmlab"] / tok_s["transformers"]
            result["tokens_equal"] = sum(a == b for a, b in zip(outputs["transformers"], outputs["llmlab_compiled"]))
        result.update(seconds=times, args=vars(args))
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
