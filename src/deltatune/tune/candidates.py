"""The configurations ``deltatune plan`` weighs: every registered method, at a few sizes.

A method declares the option that sets its size (``MethodSpec.size_option``: LoRA's ``r``,
an adapter's ``bottleneck``); the plan tries that option's default scaled by a few factors
(half, the default, double). A method without a size option is one candidate at its
defaults. Nothing here knows a method by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..core.options import option_lookup
from ..core.registry import MethodSpec, get_method, method_specs
from ..errors import ConfigError

#: the size option's default times these (rounded, at least 1, duplicates dropped)
DEFAULT_FACTORS = (0.5, 1.0, 2.0)


@dataclass(frozen=True)
class Candidate:
    """One configuration to weigh: a method and the options that differ from its defaults.

    ``size`` is the value of the method's size option (``None`` when it has none);
    ``default`` marks the method's own default size (the one the probe measures).
    """

    method: str
    options: dict[str, Any] = field(default_factory=dict)
    size: int | None = None
    default: bool = True

    @property
    def label(self) -> str:
        """``lora r=16``; ``ia3`` for a method at its defaults."""
        return self.method + "".join(f" {k}={v}" for k, v in self.options.items())


def sizes(default: int, factors: tuple[float, ...] = DEFAULT_FACTORS) -> list[int]:
    """The sizes tried around ``default``, ascending: ``sizes(8) == [4, 8, 16]``."""
    return sorted({max(1, round(default * f)) for f in factors})


def method_candidates(spec: MethodSpec, factors: tuple[float, ...] = DEFAULT_FACTORS) -> list[Candidate]:
    """A method's candidates: its size option at :func:`sizes` of its default, else one at its defaults."""
    if spec.size_option is None:
        return [Candidate(spec.name)]
    option = option_lookup(spec.config_class)[spec.size_option]
    if not isinstance(option.default, int) or isinstance(option.default, bool):
        return [Candidate(spec.name)]
    return [Candidate(spec.name, {} if value == option.default else {spec.size_option: value}, value,
                      value == option.default)
            for value in sizes(option.default, factors)]


def planned_methods(methods: list[str] | None = None) -> tuple[list[MethodSpec], dict[str, str]]:
    """The methods a plan weighs (all trained from flags, or those named) and, for the others
    named or registered, why they are not weighed.

    Raises:
        ConfigError: a named method is not registered (the message lists the valid names).
    """
    specs = [get_method(name) for name in dict.fromkeys(methods)] if methods else method_specs()
    kept, left_out = [], {}
    for spec in specs:
        if spec.trainable_from_flags:
            kept.append(spec)
        else:
            left_out[spec.name] = f"built with the Python API, not trained from flags ({spec.summary})"
    if not kept:
        raise ConfigError(f"none of the methods {methods} is trained from flags; name methods that `deltatune train "
                          f"--method` takes")
    return kept, left_out


def all_candidates(methods: list[str] | None = None,
                   factors: tuple[float, ...] = DEFAULT_FACTORS) -> tuple[list[Candidate], dict[str, str]]:
    """Every candidate of the planned methods, and the methods left out with their reasons."""
    specs, left_out = planned_methods(methods)
    return [c for spec in specs for c in method_candidates(spec, factors)], left_out
