"""GGUF export for llama.cpp (through the `gguf` package): arch `qwen3` when qk_norm, `llama` otherwise.

One file, `model.gguf`, with every tensor in fp32 (exact; quantize it with llama.cpp's `llama-quantize`),
the model's hyperparameters, and the tokenizer: byte-level BPE ("gpt2" in llama.cpp's terms) with its tokens,
merges and token types (llmlab's special tokens are *control* tokens, so text that looks like one stays text,
as in llmlab), bos / eos (`<|assistant_end|>`, where a reply ends) / pad ids, and the chat template.

Two layout decisions:

- RoPE. llmlab, like Hugging Face, rotates each head's first half against its second half ("rotate half",
  what llama.cpp calls NEOX). llama.cpp's `qwen3` arch uses that layout, so Qwen3 tensors go in unchanged.
  Its `llama` arch rotates adjacent pairs (0,1), (2,3), ... instead (the layout of Meta's original
  checkpoints), so, as llama.cpp's own converter does for Llama models, the rows of each head of q_proj and
  k_proj are reordered 0, D/2, 1, D/2+1, ... (`interleave_rope`). Queries and keys get the same reordering,
  so their dot products, and the model, are unchanged; `uninterleave_rope` undoes it.
- Pre-tokenizer. llmlab splits text with the GPT-4 pattern except that digits stand alone, which is the
  pattern of Qwen2's tokenizer, so the file names llama.cpp's "qwen2" pre-tokenizer. llama.cpp adds no bos
  (`add_bos_token` false): the chat template starts with `<|bos|>`, and raw prompts must start with it too,
  as in `transformers` with the exported tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from llmlab.chat import CHAT_TEMPLATE
from llmlab.errors import LLMLabError
from llmlab.export.folder import atomic_dir
from llmlab.model import GPT, GPTConfig
from llmlab.tokenizer import SPECIAL_TOKENS, Tokenizer

GGUF_FILE = "model.gguf"
PRE_TOKENIZER = "qwen2"

# llmlab name -> llama.cpp name; "{i}" is the layer
TENSOR_NAMES = {
    "embed_tokens.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "layers.{i}.self_attn.q_norm.weight": "blk.{i}.attn_q_norm.weight",
    "layers.{i}.self_attn.k_norm.weight": "blk.{i}.attn_k_norm.weight",
    "layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
}


def gguf_arch(cfg: GPTConfig) -> str:
    return "qwen3" if cfg.qk_norm else "llama"


def gguf_name(name: str) -> str:
    """llama.cpp's name of a llmlab tensor: `layers.3.mlp.up_proj.weight` -> `blk.3.ffn_up.weight`."""
    parts = name.split(".")
    if parts[0] == "layers":
        return TENSOR_NAMES["layers.{i}." + ".".join(parts[2:])].format(i=parts[1])
    return TENSOR_NAMES[name]


def interleave_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder the rows of each head of a (n_heads * D, d_in) projection from rotate-half pairs (j, j + D/2)
    to adjacent pairs (2j, 2j + 1): rows 0, D/2, 1, D/2 + 1, ..."""
    rows, d_in = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, d_in).swapaxes(1, 2).reshape(rows, d_in)


def uninterleave_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of `interleave_rope`."""
    rows, d_in = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, d_in).swapaxes(1, 2).reshape(rows, d_in)


def gguf_tensors(model: GPT) -> dict[str, np.ndarray]:
    """Every tensor under its llama.cpp name, fp32, q/k rows interleaved for the `llama` arch; a tied head is
    left out (llama.cpp then uses token_embd.weight as the output matrix)."""
    cfg = model.config
    out = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        w = t.detach().to("cpu").float().numpy()
        if not cfg.qk_norm and name.endswith("q_proj.weight"):
            w = interleave_rope(w, cfg.n_head)
        elif not cfg.qk_norm and name.endswith("k_proj.weight"):
            w = interleave_rope(w, cfg.n_kv_head)
        out[gguf_name(name)] = np.ascontiguousarray(w)
    return out


def vocabulary(tokenizer: Tokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens by id, llama.cpp token types, merges "a b") of a byte-level BPE tokenizer, padded with unused
    tokens up to the model's vocab_size."""
    import gguf  # deferred: an optional dependency (the export extra)

    if tokenizer.vocab_size > vocab_size:
        raise LLMLabError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {vocab_size}: "
                          f"export the tokenizer the model was trained with")
    by_id = {i: tok for tok, i in tokenizer.hf.get_vocab(with_added_tokens=True).items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if by_id[i] in SPECIAL_TOKENS else gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    model = json.loads(tokenizer.hf.to_str())["model"]
    if model.get("type") != "BPE":
        raise LLMLabError(f"GGUF export needs a byte-level BPE tokenizer, this one is {model.get('type')}")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, [int(t) for t in types], merges


def export_gguf(model: GPT, tokenizer: Tokenizer, out_dir: str | Path, *, force: bool = False,
                source: str | Path | None = None) -> Path:
    """Write out_dir/model.gguf for llama.cpp. Returns the file's path."""
    try:
        import gguf  # deferred: an optional dependency (the export extra)
    except ImportError:
        raise LLMLabError("GGUF export needs the gguf package: pip install 'llmlab[export]'") from None
    cfg = model.config
    arch = gguf_arch(cfg)
    tokens, types, merges = vocabulary(tokenizer, cfg.vocab_size)
    info = {"format": "gguf", "source": str(source) if source else None, "architecture": arch}
    with atomic_dir(out_dir, force=force, info=info, source=source) as tmp:
        writer = gguf.GGUFWriter(str(tmp / GGUF_FILE), arch)
        writer.add_name("llmlab")
        writer.add_file_type(gguf.LlamaFileType.ALL_F32)
        writer.add_vocab_size(cfg.vocab_size)
        writer.add_context_length(cfg.context_len)
        writer.add_embedding_length(cfg.d_model)
        writer.add_block_count(cfg.n_layer)
        writer.add_feed_forward_length(cfg.ffn)
        writer.add_head_count(cfg.n_head)
        writer.add_head_count_kv(cfg.n_kv_head)
        writer.add_key_length(cfg.hdim)
        writer.add_value_length(cfg.hdim)
        writer.add_rope_dimension_count(cfg.hdim)
        writer.add_rope_freq_base(cfg.rope_theta)
        writer.add_layer_norm_rms_eps(cfg.norm_eps)

        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(PRE_TOKENIZER)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(tokenizer.bos_id)
        writer.add_eos_token_id(tokenizer.special_id("<|assistant_end|>"))
        writer.add_pad_token_id(tokenizer.pad_id)
        writer.add_add_bos_token(False)
        writer.add_add_eos_token(False)
        writer.add_chat_template(CHAT_TEMPLATE)

        for name, w in gguf_tensors(model).items():
            writer.add_tensor(name, w)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return Path(out_dir) / GGUF_FILE
