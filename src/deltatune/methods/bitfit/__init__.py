"""BitFit: train only bias terms (Ben Zaken et al., 2021, arXiv:2106.10199).

Each delta keeps its own bias change ``b - b0``, so several BitFit deltas can share a base.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...core.build import per_module
from ...core.config import DeltaConfig
from ...core.registry import MethodSpec, register_method
from ...core.targeting import base_modules
from ...core.unit import DeltaUnit, Placements
from ...errors import NotApplicableError

_CHANNEL_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm)


@dataclass(frozen=True)
class BitFitConfig(DeltaConfig):
    """BitFit; by default every module with a bias, or only the targeted ones."""

    method = "bitfit"


class BiasDelta(DeltaUnit):
    """``y = f(x) + (b - b0)``: a learned change to a module's bias, zero at start."""

    def __init__(self, bias: torch.Tensor, channel_dim: int):
        super().__init__()
        self.channel_dim = channel_dim
        self.bias_delta = nn.Parameter(torch.zeros_like(bias, dtype=torch.float32))

    def forward_post(self, module, args, kwargs, output):
        delta = self.bias_delta.to(output.dtype)
        if self.channel_dim == 1 and output.dim() > 2:
            delta = delta.view(-1, *([1] * (output.dim() - 2)))
        return output + delta

    def merge_params(self, module, params):
        return {"bias": params["bias"] + self.bias_delta.to(params["bias"].dtype)}


def _has_bias(module: nn.Module) -> bool:
    return isinstance(getattr(module, "bias", None), nn.Parameter)


def build(model: nn.Module, config: BitFitConfig) -> Placements:
    def defaults() -> tuple[str, ...]:
        names = tuple(path for path, module in base_modules(model) if path and _has_bias(module))
        if not names:
            raise NotApplicableError(f"no module of {type(model).__name__} has a bias, so BitFit has nothing to train")
        return names

    def make(path: str, module: nn.Module):
        if not _has_bias(module):
            return f"{type(module).__name__} has no bias"
        return BiasDelta(module.bias, 1 if isinstance(module, _CHANNEL_FIRST) else -1)

    return per_module(model, config, defaults, make)


register_method(MethodSpec(
    "bitfit", BitFitConfig, build, mergeable=True, identity_at_init=True, summary="train only bias terms",
    default_lr=3e-3,
    peft_refusal="peft has no bias-only method (LoRA's bias='all' stores whole biases next to a LoRA, not bias changes)"))
