"""Fully sharded data parallel training (``--sharding fsdp``) with FSDP2's ``fully_shard``.

Each transformer block (found from the model's structure, :func:`~deltatune.core.roles.find_roles`)
becomes one FSDP unit and the root holds the rest (embeddings, head, deltas outside the blocks).
Between forwards every parameter, the frozen base and the float32 delta alike, is a ``DTensor``
sharded on its first dimension over the ranks; a block's parameters are all-gathered just before
it runs and freed after it. The optimizer holds, and keeps state for, this rank's shards only.

Whatever reads whole tensors outside a forward (saving the delta, checkpoints) goes through
:func:`full_tensor` or :func:`full_parameters`. Both are collectives: every rank calls them, in
the same order, and rank 0 alone writes.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..core.registry import get_method
from ..core.roles import find_roles
from ..core.slot import get_state
from ..errors import ConfigError


def _loaded(module: str, name: str) -> type | None:
    """Class ``name`` of torch module ``module`` if that module is imported, else ``None``.

    Importing ``torch.distributed.tensor`` takes seconds, and no DTensor or FSDP module can exist
    before it is imported, so the checks below do not import it (every CLI command would pay)."""
    loaded = sys.modules.get(module)
    return getattr(loaded, name) if loaded is not None else None


def _is(value: object, module: str, name: str) -> bool:
    kind = _loaded(module, name)
    return kind is not None and isinstance(value, kind)


def check_method(method: str) -> None:
    """Raises ConfigError when FSDP cannot train ``method`` (its ``fsdp_refusal`` says why)."""
    refusal = get_method(method).fsdp_refusal
    if refusal:
        raise ConfigError(f"--sharding fsdp cannot train method {method!r}: {refusal}; train it with --sharding ddp")


def shard(model: nn.Module) -> nn.Module:
    """Shard ``model`` in place: ``fully_shard`` on each transformer block, then on the root.

    Raises:
        ConfigError: the model has no transformer blocks to shard, or a delta's method cannot be
            sharded (:func:`check_method`).
    """
    state = get_state(model)
    for config in (state.configs.values() if state is not None else ()):
        check_method(config.method)
    blocks = find_roles(model).blocks
    if not blocks:
        raise ConfigError(f"--sharding fsdp shards a model block by block, but no transformer blocks were found in "
                          f"{type(model).__name__} (an nn.ModuleList of layers holding an attention sub-module); "
                          f"train it with --sharding ddp")
    from torch.distributed.fsdp import fully_shard

    for path in blocks:
        fully_shard(model.get_submodule(path))
    # the root too frees its whole weights after each forward (FSDP keeps them by default, for the
    # backward): an evaluation has no backward, and parameters, optimizer and checkpoint must all
    # see the same sharded tensors between steps
    fully_shard(model, reshard_after_forward=True)
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether :func:`shard` sharded ``model``."""
    return _is(model, "torch.distributed.fsdp", "FSDPModule")


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded ``DTensor`` (gathered from every rank), else ``tensor``."""
    return tensor.full_tensor() if _is(tensor, "torch.distributed.tensor", "DTensor") else tensor


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` split the way ``like`` (a sharded parameter) is, or ``full`` on ``like``'s device
    when ``like`` is not sharded. Every rank must pass the same ``full``."""
    if _is(like, "torch.distributed.tensor", "DTensor"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(like.device), like.device_mesh, like.placements)
    return full.to(like.device)


@contextmanager
def full_parameters(model: nn.Module) -> Iterator[nn.Module]:
    """Every parameter whole (a plain tensor again) inside the block, sharded again after it.

    Meant for reading (saving, fingerprints); run no forward inside it. A no-op for a model
    :func:`shard` did not shard.
    """
    units = [module for module in model.modules() if _is(module, "torch.distributed.fsdp", "FSDPModule")]
    for unit in units:
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units:
            unit.reshard()


def local_parameter_mb(model: nn.Module) -> float:
    """MiB of parameter storage this rank holds (its shards under FSDP, everything otherwise)."""
    local = (p.to_local() if _is(p, "torch.distributed.tensor", "DTensor") else p for p in model.parameters())
    return sum(t.numel() * t.element_size() for t in local) / 2**20
