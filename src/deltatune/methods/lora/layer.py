"""LoRA and DoRA units for linear layers (``nn.Linear``, GPT-2 ``Conv1D``) and embeddings."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...core.build import first_input, weight_as_out_in
from ...core.unit import DeltaUnit
from .config import LoRAConfig


class LoRALinear(DeltaUnit):
    """``y = W x + b + s * B A dropout(x)`` (Hu et al., 2021), ``A: (r, in)``, ``B: (out, r)``."""

    def __init__(self, in_features: int, out_features: int, config: LoRAConfig, fan_in_fan_out: bool = False):
        super().__init__()
        self.scaling = config.scaling
        self.fan_in_fan_out = fan_in_fan_out
        self.lora_A = nn.Parameter(torch.empty(config.r, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, config.r))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        if config.init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / config.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def lora_output(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x.to(self.lora_A.dtype))
        return F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """``s * B A`` as an ``(out, in)`` matrix."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward_post(self, module, args, kwargs, output):
        return output + self.lora_output(first_input(args, kwargs)).to(output.dtype)

    def merge_params(self, module, params):
        delta = self.delta_weight().to(params["weight"].dtype)
        return {"weight": params["weight"] + (delta.T if self.fan_in_fan_out else delta)}


class DoRALinear(LoRALinear):
    """``y = m / ||W + s B A||_row * (W x + s B A x) + b`` (Liu et al., 2024).

    The row norm is detached from the graph, as the paper recommends (section 4.3).
    """

    def __init__(self, module: nn.Module, in_features: int, out_features: int, config: LoRAConfig, fan_in_fan_out: bool):
        super().__init__(in_features, out_features, config, fan_in_fan_out)
        with torch.no_grad():
            norm = weight_as_out_in(module, fan_in_fan_out).float().norm(dim=1)
        self.magnitude = nn.Parameter(norm)

    def _magnitude_scale(self, module: nn.Module) -> torch.Tensor:
        weight = weight_as_out_in(module, self.fan_in_fan_out).to(self.lora_A.dtype)
        norm = (weight + self.delta_weight()).norm(dim=1)
        return self.magnitude / norm.detach()

    def forward_post(self, module, args, kwargs, output):
        scale = self._magnitude_scale(module).to(output.dtype)
        bias = getattr(module, "bias", None)
        base = output - bias if bias is not None else output
        lora = self.lora_output(first_input(args, kwargs)).to(output.dtype)
        return output + base * (scale - 1) + lora * scale

    def merge_params(self, module, params):
        weight = params["weight"].T if self.fan_in_fan_out else params["weight"]
        direction = weight.to(self.lora_A.dtype) + self.delta_weight()
        merged = (self.magnitude / direction.norm(dim=1)).unsqueeze(1) * direction
        merged = merged.to(params["weight"].dtype)
        return {"weight": merged.T if self.fan_in_fan_out else merged}


class LoRAEmbedding(DeltaUnit):
    """LoRA on an embedding table: ``E[i] + s * (A[:, i] B^T)``; A starts at zero, B random."""

    def __init__(self, module: nn.Embedding, config: LoRAConfig):
        super().__init__()
        self.scaling = config.scaling
        self.lora_A = nn.Parameter(torch.zeros(config.r, module.num_embeddings))
        self.lora_B = nn.Parameter(torch.randn(module.embedding_dim, config.r))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def delta_weight(self) -> torch.Tensor:
        """``s * (B A)^T`` as a ``(num_embeddings, embedding_dim)`` table."""
        return (self.lora_B @ self.lora_A).T * self.scaling

    def forward_post(self, module, args, kwargs, output):
        ids = first_input(args, kwargs)
        rows = F.embedding(ids, self.lora_A.T, padding_idx=module.padding_idx)
        return output + (self.dropout(rows) @ self.lora_B.T * self.scaling).to(output.dtype)

    def merge_params(self, module, params):
        return {"weight": params["weight"] + self.delta_weight().to(params["weight"].dtype)}
