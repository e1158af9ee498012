"""Optimizers and schedules shared by every training stage.

Matrices inside the Transformer blocks are trained with Muon (momentum, then the update orthogonalised by a
Newton-Schulz iteration; Jordan et al. 2024, the modded-nanogpt / nanochat recipe). Embeddings, the LM head and
norm weights, whose geometry is not that of a linear map between hidden states, use AdamW.
Learning-rate schedules are pure functions of the step, so a resumed run recomputes them exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from llmlab import dist
from llmlab import threads as cpu_threads
from llmlab.errors import LLMLabError


def newton_schulz(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately U V^T for G = U S V^T: a quintic Newton-Schulz iteration tuned to push singular values
    into about [0.7, 1.2] in few steps (the coefficients of Jordan et al. 2024), which is all Muon needs."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G / (G.norm() + 1e-7)
    transposed = X.size(0) > X.size(1)
    if transposed:  # iterate on the smaller Gram matrix
        X = X.T
    for _ in range(steps):
        A = X @ X.T
        B = b * A + c * A @ A
        X = a * X + B @ X
    return X.T if transposed else X


def newton_schulz_batched(G: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """`newton_schulz` of a stack of same-shape matrices (n, rows, cols) at once, its matmuls in `dtype`: one
    batched matmul per iteration instead of one per matrix (the GPU path: modded-nanogpt and nanochat run it in
    bf16, whose rounding the iteration tolerates, since it only needs singular values near 1)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = (G / (G.norm(dim=(-2, -1), keepdim=True) + 1e-7)).to(dtype)
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    return (X.mT if transposed else X).to(G.dtype)


