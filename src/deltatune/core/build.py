"""The usual way a method builds its units: select modules, make one unit per module."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..errors import TargetError
from .config import ALL_LINEAR, DeltaConfig
from .targeting import select_modules
from .unit import DeltaUnit, Placement, Placements

#: returns a unit, or a string saying why this module cannot be adapted
UnitFactory = Callable[[str, nn.Module], "DeltaUnit | str"]


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
        from .roles import all_linear_targets  # roles imports this module

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


def linear_shape(module: nn.Module) -> tuple[int, int, bool] | None:
    """``(in_features, out_features, fan_in_fan_out)`` of a Linear or GPT-2 ``Conv1D``, else None.

    GPT-2's ``Conv1D`` is a linear layer whose weight is stored ``(in, out)``.
    """
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None and module.weight.dim() == 2:
        fan_in, fan_out = module.weight.shape
        return fan_in, fan_out, True
    return None


def weight_as_out_in(module: nn.Module, fan_in_fan_out: bool):
    """The module's weight as an ``(out, in)`` matrix (a view; transposed for ``Conv1D``)."""
    return module.weight.T if fan_in_fan_out else module.weight
