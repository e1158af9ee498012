"""run.py: greedy generation with an exported llmlab model in plain numpy (no torch, no llmlab).

Needs numpy and safetensors; text in and out also needs `tokenizers` (token ids do not). Reads config.json,
model.safetensors and tokenizer.json from the folder it sits in (or --model_dir). Gives the same tokens as
llmlab's engine at temperature 0.

    python run.py "Q: Where was Ada born? A:"      complete text (after <|bos|>), stop at <|bos|>
    python run.py --chat "Where was Ada born?"     the assistant's reply to one user message
    python run.py --ids 0,17,42                    continue token ids; prints the new ids as JSON, no stop
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file


class Model:
    """The decoder: embedding -> layers of [RMSNorm, attention with RoPE (and QK norm in Qwen3 layout),
    RMSNorm, SwiGLU] -> RMSNorm -> head. Keys and values of past positions are kept per layer (a KV cache)."""

    def __init__(self, folder: Path):
        cfg = json.loads((folder / "config.json").read_text())
        self.w = load_file(str(folder / "model.safetensors"))
        self.n_layer, self.n_head, self.n_kv_head = cfg["n_layer"], cfg["n_head"], cfg["n_kv_head"]
        self.head_dim = cfg["head_dim"] or cfg["d_model"] // cfg["n_head"]
        self.eps, self.qk_norm, self.context_len = cfg["norm_eps"], cfg["qk_norm"], cfg["context_len"]
        self.head = self.w.get("lm_head.weight", self.w["embed_tokens.weight"])  # tied: one matrix for both
        # RoPE tables, "rotate half" layout: dimension j pairs with j + head_dim/2, both at frequency j
        inv_freq = 1.0 / cfg["rope_theta"] ** (np.arange(0, self.head_dim, 2, dtype=np.float32) / self.head_dim)
        angles = np.outer(np.arange(self.context_len, dtype=np.float32), inv_freq.astype(np.float32))
        angles = np.concatenate([angles, angles], axis=-1)  # (context_len, head_dim)
        self.cos, self.sin = np.cos(angles), np.sin(angles)
        self.cache = [None] * self.n_layer  # per layer: (keys, values), each (n_kv_head, length, head_dim)

    def norm(self, x, weight):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * weight

    def rope(self, x, pos):  # x (heads, T, head_dim)
        half = self.head_dim // 2
        rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * self.cos[pos] + rotated * self.sin[pos]

    def forward(self, ids: list[int]) -> np.ndarray:
        """Append ids to the sequence; return the logits (vocab,) of the next token."""
        start = 0 if self.cache[0] is None else self.cache[0][0].shape[1]
        T, D, H, Hkv = len(ids), self.head_dim, self.n_head, self.n_kv_head
        pos = np.arange(start, start + T)
        x = self.w["embed_tokens.weight"][ids]  # (T, d_model)
        for i in range(self.n_layer):
            p = f"layers.{i}."
            h = self.norm(x, self.w[p + "input_layernorm.weight"])
            q = (h @ self.w[p + "self_attn.q_proj.weight"].T).reshape(T, H, D)
            k = (h @ self.w[p + "self_attn.k_proj.weight"].T).reshape(T, Hkv, D)
            v = (h @ self.w[p + "self_attn.v_proj.weight"].T).reshape(T, Hkv, D)
            if self.qk_norm:
                q = self.norm(q, self.w[p + "self_attn.q_norm.weight"])
                k = self.norm(k, self.w[p + "self_attn.k_norm.weight"])
            q, k, v = q.transpose(1, 0, 2), k.transpose(1, 0, 2), v.transpose(1, 0, 2)  # (heads, T, D)
            q, k = self.rope(q, pos), self.rope(k, pos)
            if self.cache[i] is not None:
                k, v = np.concatenate([self.cache[i][0], k], axis=1), np.concatenate([self.cache[i][1], v], axis=1)
            self.cache[i] = (k, v)
            k, v = np.repeat(k, H // Hkv, axis=0), np.repeat(v, H // Hkv, axis=0)  # grouped-query heads
            scores = q @ k.transpose(0, 2, 1) / np.sqrt(np.float32(D))  # (H, T, start + T)
            causal = np.arange(start + T)[None, :] <= pos[:, None]
            scores = np.where(causal, scores, -np.inf)
            probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
            probs /= probs.sum(axis=-1, keepdims=True)
            y = (probs @ v).transpose(1, 0, 2).reshape(T, H * D)
            x = x + y @ self.w[p + "self_attn.o_proj.weight"].T
            h = self.norm(x, self.w[p + "post_attention_layernorm.weight"])
            gate, up = h @ self.w[p + "mlp.gate_proj.weight"].T, h @ self.w[p + "mlp.up_proj.weight"].T
            silu = gate * (0.5 + 0.5 * np.tanh(gate / 2))  # gate * sigmoid(gate), without overflow in exp
            x = x + (silu * up) @ self.w[p + "mlp.down_proj.weight"].T  # SwiGLU
        return self.norm(x[-1], self.w["norm.weight"]) @ self.head.T


def generate(model: Model, prompt: list[int], max_new_tokens: int, stop_ids=()):
    """Yield greedy tokens one by one until a stop id (not yielded), max_new_tokens or a full context."""
    logits = model.forward(prompt)
    for _ in range(min(max_new_tokens, model.context_len - len(prompt))):
        token = int(np.argmax(logits))
        if token in stop_ids:
            return
        yield token
        logits = model.forward([token])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prompt", nargs="?", default="", help="text to complete (or the user's message with --chat)")
    parser.add_argument("--chat", action="store_true", help="answer the prompt as the assistant")
    parser.add_argument("--ids", default="", help="comma-separated prompt token ids instead of text")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--model_dir", default=str(Path(__file__).resolve().parent))
    args = parser.parse_args()
    folder = Path(args.model_dir)
    model = Model(folder)
    if args.ids:
        new = list(generate(model, [int(t) for t in args.ids.split(",")], args.max_new_tokens))
        print(json.dumps(new))
        return
    from tokenizers import Tokenizer  # only text needs it

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.encode_special_tokens = True  # special-token text typed in a prompt stays text, as in llmlab
    sp = tok.token_to_id
    text = tok.encode(args.prompt, add_special_tokens=False).ids
    if args.chat:
        prompt = [sp("<|bos|>"), sp("<|user_start|>"), *text, sp("<|user_end|>"), sp("<|assistant_start|>")]
        stop = {sp("<|assistant_end|>")}
    else:
        prompt, stop = [sp("<|bos|>"), *text], {sp("<|bos|>")}
        sys.stdout.write(args.prompt)
    new, printed = [], ""
    for token in generate(model, prompt, args.max_new_tokens, stop):
        new.append(token)
        text = tok.decode(new, skip_special_tokens=False)
        if not text.endswith("\ufffd"):  # else a character is split over tokens: wait for its last byte
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text
    sys.stdout.write(tok.decode(new, skip_special_tokens=False)[len(printed):] + "\n")


if __name__ == "__main__":
    main()
