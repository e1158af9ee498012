"""The Hugging Face Llama / Qwen3 format, both ways: configs and tensor names, and reading such folders.

llmlab's GPT is the Llama / Qwen3 decoder and its tensor names are theirs without the `model.` prefix, so the
conversion is a renaming plus a config translation:

    GPTConfig              config.json (Qwen3Config when qk_norm, LlamaConfig otherwise)
    vocab_size             vocab_size
    n_layer, d_model       num_hidden_layers, hidden_size
    n_head, n_kv_head      num_attention_heads, num_key_value_heads
    hdim, ffn              head_dim, intermediate_size
    context_len            max_position_embeddings
    rope_theta, norm_eps   rope_theta (rope_parameters in transformers 5), rms_norm_eps
    tie_embeddings         tie_word_embeddings

Reading a folder (config.json with model_type "llama" or "qwen3", model.safetensors or shards listed in
model.safetensors.index.json) is what `llmlab.checkpoint` does when a checkpoint's config.json is not llmlab's,
so every stage can start from such a folder; writing one is `llmlab.export.hf`. A feature llmlab's model lacks
(attention or MLP biases, RoPE scaling, sliding-window attention, another activation) is refused with an error
naming it, never approximated. The folder's tokenizer works with llmlab only if it has llmlab's special tokens
(`Tokenizer.load` names the missing ones otherwise): a model exported by llmlab does; a Llama or Qwen3 from the
Hub does not, so its weights load (sample from token ids, fine-tune with a llmlab tokenizer of the same size)
but its chat format is not llmlab's.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from llmlab.errors import LLMLabError
from llmlab.model import GPT, GPTConfig
from llmlab.tokenizer import Tokenizer

ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}
INDEX = "model.safetensors.index.json"


# -------------------------------------------------------------------------------------------------- configs


def hf_config(cfg: GPTConfig, tokenizer: Tokenizer | None = None) -> dict:
    """config.json of the Hugging Face twin of a llmlab model (special-token ids when a tokenizer is given)."""
    model_type = "qwen3" if cfg.qk_norm else "llama"
    config = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.hdim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.context_len,
        "rms_norm_eps": cfg.norm_eps,
        # transformers 5 reads rope_parameters, 4.x reads rope_theta: both, so either version loads the folder
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": cfg.tie_embeddings,
        "use_cache": True,
        "dtype": "float32",
        "torch_dtype": "float32",
    }
    if model_type == "qwen3":
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layer)
    else:
        config.update(mlp_bias=False, pretraining_tp=1)
    if tokenizer is not None:
        config.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.special_id("<|assistant_end|>"),
                      pad_token_id=tokenizer.pad_id)
    return config


def _unsupported(data: dict) -> list[str]:
    """The features of a Hugging Face config that llmlab's model cannot express, in words."""
    found = []
    if data.get("hidden_act", "silu") != "silu":
        found.append(f"hidden_act={data['hidden_act']!r} (llmlab's MLP is SwiGLU with silu)")
    if data.get("attention_bias"):
        found.append("attention_bias=True (llmlab's attention has no biases)")
    if data.get("mlp_bias"):
        found.append("mlp_bias=True (llmlab's MLP has no biases)")
    rope_type = (data.get("rope_parameters") or {}).get("rope_type", "default")
    if data.get("rope_scaling") or rope_type != "default":
        found.append(f"rope_scaling ({data.get('rope_scaling') or rope_type!r}; llmlab has plain RoPE only)")
    if data.get("partial_rotary_factor", 1.0) != 1.0:
        found.append(f"partial_rotary_factor={data['partial_rotary_factor']} (llmlab rotates whole heads)")
    sliding_layers = [t for t in data.get("layer_types") or [] if t != "full_attention"]
    if data.get("use_sliding_window") or sliding_layers:
        found.append("sliding-window attention (llmlab attends to the whole context)")
    return found


