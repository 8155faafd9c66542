"""RoAd in peft's ROAD adapter format (peft 0.21.2, ``peft.tuners.road``)."""

from __future__ import annotations

import re
from typing import ClassVar

from torch import nn

from ...core.codec import PeftCodec, Tensors, exact_selector, unsupported_unit
from ...errors import ConfigError, DeltaFileError
from .config import RoadConfig
from .layer import SIZE_PER_OUTPUT, RoadUnit


class RoadCodec(PeftCodec):
    """RoAd on Linear layers: peft's ``road_theta`` / ``road_alpha`` are deltatune's
    ``theta`` / ``alpha`` with the same layout, so tensors travel unchanged."""

    peft_type = "ROAD"
    understood = frozenset({"variant", "group_size", "init_weights", "target_modules"})
    refused: ClassVar[dict[str, str]] = {}
    exported_fields = frozenset({"variant", "group_size"})
    carried = ("variant", "group_size")

    def check_site(self, path: str, module: nn.Module, unit) -> None:
        if isinstance(unit, RoadUnit) and unit.transposed:
            raise ConfigError(
                f"RoAd on the GPT-2 Conv1D layer {path!r} has no peft form: peft's RoAd adapts nn.Linear layers only"
            )

    def export_delta(self, config, sites, module_names):
        tensors: Tensors = {}
        for path, unit in sites:
            if not isinstance(unit, RoadUnit):
                raise unsupported_unit(unit, path, self.peft_type)
            if unit.transposed:
                raise ConfigError(f"cannot export RoAd on the GPT-2 Conv1D layer {path!r} to peft: peft's RoAd "
                                  f"adapts nn.Linear layers only")
            tensors[f"{path}.road_theta"] = unit.theta
            tensors[f"{path}.road_alpha"] = unit.alpha
        fields = {
            "variant": config.variant, "group_size": config.group_size, "init_weights": True,
            "target_modules": exact_selector([path for path, _ in sites], module_names, "."),
        }
        return fields, tensors

    def import_delta(self, peft_config, tensors):
        kinds = {"road_theta": "theta", "road_alpha": "alpha"}
        pattern = re.compile(r"^(.+)\.(road_theta|road_alpha)$")
        sites: dict[str, Tensors] = {}
        rest: Tensors = {}
        for key, value in tensors.items():
            match = pattern.match(key)
            if match:
                sites.setdefault(match[1], {})[kinds[match[2]]] = value
            else:
                rest[key] = value
        variant = peft_config.get("variant", "road_1")
        group_size = peft_config.get("group_size", 64)
        if variant not in SIZE_PER_OUTPUT or isinstance(group_size, bool) or not isinstance(group_size, int):
            raise DeltaFileError(f"peft ROAD adapter config has variant={variant!r}, group_size={group_size!r}; "
                                 f"expected one of {sorted(SIZE_PER_OUTPUT)} and an even integer")
        for path, pair in sites.items():
            if set(pair) != {"theta", "alpha"}:
                raise DeltaFileError(f"peft ROAD adapter has {sorted(pair)} at {path!r} but needs road_theta and road_alpha")
        return RoadConfig(variant=variant, group_size=group_size), sites, rest
