"""Many processes, one code path: process-group set-up from the torchrun environment, DDP or FSDP2 wrapping,
and the few collectives the training stages need. World size 1 runs the same code with no process group.

Only this module touches torch.distributed. A stage asks it who it is (`init`), wraps its model (`wrap`),
skips gradient synchronisation on all but the last micro-batch (`no_sync`), sums scalars over ranks
(`all_reduce_sum`), and gathers full tensors for a checkpoint (`full_tensor`). Rank 0 logs and writes; every
other rank only computes.

    torchrun --nproc_per_node=2 -m llmlab pretrain --preset cpu --parallel fsdp     # gloo on CPU, NCCL on GPUs

Data parallelism, both ways: every rank holds a different slice of the global batch (rows r, r+W, ... of
the packed stream), so the union of the ranks' micro-batches is exactly the single-process batch of W times
the rows. DDP keeps a whole replica of the model and optimizer on every rank and all-reduces gradients;
FSDP2 (`fully_shard`) keeps 1/W of each parameter, gradient and optimizer state as a DTensor sharded on dim
0, all-gathers weights for each forward and backward and reduce-scatters gradients. Both average gradients
over ranks; the loss is scaled so that the average is the gradient of the mean over the global batch.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as td
import torch.nn as nn

from llmlab.errors import LLMLabError

PARALLEL = ("ddp", "fsdp")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Read RANK/WORLD_SIZE/LOCAL_RANK (set by torchrun), start the process group when there are several
    processes (NCCL on CUDA, gloo on CPU), and pick the device. A collective that waits longer than
    timeout_s (a rank died or hangs) fails instead of blocking forever."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise LLMLabError("device cuda asked for, but torch sees no GPU: use --device cpu or install a CUDA build of torch")
    dev = torch.device(f"cuda:{local_rank}") if device == "cuda" else torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not td.is_initialized():
        td.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                              timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank, world_size, local_rank, dev)


def autocast(info: DistInfo):
    """bf16 autocast on CUDA; fp32 (a no-op context) on CPU, whose bf16 matmuls are slow."""
    if info.device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def barrier() -> None:
    if td.is_initialized():
        td.barrier()


def shutdown() -> None:
    """End the process group (at the end of a command), once every rank is there: a rank that tears its group
    down while another still has collectives in flight can leave Gloo's worker threads holding work as the
    interpreter exits, and abort ("terminate called without an active exception", seen at the end of FSDP runs
    on CPU)."""
    if td.is_initialized():
        td.barrier()
        td.destroy_process_group()


def world_size() -> int:
    return td.get_world_size() if td.is_initialized() else 1


def wrap(model: nn.Module, info: DistInfo, parallel: str) -> nn.Module:
    """The model made data-parallel over the ranks: DDP, or FSDP2's `fully_shard` of every block and then of
    the whole model (embedding, final norm and head). With one process the model is returned as it is.
    Load weights before wrapping and build the optimizers after: FSDP2 turns parameters into DTensors."""
    if parallel not in PARALLEL:
        raise LLMLabError(f"parallel must be one of {', '.join(PARALLEL)} (got {parallel!r})")
    if info.world_size == 1:
        return model
    if parallel == "ddp":
        device_ids = [info.device.index] if info.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    from torch.distributed.fsdp import fully_shard  # deferred: absent from torch builds without distributed support

    for block in model.layers:
        fully_shard(block)
    fully_shard(model)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The GPT inside a torch.compile and DDP wrapper (FSDP2 changes the module in place: it is its own model)."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@contextlib.contextmanager
def no_sync(model: nn.Module, skip: bool):
    """Within the context, backward accumulates local gradients without communicating (when skip is true):
    for every micro-batch but the last of an optimizer step."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    if not skip or not td.is_initialized():
        yield
        return
    if isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
        return
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
        return
    yield


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sums of the values over all ranks (the values themselves with one process); float64 so that token
    counts and loss sums add exactly enough."""
    if not td.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    td.all_reduce(t)
    return t.tolist()


def all_reduce_(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over all ranks in place (nothing with one process), without the host waiting for the result."""
    if td.is_initialized():
        td.all_reduce(t)
    return t


def is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor  # deferred: as fully_shard above

    return isinstance(t, DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor shard (a collective: every rank must call it), or the tensor itself."""
    return t.full_tensor() if is_sharded(t) else t


def shard_like(full: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """`full` cut the way the DTensor `ref` is (this rank's rows; no communication), or `full` when ref is a
    plain tensor."""
    if not is_sharded(ref):
        return full
    from torch.distributed.tensor import DTensor, Replicate  # deferred: as fully_shard above

    replicated = DTensor.from_local(full.to(ref.device, ref.dtype), ref.device_mesh,
                                    [Replicate()] * ref.device_mesh.ndim, run_check=False)
    return replicated.redistribute(ref.device_mesh, ref.placements)


def check_global_batch(saved: dict, batch_size: int, info: DistInfo) -> None:
    """A resumed run must keep the global batch (rows per micro-batch x processes) of the run it continues:
    then any number of processes continues the same trajectory."""
    saved_rows = saved.get("batch_size", batch_size) * saved.get("world_size", 1)
    rows = batch_size * info.world_size
    if saved_rows != rows:
        raise LLMLabError(
            f"the checkpoint was trained with {saved.get('world_size', 1)} process(es) x batch_size "
            f"{saved.get('batch_size')} = {saved_rows} rows per micro-batch; this run has {info.world_size} x {batch_size} "
            f"= {rows}: pass --batch_size {saved_rows // info.world_size if saved_rows % info.world_size == 0 else '?'}"
            + ("" if saved_rows % info.world_size == 0 else f" with a number of processes that divides {saved_rows}")
            + " to continue the same run, or a new out_dir")
