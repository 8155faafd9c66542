"""Data-parallel training through torch.distributed (started by ``torchrun`` or
``accelerate launch``): every rank takes its share of each global batch; DDP (or FSDP, with
``sharding="fsdp"``: see :mod:`.fsdp`) averages the gradients. Without a launcher everything
here is a no-op.

Each rank trains on ``device()``: its own GPU (``LOCAL_RANK``) where CUDA is available, with
the nccl backend, else the CPU with gloo.
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
    if torch.cuda.is_available():
        torch.cuda.set_device(device())
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.get_rank() != 0:  # one progress bar (rank 0's), not one per process
        from transformers.utils import logging

        logging.disable_progress_bar()
    return True


def device() -> torch.device:
    """This process's device: ``cuda:<LOCAL_RANK>`` where CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def finish(*, synchronise: bool = True) -> None:
    """Leave the process group (so ranks exit cleanly instead of warning or hanging).

    With ``synchronise`` (the normal end of a run) every rank first waits at a barrier, so no
    rank tears down its gloo connections while a peer is still finishing the last collective;
    without that barrier a rank exiting early aborted now and then ("terminate called without
    an active exception"). After an error pass ``synchronise=False``: the peers may never
    reach the barrier.
    """
    if dist.is_available() and dist.is_initialized():
        if synchronise:
            dist.barrier()
        dist.destroy_process_group()


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


#: how the ranks hold the model: ``ddp`` a whole copy each, ``fsdp`` a shard each (FSDP2)
SHARDINGS = ("ddp", "fsdp")


def wrap(model: nn.Module, sharding: str = "ddp") -> nn.Module:
    """The model to call for training when running distributed, else ``model`` itself.

    ``ddp``: ``model`` wrapped in DistributedDataParallel. ``fsdp``: ``model`` itself, sharded in
    place by :func:`.fsdp.shard` (its parameters are replaced, so build the optimizer after this).
    """
    if rank_and_world()[1] == 1:
        return model
    if sharding == "fsdp":
        from .fsdp import shard  # imports FSDP only for the runs that use it

        return shard(model)
    target = device()
    return nn.parallel.DistributedDataParallel(model, device_ids=[target] if target.type == "cuda" else None)


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


def every_rank(value: float) -> list[float]:
    """``value`` from each rank, in rank order, on every rank (``[value]`` without a launcher)."""
    rank, world = rank_and_world()
    if world == 1:
        return [value]
    values = torch.zeros(world, dtype=torch.float64, device=device())
    values[rank] = value
    dist.all_reduce(values)
    return values.cpu().tolist()


def from_main(value: Any) -> Any:
    """Rank 0's JSON-serialisable ``value`` on every rank; waits for rank 0 to get here."""
    if rank_and_world()[1] == 1:
        return value
    import json

    data = torch.tensor(list(json.dumps(value).encode()) if is_main() else [], dtype=torch.uint8, device=device())
    size = torch.tensor([data.numel()], dtype=torch.long, device=device())
    dist.broadcast(size, src=0)
    if not is_main():
        data = torch.empty(int(size), dtype=torch.uint8, device=device())
    dist.broadcast(data, src=0)
    return json.loads(bytes(data.cpu().tolist()).decode())


def is_main() -> bool:
    """Rank 0, or the only process; also right before the group is joined or after it ends
    (it falls back on the launcher's ``RANK``)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0
