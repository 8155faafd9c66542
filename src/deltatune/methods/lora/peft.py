"""LoRA (rsLoRA, DoRA) in peft's LORA adapter format."""

from __future__ import annotations

import dataclasses
import re
from typing import Any, ClassVar

import torch

from ...core.codec import NO_EQUIVALENT, PeftCodec, Tensors, exact_selector, unsupported_unit, whole_number
from ...errors import ConfigError, DeltaFileError
from .config import DoRAConfig, LoRAConfig
from .layer import DoRALinear, LoRAEmbedding, LoRALinear


class LoraCodec(PeftCodec):
    """LoRA (rsLoRA, DoRA) on Linear, GPT-2 ``Conv1D`` and Embedding layers."""

    peft_type = "LORA"
    understood = frozenset({"r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "init_lora_weights",
                            "fan_in_fan_out", "rank_pattern", "target_modules", "exclude_modules",
                            "layers_to_transform", "layers_pattern", "megatron_core", "qalora_group_size",
                            "eva_config", "corda_config", "lora_ga_config"})
    refused: ClassVar[dict[str, str]] = {
        "bias": "it trains the base model's biases, which a LoRA delta does not hold (train a BitFit delta for that)",
        "lora_bias": "it adds a bias to LoRA's B matrix; deltatune's LoRA has none",
        "alpha_pattern": "it sets alpha per module; a deltatune LoRA has one alpha",
        "use_qalora": "QA-LoRA pools the inputs of a quantised (GPTQ) base; " + NO_EQUIVALENT,
        "layer_replication": "it builds extra layers by repeating the base's; a delta cannot add layers",
        "trainable_token_indices": "it trains selected embedding rows (peft's trainable tokens); " + NO_EQUIVALENT,
        "target_parameters": "it puts LoRA on raw parameters (mixture-of-experts weights); deltatune adapts modules",
        "alora_invocation_tokens": "activated LoRA acts only after the invocation tokens; deltatune's acts on all",
        "ensure_weight_tying": "it ties the adapters of tied layers; deltatune adapts each module on its own",
        "loftq_config": "LoftQ initialisation replaces the base weights with quantised ones",
        "megatron_config": "Megatron-parallel layers are not plain Linear layers",
        "use_bdlora": "block-diagonal LoRA factors; " + NO_EQUIVALENT,
        "arrow_config": "Arrow routing mixes several LoRAs per token; " + NO_EQUIVALENT,
        "monteclora_config": "Monte Carlo LoRA samples its factors; " + NO_EQUIVALENT,
        "velora_config": "VeLoRA; " + NO_EQUIVALENT,
        "kasa_config": "KaSA truncates the base weight's singular values, changing the base",
    }
    exported_fields = frozenset({"r", "alpha", "dropout", "use_rslora", "init", "rank_pattern"})
    carried = ("r", "alpha", "dropout", "use_rslora", "init", "rank_pattern")
    #: peft initialisations that change the base weights, so the adapter only fits a modified base
    _BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")

    def check_site(self, path, module, unit):
        scale = getattr(module, "embed_scale", None)
        if isinstance(unit, LoRAEmbedding) and scale is not None and not torch.all(torch.as_tensor(scale) == 1):
            raise ConfigError(
                f"LoRA on the scaled embedding {path!r} ({type(module).__name__} multiplies its output by embed_scale): "
                f"peft scales the LoRA term too, deltatune adds it after the scaling, so the two would differ"
            )

    def export_delta(self, config, sites, module_names):
        tensors: Tensors = {}
        ranks: dict[str, int] = {}
        transposed = []
        for path, unit in sites:
            if isinstance(unit, LoRAEmbedding):
                tensors[f"{path}.lora_embedding_A"] = unit.lora_A
                tensors[f"{path}.lora_embedding_B"] = unit.lora_B
            elif isinstance(unit, LoRALinear):
                tensors[f"{path}.lora_A.weight"] = unit.lora_A
                tensors[f"{path}.lora_B.weight"] = unit.lora_B
                transposed.append(unit.fan_in_fan_out)
                if isinstance(unit, DoRALinear):
                    tensors[f"{path}.lora_magnitude_vector"] = unit.magnitude
            else:
                raise unsupported_unit(unit, path, self.peft_type)
            ranks[path] = unit.lora_A.shape[0]
        rank_pattern = {re.escape(p): k for p, k in sorted(ranks.items()) if k != config.r}
        fields = {
            "r": config.r, "lora_alpha": whole_number(config.alpha), "lora_dropout": config.dropout,
            "use_rslora": config.use_rslora, "use_dora": isinstance(config, DoRAConfig),
            "init_lora_weights": "gaussian" if config.init == "gaussian" else True,
            # peft's flag is per config; it corrects it per layer (Conv1D or Linear) with a warning
            "fan_in_fan_out": bool(transposed) and all(transposed),
            "target_modules": exact_selector(list(ranks), module_names, "."),
            "rank_pattern": rank_pattern, "alpha_pattern": {}, "bias": "none", "lora_bias": False,
            "layers_to_transform": None, "layers_pattern": None, "exclude_modules": None,
        }
        return fields, tensors

    def import_delta(self, peft_config, tensors):
        init = self._init(peft_config.get("init_lora_weights", True))
        kinds = {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B", "lora_embedding_A": "lora_A",
                 "lora_embedding_B": "lora_B", "lora_magnitude_vector": "magnitude"}
        pattern = re.compile(r"^(.+)\.(" + "|".join(re.escape(k) for k in kinds) + r")$")
        sites: dict[str, Tensors] = {}
        rest: Tensors = {}
        for key, value in tensors.items():
            match = pattern.match(key)
            if match:
                sites.setdefault(match[1], {})[kinds[match[2]]] = value
            else:
                rest[key] = value
        r = int(peft_config.get("r", 8))
        ranks = {path: t["lora_A"].shape[0] for path, t in sites.items() if "lora_A" in t}
        rank_pattern = {path: rank for path, rank in sorted(ranks.items()) if rank != r}
        fields: dict[str, Any] = {
            "r": r, "alpha": float(peft_config.get("lora_alpha", 8)), "dropout": float(peft_config.get("lora_dropout", 0.0)),
            "use_rslora": bool(peft_config.get("use_rslora", False)), "init": init,
        }
        if rank_pattern:
            if not peft_config.get("rank_pattern"):
                raise DeltaFileError(f"LoRA tensors of rank {sorted(set(ranks.values()))} do not match r={r} in the "
                                     f"adapter config (and it has no rank_pattern); the adapter files do not belong together")
            if "rank_pattern" not in {f.name for f in dataclasses.fields(LoRAConfig)}:
                raise ConfigError("cannot import the peft LORA adapter: option rank_pattern (a rank per module) is not "
                                  "supported by this deltatune's LoRAConfig")
            fields["rank_pattern"] = rank_pattern
        cls = DoRAConfig if peft_config.get("use_dora") else LoRAConfig
        return cls(**fields), sites, rest

    def _init(self, value: Any) -> str:
        if value is True or value is False or value in ("orthogonal", "eva", "mica"):
            return "kaiming"  # only the starting point differs; the trained tensors are loaded over it
        if value == "gaussian":
            return "gaussian"
        if isinstance(value, str) and value.lower().startswith(self._BASE_CHANGING_INITS):
            raise ConfigError(
                f"cannot import the peft LORA adapter: init_lora_weights={value!r} changes the base weights before "
                f"training, so the adapter fits only that changed base. Convert it in peft first: "
                f"save_pretrained(..., path_initial_model_for_weight_conversion=...) turns it into a plain LoRA"
            )
        raise ConfigError(f"cannot import the peft LORA adapter: init_lora_weights={value!r} is not supported")
