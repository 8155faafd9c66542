"""Mixed batches: each row of one batch runs through its own delta (or the base alone).

A :class:`~deltatune.core.rows.Routing` names the deltas in play and gives every row an
index into them (the last index, ``len(names)``, means "base only"). Installed as the
model's plan (:class:`~deltatune.core.plan.RowRouting`), it makes every slot call
:meth:`DeltaUnit.mixed_post` / :meth:`DeltaUnit.mixed_pre` once per unit class with the
units of all routed deltas. LoRA, DoRA, (IA)3 and adapters implement these with stacked
weights gathered per row and batched matrix products; other units fall back on one call per
delta over that delta's rows.

Set a routing with ``model(..., delta_ids=...)``, ``model.generate(..., delta_ids=...)`` or
``with route(model, delta_ids): ...``.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import DeltaStateError
from .plan import RowRouting
from .rows import Routing
from .slot import STATE_ATTR, DeltaState, get_state, require_state

ROUTING_KWARG = "delta_ids"


def make_routing(state: DeltaState, delta_ids: Any, names: Sequence[str] | None = None) -> Routing:
    """A checked :class:`Routing` from per-row delta names or integer ids.

    Args:
        state: the model's delta state.
        delta_ids: one entry per row: a delta name or ``None`` (base only); or an integer
            tensor / list indexing ``names``, with ``-1`` for base only.
        names: what integer ids index; default: the model's deltas in attach order.

    Raises:
        DeltaStateError: an unknown name, an id out of range, a merged delta, ids that are
            not one-dimensional, or a plan in force that a routing cannot replace.
    """
    if state.override is not None and state.override.refuses_routing:
        raise DeltaStateError(state.override.refuses_routing)
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
def routed(state: DeltaState, routing: Routing) -> Iterator[Routing]:
    """Install ``routing`` as the plan in force inside the block, then restore the previous plan."""
    previous = state.override
    state.set_override(RowRouting(routing))
    try:
        yield routing
    finally:
        state.set_override(previous)


@contextlib.contextmanager
def route(model: nn.Module, delta_ids: Any, names: Sequence[str] | None = None) -> Iterator[Routing]:
    """Run each row of the batches inside the block through its own delta.

    Example:
        >>> with route(model, ["sentiment", "spam", None]):   # None: the base alone
        ...     logits = model(**batch).logits
    """
    state = require_state(model)
    with routed(state, make_routing(state, delta_ids, names)) as routing:
        yield routing


def get_routing(model: nn.Module) -> Routing | None:
    """The routing in force on ``model`` (inside :func:`route`), else ``None``."""
    state = get_state(model)
    plan = state.plan if state is not None else None
    return plan.routing if isinstance(plan, RowRouting) else None


# --- model(..., delta_ids=...) and model.generate(..., delta_ids=...) ------------------------


def routing_pre_hook(model: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
    """Root pre-hook: ``model(..., delta_ids=...)`` sets the routing for that one call."""
    if ROUTING_KWARG not in kwargs:
        return None
    kwargs = dict(kwargs)
    delta_ids = kwargs.pop(ROUTING_KWARG)
    state = require_state(model)
    state.call_plans.append(state.override)
    if delta_ids is not None:
        routing = make_routing(state, delta_ids)
        for key in ("input_ids", "inputs_embeds"):
            if isinstance(kwargs.get(key), torch.Tensor):
                routing.check_batch(kwargs[key].shape[0], key)
        state.set_override(RowRouting(routing))
    return args, kwargs


def routing_post_hook(model: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    """Root post-hook (always called, errors included): restore the plan of before the call."""
    state = get_state(model)
    if state is not None and state.call_plans:
        state.set_override(state.call_plans.pop())


def generate_routed(model: nn.Module, *args: Any, delta_ids: Any = None, **kwargs: Any) -> Any:
    """``model.generate`` that also takes ``delta_ids`` (one per prompt), like ``model(...)``.

    Beams and returned sequences repeat each prompt's row; the routing repeats with them.
    """
    generate = type(model).generate
    if delta_ids is None:
        return generate(model, *args, **kwargs)
    state = require_state(model)
    routing = make_routing(state, delta_ids)
    prompts = kwargs.get("input_ids", args[0] if args else None)
    if isinstance(prompts, torch.Tensor):
        routing.check_batch(prompts.shape[0], "input_ids")
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    beams = kwargs.get("num_beams", getattr(config, "num_beams", 1) or 1)
    returned = kwargs.get("num_return_sequences", getattr(config, "num_return_sequences", 1) or 1)
    with routed(state, routing.expanded(beams if beams > 1 else returned)):
        return generate(model, *args, **kwargs)


def new_state(model: nn.Module) -> DeltaState:
    """A fresh state on ``model``, with the root hooks that take ``model(..., delta_ids=...)``
    and, on a model that generates, ``model.generate(..., delta_ids=...)``."""
    state = DeltaState()
    model.__dict__[STATE_ATTR] = state
    state.root_handles = [
        model.register_forward_pre_hook(routing_pre_hook, with_kwargs=True, prepend=True),
        model.register_forward_hook(routing_post_hook, with_kwargs=True, always_call=True),
    ]
    if callable(getattr(type(model), "generate", None)):
        model.__dict__["generate"] = types.MethodType(generate_routed, model)
    return state


def drop_state(model: nn.Module) -> None:
    """Remove the state, its root hooks and the ``generate`` wrapper from ``model``."""
    state = model.__dict__.pop(STATE_ATTR, None)
    for handle in getattr(state, "root_handles", []):
        handle.remove()
    if isinstance(model.__dict__.get("generate"), types.MethodType) and \
            model.__dict__["generate"].__func__ is generate_routed:
        del model.__dict__["generate"]
