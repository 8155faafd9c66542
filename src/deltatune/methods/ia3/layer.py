"""(IA)3: learned vectors that rescale keys, values and feed-forward activations.

Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning" (arXiv:2205.05638).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...core.build import first_input, replace_first_input
from ...core.rows import as_rows, gathered
from ...core.slot import get_slot
from ...core.config import DeltaConfig
from ...core.unit import DeltaUnit



@dataclass(frozen=True)
class IA3Config(DeltaConfig):
    """(IA)3 on linear layers.

    Args:
        feedforward: patterns (among the targets) whose *input* is scaled, as for the
            feed-forward inner activation; every other target has its *output* scaled.
            ``None`` uses the family default when targets are defaulted, else none.
    """

    method = "ia3"

    feedforward: tuple[str, ...] | None = None  # one pattern alone becomes a 1-tuple (DeltaConfig)


def _row_scales(units, module, routing):
    """Each row's scaling vector as ``(batch, 1, features)``; ones for rows without one."""
    cache = get_slot(module).mixed_cache
    return gathered(units, routing.index, lambda u: u.ia3_l, 1.0, cache, "ia3_l").unsqueeze(1)


class IA3Output(DeltaUnit):
    """``y = l * (W x + b)`` with ``l`` starting at one."""

    def __init__(self, out_features: int, fan_in_fan_out: bool):
        super().__init__()
        self.fan_in_fan_out = fan_in_fan_out
        self.ia3_l = nn.Parameter(torch.ones(out_features))

    def forward_post(self, module, args, kwargs, output):
        return output * self.ia3_l.to(output.dtype)

    @classmethod
    def mixed_post(cls, units, module, args, kwargs, output, routing):
        scale = _row_scales(units, module, routing)
        return (as_rows(output, routing.index.numel()) * scale.to(output.dtype)).view(output.shape)

    def merge_params(self, module, params):
        scale = self.ia3_l.to(params["weight"].dtype)
        weight = params["weight"] * (scale if self.fan_in_fan_out else scale.unsqueeze(1))
        out = {"weight": weight}
        if params.get("bias") is not None:
            out["bias"] = params["bias"] * scale
        return out


class IA3Input(DeltaUnit):
    """``y = W (l * x) + b`` with ``l`` starting at one."""

    merge_order = 1

    def __init__(self, in_features: int, fan_in_fan_out: bool):
        super().__init__()
        self.fan_in_fan_out = fan_in_fan_out
        self.ia3_l = nn.Parameter(torch.ones(in_features))

    def forward_pre(self, module, args, kwargs):
        x = first_input(args, kwargs)
        return replace_first_input(args, kwargs, x * self.ia3_l.to(x.dtype))

    @classmethod
    def mixed_pre(cls, units, module, args, kwargs, routing):
        x = first_input(args, kwargs)
        scaled = as_rows(x, routing.index.numel()) * _row_scales(units, module, routing).to(x.dtype)
        return replace_first_input(args, kwargs, scaled.view(x.shape))

    def merge_params(self, module, params):
        scale = self.ia3_l.to(params["weight"].dtype)
        return {"weight": params["weight"] * (scale.unsqueeze(1) if self.fan_in_fan_out else scale)}
