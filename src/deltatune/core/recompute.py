"""Gradient (activation) checkpointing that keeps every delta's plan.

A checkpointed block drops its activations in the forward pass and runs again in the backward
pass. Every adapted module inside it hands its call to the model's plan in force
(:mod:`.plan`), and that plan may be gone by the time the backward pass runs: a mixed batch's
per-row routing (``model(..., delta_ids=...)``, ``train --multi``) ends when the forward call
returns, so a recompute would run the rows through the active set instead and produce other
gradients, silently.

:func:`recompute_context` is the fix, through torch's own hook for this
(``torch.utils.checkpoint.checkpoint(..., use_reentrant=False, context_fn=...)``): it notes the
plan in force when a checkpointed forward runs, and puts that plan back in force while its
recompute runs. :func:`enable_gradient_checkpointing` turns on a transformers model's
checkpointing with it; other models pass ``context_fn=recompute_context(model)`` to their own
``checkpoint`` calls.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from torch import nn

from ..errors import ConfigError
from .plan import Plan
from .slot import DeltaState, get_state


def recompute_context(model: nn.Module) -> Callable[[], tuple[Any, Any]]:
    """A ``context_fn`` for ``torch.utils.checkpoint.checkpoint`` (non-reentrant): the
    recompute in the backward pass runs under the plan that was in force in the forward pass.

    The model's deltas are looked up at each call, so it may be made before any delta is attached.
    """

    def context_fn() -> tuple[Any, Any]:
        state = get_state(model)
        if state is None:
            return contextlib.nullcontext(), contextlib.nullcontext()
        return contextlib.nullcontext(), _in_force(state, state.plan)

    return context_fn


@contextlib.contextmanager
def _in_force(state: DeltaState, plan: Plan) -> Iterator[None]:
    previous = state.plan
    state.plan = plan
    try:
        yield
    finally:
        state.plan = previous


def enable_gradient_checkpointing(model: nn.Module, every_n_layers: int = 1) -> None:
    """Checkpoint each transformer block of a transformers model (its own mechanism, with
    :func:`recompute_context`), so training keeps one block's activations at a time.

    Raises:
        ConfigError: the model has no checkpointing of its own (then wrap its blocks with
            ``torch.utils.checkpoint.checkpoint(block, ..., use_reentrant=False,
            context_fn=recompute_context(model))``).
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"{type(model).__name__} has no gradient checkpointing of its own (transformers models "
                          f"declare supports_gradient_checkpointing); train without it, or wrap its blocks with "
                          f"torch.utils.checkpoint.checkpoint(..., use_reentrant=False, "
                          f"context_fn=deltatune.recompute_context(model))")
    kwargs = {"use_reentrant": False, "context_fn": recompute_context(model)}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs, every_n_layers=every_n_layers)
    else:  # transformers before 5
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def disable_gradient_checkpointing(model: nn.Module) -> None:
    """Undo :func:`enable_gradient_checkpointing` (a no-op for a model without checkpointing)."""
    disable = getattr(model, "activation_checkpointing_disable", None) or getattr(
        model, "gradient_checkpointing_disable", None)
    if disable is not None and getattr(model, "supports_gradient_checkpointing", False):
        disable()
