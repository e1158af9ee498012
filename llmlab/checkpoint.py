"""Checkpoints: atomic save and load of the model, optimizer state, RNG and data position.

A training stage writes into its output directory:

    out_dir/
      latest                 text file naming the newest complete checkpoint (replaced atomically)
      step-000200/           one checkpoint, itself a Hugging Face-style folder:
        model.safetensors      weights (a tied head is stored once, as embed_tokens.weight)
        config.json            model shape (GPTConfig)
        tokenizer.json         the tokenizer the model was trained with
        llmlab.json            stage, step, tokens seen, resolved stage config, metrics, format_version
        optimizer.safetensors  optimizer state tensors, for resuming
        trainer_state.json     optimizer hyperparameters, data loader position, RNG states

A checkpoint is built in a hidden temporary directory, every file fsynced, then renamed into place, and only
then does `latest` move to it: a process killed at any point leaves the previous checkpoint intact and
loadable. Weights are never pickled. A Hugging Face Llama or Qwen3 folder loads as a checkpoint too: its
config and tensor names are converted on the fly (llmlab.export.hf).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from llmlab import dist
from llmlab.chat import write_tokenizer_config
from llmlab.errors import LLMLabError
from llmlab.export.hf import INDEX, gpt_config_from_hf, is_hf_folder, read_hf_weights
from llmlab.model import GPT, GPTConfig

FORMAT_VERSION = 1
LATEST = "latest"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temporary sibling, fsync, and rename over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _write_bytes(tmp, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())
    os.replace(tmp, path)


def _model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights as whole CPU tensors, FSDP2 shards gathered (then a collective: every rank calls it)."""
    model = dist.unwrap(model)
    sd = model.state_dict()
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight")
    return {k: dist.full_tensor(v).detach().to("cpu").contiguous() for k, v in sd.items()}


def _optimizer_state(optimizers: list[torch.optim.Optimizer]) -> tuple[dict[str, torch.Tensor], list]:
    """Optimizer state as whole CPU tensors named "{optimizer}.{parameter index}.{key}" (a collective under
    FSDP2), and the param groups."""
    tensors, groups = {}, []
    for i, opt in enumerate(optimizers):
        sd = opt.state_dict()
        for pid, state in sd["state"].items():
            for key, value in state.items():
                if not torch.is_tensor(value):
                    value = torch.tensor(value)
                tensors[f"{i}.{pid}.{key}"] = dist.full_tensor(value).detach().to("cpu").contiguous()
        groups.append(sd["param_groups"])
    return tensors, groups


def save_checkpoint(out_dir: str | Path, step: int, model: nn.Module, *, tokenizer_path: str | Path | None,
                    meta: dict, optimizers: list[torch.optim.Optimizer] | None = None,
                    trainer_state: dict | None = None, keep: int = 2, write: bool = True) -> Path:
    """Write checkpoint `out_dir/step-{step}` atomically, point `latest` at it, keep the newest `keep`.

    With several processes every rank calls this (FSDP2 shards are gathered into whole tensors, the same
    files as a single process would write) and only the one given write=True (rank 0) writes.
    """
    out_dir = Path(out_dir)
    name = f"step-{step:06d}"
    weights = _model_tensors(model)
    opt_state = _optimizer_state(optimizers) if optimizers is not None else None
    if not write:
        return out_dir / name
    model = dist.unwrap(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(".tmp-step-*"):  # left by a process killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out_dir / f".tmp-{name}-{os.getpid()}"
    tmp.mkdir()
    save_file(weights, str(tmp / "model.safetensors"))
    _write_bytes(tmp / "config.json", (json.dumps({"model_type": "llmlab", **model.config.to_dict()}, indent=2) + "\n").encode())
    if tokenizer_path is not None:
        shutil.copyfile(resolve_tokenizer(tokenizer_path), tmp / "tokenizer.json")
        write_tokenizer_config(tmp, model_max_length=model.config.context_len)  # with the chat template
    info = {"format_version": FORMAT_VERSION, "step": step, **meta}
    _write_bytes(tmp / "llmlab.json", (json.dumps(info, indent=2, sort_keys=True) + "\n").encode())
    if opt_state is not None:
        tensors, groups = opt_state
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        state = dict(trainer_state or {})
        state["optimizer_param_groups"] = groups
        state["rng"] = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
        _write_bytes(tmp / "trainer_state.json", (json.dumps(state, indent=2, sort_keys=True) + "\n").encode())
    for f in tmp.iterdir():  # copyfile and save_file do not fsync
        with open(f, "rb+") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)
    final = out_dir / name
    if final.exists():  # a save of this step that `latest` never pointed at (killed before the pointer moved)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(out_dir)
    tmp_latest = out_dir / f".{LATEST}.tmp-{os.getpid()}"
    _write_bytes(tmp_latest, (name + "\n").encode())
    os.replace(tmp_latest, out_dir / LATEST)
    _fsync_dir(out_dir)
    steps = sorted(p for p in out_dir.glob("step-*") if p.is_dir())
    for old in steps[:-keep] if keep > 0 else []:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def resolve(path: str | Path) -> Path:
    """The checkpoint directory that `path` names: itself, or the one its `latest` file points at."""
    path = Path(path)
    if not path.exists():
        raise LLMLabError(f"checkpoint path {path} does not exist: train one first or pass the right path")
    if (path / LATEST).is_file():
        target = path / (path / LATEST).read_text().strip()
        if not (target / "model.safetensors").is_file():
            raise LLMLabError(f"{path / LATEST} points at {target}, which is not a checkpoint: remove `latest` to start over")
        return target
    if (path / "model.safetensors").is_file() or (path / INDEX).is_file():  # the index: a sharded HF folder
        return path
    raise LLMLabError(f"{path} is not a checkpoint (no model.safetensors and no `latest` file)")


