"""(IA)3 in peft's IA3 adapter format."""

from __future__ import annotations

import re
from typing import Any

from ...core.codec import PeftCodec, Tensors, exact_selector, unsupported_unit
from ...errors import DeltaFileError
from .layer import IA3Config, IA3Input, IA3Output


class IA3Codec(PeftCodec):
    """(IA)3 on Linear and GPT-2 ``Conv1D`` layers: output scaling, or input scaling on peft's
    ``feedforward_modules``."""

    peft_type = "IA3"
    understood = frozenset({"target_modules", "exclude_modules", "feedforward_modules", "fan_in_fan_out",
                            "init_ia3_weights"})
    exported_fields = frozenset({"feedforward"})

    def export_delta(self, config, sites, module_names):
        tensors: Tensors = {}
        feedforward, transposed = [], []
        for path, unit in sites:
            if isinstance(unit, IA3Input):
                tensors[f"{path}.ia3_l"] = unit.ia3_l.reshape(1, -1)  # peft: (1, in) scales the input
                feedforward.append(path)
            elif isinstance(unit, IA3Output):
                tensors[f"{path}.ia3_l"] = unit.ia3_l.reshape(-1, 1)  # peft: (out, 1) scales the output
            else:
                raise unsupported_unit(unit, path, self.peft_type)
            transposed.append(unit.fan_in_fan_out)
        targets = [path for path, _ in sites]
        fields = {
            "target_modules": exact_selector(targets, module_names, "."),
            # peft tests feedforward modules among the targets with a plain suffix match
            "feedforward_modules": exact_selector(feedforward, targets, ""),
            "fan_in_fan_out": bool(transposed) and all(transposed),
            "init_ia3_weights": True, "exclude_modules": None,
        }
        return fields, tensors

    def import_delta(self, peft_config, tensors):
        sites: dict[str, Tensors] = {}
        feedforward = []
        rest: Tensors = {}
        for key, value in tensors.items():
            if not key.endswith(".ia3_l"):
                rest[key] = value
                continue
            path = key.removesuffix(".ia3_l")
            if value.dim() != 2 or 1 not in value.shape:
                raise DeltaFileError(f"peft (IA)3 vector {key!r} has shape {list(value.shape)}; (1, in) or (out, 1) expected")
            if value.shape[0] == 1 and (value.shape[1] > 1 or self._feedforward_by_config(peft_config, path)):
                feedforward.append(path)
            sites[path] = {"ia3_l": value.reshape(-1)}
        exact = tuple("re:" + re.escape(p) for p in feedforward)
        return IA3Config(feedforward=exact), sites, rest

    @staticmethod
    def _feedforward_by_config(peft_config: dict[str, Any], path: str) -> bool:
        """peft's own rule, needed only for a (1, 1) vector whose shape does not tell."""
        chosen = peft_config.get("feedforward_modules") or []
        if isinstance(chosen, str):
            return re.fullmatch(chosen, path) is not None
        return any(path.endswith(name) for name in chosen)
