"""The contract between a method and peft's adapter format (peft 0.21.2).

A method that peft can represent registers a :class:`PeftCodec` on its
:class:`~deltatune.core.registry.MethodSpec` (``peft=``): which peft type it maps to, the
config fields it writes and reads, how tensors are named and shaped on each side, and which
peft options it cannot represent (and why). Tensor keys here are relative to the model (no
``base_model.model.`` prefix); :mod:`deltatune.interop.peft` adds and removes that.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import ConfigError
from .config import DeltaConfig
from .unit import DeltaUnit

Site = tuple[str, DeltaUnit]
Tensors = dict[str, torch.Tensor]
#: what a codec's import returns: the config (targets not yet set), tensors per site path, unused tensors
Imported = tuple[DeltaConfig, dict[str, Tensors], Tensors]

#: fields of every peft config that do not change what an adapter computes
COMMON_FIELDS = frozenset({"peft_type", "peft_version", "task_type", "auto_mapping", "base_model_name_or_path",
                           "revision", "inference_mode", "modules_to_save"})
NO_EQUIVALENT = "deltatune has no equivalent"


def is_neutral(value: Any) -> bool:
    """Whether a peft option value means "off" (so an option deltatune lacks can be ignored)."""
    return value is None or value is False or value in ("", "none") or (isinstance(value, (list, dict)) and not value)


def exact_selector(paths: list[str], module_names: list[str], separator: str) -> list[str] | str:
    """peft's module selector for exactly ``paths``: the list itself when peft's suffix rule
    (a name equal to an entry or ending in ``separator + entry``) picks nothing else, else a
    regular expression that peft matches against the whole name."""
    chosen = set(paths)
    for path in paths:
        if any(name not in chosen and name.endswith(separator + path) for name in module_names):
            return "(" + "|".join(re.escape(p) for p in sorted(paths)) + ")"
    return sorted(paths)


class PeftCodec:
    """The mapping of one peft type; subclasses fill in the method-specific parts."""

    peft_type: ClassVar[str]
    #: prompt learning adapters keep their table outside the model (no module path, other prefix)
    prompt_learning: ClassVar[bool] = False
    #: peft config fields this codec reads, or that only choose modules (the tensors name the modules)
    understood: ClassVar[frozenset[str]]
    #: peft options deltatune cannot represent -> why
    refused: ClassVar[dict[str, str]] = {}
    #: deltatune config fields the peft config carries (targeting fields become the exact module list)
    exported_fields: ClassVar[frozenset[str]]
    #: of those, the ones read back from peft's config (the rest come from the tensors or not at all)
    carried: ClassVar[tuple[str, ...]] = ()
    #: tensors peft keeps on its tuner beside the model (file key ``base_model.<name>``, such as
    #: VeRA's shared projections); the codec exports and imports them as site ``""`` tensors
    tuner_keys: ClassVar[frozenset[str]] = frozenset()

    def check_options(self, peft_config: dict[str, Any]) -> None:
        """Raise :class:`ConfigError` naming the first option deltatune cannot represent."""
        for option, value in sorted(peft_config.items()):
            if option in COMMON_FIELDS or option in self.understood or is_neutral(value):
                continue
            reason = self.refused.get(option, f"it is unknown to this deltatune ({NO_EQUIVALENT})")
            raise ConfigError(
                f"cannot import the peft {self.peft_type} adapter: option {option}={value!r} is not supported: "
                f"{reason}. Re-train or re-save the adapter without it."
            )

    def check_site(self, path: str, module: nn.Module, unit: DeltaUnit) -> None:
        """Raise :class:`ConfigError` if peft and deltatune compute different things at this site."""

    def export_delta(self, config: DeltaConfig, sites: list[Site], module_names: list[str]) -> tuple[dict, Tensors]:
        """peft config fields and tensors (model-relative keys) for a delta's units."""
        raise NotImplementedError

    def import_delta(self, peft_config: dict[str, Any], tensors: Tensors) -> Imported:
        """The deltatune config and per-site tensors of a peft adapter; tensors it does not use are returned."""
        raise NotImplementedError


def unsupported_unit(unit: DeltaUnit, path: str, peft_type: str) -> ConfigError:
    return ConfigError(f"cannot export {type(unit).__name__} at {path!r} to peft {peft_type}: no peft layer matches it")


def whole_number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value
