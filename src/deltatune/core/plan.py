"""What runs at every slot: the one plan in force on a model.

A model's :class:`~deltatune.core.slot.DeltaState` holds exactly one plan, and every slot's
module call (its :class:`~deltatune.core.slot.SlotForward`) only delegates to it:

- :class:`ActiveSet`: the active deltas, stacked in order (``set_active``, ``using``);
- :class:`RowRouting`: each row of the batch through its own delta (``route``, ``delta_ids``);
- a composition of blocks (``deltatune.compose``), which subclasses :class:`Plan` too.

A plan prepares what it needs at one slot once per change of the model's deltas
(:meth:`Plan.resolve`, cached by the slot against the state's version counter), so a forward
pass with nothing to do at a module costs one identity check and one integer comparison, and
a module with one delta unit hands the whole call to that unit (:meth:`DeltaUnit.run`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import NotApplicableError
from .rows import Routing, group_by_class, run_mixed_post, run_mixed_pre

if TYPE_CHECKING:
    from torch import nn

    from .slot import DeltaSlot
    from .unit import DeltaUnit


class Plan:
    """How the deltas at a slot run: :meth:`forward` runs one module call; subclasses
    implement it or the :meth:`pre` / :meth:`post` steps it takes by default."""

    #: why per-row ``delta_ids`` cannot replace this plan for a call (``None``: they can)
    refuses_routing: str | None = None

    def resolve(self, slot: DeltaSlot) -> Any:
        """What the plan needs at ``slot``; computed once per version of the model's deltas."""
        return None

    def forward(self, slot: DeltaSlot, module: nn.Module, own: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """One call of ``module``: :meth:`pre` on its inputs, its own forward (``own``), then
        :meth:`post` on its output."""
        changed = self.pre(slot, module, args, kwargs)
        if changed is not None:
            args, kwargs = changed
        output = own(*args, **kwargs)
        result = self.post(slot, module, args, kwargs, output)
        return output if result is None else result

    def pre(self, slot: DeltaSlot, module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        """Before the module runs: new ``(args, kwargs)``, or ``None`` for unchanged."""
        return None

    def post(self, slot: DeltaSlot, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        """After the module ran: a new output, or ``None`` for unchanged."""
        return None

    def units(self, slot: DeltaSlot) -> list[DeltaUnit]:
        """Units at ``slot`` for methods that act from inside their module (prefix tuning)."""
        return []

    def names(self) -> tuple[str, ...]:
        """The deltas this plan runs."""
        return ()


def overrides(unit: DeltaUnit, hook: str) -> bool:
    return type(unit).overrides(hook)


class ActiveSet(Plan):
    """The named deltas applied one after the other at every module (merged ones excluded:
    their change is in the weights already)."""

    def __init__(self, names: tuple[str, ...] = ()) -> None:
        self.active = tuple(names)

    def resolve(self, slot: DeltaSlot) -> tuple[list, list, list, DeltaUnit | None]:
        """(units that change inputs, units that change outputs, all units, the unit when it is alone)."""
        merged = slot.state.merged
        units = [slot[n] for n in self.active if n in slot._modules and n not in merged]
        return ([u for u in units if overrides(u, "forward_pre")], [u for u in units if overrides(u, "forward_post")],
                units, units[0] if len(units) == 1 else None)

    def forward(self, slot, module, own, args, kwargs):
        pre, post, units, alone = slot.resolved(self)
        if alone is not None:
            return alone.run(module, own, args, kwargs)
        if not units:
            return own(*args, **kwargs)
        for unit in pre:
            args, kwargs = unit.forward_pre(module, args, kwargs)
        output = own(*args, **kwargs)
        for unit in post:
            output = unit.forward_post(module, args, kwargs, output)
        return output

    def pre(self, slot, module, args, kwargs):
        units = slot.resolved(self)[0]
        if not units:
            return None
        for unit in units:
            args, kwargs = unit.forward_pre(module, args, kwargs)
        return args, kwargs

    def post(self, slot, module, args, kwargs, output):
        units = slot.resolved(self)[1]
        if not units:
            return None
        for unit in units:
            output = unit.forward_post(module, args, kwargs, output)
        return output

    def units(self, slot):
        return slot.resolved(self)[2]

    def names(self) -> tuple[str, ...]:
        return self.active


class RowRouting(Plan):
    """Row ``i`` through delta ``routing.names[routing.index[i]]``: each unit class's
    ``mixed_pre`` / ``mixed_post`` runs once over all rows. A routing in which every row
    uses one delta runs exactly as that delta active alone."""

    def __init__(self, routing: Routing) -> None:
        self.routing = routing
        self._single = ActiveSet((routing.single,)) if routing.single is not None else None

    def resolve(self, slot):
        units = [slot._modules.get(n) for n in self.routing.names]
        groups = group_by_class(units)
        return ([g for g in groups if g[0].overrides("forward_pre")], [g for g in groups if g[0].overrides("forward_post")])

    def forward(self, slot, module, own, args, kwargs):
        if self._single is not None:
            return self._single.forward(slot, module, own, args, kwargs)
        return super().forward(slot, module, own, args, kwargs)

    def pre(self, slot, module, args, kwargs):
        if self._single is not None:
            return self._single.pre(slot, module, args, kwargs)
        groups = slot.resolved(self)[0]
        return run_mixed_pre(groups, module, args, kwargs, self.routing) if groups else None

    def post(self, slot, module, args, kwargs, output):
        if self._single is not None:
            return self._single.post(slot, module, args, kwargs, output)
        groups = slot.resolved(self)[1]
        return run_mixed_post(groups, module, args, kwargs, output, self.routing) if groups else None

    def units(self, slot):
        if self._single is not None:
            return self._single.units(slot)
        present = [slot[n] for n in self.routing.names if n in slot._modules]
        if present:
            raise NotApplicableError(
                f"{type(present[0]).__name__} units cannot take part in a batch that mixes deltas per row; run those "
                f"rows as their own batch (with using(model, name))"
            )
        return []

    def names(self) -> tuple[str, ...]:
        return self.routing.names
