"""Checkpoints: atomic save and load of the model, optimizer state, RNG and data position, and the one call
that opens a checkpoint for use (`load`: model, tokenizer and info together).

A training stage writes into its output directory:

    out_dir/
      latest                 text file naming the newest complete checkpoint (replaced atomically)
      step-000200/           one checkpoint, itself a Hugging Face-style folder:
        model.safetensors      weights (a tied head is stored once, as embed_tokens.weight)
        config.json            model shape (GPTConfig)
        tokenizer.json         the tokenizer the model was trained with
        llmlab.json            stage, step, tokens seen, resolved stage config, metrics, format_version, and the
                               sha256 of model.safetensors (checked on load)
        optimizer.safetensors  optimizer state tensors, for resuming
        trainer_state.json     optimizer hyperparameters, data loader position, RNG states

A checkpoint is built in a hidden temporary directory, every file fsynced, then renamed into place, and only
then does `latest` move to it. Saving a step that already exists (re-running a finished stage) first points
`latest` at a hard-linked copy of the old one, so `latest` names a complete checkpoint at every instant and a
process killed anywhere in a save leaves a loadable run (tests/test_checkpoint.py kills it between every two
filesystem operations). Weights are never pickled; weights that are not finite are refused at save and at
load, as is a model.safetensors whose checksum does not match. A Hugging Face Llama or Qwen3 folder loads as a
checkpoint too: its config and tensor names are converted on the fly (llmlab.hf).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load as tensors_from_bytes
from safetensors.torch import load_file
from safetensors.torch import save as tensors_to_bytes

from llmlab import dist
from llmlab.chat import write_tokenizer_config
from llmlab.errors import LLMLabError
from llmlab.fileio import fsync_dir, fsync_file, write_atomic, write_durably
from llmlab.hf import INDEX, gpt_config_from_hf, is_hf_folder, read_hf_weights
from llmlab.lora import add_lora, merge_lora
from llmlab.model import GPT, GPTConfig
from llmlab.tokenizer import Tokenizer

FORMAT_VERSION = 1
LATEST = "latest"
_PREVIOUS = ".previous-"  # a hard-linked copy of a step being saved again, named by `latest` meanwhile


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def _check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise LLMLabError(f"{what}: {name} holds NaN or infinite values; such weights are never saved or "
                              f"loaded (a learning rate too high for the model is the usual cause)")


def gather_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights as whole CPU tensors under llmlab's names, a tied head stored once, FSDP2 shards gathered
    (then a collective: every rank calls it)."""
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


def _remove_leftovers(out_dir: Path) -> None:
    """Remove what a process killed mid-save left behind, except the directory `latest` names."""
    named = _latest_name(out_dir)
    for stale in [*out_dir.glob(".tmp-step-*"), *out_dir.glob(_PREVIOUS + "*")]:
        if stale.name != named:
            shutil.rmtree(stale, ignore_errors=True)


def _point_latest(out_dir: Path, name: str) -> None:
    write_atomic(out_dir / LATEST, (name + "\n").encode())


