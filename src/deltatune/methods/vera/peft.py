"""VeRA in peft's VERA adapter format.

peft keeps the shared projections on its tuner, beside the model (file keys
``base_model.vera_A`` / ``base_model.vera_B``, present when ``save_projection``), and each
layer's vectors as ``<module>.vera_lambda_b`` / ``<module>.vera_lambda_d``.
"""

from __future__ import annotations

import re
import warnings
from typing import ClassVar

from ...core.codec import PeftCodec, Tensors, exact_selector, unsupported_unit
from ...errors import DeltaFileError
from .layer import VeRAConfig, VeRALinear, VeRAProjections

_VECTORS = ("vera_lambda_b", "vera_lambda_d")
_PROJECTIONS = ("vera_A", "vera_B")


class VeraCodec(PeftCodec):
    """VeRA on Linear and GPT-2 ``Conv1D`` layers, the projections saved or drawn from the seed."""

    peft_type = "VERA"
    understood = frozenset({"r", "target_modules", "exclude_modules", "projection_prng_key", "save_projection",
                            "vera_dropout", "d_initial", "fan_in_fan_out", "init_weights", "layers_to_transform",
                            "layers_pattern"})
    refused: ClassVar[dict[str, str]] = {
        "bias": "it trains the base model's biases, which a VeRA delta does not hold (train a BitFit delta for that)",
    }
    tuner_keys = frozenset(_PROJECTIONS)
    exported_fields = frozenset({"r", "projection_prng_key", "save_projection", "dropout", "d_initial"})
    carried = ("r", "projection_prng_key", "save_projection", "dropout", "d_initial")

    def export_delta(self, config, sites, module_names):
        tensors: Tensors = {}
        layers, transposed = [], []
        for path, unit in sites:
            if isinstance(unit, VeRAProjections):
                tensors.update(unit.saved_tensors())
            elif isinstance(unit, VeRALinear):
                tensors[f"{path}.vera_lambda_b"] = unit.vera_lambda_b
                tensors[f"{path}.vera_lambda_d"] = unit.vera_lambda_d
                layers.append(path)
                transposed.append(unit.transposed)
            else:
                raise unsupported_unit(unit, path, self.peft_type)
        fields = {
            "r": config.r, "projection_prng_key": config.projection_prng_key,
            "save_projection": config.save_projection, "vera_dropout": config.dropout, "d_initial": config.d_initial,
            # peft's flag is per config; it corrects it per layer (Conv1D or Linear) with a warning
            "fan_in_fan_out": bool(transposed) and all(transposed),
            "target_modules": exact_selector(layers, module_names, "."),
            "bias": "none", "init_weights": True, "layers_to_transform": None, "layers_pattern": None,
        }
        return fields, tensors

    def import_delta(self, peft_config, tensors):
        save_projection = bool(peft_config.get("save_projection", True))
        shared: Tensors = {}
        sites: dict[str, Tensors] = {"": shared}
        rest: Tensors = {}
        pattern = re.compile(r"^(.+)\.(" + "|".join(_VECTORS) + r")$")
        for key, value in tensors.items():
            match = pattern.match(key)
            if match:
                sites.setdefault(match[1], {})[match[2]] = value
            elif key in _PROJECTIONS:
                shared[key] = value
            else:
                rest[key] = value
        if shared and not save_projection:
            warnings.warn("the peft VERA adapter has save_projection=false but holds vera_A / vera_B; like peft, "
                          "deltatune ignores them and draws the projections from projection_prng_key", stacklevel=3)
            shared.clear()
        r = int(peft_config.get("r", 256))
        ranks = sorted({t["vera_lambda_d"].shape[0] for t in sites.values() if "vera_lambda_d" in t})
        if ranks and ranks != [r]:
            raise DeltaFileError(f"peft VERA vectors vera_lambda_d have length {ranks} but the adapter config says "
                                 f"r={r}; the adapter files do not belong together")
        config = VeRAConfig(r=r, projection_prng_key=int(peft_config.get("projection_prng_key", 0)),
                            save_projection=save_projection, dropout=float(peft_config.get("vera_dropout", 0.0)),
                            d_initial=float(peft_config.get("d_initial", 0.1)))
        return config, sites, rest
