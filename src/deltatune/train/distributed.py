"""Data-parallel training through torch.distributed (started by ``torchrun`` or
``accelerate launch``): every rank takes its share of each global batch; DDP averages
the gradients. Without a launcher everything here is a no-op."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def init_from_environment() -> bool:
    """Join the process group a launcher set up (``WORLD_SIZE`` > 1); returns whether it did."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    return True


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def wrap(model: nn.Module) -> nn.Module:
    """The model wrapped in DistributedDataParallel when running distributed, else itself."""
    if rank_and_world()[1] == 1:
        return model
    return nn.parallel.DistributedDataParallel(model)


def mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar over ranks (for logging)."""
    if rank_and_world()[1] == 1:
        return value
    value = value.clone()
    dist.all_reduce(value)
    return value / dist.get_world_size()


def is_main() -> bool:
    return rank_and_world()[0] == 0
