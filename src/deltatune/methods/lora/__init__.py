"""LoRA and DoRA: one registration each, sharing one builder."""

from __future__ import annotations

from torch import nn

from ...core.build import linear_shape, per_module
from ...core.registry import MethodSpec, Mixing, register_method
from ...core.unit import Placements
from ...core.roles import default_targets
from .config import DoRAConfig, LoRAConfig
from .layer import DoRALinear, LoRAEmbedding, LoRALinear
from .peft import LoraCodec

__all__ = ["LoRAConfig", "DoRAConfig", "LoRALinear", "DoRALinear", "LoRAEmbedding"]

DEFAULT_ROLES = ["q|qkv", "v"]


def _make_unit(model_config: LoRAConfig):
    dora = isinstance(model_config, DoRAConfig)

    def make(path: str, module: nn.Module):
        config = model_config.for_module(path)
        shape = linear_shape(module)
        if shape is not None:
            fan_in, fan_out, transposed = shape
            if dora:
                return DoRALinear(module, fan_in, fan_out, config, transposed)
            return LoRALinear(fan_in, fan_out, config, transposed)
        if isinstance(module, nn.Embedding):
            if dora:
                return "DoRA supports Linear and Conv1D layers, not Embedding"
            return LoRAEmbedding(module, config)
        return f"{type(module).__name__} is not a Linear, Conv1D or Embedding layer"

    return make


def build(model: nn.Module, config: LoRAConfig) -> Placements:
    return per_module(model, config, lambda: default_targets(model, DEFAULT_ROLES, config.method), _make_unit(config))


_CODEC = LoraCodec()
register_method(MethodSpec("lora", LoRAConfig, build, size_option="r", mergeable=True, identity_at_init=True,
                           summary="low-rank update B A added to linear and embedding weights",
                           default_lr=2e-3, mixing=Mixing("batched"), peft=_CODEC))
register_method(MethodSpec("dora", DoRAConfig, build, size_option="r", mergeable=True, identity_at_init=True,
                           summary="LoRA direction with a learned per-output magnitude",
                           default_lr=2e-3, mixing=Mixing("batched"), peft=_CODEC))
