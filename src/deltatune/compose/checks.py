"""Checking a composition against the model it is about to run on."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from ..core.registry import get_method, method_specs
from ..core.slot import DeltaState, require_state, slot_sites
from ..errors import ConfigError, DeltaStateError, NotApplicableError

if TYPE_CHECKING:
    from .blocks import Block


def _fuses(state: DeltaState, name: str) -> bool:
    return get_method(state.configs[name].method).fuses


def check_composition(block: Block, model: nn.Module) -> None:
    """Raise if ``block`` cannot run on ``model``; see :meth:`Block.validate`."""
    state = require_state(model)
    sites = slot_sites(model)
    for name, enclosing in block.leaves():
        _check_name(state, name, enclosing)
        if _fuses(state, name):
            raise ConfigError(
                f"{name!r} is a fusion delta; it runs only as Fuse(<the deltas it fuses>, fusion={name!r}), "
                f"not as a plain delta in {_where(enclosing)}"
            )
        _check_can_take_part(state, sites, name, enclosing)
    for fuse in (b for b in block.blocks() if b.fusion_name() is not None):
        _check_fuse(state, sites, fuse)


def _where(enclosing: tuple[Block, ...]) -> str:
    return " > ".join(type(b).__name__ for b in enclosing) or "the composition"


def _check_name(state: DeltaState, name: str, enclosing: tuple[Block, ...]) -> None:
    if name not in state.configs:
        known = ", ".join(repr(n) for n in state.configs) or "none"
        raise DeltaStateError(
            f"{_where(enclosing)} names delta {name!r}, which this model does not have (deltas: {known}); "
            f"attach or load it first, or fix the name"
        )
    if name in state.merged:
        raise DeltaStateError(
            f"delta {name!r} in {_where(enclosing)} is merged into the base weights, so a composition cannot "
            f"place it; call unmerge(model) first"
        )


def _check_can_take_part(state: DeltaState, sites: list, name: str, enclosing: tuple[Block, ...]) -> None:
    """Deltas that do not act through module hooks can only be stacked."""
    combining = [b for b in enclosing if not b.sequential]
    if not combining:
        return
    method = state.configs[name].method
    reason = get_method(method).stack_only
    if reason is None:
        for _, _, slot in sites:
            unit = slot._modules.get(name)
            if unit is not None and not (type(unit).overrides("forward_pre") or type(unit).overrides("forward_post")):
                reason = f"its {type(unit).__name__} units act from inside their module, not through its hooks"
                break
    if reason is not None:
        block = type(combining[-1]).__name__
        raise NotApplicableError(
            f"delta {name!r} ({method}) cannot take part in {block}: {reason}. Only a Stack can hold {method} "
            f"deltas; stack it around the {block} instead (e.g. Stack({name!r}, {block}(...)))"
        )


def _check_fuse(state: DeltaState, sites: list, fuse) -> None:
    fusion = fuse.fusion
    if fusion not in state.configs:
        known = ", ".join(repr(n) for n in state.configs if _fuses(state, n)) or "none"
        raise DeltaStateError(
            f"Fuse names fusion delta {fusion!r}, which this model does not have (fusion deltas: {known}); attach "
            f"one with dt.attach(model, FusionConfig(fused={list(fuse.children)}), name={fusion!r}) or load it"
        )
    config = state.configs[fusion]
    if not _fuses(state, fusion):
        fusing = ", ".join(s.name for s in method_specs() if s.fuses)
        raise ConfigError(
            f"Fuse(fusion={fusion!r}) names a {config.method} delta; the fusion must be a delta of a fusing method "
            f"({fusing}, e.g. FusionConfig)"
        )
    if set(config.fused) != set(fuse.children):
        raise ConfigError(
            f"fusion delta {fusion!r} was made for deltas {list(config.fused)}, but Fuse lists "
            f"{list(fuse.children)}; fuse exactly the deltas it was made for"
        )
    for path, _, slot in sites:
        has_fusion = fusion in slot._modules
        present = [c for c in fuse.children if c in slot._modules]
        where = repr(path) if path else "the model root"
        if has_fusion and len(present) < len(fuse.children):
            missing = [c for c in fuse.children if c not in present]
            raise NotApplicableError(
                f"fusion {fusion!r} sits at {where}, but fused delta(s) {missing} have no unit there; every "
                f"fused delta must act at every module the fusion does (attach them with the same targets)"
            )
        if present and not has_fusion:
            raise NotApplicableError(
                f"fused delta {present[0]!r} acts at {where}, where fusion {fusion!r} has no unit; attach the "
                f"fusion after the deltas it fuses (its default targets are their modules)"
            )
        for child in present:
            if type(slot[child]).overrides("forward_pre"):
                raise NotApplicableError(
                    f"delta {child!r} ({state.configs[child].method}) changes the input of {where}; Fuse attends "
                    f"over module outputs, so it can only fuse deltas that change outputs (LoRA, adapters, "
                    f"output (IA)3, ...)"
                )
