"""Evaluating a composition at one module, from that module's slot hooks.

While a composition is set, every :class:`~deltatune.core.slot.DeltaSlot` hands its hook
calls to :class:`ActiveComposition`, which walks the block tree with the units present at
that module. Deltas without a unit at a module leave it unchanged there.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..core.build import first_input, replace_first_input
from ..core.plan import Plan
from ..core.rows import Routing, group_by_class, run_mixed_post, run_mixed_pre, take_call_rows
from ..core.unit import DeltaUnit
from ..errors import DeltaStateError
from .blocks import Average, BatchSplit, Block, Fuse, Parallel, Stack


class ActiveComposition(Plan):
    """A validated block installed as the model's plan; re-validated whenever the model's
    deltas change (attach, delete, activate, merge) while it is in force."""

    refuses_routing = (
        "a composition and per-row delta_ids cannot both be in force; express the row routing inside the "
        "composition with BatchSplit, or clear the composition (set_composition(model, None))"
    )

    def __init__(self, block: Block, model: nn.Module, version: int) -> None:
        self.block = block
        self._model = weakref.ref(model)
        self._version = version
        self._names = tuple(block.names())

    def resolve(self, slot: Any) -> tuple[bool, bool]:
        """Whether any of the composition's deltas changes this module's input, its output."""
        state = slot.state
        if state.version != self._version:
            model = self._model()
            if model is not None:
                self.block.validate(model)
            self._version = state.version
        units = [slot._modules[n] for n in self._names if n in slot._modules]
        return any(type(u).overrides("forward_pre") for u in units), any(type(u).overrides("forward_post") for u in units)

    def pre(self, slot: Any, module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        if not slot.resolved(self)[0]:
            return None
        return _Site(slot, module).pre(self.block, args, kwargs)

    def post(self, slot: Any, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if not slot.resolved(self)[1]:
            return None
        return _Site(slot, module, args, kwargs).post(self.block, output)

    def units(self, slot: Any) -> list[DeltaUnit]:
        """Units of the composition's deltas at ``slot`` (for methods acting from inside a
        module, which validation has allowed only in Stacks)."""
        return [slot[n] for n in self._names if n in slot._modules]

    def names(self) -> tuple[str, ...]:
        return self._names


class _Site:
    """One module call: the slot, the module, and (for output hooks) its inputs."""

    def __init__(self, slot: Any, module: nn.Module, args: tuple = (), kwargs: dict | None = None) -> None:
        self.slot, self.module, self.args, self.kwargs = slot, module, args, kwargs or {}

    def unit(self, name: str, hook: str) -> DeltaUnit | None:
        unit = self.slot._modules.get(name)
        return unit if unit is not None and type(unit).overrides(hook) else None

    # --- module outputs ------------------------------------------------------------------

    def post(self, block: Block | str, output: Any) -> Any:
        if isinstance(block, str):
            unit = self.unit(block, "forward_post")
            return output if unit is None else unit.forward_post(self.module, self.args, self.kwargs, output)
        return _POST[type(block)](self, block, output)

    def _post_stack(self, block: Stack, output: Any) -> Any:
        for child in block.children:
            output = self.post(child, output)
        return output

    def _post_parallel(self, block: Parallel, output: Any) -> Any:
        return _weighted_change(output, [self.post(c, output) for c in block.children], block.child_weights())

    def _post_fuse(self, block: Fuse, output: Any) -> Any:
        fusion = self.slot._modules.get(block.fusion)
        if fusion is None:  # validation keeps fused deltas and their fusion on the same modules
            return output
        return fusion.fuse(output, [self.post(c, output) for c in block.children])

    def _post_split(self, block: BatchSplit, output: Any) -> Any:
        rows = _check_rows(block, output, self.module)
        if all(isinstance(c, str) for c in block.children):
            return self._post_routed(block, output)
        parts = []
        for child, index in zip(block.children, rows):
            part = _Site(self.slot, self.module, *take_call_rows(self.args, self.kwargs, index, output.shape[0]))
            parts.append(part.post(child, output.index_select(0, index)))
        return torch.cat(parts, 0)

    def _post_routed(self, block: BatchSplit, output: Any) -> Any:
        """Children that are all delta names: the mixed-batch kernels of ``dt.route``."""
        routing, units = _routing(block, self.slot, "forward_post")
        return run_mixed_post(group_by_class(units), self.module, self.args, self.kwargs, output, routing)

    # --- module inputs -------------------------------------------------------------------

    def pre(self, block: Block | str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if isinstance(block, str):
            unit = self.unit(block, "forward_pre")
            return (args, kwargs) if unit is None else unit.forward_pre(self.module, args, kwargs)
        if isinstance(block, Stack):
            for child in block.children:
                args, kwargs = self.pre(child, args, kwargs)
            return args, kwargs
        if isinstance(block, BatchSplit):
            return self._pre_split(block, args, kwargs)
        if isinstance(block, Fuse):  # fuses outputs; validation keeps input-changing units out of it
            return args, kwargs
        x = first_input(args, kwargs)
        changed = [first_input(*self.pre(c, args, kwargs)) for c in block.children]
        return replace_first_input(args, kwargs, _weighted_change(x, changed, block.child_weights()))

    def _pre_split(self, block: BatchSplit, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        x = first_input(args, kwargs)
        rows = _check_rows(block, x, self.module)
        if all(isinstance(c, str) for c in block.children):
            routing, units = _routing(block, self.slot, "forward_pre")
            groups = group_by_class(units)
            if all(cls.overrides("mixed_pre") for cls, _ in groups):
                return run_mixed_pre(groups, self.module, args, kwargs, routing)
        parts = []
        for child, index in zip(block.children, rows):
            sub_args, sub_kwargs = take_call_rows(args, kwargs, index, x.shape[0])
            parts.append(first_input(*self.pre(child, sub_args, sub_kwargs)))
        return replace_first_input(args, kwargs, torch.cat(parts, 0))


_POST: dict[type, Callable] = {
    Stack: _Site._post_stack, Parallel: _Site._post_parallel, Average: _Site._post_parallel, Fuse: _Site._post_fuse,
    BatchSplit: _Site._post_split,
}


def _weighted_change(start: torch.Tensor, results: list[torch.Tensor], weights: tuple[float, ...]) -> torch.Tensor:
    """``start + sum_i w_i (results_i - start)``."""
    if not isinstance(start, torch.Tensor):
        raise DeltaStateError(
            f"Parallel and Fuse combine tensors, but a module gave a {type(start).__name__}; target modules whose "
            f"output is a single tensor"
        )
    total = start
    for result, weight in zip(results, weights):
        if result is not start:  # a child without a unit here contributes no change
            total = total + weight * (result - start)
    return total


def _check_rows(block: BatchSplit, x: Any, module: nn.Module) -> list[torch.Tensor]:
    """Each child's row indices; the sizes must add up to the batch."""
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        raise DeltaStateError(
            f"BatchSplit splits tensors by rows, but {type(module).__name__} gave a {type(x).__name__}; target "
            f"modules whose input and output are single tensors"
        )
    batch = x.shape[0]
    if batch != sum(block.sizes):
        raise DeltaStateError(
            f"BatchSplit sizes {list(block.sizes)} add up to {sum(block.sizes)} rows, but {type(module).__name__} "
            f"received a batch of {batch}; make the sizes add up to the batch size"
        )
    device = x.device
    starts = [sum(block.sizes[:i]) for i in range(len(block.sizes))]
    return [torch.arange(start, start + size, device=device) for start, size in zip(starts, block.sizes)]


def _routing(block: BatchSplit, slot: Any, hook: str) -> tuple[Routing, list]:
    names = tuple(dict.fromkeys(block.children))
    position = [names.index(c) for c in block.children]
    index = torch.repeat_interleave(torch.tensor(position, dtype=torch.long), torch.tensor(block.sizes))
    units = [slot._modules.get(n) for n in names]
    units = [u if u is not None and type(u).overrides(hook) else None for u in units]
    return Routing(names, index), units
