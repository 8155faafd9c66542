"""One registration per method: everything the rest of deltatune asks about it.

A method is one folder under ``deltatune/methods`` (or a third-party module) that calls
:func:`register_method` once. Training, the CLI, composition, serving, task vectors and
peft interop read what they need from the :class:`MethodSpec`; no other layer keeps a table
of method names.

Third-party methods register the same way from a module named by a ``deltatune.methods``
entry point of an installed package, by ``DELTATUNE_PLUGINS`` (comma-separated module
names) or by ``deltatune --plugin MODULE``; :func:`load_plugins` imports them.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from typing import TYPE_CHECKING, Any, Literal

from ..errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .config import DeltaConfig
    from .unit import DeltaUnit, Placement

BuildFn = Callable[["nn.Module", "DeltaConfig"], "list[Placement]"]
#: called after every optimizer step, before the gradients are cleared, with (model, delta name,
#: step just done, total steps)
StepHook = Callable[["nn.Module", str, int, int], None]
#: (model, delta name) -> a term added to the training loss (a regulariser), or ``None``
LossTerm = Callable[["nn.Module", str], "torch.Tensor | None"]
#: (model, delta name) -> JSON-ready statistics of the delta's training (a router's expert load)
Stats = Callable[["nn.Module", str], dict]
#: (config, [(site path, unit), ...]) -> the config a saved or exported delta records
SavedConfig = Callable[["DeltaConfig", "list[tuple[str, DeltaUnit]]"], "DeltaConfig"]
PLUGIN_GROUP = "deltatune.methods"
PLUGIN_ENV = "DELTATUNE_PLUGINS"


@dataclass(frozen=True)
class Mixing:
    """How rows of a method's deltas share a batch that mixes deltas per row.

    Args:
        mode: ``"batched"`` (one batched product over per-row stacked weights),
            ``"per_delta"`` (the generic fallback: each delta on its own rows, one forward) or
            ``"alone"`` (rows of such a delta need a batch of their own).
        group_by: config fields whose values must agree for deltas to share a batch
            (prompt tuning: ``num_virtual_tokens``).
        with_base: whether base-only rows (and other methods' rows) may share the batch.
        reason: why the method is limited, when it is.
    """

    mode: Literal["batched", "per_delta", "alone"] = "per_delta"
    group_by: tuple[str, ...] = ()
    with_base: bool = True
    reason: str = ""


@dataclass(frozen=True)
class MethodSpec:
    """What deltatune needs to know about a delta method.

    Args:
        name: the method's registry name (``"lora"``).
        config_class: its :class:`DeltaConfig` subclass.
        build: ``build(model, config) -> [Placement, ...]``: the units to install and where.
            Raises :class:`TargetError` or :class:`NotApplicableError` when it cannot.
        mergeable: whether the delta is a weight change that can be folded into the base
            (merge, fold, task vectors, merging several deltas).
        merge_refusal: for a method that is not mergeable, what in its computation no weight
            change can equal (quoted when merging, folding or a task vector is refused).
        identity_at_init: whether a freshly attached delta leaves the model's output unchanged.
        summary: one line for listings and ``--help``.
        default_lr: a peak learning rate that works on MiniLM-sized models; ``None`` for
            methods that are not trained from flags (built with the Python API).
        mixing: how its rows share a mixed batch (:class:`Mixing`).
        stack_only: why its deltas can only run inside a ``Stack`` (they act inside
            attention or on the whole sequence rather than on a module's output); ``None``
            when they combine freely.
        fuses: the delta attends over other deltas' outputs and runs only as
            ``Fuse(..., fusion=<its name>)``.
        targeted: whether its deltas go where ``targets`` say (prompt tuning and the head
            take no targets).
        trains_base: not a delta at all: the job trains every base parameter (full fine-tuning).
        step_hook: called after each optimizer step (its gradients still in place) for each
            delta of this method (rank allocation, rank sampling).
        loss_term: ``loss_term(model, name)``: a term the training loops add to the loss for
            each delta of this method (a regulariser), or ``None`` for none at this step.
        stats: ``stats(model, name)``: JSON-ready statistics of the delta (a router's expert load
            per layer) that a training job records in its ``metrics.json``; ``None`` for none.
        saved_config: ``saved_config(config, sites)``: the config a saved or exported delta
            records, when it depends on the trained units (the ranks a rank allocation kept).
        peft: the codec that exports and imports this method in peft's format, else ``None``.
        peft_refusal: why the method has no peft format (when ``peft`` is ``None``).
        fsdp_refusal: why ``--sharding fsdp`` (FSDP2, every parameter sharded over the ranks)
            cannot train it; ``""`` when it can.
        reference: set on the comparison's reference points (``"floor"``: the least a method
            must beat, the head alone; ``"ceiling"``: full fine-tuning); ``""`` for the rest.
        size_option: the integer option of its config that sets how big the delta is (LoRA's
            ``r``, an adapter's ``bottleneck``); ``deltatune plan`` tries a few values around its
            default. ``None`` for a method whose size no single option sets.
    """

    name: str
    config_class: type
    build: BuildFn
    mergeable: bool
    identity_at_init: bool
    summary: str = ""
    default_lr: float | None = None
    mixing: Mixing = field(default_factory=Mixing)
    stack_only: str | None = None
    fuses: bool = False
    targeted: bool = True
    trains_base: bool = False
    step_hook: StepHook | None = None
    loss_term: LossTerm | None = None
    stats: Stats | None = None
    saved_config: SavedConfig | None = None
    peft: Any = None
    peft_refusal: str = "peft has no matching adapter type"
    merge_refusal: str = ""
    fsdp_refusal: str = ""
    reference: Literal["", "floor", "ceiling"] = ""
    size_option: str | None = None

    @property
    def trainable_from_flags(self) -> bool:
        """Whether ``deltatune train --method <name>`` builds it from options alone."""
        return self.default_lr is not None

    def batch_key(self, name: str, config: DeltaConfig) -> tuple:
        """Deltas (and the base, ``name`` ``None``) with equal keys may share a mixed batch."""
        if self.mixing.mode == "alone":
            return ("alone", name)
        if not self.mixing.with_base or self.mixing.group_by:
            return (self.name, *(repr(getattr(config, f)) for f in self.mixing.group_by))
        return ("mixed",)


_METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add a method to the registry; its config class's ``method`` must equal its name."""
    if spec.config_class.method != spec.name:
        raise ValueError(f"{spec.config_class.__name__}.method is {spec.config_class.method!r}, expected {spec.name!r}")
    if spec.size_option is not None and spec.size_option not in {f.name for f in dataclasses.fields(spec.config_class)}:
        raise ValueError(f"method {spec.name!r}: size_option {spec.size_option!r} is not a field of "
                         f"{spec.config_class.__name__}")
    if spec.name in _METHODS and _METHODS[spec.name] is not spec:
        raise ValueError(f"method {spec.name!r} is already registered")
    _METHODS[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    """The spec registered under ``name``; an unknown name lists the valid ones."""
    try:
        return _METHODS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown delta method {name!r}; available: {', '.join(method_names())}") from None


def method_names() -> list[str]:
    """Registered method names, in registration order."""
    return list(_METHODS)


def method_specs() -> list[MethodSpec]:
    """Registered methods, in registration order."""
    return list(_METHODS.values())


def config_from_dict(data: dict) -> DeltaConfig:
    """Rebuild any method's config from its ``to_dict`` form."""
    if not isinstance(data, dict):
        raise ConfigError(f"a delta config is a JSON object with a 'method' field, got {data!r}")
    if "method" not in data:
        raise ConfigError("config dict has no 'method' field")
    if not isinstance(data["method"], str):
        raise ConfigError(f"config field 'method' must be a method name (a string), got {data['method']!r}")
    return get_method(data["method"]).config_class.from_dict(data)


def load_plugins(modules: tuple[str, ...] | list[str] = ()) -> list[str]:
    """Import third-party method modules: ``modules``, those in ``$DELTATUNE_PLUGINS`` and
    every ``deltatune.methods`` entry point; each registers its methods when imported.

    Returns:
        the modules imported by this call.

    Raises:
        ConfigError: a plugin module cannot be imported (the message names it and why).
    """
    names = [*modules, *(m.strip() for m in os.environ.get(PLUGIN_ENV, "").split(",") if m.strip())]
    points = list(metadata.entry_points(group=PLUGIN_GROUP))
    loaded = []
    for name in dict.fromkeys(names):
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise ConfigError(f"plugin module {name!r} cannot be imported ({error}); check the name and that it is "
                              f"on the Python path") from None
        loaded.append(name)
    for point in points:
        try:
            point.load()
        except Exception as error:  # noqa: BLE001 - a broken installed plugin must not break deltatune
            warnings.warn(f"deltatune plugin entry point {point.name!r} ({point.value}) failed to load: {error!r}; "
                          f"its methods are not available", stacklevel=2)
            continue
        loaded.append(point.value)
    return loaded