def save_checkpoint(out_dir: str | Path, step: int, model: nn.Module, *, tokenizer_path: str | Path | None,
                    meta: dict, optimizers: list[torch.optim.Optimizer] | None = None,
                    trainer_state: dict | None = None, keep: int = 2, write: bool = True) -> Path:
    """Write checkpoint `out_dir/step-{step}` atomically, point `latest` at it, keep the newest `keep`.

    With several processes every rank calls this (FSDP2 shards are gathered into whole tensors, the same
    files as a single process would write) and only the one given write=True (rank 0) writes.
    """
    out_dir = Path(out_dir)
    name = f"step-{step:06d}"
    weights = gather_weights(model)
    opt_state = _optimizer_state(optimizers) if optimizers is not None else None
    if not write:
        return out_dir / name
    _check_finite(weights, f"checkpoint {out_dir / name}")
    model = dist.unwrap(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(out_dir)
    tmp = out_dir / f".tmp-{name}-{os.getpid()}"
    os.mkdir(tmp)
    weight_bytes = tensors_to_bytes(weights)
    write_durably(tmp / "model.safetensors", weight_bytes)
    config = {"model_type": "llmlab", **model.config.to_dict()}
    write_durably(tmp / "config.json", (json.dumps(config, indent=2) + "\n").encode())
    if tokenizer_path is not None:
        write_durably(tmp / "tokenizer.json", resolve_tokenizer(tokenizer_path).read_bytes())
        write_tokenizer_config(tmp, model_max_length=model.config.context_len)  # with the chat template
        fsync_file(tmp / "tokenizer_config.json")
    info = {"format_version": FORMAT_VERSION, "step": step, **meta,
            "weights_sha256": hashlib.sha256(weight_bytes).hexdigest()}
    write_durably(tmp / "llmlab.json", _json_bytes(info))
    if opt_state is not None:
        tensors, groups = opt_state
        write_durably(tmp / "optimizer.safetensors", tensors_to_bytes(tensors))
        state = dict(trainer_state or {})
        state["optimizer_param_groups"] = groups
        state["rng"] = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
        write_durably(tmp / "trainer_state.json", _json_bytes(state))
    fsync_dir(tmp)

    final = out_dir / name
    if final.exists():
        if _latest_name(out_dir) == name:  # saving a step again: `latest` moves to a copy of the old one first
            previous = out_dir / (_PREVIOUS + name)
            shutil.rmtree(previous, ignore_errors=True)
            os.mkdir(previous)
            for f in final.iterdir():
                os.link(f, previous / f.name)  # files are never modified in place, so links are a copy
            fsync_dir(previous)
            _point_latest(out_dir, previous.name)
        shutil.rmtree(final)  # `latest` does not name it (any more)
    os.rename(tmp, final)
    fsync_dir(out_dir)
    _point_latest(out_dir, name)
    _remove_leftovers(out_dir)
    steps = sorted(p for p in out_dir.glob("step-*") if p.is_dir())
    for old in steps[:-keep] if keep > 0 else []:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _latest_name(out_dir: Path) -> str | None:
    """The directory name in `out_dir/latest`, or None without one; a clear error for a file that is not one."""
    path = out_dir / LATEST
    if not path.is_file():
        return None
    try:
        name = path.read_bytes().decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise LLMLabError(f"{path} is unreadable or not text ({e}): remove it to start over") from None
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise LLMLabError(f"{path} does not name a checkpoint directory ({name[:40]!r}): remove it to start over")
    return name


@dataclass
class Checkpoint:
    """A checkpoint opened for use: what `load` returns."""

    path: Path
    """the checkpoint directory itself (a `latest` file already followed)"""
    model: GPT
    """the model with the checkpoint's shape and weights, in eval mode"""
    tokenizer: Tokenizer | None
    """the tokenizer saved with it; None for a folder without tokenizer.json (a bare Hugging Face model)"""
    info: dict
    """llmlab.json: stage, step, resolved stage config, metrics (an imported folder: stage "import")"""

    def require_tokenizer(self, purpose: str) -> Tokenizer:
        """The tokenizer, or a clear error saying what needs it when the folder has none."""
        if self.tokenizer is None:
            raise LLMLabError(f"{self.path} has no tokenizer.json: {purpose} needs the model's tokenizer "
                              f"(export it with the model, or copy a llmlab tokenizer.json into the folder)")
        return self.tokenizer


def load(path: str | Path, device: str | torch.device = "cpu", *, verify: bool = True) -> Checkpoint:
    """Open a run directory (its `latest`), a step directory or a Hugging Face Llama / Qwen3 folder: the path is
    resolved once, and model, tokenizer and info come from the same directory. `verify=False` skips the
    checksum of the weights (for speed on large models)."""
    ckpt = resolve(path)
    model = load_model(ckpt, device, verify=verify)
    tokenizer = Tokenizer.load(ckpt) if (ckpt / "tokenizer.json").is_file() else None
    return Checkpoint(path=ckpt, model=model, tokenizer=tokenizer, info=read_info(ckpt))


def resolve(path: str | Path) -> Path:
    """The checkpoint directory that `path` names: itself, or the one its `latest` file points at."""
    path = Path(path)
    if not path.exists():
        raise LLMLabError(f"checkpoint path {path} does not exist: train one first or pass the right path")
    name = _latest_name(path) if path.is_dir() else None
    if name is not None:
        target = path / name
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


def weights_sha256(ckpt: str | Path) -> str:
    """The sha256 of a checkpoint's model.safetensors as recorded when it was saved ("" when none is: an imported
    folder): what names its weights, e.g. the base a LoRA adapter was trained on."""
    return read_info(ckpt).get("weights_sha256", "")


def load_model_config(ckpt: str | Path) -> GPTConfig:
    ckpt = resolve(ckpt)
    try:
        data = json.loads((ckpt / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LLMLabError(f"{ckpt}/config.json is missing or corrupt ({e})") from None
    if data.get("model_type", "llmlab") != "llmlab":  # a Hugging Face Llama or Qwen3 folder
        return gpt_config_from_hf(data, where=str(ckpt / "config.json"))
    return GPTConfig.from_dict(data)


def _read_weights(ckpt: Path, verify: bool) -> dict[str, torch.Tensor]:
    """model.safetensors of a llmlab checkpoint, its checksum checked against llmlab.json when `verify`."""
    try:
        data = (ckpt / "model.safetensors").read_bytes()
        tensors = tensors_from_bytes(data)
    except (SafetensorError, OSError) as e:
        raise LLMLabError(f"{ckpt}/model.safetensors is unreadable or corrupt ({e})") from None
    expected = read_info(ckpt).get("weights_sha256") if verify and (ckpt / "llmlab.json").is_file() else None
    if expected is not None and hashlib.sha256(data).hexdigest() != expected:
        raise LLMLabError(f"{ckpt}/model.safetensors is corrupt: its sha256 differs from the one recorded in "
                          f"llmlab.json when it was saved (a damaged disk or copy?)")
    return tensors


def load_weights(model: GPT, ckpt: str | Path, *, verify: bool = True) -> None:
    """Load the checkpoint's weights into `model`, checking names, shapes, finiteness and (with `verify`) the
    checksum first: a clear error, not a traceback or a silently broken model."""
    ckpt = resolve(ckpt)
    if is_hf_folder(ckpt):  # Hugging Face names (and maybe shards), converted to llmlab's
        tensors = read_hf_weights(ckpt, tied=model.config.tie_embeddings)
    else:
        tensors = _read_weights(ckpt, verify)
    expected = {k: v for k, v in model.state_dict().items()
                if not (k == "lm_head.weight" and model.config.tie_embeddings)}
    missing, unexpected = set(expected) - set(tensors), set(tensors) - set(expected)
    if missing or unexpected:
        raise LLMLabError(f"checkpoint {ckpt} does not fit this model: missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]}")
    for name, t in tensors.items():
        if t.shape != expected[name].shape:
            raise LLMLabError(f"checkpoint {ckpt} has {name} of shape {tuple(t.shape)}, this model expects {tuple(expected[name].shape)}: use matching model flags")
    _check_finite(tensors, f"checkpoint {ckpt}")
    model.load_state_dict(tensors, strict=False)  # strict=False only for the tied head, checked above


def load_model(ckpt: str | Path, device: str | torch.device = "cpu", *, verify: bool = True) -> GPT:
    """A GPT with the checkpoint's shape and weights, in eval mode (`load` also gives its tokenizer); a
    checkpoint of LoRA fine-tuning comes with its adapter merged (llmlab.lora)."""
    model = GPT(load_model_config(ckpt))
    lora = read_info(ckpt).get("lora") if (resolve(ckpt) / "llmlab.json").is_file() else None
    if lora:
        add_lora(model, lora["r"], lora["alpha"], tuple(lora["targets"]))
    load_weights(model, ckpt, verify=verify)
    if lora:
        merge_lora(model)
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
