"""AdaLoRA in peft's ADALORA adapter format (peft 0.21.2).

peft names the factors as deltatune does (``lora_A``, ``lora_E``, ``lora_B``); its
``rank_pattern`` maps ``<module path>.lora_E`` to one boolean per initial singular value
(kept or masked), and its saved tensors hold the kept triplets only.
"""

from __future__ import annotations

import re
from typing import ClassVar

from ...core.codec import NO_EQUIVALENT, PeftCodec, Tensors, exact_selector, unsupported_unit, whole_number
from ...errors import DeltaFileError
from .config import AdaLoRAConfig
from .layer import FACTORS, AdaLoRALinear

_CARRIED = {"init_r": "init_r", "target_r": "target_r", "tinit": "tinit", "tfinal": "tfinal", "delta_t": "deltaT",
            "beta1": "beta1", "beta2": "beta2", "orth_reg_weight": "orth_reg_weight", "total_step": "total_step"}


class AdaLoraCodec(PeftCodec):
    """AdaLoRA on Linear and GPT-2 ``Conv1D`` layers."""

    peft_type = "ADALORA"
    understood = frozenset({"r", "lora_alpha", "lora_dropout", "init_lora_weights", "fan_in_fan_out", "rank_pattern",
                            "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
                            # LoraConfig fields peft fills with defaults that do not change the adapter
                            "megatron_core", "qalora_group_size", "eva_config", "corda_config", "lora_ga_config",
                            *_CARRIED.values()})
    refused: ClassVar[dict[str, str]] = {
        "bias": "it trains the base model's biases, which an AdaLoRA delta does not hold (train a BitFit delta for that)",
        "lora_bias": "it adds a bias to the B matrix; deltatune's AdaLoRA has none",
        "alpha_pattern": "it sets alpha per module; a deltatune AdaLoRA has one alpha",
        "use_rslora": "AdaLoRA scales by alpha / init_r; peft ignores rank-stabilised scaling for it",
        "layer_replication": "it builds extra layers by repeating the base's; a delta cannot add layers",
        "trainable_token_indices": "it trains selected embedding rows (peft's trainable tokens); " + NO_EQUIVALENT,
        "target_parameters": "it puts adapters on raw parameters (mixture-of-experts weights); deltatune adapts modules",
    }
    exported_fields = frozenset({"alpha", "dropout", "rank_pattern", "init", *_CARRIED})  # init: the start only
    # total_step is left out: an export writes a stand-in when the config leaves it to the run
    carried = ("alpha", "dropout", *(field for field in _CARRIED if field != "total_step"))

    def export_delta(self, config, sites, module_names):
        tensors: Tensors = {}
        pattern: dict[str, list[bool]] = {}
        transposed = []
        for path, unit in sites:
            if not isinstance(unit, AdaLoRALinear):
                raise unsupported_unit(unit, path, self.peft_type)
            saved = unit.saved_tensors()
            tensors.update({f"{path}.{name}": saved[name] for name in FACTORS})
            kept = saved["lora_A"].shape[0]
            # peft drops the masked rows on saving; which ones they were does not matter once dropped
            pattern[f"{path}.lora_E"] = [True] * kept + [False] * (config.init_r - kept)
            transposed.append(unit.transposed)
        fields = {
            "r": 8, "lora_alpha": whole_number(config.alpha), "lora_dropout": config.dropout,
            **{theirs: getattr(config, ours) for ours, theirs in _CARRIED.items()},
            # peft refuses a config without a schedule; one step past tinit + tfinal is the shortest it takes
            "total_step": config.total_step or config.tinit + config.tfinal + 1,
            "init_lora_weights": True, "fan_in_fan_out": bool(transposed) and all(transposed),
            "target_modules": exact_selector([path for path, _ in sites], module_names, "."),
            "rank_pattern": pattern if any(not all(kept) for kept in pattern.values()) else None,
            "bias": "none", "layers_to_transform": None, "layers_pattern": None, "exclude_modules": None,
        }
        return fields, tensors

    def import_delta(self, peft_config, tensors):
        pattern = re.compile(r"^(.+)\.(" + "|".join(FACTORS) + r")$")
        sites: dict[str, Tensors] = {}
        rest: Tensors = {}
        for key, value in tensors.items():
            match = pattern.match(key)
            if match:
                sites.setdefault(match[1], {})[match[2]] = value
            else:
                rest[key] = value
        init_r = int(peft_config.get("init_r", 12))
        ranks = {}
        for path, found in sites.items():
            if set(found) != set(FACTORS):
                raise DeltaFileError(f"peft AdaLoRA module {path!r} has tensors {sorted(found)}; it needs "
                                     f"{list(FACTORS)}")
            ranks[path] = found["lora_A"].shape[0]
            if ranks[path] > init_r:
                raise DeltaFileError(f"peft AdaLoRA module {path!r} has rank {ranks[path]}, above init_r={init_r}")
        fields = {ours: peft_config[theirs] for ours, theirs in _CARRIED.items() if peft_config.get(theirs) is not None}
        config = AdaLoRAConfig(**fields, alpha=float(peft_config.get("lora_alpha", 8)),
                               dropout=float(peft_config.get("lora_dropout", 0.0)))
        return config.with_ranks(ranks), sites, rest
