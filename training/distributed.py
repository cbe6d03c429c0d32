"""torchrun/DDP setup: NCCL on CUDA, gloo on CPU; rank 0 alone writes checkpoints and logs."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from models.device import resolve_device


@dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistributedContext:
    """Reads torchrun's environment; a plain `python main.py` is a world of one. device (train.device): auto takes
    CUDA when present (GPU local_rank under torchrun), else the CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = resolve_device(device)
    if chosen.type == "cuda":
        chosen = torch.device("cuda", chosen.index if chosen.index is not None and world_size == 1 else local_rank)
        torch.cuda.set_device(chosen)
    device = chosen
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistributedContext(int(os.environ.get("RANK", "0")), world_size, local_rank, device)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(value: torch.Tensor, ctx: DistributedContext) -> torch.Tensor:
    if ctx.enabled:
        value = value.clone()
        dist.all_reduce(value)
        value /= ctx.world_size
    return value


def all_reduce_grads(parameters, ctx: DistributedContext) -> None:
    """Averages gradients across ranks, for losses computed outside the DDP wrapper (the diffusion phase)."""
    if not ctx.enabled:
        return
    for param in parameters:
        if param.grad is not None:
            dist.all_reduce(param.grad)
            param.grad /= ctx.world_size