def gpt_config_from_hf(data: dict, where: str = "config.json") -> GPTConfig:
    """The GPTConfig of a Hugging Face Llama or Qwen3 config.json; LLMLabError naming anything unsupported."""
    model_type = data.get("model_type")
    if model_type not in ARCHITECTURES:
        raise LLMLabError(f"{where}: model_type {model_type!r} is not supported: llmlab imports "
                          f"{' and '.join(sorted(ARCHITECTURES))} models only")
    unsupported = _unsupported(data)
    if unsupported:
        raise LLMLabError(f"{where}: this {model_type} model uses {'; '.join(unsupported)}: "
                          f"it cannot be imported exactly")
    try:
        d_model, n_head = int(data["hidden_size"]), int(data["num_attention_heads"])
        head_dim = int(data.get("head_dim") or d_model // n_head)
        ffn = int(data["intermediate_size"])
        rope_theta = (data.get("rope_parameters") or {}).get("rope_theta", data.get("rope_theta", 10000.0))
        default_context = 32768 if model_type == "qwen3" else 2048  # the config classes' defaults
        cfg = GPTConfig(
            vocab_size=int(data["vocab_size"]), n_layer=int(data["num_hidden_layers"]), d_model=d_model,
            n_head=n_head, n_kv_head=int(data.get("num_key_value_heads") or n_head),
            head_dim=head_dim, ffn_hidden=ffn,
            context_len=int(data.get("max_position_embeddings", default_context)), rope_theta=float(rope_theta),
            norm_eps=float(data.get("rms_norm_eps", 1e-6)), qk_norm=model_type == "qwen3",
            tie_embeddings=bool(data.get("tie_word_embeddings", False)))
    except KeyError as e:
        raise LLMLabError(f"{where}: missing {e.args[0]!r}: is this a complete {model_type} config.json?") from None
    # Spell derived sizes as llmlab does (0), so that llmlab -> Hugging Face -> llmlab gives an equal config.
    if replace(cfg, ffn_hidden=0).ffn == ffn:
        cfg = replace(cfg, ffn_hidden=0)
    if d_model % n_head == 0 and d_model // n_head == head_dim:
        cfg = replace(cfg, head_dim=0)
    return cfg


def read_config(folder: Path) -> dict | None:
    """config.json of a folder as a dict, or None when there is none."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LLMLabError(f"{path} is unreadable or corrupt ({e})") from None


def is_hf_folder(folder: str | Path) -> bool:
    """Whether a folder is a Hugging Face model (config.json whose model_type is not llmlab's)."""
    config = read_config(Path(folder))
    return config is not None and config.get("model_type", "llmlab") != "llmlab"


# -------------------------------------------------------------------------------------------------- weights


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The model's weights under Hugging Face names (`model.` prefix; a tied head is left out, as
    `save_pretrained` does), as contiguous CPU copies."""
    sd = model.state_dict()
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight")
    return {(k if k.startswith("lm_head.") else "model." + k): v.detach().to("cpu").contiguous().clone()
            for k, v in sd.items()}


def llmlab_state_dict(tensors: dict[str, torch.Tensor], tied: bool, where: str) -> dict[str, torch.Tensor]:
    """Hugging Face names -> llmlab names, fp32; a tied head checked and dropped (llmlab stores it once)."""
    out = {}
    for name, t in tensors.items():
        if "rotary_emb" in name:  # RoPE tables saved by old transformers versions: derived from the config
            continue
        out[name.removeprefix("model.")] = t.float()
    head = out.get("lm_head.weight")
    if tied and head is not None:
        if not torch.equal(head, out.get("embed_tokens.weight", head)):
            raise LLMLabError(f"{where}: tie_word_embeddings is true but lm_head.weight differs from the embedding: "
                              f"set tie_word_embeddings to false in config.json")
        del out["lm_head.weight"]
    if not tied and head is None:
        raise LLMLabError(f"{where}: tie_word_embeddings is false but there is no lm_head.weight: "
                          f"set tie_word_embeddings to true in config.json if the head shares the embedding")
    return out


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise LLMLabError(f"{path} is unreadable or corrupt ({e}): download or export it again") from None


def read_hf_weights(folder: str | Path, tied: bool) -> dict[str, torch.Tensor]:
    """The weights of a Hugging Face folder (model.safetensors, or the shards named by its index) under
    llmlab's names."""
    folder = Path(folder)
    if (folder / "model.safetensors").is_file():
        tensors = _load_safetensors(folder / "model.safetensors")
    elif (folder / INDEX).is_file():
        try:
            shards = sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values()))
        except (OSError, json.JSONDecodeError, KeyError, AttributeError) as e:
            raise LLMLabError(f"{folder / INDEX} is unreadable or has no weight_map ({e})") from None
        tensors = {}
        for shard in shards:
            tensors.update(_load_safetensors(folder / shard))
    else:
        raise LLMLabError(f"{folder} has no model.safetensors nor {INDEX}: llmlab reads safetensors weights only "
                          f"(convert .bin files with transformers' save_pretrained)")
    return llmlab_state_dict(tensors, tied, str(folder))
