"""Attaching, activating and deleting deltas on a model, in place."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from ..errors import DeltaStateError, TargetError
from .config import DeltaConfig
from .mixing import drop_state, new_state
from .params import base_parameters, count_parameters, parameter_owners, tied_elsewhere
from .registry import get_method
from .report import AttachReport, SiteReport
from .saved_module import SavedModule
from .slot import (
    DeltaState,
    check_delta_name,
    ensure_slot,
    get_state,
    remove_slot,
    require_state,
    slot_sites,
)
from .targeting import select_modules
from .unit import Placement


def attach(model: nn.Module, config: DeltaConfig, name: str = "default", *, activate: bool = True) -> AttachReport:
    """Add a delta to ``model`` in place, freeze the base, and report what was adapted.

    Args:
        model: any ``nn.Module``; a transformers model works as it is.
        config: the method's config (``LoRAConfig(r=8)``, ...).
        name: the delta's name; several deltas can live on one model.
        activate: make this the only active delta (otherwise it is added inactive).

    Returns:
        An :class:`AttachReport`; ``print(report)`` shows the table.

    Raises:
        TargetError: a target pattern matched nothing or the method cannot adapt what matched.
        DeltaStateError: a delta called ``name`` already exists.

    Example:
        >>> report = attach(model, LoRAConfig(r=8, targets=["query", "value"]), name="sentiment")
        >>> print(report)
    """
    check_name_free(model, name)
    placements = build_placements(model, config)
    return install(model, name, getattr(placements, "resolved", None) or config, placements, activate=activate)


def check_name_free(model: nn.Module, name: str) -> None:
    check_delta_name(name)
    state = get_state(model)
    if state is not None and name in state.configs:
        raise DeltaStateError(f"a delta named {name!r} already exists; delete(model, {name!r}) first or pick another name")


def build_placements(model: nn.Module, config: DeltaConfig) -> list[Placement]:
    """The units a config asks for, built but not installed: the model is not changed."""
    placements = get_method(config.method).build(model, config)
    placements += _saved_module_placements(model, getattr(placements, "resolved", None) or config)
    if not placements:
        raise TargetError(f"{config.method} found nothing to adapt in {type(model).__name__}")
    return placements


def install(
    model: nn.Module, name: str, config: DeltaConfig, placements: Sequence[Placement], *, activate: bool
) -> AttachReport:
    """Put built units into their slots, freeze the base, record the delta."""
    check_name_free(model, name)
    state = get_state(model)
    if state is None:
        state = new_state(model)
        state.originally_trainable = {n for n, p in base_parameters(model) if p.requires_grad}
    for _, param in base_parameters(model):
        param.requires_grad_(False)
    sites = []
    owners = parameter_owners(model)
    for placement in placements:
        module = model.get_submodule(placement.path)
        if placement.path and not isinstance(placement.unit, SavedModule):
            for key, others in tied_elsewhere(model, placement.path, owners).items():
                warnings.warn(
                    f"{placement.path}.{key} is shared with {', '.join(others)}: delta {name!r} acts only where "
                    f"{placement.path!r} itself is called, and it cannot be merged",
                    stacklevel=3,
                )
        unit = placement.unit.to(device=_device_of(module))
        unit.requires_grad_(True)
        unit.train(model.training)  # an eval() model stays in eval mode: no dropout at inference
        ensure_slot(module, state)[name] = unit
        unit.attached(module, model)
        role = "saved" if isinstance(unit, SavedModule) else "adapted"
        count = sum(p.numel() for p in unit.parameters())
        sites.append(SiteReport(placement.path, placement.module_type or type(module).__name__, count, role))
    state.configs[name] = config
    state.sites[name] = [s.path for s in sites if s.role == "adapted"]
    state.saved_modules[name] = [s.path for s in sites if s.role == "saved"]
    if activate:
        state.set_active((name,))
    state.changed()
    return AttachReport(
        name=name,
        method=config.method,
        sites=tuple(sites),
        skipped=tuple(getattr(placements, "skipped", ())),
        trainable=sum(s.parameters for s in sites),
        total=count_parameters(model),
    )


def _saved_module_placements(model: nn.Module, config: DeltaConfig) -> list[Placement]:
    if not config.modules_to_save:
        return []
    selected = select_modules(model, config.modules_to_save)
    paths = [path for path, _ in selected]
    return [
        Placement(path, SavedModule(module), type(module).__name__)
        for path, module in selected
        if not any(path.startswith(other + ".") for other in paths)  # a saved module's children come with it
    ]


def _device_of(module: nn.Module):
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return None


def delete(model: nn.Module, name: str) -> None:
    """Remove a delta and its units; with the last delta gone, no deltatune state remains."""
    state = require_state(model)
    state.require(name)
    if name in state.merged:
        raise DeltaStateError(f"delta {name!r} is merged into the base weights; call unmerge(model) before deleting it")
    for _, module, slot in slot_sites(model):
        if name in slot:
            unit = slot[name]
            del slot[name]
            unit.detached(module, model)
    del state.configs[name], state.sites[name], state.saved_modules[name]
    state.meanings.pop(name, None)
    state.set_active(tuple(n for n in state.active if n != name))
    prune_slots(model)
    if not state.configs:
        remove_all(model)


def prune_slots(model: nn.Module) -> None:
    """Drop slots that hold no unit."""
    for _, module, slot in slot_sites(model):
        if len(slot) == 0:
            remove_slot(module)


def remove_all(model: nn.Module) -> None:
    """Strip every slot and hook and restore the base's original trainable flags."""
    state = get_state(model)
    for _, module, slot in slot_sites(model):
        for unit_name in list(slot.keys()):
            unit = slot[unit_name]
            del slot[unit_name]
            unit.detached(module, model)
        remove_slot(module)
    if state is not None:
        for key, param in base_parameters(model):
            param.requires_grad_(key in state.originally_trainable)
    drop_state(model)