def has_checkpoint(out_dir: str | Path) -> bool:
    return (Path(out_dir) / LATEST).is_file()


def resolve_tokenizer(path: str | Path) -> Path:
    path = Path(path)
    candidate = path / "tokenizer.json" if path.is_dir() else path
    if not candidate.is_file():
        raise LLMLabError(f"no tokenizer at {path}: run `llmlab tokenizer` first or pass --tokenizer")
    return candidate


def read_info(ckpt: str | Path) -> dict:
    ckpt = resolve(ckpt)
    if is_hf_folder(ckpt):  # an imported model has no training history
        return {"format_version": FORMAT_VERSION, "step": 0, "stage": "import", "metrics": {}}
    try:
        return json.loads((ckpt / "llmlab.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LLMLabError(f"{ckpt}/llmlab.json is missing or corrupt ({e})") from None


def load_model_config(ckpt: str | Path) -> GPTConfig:
    ckpt = resolve(ckpt)
    try:
        data = json.loads((ckpt / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LLMLabError(f"{ckpt}/config.json is missing or corrupt ({e})") from None
    if data.get("model_type", "llmlab") != "llmlab":  # a Hugging Face Llama or Qwen3 folder
        return gpt_config_from_hf(data, where=str(ckpt / "config.json"))
    return GPTConfig.from_dict(data)


def load_weights(model: GPT, ckpt: str | Path) -> None:
    """Load model.safetensors into `model`, checking names and shapes first (a clear error, not a traceback)."""
    ckpt = resolve(ckpt)
    if is_hf_folder(ckpt):  # Hugging Face names (and maybe shards), converted to llmlab's
        tensors = read_hf_weights(ckpt, tied=model.config.tie_embeddings)
    else:
        try:
            tensors = load_file(str(ckpt / "model.safetensors"))
        except (SafetensorError, OSError) as e:
            raise LLMLabError(f"{ckpt}/model.safetensors is unreadable or corrupt ({e})") from None
    expected = _model_tensors(model)
    missing, unexpected = set(expected) - set(tensors), set(tensors) - set(expected)
    if missing or unexpected:
        raise LLMLabError(f"checkpoint {ckpt} does not fit this model: missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]}")
    for name, t in tensors.items():
        if t.shape != expected[name].shape:
            raise LLMLabError(f"checkpoint {ckpt} has {name} of shape {tuple(t.shape)}, this model expects {tuple(expected[name].shape)}: use matching model flags")
    model.load_state_dict(tensors, strict=False)  # strict=False only for the tied head, checked above


def load_model(ckpt: str | Path, device: str | torch.device = "cpu") -> GPT:
    """A GPT with the checkpoint's shape and weights, in eval mode."""
    model = GPT(load_model_config(ckpt))
    load_weights(model, ckpt)
    return model.to(device).eval()


def check_same_shape(ckpt: str | Path, cfg: GPTConfig) -> None:
    saved = load_model_config(ckpt)
    if saved != cfg:
        diff = {k: (getattr(saved, k), getattr(cfg, k)) for k in cfg.to_dict() if getattr(saved, k) != getattr(cfg, k)}
        detail = ", ".join(f"{k}: checkpoint {a} vs asked {b}" for k, (a, b) in diff.items())
        raise LLMLabError(f"checkpoint {resolve(ckpt)} has another model shape ({detail}): use the same model flags or a new out_dir")


def load_training_state(ckpt: str | Path, model: GPT, optimizers: list[torch.optim.Optimizer]) -> dict:
    """Restore weights, optimizer state and the torch RNG; return the trainer state (data position etc.)."""
    ckpt = resolve(ckpt)
    check_same_shape(ckpt, model.config)
    load_weights(model, ckpt)
    return load_optimizer_state(ckpt, optimizers)


def load_optimizer_state(ckpt: str | Path, optimizers: list[torch.optim.Optimizer]) -> dict:
    """Restore optimizer state and the torch RNG; return the trainer state. Under FSDP2 (optimizers built on
    sharded parameters) each rank keeps its rows of the whole tensors saved, so a checkpoint resumes on any
    number of processes."""
    ckpt = resolve(ckpt)
    try:
        state = json.loads((ckpt / "trainer_state.json").read_text())
        tensors = load_file(str(ckpt / "optimizer.safetensors"))
    except (OSError, json.JSONDecodeError, SafetensorError) as e:
        raise LLMLabError(f"{ckpt} has no readable optimizer/trainer state to resume from ({e})") from None
    groups = state.pop("optimizer_param_groups")
    if len(groups) != len(optimizers):
        raise LLMLabError(f"{ckpt} holds {len(groups)} optimizers, this run has {len(optimizers)}")
    for i, opt in enumerate(optimizers):
        params = [p for group in opt.param_groups for p in group["params"]]  # state_dict's numbering
        per_param: dict[int, dict] = {}
        for name, t in tensors.items():
            oi, pid, key = name.split(".", 2)
            if int(oi) == i:
                if int(pid) >= len(params):
                    raise LLMLabError(f"{ckpt} holds optimizer state for more parameters than this model has")
                ref = params[int(pid)]
                per_param.setdefault(int(pid), {})[key] = dist.shard_like(t, ref) if t.shape == ref.shape else t
        opt.load_state_dict({"state": per_param, "param_groups": groups[i]})
    rng = torch.frombuffer(bytearray(base64.b64decode(state.pop("rng")["torch"])), dtype=torch.uint8)
    torch.set_rng_state(rng)
    return state
