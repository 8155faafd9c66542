"""What runs at every slot: the one plan in force on a model.

A model's :class:`~deltatune.core.slot.DeltaState` holds exactly one plan, and every slot's
hooks only delegate to it:

- :class:`ActiveSet`: the active deltas, stacked in order (``set_active``, ``using``);
- :class:`RowRouting`: each row of the batch through its own delta (``route``, ``delta_ids``);
- a composition of blocks (``deltatune.compose``), which subclasses :class:`Plan` too.

A plan prepares what it needs at one slot once per change of the model's deltas
(:meth:`Plan.resolve`, cached by the slot against the state's version counter), so a forward
pass with nothing to do at a module costs one identity check and one integer comparison.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import NotApplicableError
from .rows import Routing, group_by_class, run_mixed_post, run_mixed_pre

if TYPE_CHECKING:
    from torch import nn

    from .slot import DeltaSlot
    from .unit import DeltaUnit


class Plan:
    """How the deltas at a slot run; subclasses implement the hooks."""

    #: why per-row ``delta_ids`` cannot replace this plan for a call (``None``: they can)
    refuses_routing: str | None = None

    def resolve(self, slot: DeltaSlot) -> Any:
        """What the hooks need at ``slot``; computed once per version of the model's deltas."""
        return None

    def pre(self, slot: DeltaSlot, module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        """The module's forward pre-hook: new ``(args, kwargs)``, or ``None`` for unchanged."""
        return None

    def post(self, slot: DeltaSlot, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        """The module's forward hook: a new output, or ``None`` for unchanged."""
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

    def resolve(self, slot: DeltaSlot) -> tuple[list, list, list]:
        merged = slot.state.merged
        units = [slot[n] for n in self.active if n in slot._modules and n not in merged]
        return ([u for u in units if overrides(u, "forward_pre")], [u for u in units if overrides(u, "forward_post")],
                units)

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
