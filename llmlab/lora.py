"""LoRA adapters (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"), written here and
saved in PEFT's format, so that an adapter trained by llmlab loads onto the Hugging Face export with `peft`.

A linear layer y = W x, W frozen, learns a low-rank update: y = W x + (alpha / r) B A x, with A (r x in)
initialised as PEFT does (Kaiming-uniform, a = sqrt(5)) and B (out x r) at zero, so training starts from the
base model exactly. Only A and B train: an adapter is a few percent of the model's size, and several adapters
share one base in memory.

    targets = add_lora(model, r=8, alpha=16)        # wraps q_proj, k_proj, v_proj, o_proj of every block
    ... train: only lora_A and lora_B have requires_grad ...
    save_adapter(model, "out/adapter", base="runs/cpu/sft")
    load_adapter(model, "out/adapter")              # onto a fresh copy of the base
    merge_lora(model)                               # W += (alpha / r) B A; the plain GPT again

    bank = AdapterBank(model)                       # several adapters over one base, chosen per row
    shop = bank.add("runs/shop-adapter")            # 1, 2, ...; 0 is the base alone
    with bank.use([shop, 0, shop]):                 # row 0 and 2 through the adapter, row 1 the base
        logits = model(ids)

A bank batches requests of different adapters into one forward, as S-LoRA and Punica serve thousands of
adapters: the base's matmul is shared by every row, and the rows of each adapter present take its low-rank
update together (gathered, multiplied, added back: Punica's segmented gather, here as index_select and
index_add), so adapters of any rank share a batch.

On disk (PEFT's layout): adapter_config.json ({"peft_type": "LORA", "r", "lora_alpha", "target_modules", ...})
and adapter_model.safetensors with keys `base_model.model.<Hugging Face module name>.lora_A.weight` /
`.lora_B.weight`; beside them llmlab_adapter.json, the base's shape, to refuse an adapter for another base.

A checkpoint of `llmlab sft --lora_r N` holds the base's frozen weights and the adapter under the wrapped
names, for resuming; its llmlab.json records {"lora": {"r", "alpha", "targets"}}, and llmlab.checkpoint loads it
merged, a plain GPT for every stage.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
from safetensors.torch import load_file
from safetensors.torch import save as tensors_to_bytes

from llmlab.errors import LLMLabError
from llmlab.fileio import write_durably
from llmlab.model import GPT, GPTConfig

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_LINEAR = TARGETS + ("gate_proj", "up_proj", "down_proj")
CONFIG, WEIGHTS, BASE = "adapter_config.json", "adapter_model.safetensors", "llmlab_adapter.json"


class LoRALinear(nn.Module):
    """`base` (frozen) plus the low-rank update (alpha / r) B A."""

    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        self.base_layer = base.requires_grad_(False)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=base.weight.device)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=base.weight.device)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(x)) * self.scaling


def add_lora(model: GPT, r: int = 8, alpha: float = 16.0, targets: tuple[str, ...] = TARGETS,
             seed: int = 0) -> list[str]:
    """Freeze `model` and wrap its linear layers named in `targets` with LoRA; the wrapped modules' names."""
    if r < 1:
        raise LLMLabError(f"LoRA's rank must be at least 1 (got {r})")
    unknown = set(targets) - set(ALL_LINEAR)
    if unknown:
        raise LLMLabError(f"LoRA targets {sorted(unknown)} are not layers of the model; choose from {', '.join(ALL_LINEAR)}")
    model.requires_grad_(False)
    torch.manual_seed(seed)
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                setattr(module, child_name, LoRALinear(child, r, alpha))
                wrapped.append(f"{name}.{child_name}" if name else child_name)
    if not wrapped:
        raise LLMLabError(f"no layer named {', '.join(targets)} in the model: nothing to adapt")
    return wrapped


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _hf(name: str) -> str:
    return name if name.startswith("lm_head") else "model." + name


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's saved names."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"base_model.model.{_hf(name)}.lora_A.weight"] = m.lora_A.weight.detach().cpu().contiguous()
        out[f"base_model.model.{_hf(name)}.lora_B.weight"] = m.lora_B.weight.detach().cpu().contiguous()
    return out


def _base_shape(model: GPT | GPTConfig) -> dict:
    c = model.config if isinstance(model, GPT) else model
    return {"vocab_size": c.vocab_size, "n_layer": c.n_layer, "d_model": c.d_model, "n_head": c.n_head,
            "n_kv_head": c.n_kv_head, "head_dim": c.hdim, "ffn": c.ffn}


