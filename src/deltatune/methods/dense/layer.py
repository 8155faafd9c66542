"""The dense unit: a full weight (and bias) difference added to one module."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...core.build import first_input
from ...core.unit import DeltaUnit

#: module kinds a dense delta can run unmerged, by how the weight enters the output
KINDS = ("linear", "conv1d", "embedding", "layer_norm")


class DenseDelta(DeltaUnit):
    """``y = f(x; W + D, b + d)`` computed as ``f(x; W, b) + g(x; D) + d``.

    ``D`` has the module's own weight shape (GPT-2 ``Conv1D``: ``(in, out)``), so merging
    is ``W + D``. For a linear layer ``g(x; D) = x D^T``, as LoRA adds ``B A x``; for an
    embedding it is the looked-up rows of ``D``; for a LayerNorm the normalised input times
    ``D``. Both start at zero.
    """

    def __init__(self, module: nn.Module, kind: str, weight: bool, bias: bool):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown dense kind {kind!r}; one of {KINDS}")
        self.kind = kind
        has_bias = isinstance(getattr(module, "bias", None), nn.Parameter)
        self.weight_delta = nn.Parameter(torch.zeros(module.weight.shape, dtype=torch.float32, device=module.weight.device)) if weight else None
        keep_bias = bias and has_bias
        self.bias_delta = nn.Parameter(torch.zeros_like(module.bias, dtype=torch.float32)) if keep_bias else None

    def weight_change(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``g(x; D)``: what the weight difference adds to the module's output."""
        weight = self.weight_delta
        if self.kind == "embedding":
            return F.embedding(x, weight, padding_idx=module.padding_idx)
        x = x.to(weight.dtype)
        if self.kind == "linear":
            return F.linear(x, weight)
        if self.kind == "conv1d":
            return x @ weight
        return F.layer_norm(x, module.normalized_shape, eps=module.eps) * weight

    def forward_post(self, module, args, kwargs, output):
        if self.weight_delta is not None:
            output = output + self.weight_change(module, first_input(args, kwargs)).to(output.dtype)
        if self.bias_delta is not None:
            output = output + self.bias_delta.to(output.dtype)
        return output

    def merge_params(self, module, params):
        out = {}
        if self.weight_delta is not None:
            out["weight"] = params["weight"] + self.weight_delta.to(params["weight"].dtype)
        if self.bias_delta is not None:
            out["bias"] = params["bias"] + self.bias_delta.to(params["bias"].dtype)
        return out


def dense_kind(module: nn.Module) -> str | None:
    """The :data:`KINDS` entry for a module, or ``None`` when a dense delta cannot run on it."""
    if isinstance(module, nn.Linear):
        return "linear"
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None and module.weight.dim() == 2:
        return "conv1d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.LayerNorm) and module.weight is not None:
        return "layer_norm"
    return None
