"""Data-parallel training through torch.distributed (started by ``torchrun`` or
``accelerate launch``): every rank takes its share of each global batch; DDP averages
the gradients. Without a launcher everything here is a no-op.

Training runs on CPU (the loop never moves the model or batches to a GPU), so the process
group always uses the gloo backend, also on machines that have GPUs.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def init_from_environment() -> bool:
    """Join the process group a launcher set up (``WORLD_SIZE`` > 1).

    Returns whether this call created the group (the caller then ends it with :func:`finish`);
    ``False`` when not launched distributed or when the group already existed.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    dist.init_process_group("gloo")
    if dist.get_rank() != 0:  # one progress bar (rank 0's), not one per process
        from transformers.utils import logging

        logging.disable_progress_bar()
    return True


def finish() -> None:
    """Leave the process group (so ranks exit cleanly instead of warning or hanging)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


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


def total(value: float) -> float:
    """The sum of a number over ranks."""
    if rank_and_world()[1] == 1:
        return value
    tensor = torch.tensor(float(value), dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.item()


def from_main(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a picklable object); waits for rank 0 to get here."""
    if rank_and_world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def is_main() -> bool:
    """Rank 0, or the only process; also right before the group is joined or after it ends
    (it falls back on the launcher's ``RANK``)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0
