"""Mixed batches: each row of one batch runs through its own delta (or the base alone).

A :class:`Routing` names the deltas in play and gives every row an index into them (the
last index, ``len(names)``, means "base only"). While a routing is set on the model's
:class:`~deltatune.core.slot.DeltaState`, every slot ignores the active set and calls
:meth:`DeltaUnit.mixed_post` / :meth:`DeltaUnit.mixed_pre` once per unit class with the
units of all routed deltas. LoRA, DoRA, (IA)3 and adapters implement these with stacked
weights gathered per row and batched matrix products (one ``bmm`` pair per module, however
many deltas); other units fall back on one call per delta over that delta's rows.

Set a routing with ``model(..., delta_ids=...)`` or ``with route(model, delta_ids): ...``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DeltaStateError

if TYPE_CHECKING:
    from .slot import DeltaState
    from .unit import DeltaUnit

ROUTING_KWARG = "delta_ids"


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


def make_routing(state: DeltaState, delta_ids: Any, names: Sequence[str] | None = None) -> Routing:
    """A checked :class:`Routing` from per-row delta names or integer ids.

    Args:
        state: the model's delta state.
        delta_ids: one entry per row: a delta name or ``None`` (base only); or an integer
            tensor / list indexing ``names``, with ``-1`` for base only.
        names: what integer ids index; default: the model's deltas in attach order.

    Raises:
        DeltaStateError: an unknown name, an id out of range, a merged delta, or ids that are
            not one-dimensional.
    """
    table = tuple(state.configs) if names is None else tuple(names)
    for name in table:
        state.require(name)
    if isinstance(delta_ids, torch.Tensor) or (delta_ids and all(isinstance(i, int) for i in delta_ids)):
        ids = torch.as_tensor(delta_ids, dtype=torch.long).cpu()
        if ids.dim() != 1:
            raise DeltaStateError(f"delta_ids must be one id per row (a 1-D tensor), got shape {tuple(ids.shape)}")
        bad = ids[(ids < -1) | (ids >= len(table))]
        if bad.numel():
            raise DeltaStateError(
                f"delta id {int(bad[0])} is out of range: ids index {list(table)} (0..{len(table) - 1}), -1 is the base"
            )
        used = sorted({int(i) for i in ids if i >= 0})
        names_used = tuple(table[i] for i in used)
        remap = {old: new for new, old in enumerate(used)}
        index = torch.tensor([remap.get(int(i), len(used)) for i in ids], dtype=torch.long)
    else:
        rows = list(delta_ids)
        for name in rows:
            if name is not None and name not in table:
                state.require(name)  # unknown to the model: the error lists its deltas
                raise DeltaStateError(f"delta {name!r} is not among the routed deltas {list(table)}")
        names_used = tuple(dict.fromkeys(n for n in rows if n is not None))
        position = {n: i for i, n in enumerate(names_used)}
        index = torch.tensor([position.get(n, len(names_used)) for n in rows], dtype=torch.long)
    merged = [n for n in names_used if n in state.merged]
    if merged:
        raise DeltaStateError(f"delta {merged[0]!r} is merged into the base weights; unmerge(model) before mixing deltas per row")
    single = names_used[0] if len(names_used) == 1 and bool((index == 0).all()) else None
    return Routing(names_used, index, single)


@contextlib.contextmanager
def route(model: nn.Module, delta_ids: Any, names: Sequence[str] | None = None) -> Iterator[Routing]:
    """Run each row of the batches inside the block through its own delta.

    Example:
        >>> with route(model, ["sentiment", "spam", None]):   # None: the base alone
        ...     logits = model(**batch).logits
    """
    from .slot import require_state

    state = require_state(model)
    previous = state.routing
    routing = make_routing(state, delta_ids, names)
    state.set_routing(routing)
    try:
        yield routing
    finally:
        state.set_routing(previous)


def routing_pre_hook(model: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
    """Root pre-hook: ``model(..., delta_ids=...)`` sets the routing for that one call."""
    if ROUTING_KWARG not in kwargs:
        return None
    from .slot import require_state

    kwargs = dict(kwargs)
    delta_ids = kwargs.pop(ROUTING_KWARG)
    state = require_state(model)
    if delta_ids is not None:
        routing = make_routing(state, delta_ids)
        for key in ("input_ids", "inputs_embeds"):
            if isinstance(kwargs.get(key), torch.Tensor):
                routing.check_batch(kwargs[key].shape[0], key)
        state.call_routing.append(state.routing)
        state.set_routing(routing)
    else:
        state.call_routing.append(state.routing)
    return args, kwargs


def routing_post_hook(model: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    """Root post-hook (always called, errors included): restore the routing of before the call."""
    from .slot import get_state

    state = get_state(model)
    if state is not None and state.call_routing:
        state.set_routing(state.call_routing.pop())


# --- helpers for the batched kernels -------------------------------------------------------


def gathered(
    units: Sequence[DeltaUnit | None],
    index: torch.Tensor,
    tensor: Callable[[DeltaUnit], torch.Tensor],
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


def as_rows(x: torch.Tensor, batch: int) -> torch.Tensor:
    """``x`` as ``(batch, tokens, features)``: a 2-D ``(batch, features)`` input gets one token."""
    if x.shape[0] != batch:
        raise DeltaStateError(
            f"delta_ids gives {batch} rows but a module received a tensor of shape {tuple(x.shape)}; "
            f"mixed batches need the batch as the first dimension"
        )
    return x.reshape(batch, -1, x.shape[-1])


def _select(value: Any, rows: torch.Tensor, batch: int) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value.index_select(0, rows.to(value.device))
    return value


def per_delta_post(units, module, args, kwargs, output, routing: Routing):
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
        sub_args = tuple(_select(a, rows, batch) for a in args)
        sub_kwargs = {k: _select(v, rows, batch) for k, v in kwargs.items()}
        changed = unit.forward_post(module, sub_args, sub_kwargs, output.index_select(0, rows))
        result = result.index_copy(0, rows, changed.to(result.dtype))
    return result


def get_routing(model: nn.Module) -> Routing | None:
    """The routing in force on ``model`` (inside :func:`route`), else ``None``."""
    from .slot import get_state

    state = get_state(model)
    return state.routing if state is not None else None
