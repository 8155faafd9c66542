"""LoHa in peft's LOHA adapter format, and what the LyCORIS codecs (LoHa, LoKr) share."""

from __future__ import annotations

import re
from typing import Any, ClassVar

from ...core.codec import PeftCodec, Tensors, exact_selector, unsupported_unit, whole_number
from ...errors import ConfigError
from .config import LoHaConfig, LycorisConfig
from .layer import LoHaLinear


def peft_pattern_value(patterns: dict[str, Any] | None, path: str, default: Any) -> Any:
    """The value peft's ``rank_pattern`` / ``alpha_pattern`` give the module ``path``: the first
    key that matches the end of the path as a regular expression (after a dot or at the start)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


class LycorisCodec(PeftCodec):
    """The part of the LOHA and LOKR mappings they share; subclasses name the unit class, the
    tensors and the method-specific fields."""

    unit_class: ClassVar[type]
    config_class: ClassVar[type[LycorisConfig]]
    #: peft tensor suffix -> unit parameter name
    tensor_names: ClassVar[dict[str, str]]
    #: deltatune init -> peft init_weights
    inits: ClassVar[dict[str, Any]]
    #: config fields carried under the same name on both sides
    same_fields: ClassVar[tuple[str, ...]] = ("rank_dropout", "module_dropout")
    common_understood = frozenset({"r", "alpha", "rank_dropout", "module_dropout", "init_weights", "rank_pattern",
                                   "alpha_pattern", "target_modules", "exclude_modules", "layers_to_transform",
                                   "layers_pattern",
                                   # chooses the factorisation of convolution kernels; Linear layers have none
                                   "use_effective_conv2d"})

    def check_site(self, path, module, unit):
        if getattr(unit, "transposed", False):
            raise ConfigError(
                f"{type(unit).__name__} at {path!r} adapts a GPT-2 Conv1D layer ({type(module).__name__}); peft's "
                f"{self.peft_type} adapts torch's Linear and convolution layers only, so peft cannot load it"
            )

    def export_delta(self, config, sites, module_names):
        tensors: Tensors = {}
        ranks, alphas = {}, {}
        for path, unit in sites:
            if not isinstance(unit, self.unit_class):
                raise unsupported_unit(unit, path, self.peft_type)
            own = dict(unit.named_parameters())
            for suffix, name in self.tensor_names.items():
                if name in own:
                    tensors[f"{path}.{suffix}"] = own[name]
            ranks[path], alphas[path] = unit.r, unit.alpha
        fields = {
            "r": config.r, "alpha": whole_number(config.alpha),
            "init_weights": self.inits[config.init], "use_effective_conv2d": False,
            "target_modules": exact_selector(list(ranks), module_names, "."),
            "rank_pattern": {re.escape(p): k for p, k in sorted(ranks.items()) if k != config.r},
            "alpha_pattern": {re.escape(p): whole_number(a) for p, a in sorted(alphas.items()) if a != config.alpha},
            "exclude_modules": None, "layers_to_transform": None, "layers_pattern": None,
            **{name: getattr(config, name) for name in self.same_fields},
        }
        return fields, tensors

    def import_delta(self, peft_config, tensors):
        pattern = re.compile(r"^(.+)\.(" + "|".join(re.escape(k) for k in self.tensor_names) + r")$")
        sites: dict[str, Tensors] = {}
        rest: Tensors = {}
        for key, value in tensors.items():
            match = pattern.match(key)
            if match:
                sites.setdefault(match[1], {})[self.tensor_names[match[2]]] = value
            else:
                rest[key] = value
        r, alpha = int(peft_config.get("r", 8)), float(peft_config.get("alpha", 8))
        ranks = {p: peft_pattern_value(peft_config.get("rank_pattern"), p, r) for p in sorted(sites)}
        alphas = {p: float(peft_pattern_value(peft_config.get("alpha_pattern"), p, alpha)) for p in sorted(sites)}
        init = {value: name for name, value in self.inits.items()}.get(peft_config.get("init_weights", True))
        if init is None:
            raise ConfigError(f"cannot import the peft {self.peft_type} adapter: init_weights="
                              f"{peft_config.get('init_weights')!r} is not one of {sorted(map(str, self.inits.values()))}")
        fields: dict[str, Any] = {
            "r": r, "alpha": alpha, "init": init,
            "rank_pattern": {p: k for p, k in ranks.items() if k != r} or None,
            "alpha_pattern": {p: a for p, a in alphas.items() if a != alpha} or None,
            **{name: peft_config.get(name, getattr(self.config_class, name)) for name in self.same_fields},
        }
        return self.config_class(**fields), sites, rest


class LoHaCodec(LycorisCodec):
    """LoHa on Linear layers (peft's LOHA does not adapt GPT-2 ``Conv1D``)."""

    peft_type = "LOHA"
    unit_class = LoHaLinear
    config_class = LoHaConfig
    tensor_names = {"hada_w1_a": "w1_a", "hada_w1_b": "w1_b", "hada_w2_a": "w2_a", "hada_w2_b": "w2_b"}
    inits = {"zero": True, "random": False}
    understood = LycorisCodec.common_understood
    exported_fields = frozenset({"r", "alpha", "rank_dropout", "module_dropout", "init", "rank_pattern", "alpha_pattern"})
    carried = ("r", "alpha", "rank_dropout", "module_dropout", "init", "rank_pattern", "alpha_pattern")