class Muon(torch.optim.Optimizer):
    """SGD with Nesterov momentum whose update for each 2-D weight is orthogonalised (see newton_schulz).

    The update is scaled by sqrt(max(1, rows / cols)) so that tall and wide matrices move their outputs by
    comparable amounts. Only for 2-D parameters. On a GPU the matrices of one shape are orthogonalised together
    in bf16 (`newton_schulz_batched`); on the CPU one by one in fp32, several at once on the threads of a
    training step's parts (llmlab.threads.pool). Under FSDP2 each rank gathers the whole momentum-corrected
    gradient and orthogonalises it (the same work on every rank: simple, exact, and small next to the forward
    and backward at the sizes llmlab trains; nanochat's DistMuon shares it out instead).
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            on_gpu: dict[tuple, list] = {}  # shape -> [(p, g)]: orthogonalised together, in bf16
            on_cpu: list[tuple] = []  # [(p, g)]: orthogonalised one by one, on threads of their own
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - group["momentum"])
                g = p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                if dist.is_sharded(g):  # FSDP2: orthogonalise the whole matrix, apply this rank's rows
                    self._apply(p, dist.shard_like(newton_schulz(dist.full_tensor(g), group["ns_steps"]), p), group)
                elif g.device.type == "cuda":
                    on_gpu.setdefault(tuple(g.shape), []).append((p, g))
                else:  # the CPU: matrix by matrix in fp32 (what every CPU figure was measured with)
                    on_cpu.append((p, g))
            if on_cpu:  # (each matrix on one thread: no barrier for a busy core to stall, as in a training step's
                # parts, llmlab.threads; the same bits as on the calling thread)
                steps = group["ns_steps"]
                pool = cpu_threads.pool(cpu_threads.parts())
                for (p, _), update in zip(on_cpu, pool.map(lambda g: newton_schulz(g, steps), [g for _, g in on_cpu])):
                    self._apply(p, update, group)
            for same in on_gpu.values():
                updates = newton_schulz_batched(torch.stack([g for _, g in same]), group["ns_steps"])
                for (p, _), update in zip(same, updates):
                    self._apply(p, update, group)

    @staticmethod
    def _apply(p: torch.Tensor, update: torch.Tensor, group: dict) -> None:
        scale = max(1.0, p.size(0) / p.size(1)) ** 0.5
        p.add_(update, alpha=-group["lr"] * scale)


@dataclass
class OptimConfig:
    """The optimizer fields every training stage shares (nested in llmlab.training.TrainConfig as `optim`)."""

    muon_lr: float = 0.02
    """Muon learning rate for the matrices inside the blocks"""
    embed_lr: float = 0.2
    """AdamW learning rate for the token embedding"""
    head_lr: float = 0.004
    """AdamW learning rate for the LM head (and the tied embedding, when tied)"""
    scalar_lr: float = 0.02
    """AdamW learning rate for norm weights"""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay on the embedding and head"""

    def __post_init__(self) -> None:
        for name in ("muon_lr", "embed_lr", "head_lr", "scalar_lr", "weight_decay"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise LLMLabError(f"--optim.{name} must be a finite number >= 0 (got {value})")


def build_optimizers(model: nn.Module, cfg) -> list[torch.optim.Optimizer]:
    """[AdamW, Muon] over the model's trainable parameters, partitioned by role (each parameter in exactly one
    group; an optimizer with no parameter is left out).

    Learning rates of AdamW groups scale with 1/sqrt(d_model / 768) as in nanochat, so the defaults carry
    across widths. Each group remembers its base lr in `initial_lr` for the schedule.
    """
    d_model = model.config.d_model
    scale = (d_model / 768) ** -0.5
    embed, head, scalars, matrices = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:  # frozen (a LoRA adapter's base): no optimizer state, never updated
            continue
        if name.startswith("embed_tokens"):
            (head if model.config.tie_embeddings else embed).append(p)
        elif name.startswith(("lm_head", "score")):  # the LM head, or a scorer's head
            head.append(p)
        elif p.dim() == 2:
            matrices.append(p)
        else:
            scalars.append(p)
    adam_groups = [
        dict(params=embed, lr=cfg.embed_lr * scale, weight_decay=cfg.weight_decay),
        dict(params=head, lr=cfg.head_lr * scale, weight_decay=cfg.weight_decay),
        dict(params=scalars, lr=cfg.scalar_lr, weight_decay=0.0),
    ]
    adam_groups = [g for g in adam_groups if g["params"]]
    optimizers: list[torch.optim.Optimizer] = []
    if adam_groups:  # (a LoRA adapter is matrices only: no AdamW)
        # one fused kernel for all of AdamW's tensors on a GPU (whole tensors; FSDP2's shards keep the loop); on
        # the CPU the plain loop, every CPU figure's
        fused = all(p.device.type == "cuda" and not dist.is_sharded(p) for g in adam_groups for p in g["params"])
        optimizers.append(torch.optim.AdamW(adam_groups, betas=(0.8, 0.95), eps=1e-10, fused=fused))
    if matrices:
        optimizers.append(Muon(matrices, lr=cfg.muon_lr))
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, warmdown_frac: float, final_frac: float) -> float:
    """Linear warmup for warmup_steps, flat, then linear decay to final_frac over the last warmdown_frac of
    the run ("trapezoidal"/WSD schedule; Hägele et al. 2024). A pure function of the step."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    warmdown_steps = round(warmdown_frac * total_steps)
    if warmdown_steps > 0 and step >= total_steps - warmdown_steps:
        progress = (total_steps - step) / warmdown_steps  # 1 -> 0 over the warmdown
        return final_frac + (1.0 - final_frac) * progress
    return 1.0


def muon_momentum(step: int, warmup_steps: int = 300, start: float = 0.85, end: float = 0.95) -> float:
    """Muon momentum warms up from `start` to `end` over the first steps (modded-nanogpt)."""
    frac = min(step / warmup_steps, 1.0) if warmup_steps > 0 else 1.0
    return (1 - frac) * start + frac * end


def set_schedule(optimizers: list[torch.optim.Optimizer], lr_mult: float, momentum: float) -> None:
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lr_mult
            if isinstance(opt, Muon):
                group["momentum"] = momentum