def save_adapter(model: GPT, out_dir: str | Path, base: str = "", base_sha256: str = "") -> Path:
    """adapter_config.json and adapter_model.safetensors (PEFT's format) of the model's LoRA layers."""
    mods = lora_modules(model)
    if not mods:
        raise LLMLabError("the model has no LoRA layers to save")
    first = next(iter(mods.values()))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": first.r, "lora_alpha": first.alpha,
              "target_modules": sorted({n.rsplit(".", 1)[-1] for n in mods}), "lora_dropout": 0.0, "bias": "none",
              "fan_in_fan_out": False, "inference_mode": True, "base_model_name_or_path": str(base)}
    # as bytes through open(), so that the file follows the umask as the others do (save_file makes it 0600)
    write_durably(out / WEIGHTS, tensors_to_bytes(adapter_state(model), metadata={"format": "pt"}))
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    record = {"base": _base_shape(model), **({"base_weights_sha256": base_sha256} if base_sha256 else {})}
    (out / BASE).write_text(json.dumps(record, indent=2) + "\n")
    return out


def read_adapter_config(adapter_dir: str | Path) -> dict:
    path = Path(adapter_dir) / CONFIG
    if not path.is_file() or not (Path(adapter_dir) / WEIGHTS).is_file():
        raise LLMLabError(f"no adapter at {adapter_dir}: it needs {CONFIG} and {WEIGHTS} (`llmlab sft --lora_r N`)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LLMLabError(f"{path} is not JSON ({e})") from None
    if config.get("peft_type") != "LORA":
        raise LLMLabError(f"{path}: not a LoRA adapter (peft_type {config.get('peft_type')!r})")
    return config


def check_base(model: GPT | GPTConfig, adapter_dir: str | Path, config: dict, weights_sha256: str = "") -> None:
    """Raise LLMLabError if the adapter at `adapter_dir` was trained on a base of another shape than `model`
    (a model, or its config), or, when both are known, on other weights than those whose sha256 (of the
    checkpoint's model.safetensors) is `weights_sha256`: an adapter of another fine-tune of the same shape
    loads, and says nonsense."""
    record_file = Path(adapter_dir) / BASE  # (absent from adapters trained by PEFT itself)
    record = json.loads(record_file.read_text()) if record_file.is_file() else {}
    want, have = record.get("base"), _base_shape(model)
    base = config.get("base_model_name_or_path") or "its own base"
    if want is not None and want != have:
        diff = ", ".join(f"{k} {want.get(k)} vs {have[k]}" for k in have if want.get(k) != have[k])
        raise LLMLabError(f"the adapter at {adapter_dir} was trained on another base ({diff}): load it onto {base}")
    trained_on = record.get("base_weights_sha256")
    if trained_on and weights_sha256 and trained_on != weights_sha256:
        raise LLMLabError(f"the adapter at {adapter_dir} was trained on another base (the same shape, other weights: "
                          f"sha256 {trained_on[:12]} vs {weights_sha256[:12]}): load it onto {base}")


def load_adapter(model: GPT, adapter_dir: str | Path) -> GPT:
    """Wrap `model` (the base the adapter was trained on) with the adapter's LoRA layers and load them."""
    config = read_adapter_config(adapter_dir)
    check_base(model, adapter_dir, config)
    add_lora(model, config["r"], config["lora_alpha"], tuple(config["target_modules"]))
    tensors = load_file(str(Path(adapter_dir) / WEIGHTS))
    expected = adapter_state(model)
    if set(tensors) != set(expected):
        raise LLMLabError(f"{adapter_dir}/{WEIGHTS} does not hold the layers its config names")
    for name, m in lora_modules(model).items():
        for part in ("lora_A", "lora_B"):
            t = tensors[f"base_model.model.{_hf(name)}.{part}.weight"]
            getattr(m, part).weight.data.copy_(t)
    return model


def lora_meta(model: nn.Module) -> dict | None:
    """What a checkpoint records of the model's adapter ({"r", "alpha", "targets"}), or None without one."""
    mods = lora_modules(model)
    if not mods:
        return None
    first = next(iter(mods.values()))
    return {"r": first.r, "alpha": first.alpha, "targets": sorted({n.rsplit(".", 1)[-1] for n in mods})}


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base layer and put the plain layer back."""
    for name, m in lora_modules(model).items():
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        base = m.base_layer
        base.weight.add_(m.scaling * m.lora_B.weight @ m.lora_A.weight)
        setattr(parent, name.rsplit(".", 1)[-1], base)
    return model


class BankedLinear(nn.Module):
    """`base` plus, for each row of the batch, the low-rank update of the adapter its bank assigns the row."""

    def __init__(self, base: nn.Linear, bank: AdapterBank):
        super().__init__()
        self.base_layer = base
        self._bank = [bank]  # (in a list: not a submodule)
        w = base.weight
        # (A (r, in), B (out, r) with the scaling folded in) per adapter; index 0, the base alone, has rank 0
        self.updates: list[tuple[torch.Tensor, torch.Tensor]] = [(w.new_zeros(0, base.in_features),
                                                                   w.new_zeros(base.out_features, 0))]

    def add(self, A: torch.Tensor | None, B: torch.Tensor | None) -> None:
        """The next adapter's update B A (scaling folded into B), or none for this layer."""
        w = self.base_layer.weight
        self.updates.append(self.updates[0] if A is None else (A.to(w.device, w.dtype), B.to(w.device, w.dtype)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        rows = self._bank[0].rows
        if rows is None or (isinstance(rows, int) and rows == 0):
            return y
        if isinstance(rows, int):
            a, b = self.updates[rows]
            return y + (x @ a.T) @ b.T
        for adapter, members in rows:  # each adapter's rows together (Punica's segmented gather)
            a, b = self.updates[adapter]
            y = y.index_add(0, members, (x.index_select(0, members) @ a.T) @ b.T)
        return y


class AdapterBank:
    """Several LoRA adapters over one base model, chosen per row of a batch (see the module docstring).

    `add` wraps the linear layers an adapter targets in `BankedLinear` (once) and keeps its update beside the
    others'; `use(rows)` sets which adapter each row of the next forwards goes through: an int for every row,
    or one index per row (0: the base alone). Outside `use` the model is the base, exactly."""

    def __init__(self, model: GPT):
        self.model = model
        self.names: list[str] = ["base"]
        self.rows: int | list[tuple[int, torch.Tensor]] | None = None
        """what `use` set: one adapter for every row, or (adapter, its rows) for each adapter of the batch"""

    def __len__(self) -> int:
        return len(self.names)

    def _layers(self) -> dict[str, BankedLinear]:
        return {name: m for name, m in self.model.named_modules() if isinstance(m, BankedLinear)}

    @torch.no_grad()
    def add(self, adapter_dir: str | Path, name: str = "", base_sha256: str = "") -> int:
        """Load the adapter at `adapter_dir` (PEFT's format) into the bank; its index. Raises LLMLabError, the
        bank unchanged, for an adapter that is not one, is for another base (of another shape, or, with the
        model's `base_sha256`, other weights: `check_base`), or misses layers it names."""
        config = read_adapter_config(adapter_dir)
        check_base(self.model, adapter_dir, config, base_sha256)
        targets = set(config["target_modules"])
        unknown = targets - set(ALL_LINEAR)
        if unknown:
            raise LLMLabError(f"{adapter_dir}: targets {sorted(unknown)} are not layers of the model")
        tensors = load_file(str(Path(adapter_dir) / WEIGHTS))
        scaling = config["lora_alpha"] / config["r"]
        updates = {}
        for name_, m in self.model.named_modules():
            leaf = name_.rsplit(".", 1)[-1]
            if leaf in targets and isinstance(m, (nn.Linear, BankedLinear)):
                key = f"base_model.model.{_hf(name_)}"
                if f"{key}.lora_A.weight" not in tensors or f"{key}.lora_B.weight" not in tensors:
                    raise LLMLabError(f"{adapter_dir}/{WEIGHTS} has no weights for {name_}, which its config targets")
                updates[name_] = (tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] * scaling)
        if not updates:
            raise LLMLabError(f"{adapter_dir}: no layer of the model is named in its targets {sorted(targets)}")
        for name_ in updates:  # wrap the layers no adapter has touched yet, at the bank's current size
            m = self.model.get_submodule(name_)
            if isinstance(m, nn.Linear):
                banked = BankedLinear(m, self)
                for _ in range(len(self.names) - 1):
                    banked.add(None, None)
                parent = self.model.get_submodule(name_.rsplit(".", 1)[0]) if "." in name_ else self.model
                setattr(parent, name_.rsplit(".", 1)[-1], banked)
        for name_, layer in self._layers().items():
            layer.add(*updates.get(name_, (None, None)))
        self.names.append(name or str(adapter_dir))
        return len(self.names) - 1

    @contextmanager
    def use(self, rows: int | Sequence[int]):
        """Run the forwards inside with row i through adapter rows[i] (an int: every row through it)."""
        if isinstance(rows, int):
            chosen: int | list[tuple[int, torch.Tensor]] = rows
            indices = [rows]
        else:
            indices = list(rows)
            device = next(self.model.parameters()).device
            chosen = indices[0] if len(set(indices)) == 1 else [
                (a, torch.tensor([r for r, i in enumerate(indices) if i == a], device=device))
                for a in sorted(set(indices)) if a]
        bad = [i for i in indices if not 0 <= i < len(self.names)]
        if bad:
            raise LLMLabError(f"no adapter {bad[0]} in the bank (0 to {len(self.names) - 1})")
        previous, self.rows = self.rows, chosen
        try:
            yield
        finally:
            self.rows = previous
