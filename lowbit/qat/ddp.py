"""Multi-process training: ``torchrun`` environment, DistributedDataParallel, and the check that
quantizer parameters stay identical on every rank.

DDP averages the gradients of every trainable parameter, quantizer parameters included, so the
replicas stay in step by construction; :func:`check_in_sync` verifies it once per epoch (one
collective) because a rank that drifted would export a different integer model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from ..errors import TrainingError
from ..prepare import quantizers


@dataclass
class DistContext:
    """Rank information of this process (``world_size == 1`` means no distribution)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(backend: str | None = None) -> DistContext:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE > 1``); NCCL with GPUs, else gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(device=_default_device(0))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world)
    device = _default_device(local) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return DistContext(rank, world, local, device)


def current() -> DistContext:
    """Context of an already-initialised process group (or the single-process default)."""
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(),
                           int(os.environ.get("LOCAL_RANK", "0")), torch.device("cpu"))
    return DistContext()


def _default_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def wrap(model: nn.Module, ctx: DistContext) -> nn.Module:
    """DDP around ``model`` when distributed (it also broadcasts rank 0's state once)."""
    if not ctx.enabled:
        return model
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def shard_loader(
    dataset: Dataset, batch_size: int, ctx: DistContext, seed: int = 0, workers: int = 0
) -> DataLoader:
    """Training loader giving each rank a disjoint, seeded shard; the trainer sets its epoch."""
    sampler = DistributedSampler(dataset, ctx.world_size, ctx.rank, shuffle=True, seed=seed,
                                 drop_last=True)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers)


def all_reduce_sum(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.enabled:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def quantizer_vector(model: nn.Module) -> torch.Tensor:
    """Every quantizer parameter and buffer, flattened into one float64 vector."""
    parts = [t.detach().reshape(-1).double()
             for q in quantizers(model)
             for t in list(q.parameters()) + list(q.buffers())]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def check_in_sync(model: nn.Module, ctx: DistContext) -> None:
    """Raise :class:`TrainingError` unless every rank holds the same quantizer parameters."""
    if not ctx.enabled:
        return
    mine = quantizer_vector(model).to(ctx.device)
    ref = mine.clone()
    dist.broadcast(ref, src=0)
    diff = (mine - ref).abs().max() if mine.numel() else torch.zeros((), device=ctx.device)
    diff = diff.reshape(1)
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    if float(diff) != 0.0:
        raise TrainingError(
            f"quantizer parameters differ across ranks (max difference {float(diff):.3g}); "
            "calibrate on the same data on every rank and train every quantizer parameter "
            "through DistributedDataParallel"
        )
