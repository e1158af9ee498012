"""Export a llmlab model as a Hugging Face folder that `transformers` loads (the format itself: llmlab.hf).

An export folder holds model.safetensors (fp32), config.json, generation_config.json (eos = `<|assistant_end|>`,
the token a reply ends with), tokenizer.json and tokenizer_config.json (with the chat template), so that
`AutoModelForCausalLM.from_pretrained(folder)` gives the same logits and `AutoTokenizer.from_pretrained(folder)`
with `apply_chat_template` the same prompt ids as llmlab.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save as tensors_to_bytes

from llmlab.chat import write_tokenizer_config
from llmlab.errors import LLMLabError
from llmlab.export.folder import atomic_dir
from llmlab.fileio import write_durably
from llmlab.hf import hf_config, hf_state_dict
from llmlab.model import GPT
from llmlab.tokenizer import Tokenizer


# --------------------------------------------------------------------------------------------------- export


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _write_tokenizer(folder: Path, tokenizer: Tokenizer, context_len: int | None) -> None:
    tokenizer.save(folder)
    write_tokenizer_config(folder, model_max_length=context_len)


def export_hf(model: GPT, tokenizer: Tokenizer | None, out_dir: str | Path, *, force: bool = False,
              source: str | Path | None = None) -> Path:
    """Write a folder that `transformers` loads as Qwen3ForCausalLM (qk_norm) or LlamaForCausalLM, with the
    tokenizer and its chat template when one is given. Returns out_dir."""
    cfg = model.config
    config = hf_config(cfg, tokenizer)
    info = {"format": "hf", "source": str(source) if source else None, "architecture": config["architectures"][0]}
    with atomic_dir(out_dir, force=force, info=info, source=source) as tmp:
        # as bytes through open(), so that the file follows the umask (safetensors' save_file makes it 0600)
        write_durably(tmp / "model.safetensors", tensors_to_bytes(hf_state_dict(model), metadata={"format": "pt"}))
        _write_json(tmp / "config.json", config)
        if tokenizer is not None:
            # no length: a max_length here makes `transformers` warn at every generate(max_new_tokens=...)
            generation = {"bos_token_id": tokenizer.bos_id, "eos_token_id": config["eos_token_id"],
                          "pad_token_id": tokenizer.pad_id}
            _write_json(tmp / "generation_config.json", generation)
            _write_tokenizer(tmp, tokenizer, cfg.context_len)
    return Path(out_dir)


def export_tokenizer(tokenizer: Tokenizer, out_dir: str | Path, *, force: bool = False,
                     source: str | Path | None = None, model_max_length: int | None = None) -> Path:
    """Write tokenizer.json + tokenizer_config.json (chat template included): a folder that
    `AutoTokenizer.from_pretrained` and llmlab's `Tokenizer.load` both read. Returns out_dir."""
    info = {"format": "tokenizer", "source": str(source) if source else None}
    with atomic_dir(out_dir, force=force, info=info, source=source) as tmp:
        _write_tokenizer(tmp, tokenizer, model_max_length)
    return Path(out_dir)


def hf_model(model: GPT):
    """The same weights in an in-memory `transformers` model (Qwen3ForCausalLM or LlamaForCausalLM), fp32,
    eval mode: for parity checks and benchmarks without writing a folder."""
    import transformers  # deferred: a heavy optional dependency (the test extra), needed only here

    config = hf_config(model.config)
    config = transformers.AutoConfig.for_model(config.pop("model_type"), **config)
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = hf.load_state_dict(hf_state_dict(model), strict=False)
    allowed_missing = {"lm_head.weight"} if model.config.tie_embeddings else set()
    if result.unexpected_keys or set(result.missing_keys) - allowed_missing:
        raise LLMLabError(f"transformers' {type(hf).__name__} does not fit llmlab's weights: missing "
                          f"{result.missing_keys[:4]}, unexpected {result.unexpected_keys[:4]}")
    return hf.eval()
