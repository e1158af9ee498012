"""Process-group set-up from the torchrun environment; world size 1 runs the same code path.

Only this module touches torch.distributed. Stages ask it who they are (rank, world size), which device and
dtype to use, and whether they are the process that logs and writes (rank 0).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as td


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device: str = "auto") -> DistInfo:
    """Read RANK/WORLD_SIZE/LOCAL_RANK (set by torchrun), start the process group when there are several
    processes (NCCL on CUDA, gloo on CPU), and pick the device."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(f"cuda:{local_rank}") if device == "cuda" else torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not td.is_initialized():
        td.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, world_size, local_rank, dev)


def autocast(info: DistInfo):
    """bf16 autocast on CUDA; fp32 (a no-op context) on CPU, whose bf16 matmuls are slow."""
    if info.device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def barrier() -> None:
    if td.is_initialized():
        td.barrier()
