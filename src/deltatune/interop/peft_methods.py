"""Per-method mapping between deltatune deltas and peft 0.21.2 adapters: config fields and tensors.

Each :class:`PeftCodec` knows one peft type: which deltatune methods export to it, the
config fields it writes, how tensors are named and shaped on each side, and which peft
options it cannot represent (and why). Tensor keys here are relative to the model (no
``base_model.model.`` prefix); :mod:`deltatune.interop.peft` adds and removes that.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, ClassVar

import torch
from torch import nn

from ..core.config import DeltaConfig
from ..core.targeting import base_modules
from ..core.unit import DeltaUnit
from ..errors import ConfigError, DeltaFileError
from ..methods.ia3 import IA3Config, IA3Input, IA3Output
from ..methods.lora import DoRAConfig, DoRALinear, LoRAConfig, LoRAEmbedding, LoRALinear
from ..methods.prompt import PromptConfig, SoftPrompt

Site = tuple[str, DeltaUnit]
Tensors = dict[str, torch.Tensor]
#: what a codec's import returns: the config (targets not yet set), tensors per site path, unused tensors
Imported = tuple[DeltaConfig, dict[str, Tensors], Tensors]

#: fields of every peft config that do not change what an adapter computes
COMMON_FIELDS = frozenset({"peft_type", "peft_version", "task_type", "auto_mapping", "base_model_name_or_path",
                           "revision", "inference_mode", "modules_to_save"})
_NO_EQUIVALENT = "deltatune has no equivalent"


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
    methods: ClassVar[tuple[str, ...]]
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

    def check_options(self, peft_config: dict[str, Any]) -> None:
        """Raise :class:`ConfigError` naming the first option deltatune cannot represent."""
        for option, value in sorted(peft_config.items()):
            if option in COMMON_FIELDS or option in self.understood or is_neutral(value):
                continue
            reason = self.refused.get(option, f"it is unknown to this deltatune ({_NO_EQUIVALENT})")
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


def _unsupported_unit(unit: DeltaUnit, path: str, peft_type: str) -> ConfigError:
    return ConfigError(f"cannot export {type(unit).__name__} at {path!r} to peft {peft_type}: no peft layer matches it")


def _whole(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


class LoraCodec(PeftCodec):
    """LoRA (rsLoRA, DoRA) on Linear, GPT-2 ``Conv1D`` and Embedding layers."""

    peft_type = "LORA"
    methods = ("lora", "dora")
    understood = frozenset({"r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "init_lora_weights",
                            "fan_in_fan_out", "rank_pattern", "target_modules", "exclude_modules",
                            "layers_to_transform", "layers_pattern", "megatron_core", "qalora_group_size",
                            "eva_config", "corda_config", "lora_ga_config"})
    refused: ClassVar[dict[str, str]] = {
        "bias": "it trains the base model's biases, which a LoRA delta does not hold (train a BitFit delta for that)",
        "lora_bias": "it adds a bias to LoRA's B matrix; deltatune's LoRA has none",
        "alpha_pattern": "it sets alpha per module; a deltatune LoRA has one alpha",
        "use_qalora": "QA-LoRA pools the inputs of a quantised (GPTQ) base; " + _NO_EQUIVALENT,
        "layer_replication": "it builds extra layers by repeating the base's; a delta cannot add layers",
        "trainable_token_indices": "it trains selected embedding rows (peft's trainable tokens); " + _NO_EQUIVALENT,
        "target_parameters": "it puts LoRA on raw parameters (mixture-of-experts weights); deltatune adapts modules",
        "alora_invocation_tokens": "activated LoRA acts only after the invocation tokens; deltatune's acts on all",
        "ensure_weight_tying": "it ties the adapters of tied layers; deltatune adapts each module on its own",
        "loftq_config": "LoftQ initialisation replaces the base weights with quantised ones",
        "megatron_config": "Megatron-parallel layers are not plain Linear layers",
        "use_bdlora": "block-diagonal LoRA factors; " + _NO_EQUIVALENT,
        "arrow_config": "Arrow routing mixes several LoRAs per token; " + _NO_EQUIVALENT,
        "monteclora_config": "Monte Carlo LoRA samples its factors; " + _NO_EQUIVALENT,
        "velora_config": "VeLoRA; " + _NO_EQUIVALENT,
        "kasa_config": "KaSA truncates the base weight's singular values, changing the base",
    }
    exported_fields = frozenset({"r", "alpha", "dropout", "use_rslora", "use_dora", "init", "rank_pattern"})
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
                raise _unsupported_unit(unit, path, self.peft_type)
            ranks[path] = unit.lora_A.shape[0]
        rank_pattern = {re.escape(p): k for p, k in sorted(ranks.items()) if k != config.r}
        fields = {
            "r": config.r, "lora_alpha": _whole(config.alpha), "lora_dropout": config.dropout,
            "use_rslora": config.use_rslora, "use_dora": config.use_dora,
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


class IA3Codec(PeftCodec):
    """(IA)3 on Linear and GPT-2 ``Conv1D`` layers: output scaling, or input scaling on peft's
    ``feedforward_modules``."""

    peft_type = "IA3"
    methods = ("ia3",)
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
                raise _unsupported_unit(unit, path, self.peft_type)
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


class PromptCodec(PeftCodec):
    """Prompt tuning: one table of virtual-token embeddings put before the input embeddings."""

    peft_type = "PROMPT_TUNING"
    methods = ("prompt",)
    prompt_learning = True
    understood = frozenset({"num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads",
                            "num_layers", "prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path",
                            "tokenizer_kwargs"})
    exported_fields = frozenset({"num_virtual_tokens", "init_token_ids", "init_text", "seed"})
    carried = ("num_virtual_tokens", "init_text")
    TABLE = "prompt_embeddings"

    def export_delta(self, config, sites, module_names):
        if len(sites) != 1 or not isinstance(sites[0][1], SoftPrompt):
            raise _unsupported_unit(sites[0][1], sites[0][0], self.peft_type)
        table = sites[0][1].prompt
        fields = {
            "num_virtual_tokens": table.shape[0], "token_dim": table.shape[1],
            # deltatune prompts the encoder only; peft's seq2seq forward also uses only the first
            # num_virtual_tokens rows, so one submodule is the exact equivalent (and half the size)
            "num_transformer_submodules": 1,
            # the initialisation does not matter once the trained table is loaded; the text is kept for the record
            "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": config.init_text,
            "tokenizer_name_or_path": None, "tokenizer_kwargs": None,
        }
        return fields, {self.TABLE: table}

    def import_delta(self, peft_config, tensors):
        rest = dict(tensors)
        if self.TABLE not in rest:
            raise DeltaFileError(f"the peft prompt-tuning adapter has no {self.TABLE!r} tensor")
        table = rest.pop(self.TABLE)
        tokens = int(peft_config.get("num_virtual_tokens") or 0)
        submodules = int(peft_config.get("num_transformer_submodules") or 1)
        if submodules not in (1, 2) or (submodules == 2 and peft_config.get("task_type") != "SEQ_2_SEQ_LM"):
            raise ConfigError(f"cannot import the peft prompt-tuning adapter: num_transformer_submodules={submodules} "
                              f"with task_type {peft_config.get('task_type')!r} is not supported")
        if tokens <= 0 or table.dim() != 2 or table.shape[0] != tokens * submodules:
            raise DeltaFileError(f"peft {self.TABLE} has shape {list(table.shape)}, but num_virtual_tokens={tokens} "
                                 f"x num_transformer_submodules={submodules} rows are expected")
        # peft's seq2seq forward puts only the first num_virtual_tokens rows before the encoder
        # input; the decoder half of a two-submodule table is never used in prompt tuning
        config = PromptConfig(num_virtual_tokens=tokens, init_text=peft_config.get("prompt_tuning_init_text"))
        return config, {"": {"prompt": table[:tokens].contiguous()}}, rest


CODECS: tuple[PeftCodec, ...] = (LoraCodec(), IA3Codec(), PromptCodec())

#: why a delta method has no peft export
UNEXPORTABLE = {
    "adapter": "peft has no bottleneck-adapter method (Houlsby/Pfeiffer adapters are adapter-hub's format)",
    "prefix": "peft's prefix tuning passes the prefix as a key/value cache, which shifts every real token's position "
              "by num_virtual_tokens (and on T5 reaches the decoder only, cross-attention included); deltatune's "
              "prefix leaves positions alone, so the same tensors would give different outputs",
    "bitfit": "peft has no bias-only method (LoRA's bias='all' stores whole biases next to a LoRA, not bias changes)",
    "head": "peft saves modules_to_save only alongside an adapter, and a head-only delta has none",
    "dense": "peft has no full weight-difference adapter",
}


def codec_for_method(method: str) -> PeftCodec:
    """The codec that exports deltas of ``method``; a clear refusal for the others."""
    for codec in CODECS:
        if method in codec.methods:
            return codec
    reason = UNEXPORTABLE.get(method, "peft has no matching adapter type")
    supported = ", ".join(m for c in CODECS for m in c.methods)
    raise ConfigError(f"cannot export a {method!r} delta to peft: {reason}. peft export supports {supported} deltas")


def codec_for_peft_type(peft_type: Any) -> PeftCodec:
    """The codec that imports adapters of ``peft_type``; a clear refusal for the others."""
    for codec in CODECS:
        if peft_type == codec.peft_type:
            return codec
    supported = ", ".join(c.peft_type for c in CODECS)
    raise ConfigError(f"cannot import a peft {peft_type!r} adapter: deltatune imports peft {supported} adapters only")


def check_exportable(config: DeltaConfig) -> PeftCodec:
    """The codec for ``config``, after refusing any option its peft type cannot carry."""
    codec = codec_for_method(config.method)
    targeting = {"targets", "target_types", "layers", "exclude", "modules_to_save"}
    defaults = type(config)()
    for field in dataclasses.fields(config):
        if field.name in targeting or field.name in codec.exported_fields:
            continue
        if getattr(config, field.name) != getattr(defaults, field.name):
            raise ConfigError(f"cannot export the {config.method} delta to peft: its option {field.name}="
                              f"{getattr(config, field.name)!r} has no peft {codec.peft_type} equivalent")
    return codec


def module_names(model: nn.Module) -> list[str]:
    """Names of the base model's modules, as peft sees them (deltatune's own slots left out)."""
    return [name for name, _ in base_modules(model) if name]