def after_step(model: nn.Module, step: int, total: int) -> None:
    """Run every delta's per-step training hook (``MethodSpec.step_hook``: rank allocation,
    rank sampling, ...) after optimizer step ``step`` of ``total``. Training loops call this
    after ``optimizer.step()`` and before ``optimizer.zero_grad()``: hooks may read the step's
    gradients."""
    state = get_state(model)
    if state is None:
        return
    for name, config in list(state.configs.items()):
        hook = get_method(config.method).step_hook
        if hook is not None:
            hook(model, name, step, total)


def loss_terms(model: nn.Module) -> torch.Tensor | None:
    """The sum of every delta's training loss term (``MethodSpec.loss_term``: AdaLoRA's
    orthogonality penalty, ...), or ``None`` when no delta adds one. Training loops add it to
    the loss before ``backward``."""
    state = get_state(model)
    if state is None:
        return None
    total = None
    for name, config in list(state.configs.items()):
        term = get_method(config.method).loss_term
        value = term(model, name) if term is not None else None
        if value is not None:
            total = value if total is None else total + value
    return total


def delta_stats(model: nn.Module) -> dict[str, dict]:
    """Statistics of every delta whose method reports some (``MethodSpec.stats``: a router's
    expert load, ...), by delta name; training jobs write them to ``metrics.json``."""
    state = get_state(model)
    if state is None:
        return {}
    out = {}
    for name, config in list(state.configs.items()):
        stats = get_method(config.method).stats
        if stats is not None:
            out[name] = stats(model, name)
    return out


def saved_config(model: nn.Module, name: str) -> DeltaConfig:
    """The config a saved or exported delta ``name`` records: its config's ``for_saving()``,
    completed from the live units by the method's ``saved_config`` when it has one."""
    state = require_state(model)
    state.require(name)
    config = state.configs[name].for_saving()
    complete = get_method(config.method).saved_config
    if complete is None:
        return config
    return complete(config, [(path, slot[name]) for path, _, slot in slot_sites(model) if name in slot])


def list_deltas(model: nn.Module) -> list[str]:
    """Names of the deltas attached to ``model``, in attach order."""
    state = get_state(model)
    return list(state.configs) if state else []


def get_config(model: nn.Module, name: str) -> DeltaConfig:
    state = require_state(model)
    state.require(name)
    return state.configs[name]


def active_deltas(model: nn.Module) -> tuple[str, ...]:
    state = get_state(model)
    return state.active if state else ()


def set_active(model: nn.Module, names: str | Sequence[str] | None) -> None:
    """Make exactly these deltas active, applied in the given order; ``None`` or ``()`` for none."""
    state = require_state(model)
    wanted = () if names is None else (names,) if isinstance(names, str) else tuple(names)
    _refuse_if_merged(state, wanted)
    state.set_active(wanted)


def activate(model: nn.Module, name: str) -> None:
    """Add one delta to the active set (after those already active)."""
    state = require_state(model)
    if name not in state.active:
        set_active(model, (*state.active, name))


def deactivate(model: nn.Module, name: str) -> None:
    """Remove one delta from the active set."""
    state = require_state(model)
    state.require(name)
    set_active(model, tuple(n for n in state.active if n != name))


def _refuse_if_merged(state: DeltaState, wanted: tuple[str, ...]) -> None:
    for name in state.merged:
        if name not in wanted:
            raise DeltaStateError(
                f"delta {name!r} is merged into the base weights, so it cannot be switched off; "
                f"call unmerge(model) first"
            )


@contextlib.contextmanager
def using(model: nn.Module, names: str | Sequence[str] | None) -> Iterator[None]:
    """Run with exactly these deltas active, then restore the previous active set."""
    state = require_state(model)
    previous = state.active
    set_active(model, names)
    try:
        yield
    finally:
        state.set_active(previous)


def base_only(model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Run the frozen base alone: ``with base_only(model): model(x)``."""
    if get_state(model) is None:
        return contextlib.nullcontext()
    return using(model, ())
