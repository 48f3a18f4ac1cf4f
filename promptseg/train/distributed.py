"""torchrun / DistributedDataParallel set-up: one process per device, gloo on CPU, NCCL on CUDA."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None) -> DistributedContext:
    """Join the process group that torchrun describes in the environment, or run alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_device = torch.device(device)
    if torch_device.type == "cuda":
        torch_device = torch.device("cuda", local_rank)
        torch.cuda.set_device(torch_device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch_device.type == "cuda" else "gloo")
    return DistributedContext(rank, world_size, local_rank, torch_device)


def all_reduce_mean(value: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """Mean of a tensor over all processes (the tensor itself when alone)."""
    if context.world_size == 1:
        return value
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / context.world_size


def barrier(context: DistributedContext) -> None:
    if context.world_size > 1:
        dist.barrier()


def shutdown(context: DistributedContext) -> None:
    if context.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
