"""Per-model delta state and the per-module slot that runs a module's delta units."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import DeltaStateError
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
    """What one model knows about its deltas: configs, where they sit, which are active.

    One object per model, shared by every slot, so that activating a delta is one assignment.
    """

    def __init__(self) -> None:
        self.configs: dict[str, DeltaConfig] = {}
        self.sites: dict[str, list[str]] = {}
        self.saved_modules: dict[str, list[str]] = {}
        self.active: tuple[str, ...] = ()
        self.merged: tuple[str, ...] = ()
        self.version = 0
        #: names of base parameters that had requires_grad=True before the first attach
        self.originally_trainable: set[str] = set()

    def require(self, name: str) -> None:
        if name not in self.configs:
            known = ", ".join(repr(n) for n in self.configs) or "none"
            raise DeltaStateError(f"no delta named {name!r} on this model; deltas: {known}")

    def set_active(self, names: tuple[str, ...]) -> None:
        for name in names:
            self.require(name)
        if len(set(names)) != len(names):
            raise DeltaStateError(f"delta names repeated in {list(names)}")
        self.active = tuple(names)
        self.version += 1

    def changed(self) -> None:
        self.version += 1


class DeltaSlot(nn.ModuleDict):
    """The units of every delta at one module, run from that module's forward hooks.

    Installed as the child ``deltas`` of the module it serves; keys are delta names.
    """

    def __init__(self, state: DeltaState) -> None:
        super().__init__()
        self._delta_state = state
        self._handles: list[Any] = []
        self._cache: tuple[int, list[DeltaUnit], list[DeltaUnit], list[DeltaUnit]] = (-1, [], [], [])
        #: originals of the module's parameters while deltas are merged into them
        self._originals: dict[str, torch.Tensor] = {}

    @property
    def state(self) -> DeltaState:
        return self._delta_state

    def install(self, module: nn.Module) -> None:
        self._handles = [
            module.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
            module.register_forward_hook(self._post_hook, with_kwargs=True),
        ]

    def uninstall(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def active_units(self) -> list[DeltaUnit]:
        """Units of the active, unmerged deltas, in activation order."""
        return self._refresh()[3]

    def _refresh(self) -> tuple[int, list[DeltaUnit], list[DeltaUnit], list[DeltaUnit]]:
        state = self._delta_state
        if self._cache[0] != state.version:
            units = [self[n] for n in state.active if n in self._modules and n not in state.merged]
            pre = [u for u in units if type(u).overrides("forward_pre")]
            post = [u for u in units if type(u).overrides("forward_post")]
            self._cache = (state.version, pre, post, units)
        return self._cache

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        pre = self._refresh()[1]
        if not pre:
            return None
        for unit in pre:
            args, kwargs = unit.forward_pre(module, args, kwargs)
        return args, kwargs

    def _post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        post = self._refresh()[2]
        if not post:
            return None
        for unit in post:
            output = unit.forward_post(module, args, kwargs, output)
        return output

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


def new_state(model: nn.Module) -> DeltaState:
    state = DeltaState()
    model.__dict__[STATE_ATTR] = state
    return state


def drop_state(model: nn.Module) -> None:
    model.__dict__.pop(STATE_ATTR, None)


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
    module.add_module(SLOT_ATTR, slot)
    slot.install(module)
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
