"""Composition of deltas as data: Stack, Parallel, Average, BatchSplit and Fuse blocks.

Example:
    >>> import deltatune as dt
    >>> block = dt.Parallel("sentiment", dt.Stack("lang", "topic"), weights=[0.5, 0.5])
    >>> with dt.compose(model, block):
    ...     logits = model(**batch).logits
    >>> dt.set_composition(model, dt.BatchSplit("a", "b", sizes=[4, 4]))   # until cleared
    >>> dt.set_composition(model, None)

While a composition is in force it decides which deltas run and how, instead of the
active set; see docs/COMPOSITION.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from ..core.slot import require_state
from .blocks import Average, BatchSplit, Block, Fuse, Parallel, Stack, as_block, block_from_dict
from .run import ActiveComposition

__all__ = [
    "Average", "BatchSplit", "Block", "Fuse", "Parallel", "Stack", "block_from_dict", "compose",
    "get_composition", "set_composition",
]


def set_composition(model: nn.Module, block: Block | str | None) -> None:
    """Run ``model`` under ``block`` from now on (``None`` clears it, back to the active set).

    Args:
        model: a model with deltas attached.
        block: a block, a single delta name (``Stack(name)``), a dict from
            :meth:`Block.to_dict`, or ``None``.

    Raises:
        DeltaStateError, ConfigError, NotApplicableError: from :meth:`Block.validate`;
            nothing changes then.
    """
    state = require_state(model)
    if block is None:
        state.set_override(None)
        return
    block = as_block(block)
    block.validate(model)
    state.set_override(ActiveComposition(block, model, state.version))


def get_composition(model: nn.Module) -> Block | None:
    """The block in force on ``model``, else ``None``."""
    plan = require_state(model).override
    return plan.block if isinstance(plan, ActiveComposition) else None


@contextlib.contextmanager
def compose(model: nn.Module, block: Block | str) -> Iterator[Block]:
    """Run ``model`` under ``block`` inside the ``with`` body, then restore what was before.

    Example:
        >>> with dt.compose(model, dt.Average("seed0", "seed1")):
        ...     logits = model(x)
    """
    state = require_state(model)
    previous = state.override
    set_composition(model, block)
    try:
        yield state.override.block
    finally:
        state.set_override(previous)
