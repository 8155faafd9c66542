"""The usual way a method builds its units: select modules, make one unit per module."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..errors import TargetError
from .config import ALL_LINEAR, DeltaConfig
from .roles import all_linear_targets, default_targets
from .shapes import linear_shape, weight_as_out_in  # noqa: F401  (methods import them from here)
from .targeting import select_modules
from .unit import DeltaUnit, Placement, Placements

#: returns a unit, or a string saying why this module cannot be adapted
UnitFactory = Callable[[str, nn.Module], "DeltaUnit | str"]
#: ``(path, module, fan_in, fan_out, transposed)`` -> a unit, or why this linear module cannot be adapted
LinearUnitFactory = Callable[[str, nn.Module, int, int, bool], "DeltaUnit | str"]


def per_module(
    model: nn.Module,
    config: DeltaConfig,
    default_targets: Callable[[], tuple[str, ...]],
    make_unit: UnitFactory,
) -> Placements:
    """One unit per selected module; matched modules the method cannot adapt are skipped.

    ``default_targets`` is only called when the config names neither patterns nor types;
    ``targets="all-linear"`` selects every Linear / Conv1D inside the transformer blocks.

    Raises:
        TargetError: nothing matched, or nothing that matched can be adapted.
    """
    patterns = config.targets
    if patterns is None and not config.target_types:
        patterns = default_targets()
    elif patterns == (ALL_LINEAR,):
        patterns = all_linear_targets(model, config.method)
    selected = select_modules(model, patterns, config.target_types, config.layers, config.exclude)
    placements, skipped = [], []
    for path, module in selected:
        unit = make_unit(path, module)
        if isinstance(unit, str):
            skipped.append((path, unit))
        else:
            placements.append(Placement(path, unit, type(module).__name__))
    if not placements:
        reasons = "; ".join(f"{p} ({why})" for p, why in skipped[:5])
        raise TargetError(f"{config.method} cannot adapt any of the {len(selected)} matched modules: {reasons}")
    return Placements(placements, skipped)


def per_linear(model: nn.Module, config: DeltaConfig, roles: list[str], make_unit: LinearUnitFactory) -> Placements:
    """:func:`per_module` for methods that adapt Linear / GPT-2 ``Conv1D`` weights: default
    targets from ``roles`` (:func:`deltatune.core.roles.default_targets`), other module kinds
    skipped with the reason, and ``make_unit`` given the module's widths and weight layout."""
    def make(path: str, module: nn.Module):
        shape = linear_shape(module)
        if shape is None:
            return f"{type(module).__name__} is not a Linear or Conv1D layer"
        return make_unit(path, module, *shape)

    return per_module(model, config, lambda: default_targets(model, roles, config.method), make)


def with_shared(model: nn.Module, unit: DeltaUnit | None, placements: Placements) -> Placements:
    """``placements`` preceded by ``unit`` placed at the model itself (path ``""``): the
    parameters the per-module units share (a vector bank, factors tied across layers, a
    hypernetwork). ``unit`` ``None`` (nothing shared): ``placements`` unchanged."""
    if unit is None:
        return placements
    return Placements([Placement("", unit, type(model).__name__), *placements], placements.skipped, placements.resolved)


def first_input(args: tuple, kwargs: dict):
    """The first positional (or keyword) argument of a module call: its input tensor."""
    if args:
        return args[0]
    return next(iter(kwargs.values()))


def replace_first_input(args: tuple, kwargs: dict, value) -> tuple[tuple, dict]:
    if args:
        return (value, *args[1:]), kwargs
    key = next(iter(kwargs))
    return args, {**kwargs, key: value}
