"""One registration per method: its name, config class and how it builds its units."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from ..errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

    from .config import DeltaConfig
    from .unit import Placement

BuildFn = Callable[["nn.Module", "DeltaConfig"], "list[Placement]"]


@dataclass(frozen=True)
class MethodSpec:
    """What the core needs to know about a delta method.

    Args:
        name: the method's registry name (``"lora"``).
        config_class: its :class:`DeltaConfig` subclass.
        build: ``build(model, config) -> [Placement, ...]``: the units to install and where.
            Raises :class:`TargetError` or :class:`NotApplicableError` when it cannot.
        mergeable: whether the delta is a weight change that can be folded into the base.
        identity_at_init: whether a freshly attached delta leaves the model's output unchanged.
        summary: one line for listings.
    """

    name: str
    config_class: type
    build: BuildFn
    mergeable: bool
    identity_at_init: bool
    summary: str = ""


_METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add a method to the registry; its config class's ``method`` must equal its name."""
    if spec.config_class.method != spec.name:
        raise ValueError(f"{spec.config_class.__name__}.method is {spec.config_class.method!r}, expected {spec.name!r}")
    if spec.name in _METHODS and _METHODS[spec.name] is not spec:
        raise ValueError(f"method {spec.name!r} is already registered")
    _METHODS[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    """The spec registered under ``name``; an unknown name lists the valid ones."""
    from .. import methods  # noqa: F401  (importing registers the built-in methods)

    try:
        return _METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown delta method {name!r}; available: {', '.join(method_names())}") from None


def method_names() -> list[str]:
    """Registered method names, in registration order."""
    from .. import methods  # noqa: F401

    return list(_METHODS)


def config_from_dict(data: dict) -> "DeltaConfig":
    """Rebuild any method's config from its ``to_dict`` form."""
    if not isinstance(data, dict):
        raise ConfigError(f"a delta config is a JSON object with a 'method' field, got {data!r}")
    if "method" not in data:
        raise ConfigError("config dict has no 'method' field")
    if not isinstance(data["method"], str):
        raise ConfigError(f"config field 'method' must be a method name (a string), got {data['method']!r}")
    return get_method(data["method"]).config_class.from_dict(data)
