"""Rows of a batch that go through different deltas: the routing and the helpers every
mixed-batch kernel uses (selecting rows, gathering per-row stacked weights, the per-delta
fallback). Knows no slot, no plan and no method.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..errors import DeltaStateError

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class Routing:
    """Row ``i`` of the batch uses delta ``names[index[i]]``; ``index[i] == len(names)`` is the base."""

    names: tuple[str, ...]
    index: torch.Tensor  # (batch,) int64
    #: the one delta every row uses, if so (the batch then runs like an ordinary one)
    single: str | None = None

    @property
    def base_index(self) -> int:
        return len(self.names)

    def rows_of(self, position: int) -> torch.Tensor:
        return (self.index == position).nonzero().squeeze(1)

    def check_batch(self, batch: int, where: str) -> None:
        if batch != self.index.numel():
            raise DeltaStateError(
                f"delta_ids gives {self.index.numel()} rows but {where} has a batch of {batch}; "
                f"give one delta id per row"
            )

    def expanded(self, factor: int) -> Routing:
        """The routing of a batch whose every row is repeated ``factor`` times in place
        (generation with several beams or return sequences per prompt)."""
        if factor == 1:
            return self
        return Routing(self.names, self.index.repeat_interleave(factor), self.single)


def group_by_class(units: Sequence[Any]) -> list[tuple[type, list[Any]]]:
    """``(class, units aligned with the input, None where another class)`` per unit class present."""
    classes = dict.fromkeys(type(u) for u in units if u is not None)
    return [(cls, [u if type(u) is cls else None for u in units]) for cls in classes]


def take_rows(value: Any, rows: torch.Tensor, batch: int) -> Any:
    """``value``'s rows ``rows`` when it is a tensor whose first dimension is the batch, else ``value``."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value.index_select(0, rows.to(value.device))
    return value


def take_call_rows(args: tuple, kwargs: dict, rows: torch.Tensor, batch: int) -> tuple[tuple, dict]:
    """A module call's arguments restricted to ``rows`` (tensors with the batch dimension only)."""
    return tuple(take_rows(a, rows, batch) for a in args), {k: take_rows(v, rows, batch) for k, v in kwargs.items()}


def as_rows(x: torch.Tensor, batch: int) -> torch.Tensor:
    """``x`` as ``(batch, tokens, features)``: a 2-D ``(batch, features)`` input gets one token."""
    if x.shape[0] != batch:
        raise DeltaStateError(
            f"delta_ids gives {batch} rows but a module received a tensor of shape {tuple(x.shape)}; "
            f"mixed batches need the batch as the first dimension"
        )
    return x.reshape(batch, -1, x.shape[-1])


def gathered(
    units: Sequence[Any],
    index: torch.Tensor,
    tensor: Callable[[Any], torch.Tensor],
    fill: float,
    cache: dict | None = None,
    key: str = "",
) -> torch.Tensor:
    """``tensor(unit)`` for every row's unit, stacked and gathered: shape ``(batch, *shape)``.

    Rows of absent units (``None``: the base, or a delta with nothing at this module) get a
    tensor full of ``fill``. Tensors of different sizes (LoRA ranks) are padded with ``fill``
    to the largest. Without grad, the stack is cached against the parameters' versions, so
    a serving loop stacks once; training re-stacks every call so gradients reach each delta.
    """
    present = [u for u in units if u is not None]
    caching = cache is not None and not torch.is_grad_enabled()
    if caching:
        ids = tuple(id(u) for u in units)
        hit = cache.get(key)
        # the units' parameters are listed once per set of units; their version counters tell
        # whether anything (an optimizer step, a hot swap) wrote to them since the stack was built
        params = hit[1] if hit is not None and hit[0] == ids else [p for u in present for p in u.parameters()]
        versions = tuple(p._version for p in params)
        if hit is not None and hit[0] == ids and hit[2] == versions:
            return hit[3][index.to(hit[3].device)]
    values = [tensor(u) for u in present]
    shape = [max(v.shape[d] for v in values) for d in range(values[0].dim())]
    like = values[0]
    rows = []
    it = iter(values)
    for unit in (*units, None):  # the extra None: the base row
        if unit is None:
            rows.append(like.new_full(shape, fill))
            continue
        value = next(it)
        pad = [x for d in reversed(range(value.dim())) for x in (0, shape[d] - value.shape[d])]
        rows.append(F.pad(value, pad, value=fill) if any(pad) else value)
    stacked = torch.stack(rows)
    if caching:
        cache[key] = (ids, params, versions, stacked)
    return stacked[index.to(stacked.device)]


def add_row_low_rank(units: Sequence[Any], routing: Routing, x: torch.Tensor, right_t: torch.Tensor,
                     left_t: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """``output + ((x_row dropped) R_row^T) L_row^T`` for every row, with each row's unit's
    input dropout (``unit.dropout``, an ``nn.Dropout`` or ``None``) while training."""
    batch = routing.index.numel()
    x = as_rows(x, batch).to(right_t.dtype)
    present = [u for u in units if u is not None]
    if present[0].training and any(u.dropout is not None for u in present):
        rates = torch.tensor([u.dropout.p if u is not None and u.dropout is not None else 0.0 for u in units] + [0.0])
        rate = rates[routing.index].to(x.device, x.dtype).view(batch, 1, 1)
        x = x * (torch.rand_like(x) >= rate) / (1 - rate)
    update = torch.bmm(torch.bmm(x, right_t), left_t)
    return output + update.view(output.shape).to(output.dtype)


def per_delta_post(units: Sequence[Any], module: nn.Module, args: tuple, kwargs: dict, output: Any,
                   routing: Routing) -> Any:
    """The fallback kernel: each delta's ``forward_post`` on its own rows, scattered back."""
    if not isinstance(output, torch.Tensor):
        raise DeltaStateError(
            f"{type(next(u for u in units if u is not None)).__name__} cannot take part in a mixed batch at "
            f"{type(module).__name__}: its output is not a single tensor"
        )
    batch = routing.index.numel()
    routing.check_batch(output.shape[0], type(module).__name__)
    result = output
    for position, unit in enumerate(units):
        if unit is None:
            continue
        rows = routing.rows_of(position).to(output.device)
        if rows.numel() == 0:
            continue
        sub_args, sub_kwargs = take_call_rows(args, kwargs, rows, batch)
        changed = unit.forward_post(module, sub_args, sub_kwargs, output.index_select(0, rows))
        result = result.index_copy(0, rows, changed.to(result.dtype))
    return result


def run_mixed_pre(groups: list[tuple[type, list]], module: nn.Module, args: tuple, kwargs: dict,
                  routing: Routing) -> tuple[tuple, dict]:
    """Every unit class's ``mixed_pre`` over the routed rows, in order."""
    for cls, units in groups:
        args, kwargs = cls.mixed_pre(units, module, args, kwargs, routing)
    return args, kwargs


def run_mixed_post(groups: list[tuple[type, list]], module: nn.Module, args: tuple, kwargs: dict, output: Any,
                   routing: Routing) -> Any:
    """Every unit class's ``mixed_post`` over the routed rows, in order."""
    for cls, units in groups:
        output = cls.mixed_post(units, module, args, kwargs, output, routing)
    return output
