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
    from .mixing import Routing

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
        #: per-row deltas of a mixed batch (overrides ``active`` while set); see core/mixing.py
        self.routing: Routing | None = None
        #: a composition of deltas (overrides ``active`` while set); see deltatune/compose
        self.composition: Any = None
        #: routings to restore after ``model(..., delta_ids=...)`` calls, innermost last
        self.call_routing: list[Routing | None] = []
        self.root_handles: list[Any] = []
        self.merged: tuple[str, ...] = ()
        self.version = 0
        #: names of base parameters that had requires_grad=True before the first attach
        self.originally_trainable: set[str] = set()
        #: what each delta means (label names, task), as io/meaning.py records it when a delta
        #: is loaded or derived, so saving it again keeps them; core never reads it
        self.meanings: dict[str, Any] = {}

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

    def set_routing(self, routing: Routing | None) -> None:
        self.routing = routing


class DeltaSlot(nn.ModuleDict):
    """The units of every delta at one module, run from that module's forward hooks.

    Installed as the child ``deltas`` of the module it serves; keys are delta names.
    """

    def __init__(self, state: DeltaState) -> None:
        super().__init__()
        self._delta_state = state
        self._handles: list[Any] = []
        self._cache: tuple[int, list[DeltaUnit], list[DeltaUnit], list[DeltaUnit]] = (-1, [], [], [])
        self._mixed: tuple[Any, list, list] = (None, [], [])
        #: stacked per-delta weights of the last mixed batch (see mixing.gathered)
        self.mixed_cache: dict[str, Any] = {}
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
        """Units of the active, unmerged deltas, in activation order (for methods that act
        from inside their module rather than from its hooks, such as prefix tuning).

        In a batch routed to one delta, that delta's unit; a batch that mixes deltas per row
        cannot be served this way, so it raises.
        """
        if self._delta_state.composition is not None:
            return self._delta_state.composition.units(self)
        routing = self._delta_state.routing
        if routing is None:
            return self._refresh()[3]
        if routing.single is not None:
            return [self[routing.single]] if routing.single in self._modules else []
        units = [self[n] for n in routing.names if n in self._modules]
        if units:
            from ..errors import NotApplicableError

            raise NotApplicableError(
                f"{type(units[0]).__name__} units cannot take part in a batch that mixes deltas per row; run those "
                f"rows as their own batch (with using(model, name))"
            )
        return []

    def _refresh(self) -> tuple[int, list[DeltaUnit], list[DeltaUnit], list[DeltaUnit]]:
        state = self._delta_state
        if self._cache[0] != state.version:
            units = [self[n] for n in state.active if n in self._modules and n not in state.merged]
            pre = [u for u in units if type(u).overrides("forward_pre")]
            post = [u for u in units if type(u).overrides("forward_post")]
            self._cache = (state.version, pre, post, units)
        return self._cache

    def _mixed_groups(self, routing: Routing) -> tuple[list, list]:
        """For a mixed batch: (class, units aligned with ``routing.names``) per unit class,
        for the pre and the post hook."""
        key = (self._delta_state.version, routing.names)
        if self._mixed[0] != key:
            units = [self[n] if n in self._modules else None for n in routing.names]
            classes = list(dict.fromkeys(type(u) for u in units if u is not None))
            groups = [(cls, [u if type(u) is cls else None for u in units]) for cls in classes]
            self._mixed = (key, [g for g in groups if g[0].overrides("forward_pre")],
                           [g for g in groups if g[0].overrides("forward_post")])
        return self._mixed[1], self._mixed[2]

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        if self._delta_state.composition is not None:
            return self._delta_state.composition.pre(self, module, args, kwargs)
        routing = self._delta_state.routing
        if routing is not None and routing.single is None:
            pre = self._mixed_groups(routing)[0]
            for cls, units in pre:
                args, kwargs = cls.mixed_pre(units, module, args, kwargs, routing)
            return (args, kwargs) if pre else None
        pre = self._single_route(routing, 1) if routing is not None else self._refresh()[1]
        if not pre:
            return None
        for unit in pre:
            args, kwargs = unit.forward_pre(module, args, kwargs)
        return args, kwargs

    def _post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if self._delta_state.composition is not None:
            return self._delta_state.composition.post(self, module, args, kwargs, output)
        routing = self._delta_state.routing
        if routing is not None and routing.single is None:
            post = self._mixed_groups(routing)[1]
            for cls, units in post:
                output = cls.mixed_post(units, module, args, kwargs, output, routing)
            return output if post else None
        post = self._single_route(routing, 2) if routing is not None else self._refresh()[2]
        if not post:
            return None
        for unit in post:
            output = unit.forward_post(module, args, kwargs, output)
        return output

    def _single_route(self, routing: Routing, which: int) -> list[DeltaUnit]:
        """Every row uses one delta: its units (pre: ``which=1``, post: 2), as if it were the active one."""
        name = routing.single
        if name not in self._modules:
            return []
        unit = self[name]
        return [unit] if type(unit).overrides("forward_pre" if which == 1 else "forward_post") else []

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
    """A fresh state on ``model``, with the root hooks that take ``model(..., delta_ids=...)``."""
    from .mixing import routing_post_hook, routing_pre_hook

    state = DeltaState()
    model.__dict__[STATE_ATTR] = state
    state.root_handles = [
        model.register_forward_pre_hook(routing_pre_hook, with_kwargs=True, prepend=True),
        model.register_forward_hook(routing_post_hook, with_kwargs=True, always_call=True),
    ]
    return state


def drop_state(model: nn.Module) -> None:
    state = model.__dict__.pop(STATE_ATTR, None)
    for handle in getattr(state, "root_handles", []):
        handle.remove()


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
    if module.__dict__.get(STATE_ATTR) is state and len(state.root_handles) == 2:
        # the root's own slot: its post-hook must run before the one that ends a routed call
        from .mixing import routing_post_hook

        state.root_handles[1].remove()
        state.root_handles[1] = module.register_forward_hook(routing_post_hook, with_kwargs=True, always_call=True)
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
