"""Per-model delta state and the per-module slot that runs a module's delta units."""

from __future__ import annotations

import re
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


class DeltaSlot(nn.ModuleDict):
    """The units of every delta at one module, run from that module's forward hooks, which
    hand each call to the plan in force.

    Installed as the child ``deltas`` of the module it serves; keys are delta names.
    """

    def __init__(self, state: DeltaState) -> None:
        super().__init__()
        self._delta_state = state
        self._handles: list[Any] = []
        self._resolved: tuple[Any, int, Any] = (None, -1, None)
        #: stacked per-delta weights of the last mixed batch (see rows.gathered)
        self.mixed_cache: dict[str, Any] = {}
        #: originals of the module's parameters while deltas are merged into them
        self._originals: dict[str, torch.Tensor] = {}

    @property
    def state(self) -> DeltaState:
        return self._delta_state

    def install(self, module: nn.Module, *, root: bool = False) -> None:
        """Hook into ``module``. At the model root (``root``) the output hook goes first, so it
        runs before the root hook that ends a ``model(..., delta_ids=...)`` call."""
        self._handles = [
            module.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
            module.register_forward_hook(self._post_hook, with_kwargs=True, prepend=root),
        ]

    def uninstall(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

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

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        return self._delta_state.plan.pre(self, module, args, kwargs)

    def _post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        return self._delta_state.plan.post(self, module, args, kwargs, output)

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
    slot.install(module, root=module.__dict__.get(STATE_ATTR) is state)
    return slot


def remove_slot(module: nn.Module) -> None:
    slot = get_slot(module)
    if slot is not None:
        slot.uninstall()
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
