"""Per-model delta state and the per-module slot that runs a module's delta units."""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import DeltaStateError
from .plan import ActiveSet, Plan
from .unit import DeltaUnit

if TYPE_CHECKING:
    from .config import DeltaConfig

SLOT_ATTR = "deltas"
STATE_ATTR = "_deltatune_state"
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_\-]{0,63}")


def check_delta_name(name: str) -> str:
    """Delta names become module names and file names: letters, digits, ``_`` and ``-``."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise DeltaStateError(
            f"invalid delta name {name!r}: use 1-64 letters, digits, '_' or '-', starting with a letter"
        )
    return name


class DeltaState:
    """What one model knows about its deltas: configs, where they sit, which are active, and
    the one plan in force (see core/plan.py).

    One object per model, shared by every slot, so that activating a delta is one assignment.
    """

    def __init__(self) -> None:
        self.configs: dict[str, DeltaConfig] = {}
        self.sites: dict[str, list[str]] = {}
        self.saved_modules: dict[str, list[str]] = {}
        #: the active set: what runs when no routing or composition overrides it
        self.active_set = ActiveSet()
        #: a routing or composition in force instead of the active set, else ``None``
        self.override: Plan | None = None
        #: the plan every slot runs: ``override`` if set, else ``active_set``
        self.plan: Plan = self.active_set
        #: plans to restore after ``model(..., delta_ids=...)`` calls, innermost last
        self.call_plans: list[Plan | None] = []
        self.root_handles: list[Any] = []
        self.merged: tuple[str, ...] = ()
        #: while merged into a quantised base: for each re-quantised weight, the rounding error
        #: re-quantising added, as a fraction of the merged change (see core/merge.py)
        self.requantization: dict[str, float] = {}
        self.version = 0
        #: names of base parameters that had requires_grad=True before the first attach
        self.originally_trainable: set[str] = set()
        #: what each delta means (label names, task), as io/meaning.py records it when a delta
        #: is loaded or derived, so saving it again keeps them; core never reads it
        self.meanings: dict[str, Any] = {}

    @property
    def active(self) -> tuple[str, ...]:
        return self.active_set.active

    def require(self, name: str) -> None:
        if name not in self.configs:
            known = ", ".join(repr(n) for n in self.configs) or "none"
            raise DeltaStateError(f"no delta named {name!r} on this model; deltas: {known}")

    def set_active(self, names: tuple[str, ...]) -> None:
        for name in names:
            self.require(name)
        if len(set(names)) != len(names):
            raise DeltaStateError(f"delta names repeated in {list(names)}")
        self.active_set = ActiveSet(tuple(names))
        self.set_override(self.override)
        self.version += 1

    def set_override(self, plan: Plan | None) -> None:
        """Put a routing or composition in force (``None``: back to the active set)."""
        self.override = plan
        self.plan = plan if plan is not None else self.active_set

    def in_play(self) -> set[str]:
        """Deltas the model may run now: active, merged, or named by a plan in force or to be restored."""
        names = set(self.active) | set(self.merged)
        for plan in (self.override, *self.call_plans):
            if plan is not None:
                names.update(plan.names())
        return names

    def changed(self) -> None:
        self.version += 1


class SlotForward:
    """The ``forward`` of a module that has a slot: it hands every call to the plan in force,
    which runs the module's own forward with the deltas around it (or computes the result in
    one go, see :meth:`DeltaUnit.run`).

    Set on the module instance (``module.forward``), so the module keeps its class, its
    attributes and its state-dict names, a call costs one Python call more than the bare
    module (forward hooks would cost two and force torch's slow call path), and forward hooks
    that others register on the module see the adapted output. ``inspect.signature`` sees the
    module's own signature (transformers and Trainer read it).
    """

    def __init__(self, slot: DeltaSlot, module: nn.Module, inner: Any) -> None:
        self.slot = slot
        self.module = module
        #: an instance-level forward that was there before (another library's wrapper), else None
        self.inner = inner

    def own(self, *args: Any, **kwargs: Any) -> Any:
        """The module's forward without the deltas."""
        if self.inner is not None:
            return self.inner(*args, **kwargs)
        return type(self.module).forward(self.module, *args, **kwargs)

    @property
    def __wrapped__(self) -> Any:
        return self.inner if self.inner is not None else type(self.module).forward.__get__(self.module)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        slot = self.slot
        return slot._delta_state.plan.forward(slot, self.module, self.own, args, kwargs)


class DeltaSlot(nn.ModuleDict):
    """The units of every delta at one module, run from that module's forward (a
    :class:`SlotForward`), which hands each call to the plan in force.

    Installed as the child ``deltas`` of the module it serves; keys are delta names.
    """

    def __init__(self, state: DeltaState) -> None:
        super().__init__()
        self._delta_state = state
        self._wrapper: SlotForward | None = None
        self._resolved: tuple[Any, int, Any] = (None, -1, None)
        #: stacked per-delta weights of the last mixed batch (see rows.gathered)
        self.mixed_cache: dict[str, Any] = {}
        #: originals of the module's parameters while deltas are merged into them
        self._originals: dict[str, torch.Tensor] = {}

    @property
    def state(self) -> DeltaState:
        return self._delta_state

    @property
    def originals(self) -> Mapping[str, torch.Tensor]:
        """The module's base tensors as they were before the deltas merged into it, by parameter
        name (read-only; empty while nothing is merged). Readers of "the base" (fingerprints,
        task vectors, bases of recycled subspaces) take a tensor from here when it is present."""
        return MappingProxyType(self._originals)

    def install(self, module: nn.Module) -> None:
        """Serve ``module``: its ``forward`` becomes a :class:`SlotForward` over this slot. At the
        model root this runs inside the call, so before the root hook that ends a
        ``model(..., delta_ids=...)`` call."""
        self._wrapper = SlotForward(self, module, module.__dict__.get("forward"))
        module.__dict__["forward"] = self._wrapper

    def uninstall(self, module: nn.Module) -> None:
        """Give ``module`` back its own forward (or the wrapper that was there before)."""
        wrapper = self._wrapper
        if wrapper is not None and module.__dict__.get("forward") is wrapper:
            if wrapper.inner is None:
                del module.__dict__["forward"]
            else:
                module.__dict__["forward"] = wrapper.inner
        self._wrapper = None

    def resolved(self, plan: Plan) -> Any:
        """``plan.resolve(self)``, computed once per plan and version of the model's deltas."""
        cached = self._resolved
        version = self._delta_state.version
        if cached[0] is plan and cached[1] == version:
            return cached[2]
        value = plan.resolve(self)
        self._resolved = (plan, version, value)
        return value

    def active_units(self) -> list[DeltaUnit]:
        """Units the plan in force runs here, for methods that act from inside their module
        rather than from its hooks (prefix tuning). A batch that mixes deltas per row cannot
        be served this way, so it raises."""
        return self._delta_state.plan.units(self)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The identity. A slot is driven by its module's hooks; this only matters for
        containers such as ``nn.Sequential`` that call every child in turn."""
        return args[0] if args else None


def get_slot(module: nn.Module) -> DeltaSlot | None:
    """The slot installed on ``module``, if any."""
    slot = module._modules.get(SLOT_ATTR)
    return slot if isinstance(slot, DeltaSlot) else None


def get_state(model: nn.Module) -> DeltaState | None:
    """The delta state of a model that has deltas attached, else ``None``.

    It is a plain attribute of the model, not a child module, so that containers such as
    ``nn.Sequential`` keep their children unchanged.
    """
    return model.__dict__.get(STATE_ATTR)


def require_state(model: nn.Module) -> DeltaState:
    state = get_state(model)
    if state is None:
        raise DeltaStateError(f"{type(model).__name__} has no deltas; attach one first with deltatune.attach")
    return state


def ensure_slot(module: nn.Module, state: DeltaState) -> DeltaSlot:
    """The slot on ``module``, created and hooked up on first use."""
    slot = get_slot(module)
    if slot is not None:
        return slot
    if hasattr(module, SLOT_ATTR):
        raise DeltaStateError(
            f"{type(module).__name__} already has an attribute {SLOT_ATTR!r}; deltatune cannot install its slot there"
        )
    slot = DeltaSlot(state)
    slot.train(module.training)
    module.add_module(SLOT_ATTR, slot)
    slot.install(module)
    return slot


def remove_slot(module: nn.Module) -> None:
    slot = get_slot(module)
    if slot is not None:
        slot.uninstall(module)
        del module._modules[SLOT_ATTR]


def slot_sites(model: nn.Module) -> list[tuple[str, nn.Module, DeltaSlot]]:
    """Every (path, module, slot) in the model, the model itself included (path ``""``)."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, DeltaSlot):
            continue
        slot = get_slot(module)
        if slot is not None:
            out.append((name, module, slot))
    return out
