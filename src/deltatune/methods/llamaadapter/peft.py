"""LLaMA-Adapter in peft's ADAPTION_PROMPT adapter format (peft 0.21.2).

peft keeps, per adapted attention module ``<path>``, ``<path>.adaption_prompt`` of shape
``(1, adapter_len, hidden)`` and ``<path>.adaption_gate`` of shape ``(1,)``, on the top
``adapter_layers`` modules named ``target_modules`` (``self_attn``). It computes what
:class:`~.layer.AdaptionPrompt` computes only on Llama and Mistral: its GPT-2 variant adds
the heads without the output projection, and it applies the output projection's bias a
second time, so other sites are refused with the reason.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from ...core.codec import PeftCodec, unsupported_unit
from ...errors import ConfigError, DeltaFileError

PROMPT, GATE = "adaption_prompt", "adaption_gate"
#: transformers model types whose attention peft's adaption prompt computes as deltatune does
PEFT_MODEL_TYPES = ("llama", "mistral")


class AdaptionPromptCodec(PeftCodec):
    """LLaMA-Adapter: one prompt and one scalar gate per adapted attention layer."""

    peft_type = "ADAPTION_PROMPT"
    understood = frozenset({"target_modules", "adapter_len", "adapter_layers"})
    exported_fields = frozenset({"adapter_len", "adapter_layers"})
    carried = ("adapter_len", "adapter_layers")

    def check_site(self, path, module, unit):
        from .layer import AdaptionPrompt

        if not isinstance(unit, AdaptionPrompt):
            raise unsupported_unit(unit, path, self.peft_type)
        model_type = getattr(getattr(module, "config", None), "model_type", None)
        if model_type not in PEFT_MODEL_TYPES:
            raise ConfigError(
                f"peft's adaption prompt supports model types {PEFT_MODEL_TYPES} with this formula; {path} belongs to "
                f"a {model_type!r} model (peft refuses other types, and computes GPT-2 without the output projection)")
        site = unit.site
        output = module.get_submodule(site.output) if site.output is not None else None
        if site.fused or output is None or getattr(output, "bias", None) is not None:
            raise ConfigError(
                f"peft's adaption prompt at {path} needs separate key/value projections and an output projection "
                f"without bias inside the attention module (peft adds that bias a second time)")
        if unit.gate.numel() != 1:
            raise ConfigError(f"peft's adaption prompt has one gate per layer; the delta at {path} has one per head "
                              f"(gate_per_head=True)")

    def export_delta(self, config, sites, module_names):
        leaves = {path.rpartition(".")[2] for path, _ in sites}
        if len(leaves) != 1:
            raise ConfigError(f"peft's adaption prompt names its attention modules by one attribute name; this delta "
                              f"adapts modules named {sorted(leaves)}")
        leaf = leaves.pop()
        paths = [path for path, _ in sites]
        candidates = [n for n in module_names if n.endswith("." + leaf)]
        if candidates[-len(paths):] != paths:
            raise ConfigError(
                f"peft's adaption prompt adapts the top adapter_layers modules named {leaf!r} "
                f"({candidates[-len(paths):]}); this delta adapts {paths}")
        tensors = {}
        for path, unit in sites:
            tensors[f"{path}.{PROMPT}"] = unit.prompt.detach()[None]
            tensors[f"{path}.{GATE}"] = unit.gate.detach().reshape(1)
        fields = {"target_modules": leaf, "adapter_len": config.adapter_len, "adapter_layers": len(paths)}
        return fields, tensors

    def import_delta(self, peft_config, tensors):
        from . import LlamaAdapterConfig

        length, layers = peft_config.get("adapter_len"), peft_config.get("adapter_layers")
        if not isinstance(length, int) or not isinstance(layers, int) or length <= 0 or layers <= 0:
            raise DeltaFileError(f"the peft adaption-prompt config needs positive whole adapter_len and adapter_layers, "
                                 f"got {length!r} and {layers!r}")
        per_site: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
        rest = {}
        for key, value in tensors.items():
            path, _, leaf = key.rpartition(".")
            if leaf == PROMPT:
                if value.dim() != 3 or value.shape[:2] != (1, length):
                    raise DeltaFileError(f"peft tensor {key!r} has shape {list(value.shape)}; (1, adapter_len={length}, "
                                         f"hidden) is expected")
                per_site[path]["prompt"] = value[0].contiguous()
            elif leaf == GATE:
                if value.numel() != 1:
                    raise DeltaFileError(f"peft tensor {key!r} has shape {list(value.shape)}; one gate is expected")
                per_site[path]["gate"] = value.reshape(1)
            else:
                rest[key] = value
        incomplete = [p for p, t in per_site.items() if len(t) != 2]
        if incomplete or len(per_site) != layers:
            raise DeltaFileError(f"the peft adaption-prompt adapter holds prompts and gates for {sorted(per_site)}; "
                                 f"adapter_layers={layers} pairs of {PROMPT!r} and {GATE!r} are expected")
        return LlamaAdapterConfig(adapter_len=length, adapter_layers=layers), dict(per_site), rest
