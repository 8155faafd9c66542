"""VB-LoRA in peft's VBLORA adapter format.

peft keeps the bank on its tuner, beside the model (file key ``base_model.vblora_vector_bank``),
and each layer's ``<module>.vblora_logits_A`` / ``_B``; with ``save_only_topk_weights`` it
writes ``<module>.vblora_logits_A_topk_indices`` / ``_topk_weights`` (and ``_B``) instead.
"""

from __future__ import annotations

import re
from typing import ClassVar

from ...core.codec import PeftCodec, Tensors, exact_selector, unsupported_unit
from .layer import VBLoRAConfig, VBLoRALinear, VectorBank

_BANK = "vblora_vector_bank"
_LAYER_KEYS = ("vblora_logits_A", "vblora_logits_B", "vblora_logits_A_topk_indices", "vblora_logits_A_topk_weights",
               "vblora_logits_B_topk_indices", "vblora_logits_B_topk_weights")
#: peft's defaults, for a hand-written adapter config that leaves a field out
_PEFT_DEFAULTS = {"r": 4, "num_vectors": 256, "vector_length": 256, "topk": 2, "dropout": 0.0,
                  "init_vector_bank_bound": 0.02, "init_logits_std": 0.1, "save_only_topk_weights": False}
_FIELDS = {"r": "r", "num_vectors": "num_vectors", "vector_length": "vector_length", "topk": "topk",
           "dropout": "vblora_dropout", "init_vector_bank_bound": "init_vector_bank_bound",
           "init_logits_std": "init_logits_std", "save_only_topk_weights": "save_only_topk_weights"}


class VBLoRACodec(PeftCodec):
    """VB-LoRA on Linear and GPT-2 ``Conv1D`` layers, full logits or top-k only."""

    peft_type = "VBLORA"
    understood = frozenset({*_FIELDS.values(), "target_modules", "exclude_modules", "fan_in_fan_out",
                            "layers_to_transform", "layers_pattern"})
    refused: ClassVar[dict[str, str]] = {
        "bias": "it trains the base model's biases, which a VB-LoRA delta does not hold (train a BitFit delta for that)",
    }
    tuner_keys = frozenset({_BANK})
    exported_fields = frozenset(_FIELDS)
    carried = tuple(_FIELDS)

    def export_delta(self, config, sites, module_names):
        tensors: Tensors = {}
        layers, transposed = [], []
        for path, unit in sites:
            if isinstance(unit, VectorBank):
                tensors[_BANK] = unit.vblora_vector_bank
            elif isinstance(unit, VBLoRALinear):
                # deltatune's saved names are peft's, in both layouts
                tensors.update({f"{path}.{key}": value for key, value in unit.saved_tensors().items()})
                layers.append(path)
                transposed.append(unit.transposed)
            else:
                raise unsupported_unit(unit, path, self.peft_type)
        fields = {peft_name: getattr(config, name) for name, peft_name in _FIELDS.items()}
        fields.update({
            # peft's flag is per config; it corrects it per layer (Conv1D or Linear) with a warning
            "fan_in_fan_out": bool(transposed) and all(transposed),
            "target_modules": exact_selector(layers, module_names, "."),
            "bias": "none", "exclude_modules": None, "layers_to_transform": None, "layers_pattern": None,
        })
        return fields, tensors

    def import_delta(self, peft_config, tensors):
        sites: dict[str, Tensors] = {"": {}}
        rest: Tensors = {}
        pattern = re.compile(r"^(.+)\.(" + "|".join(_LAYER_KEYS) + r")$")
        for key, value in tensors.items():
            match = pattern.match(key)
            if match:
                sites.setdefault(match[1], {})[match[2]] = value
            elif key == _BANK:
                sites[""][key] = value
            else:
                rest[key] = value
        fields = {name: peft_config.get(peft_name, _PEFT_DEFAULTS[name]) for name, peft_name in _FIELDS.items()}
        for name in ("dropout", "init_vector_bank_bound", "init_logits_std"):
            fields[name] = float(fields[name])
        return VBLoRAConfig(**fields), sites, rest
