"""Hydra: a parallel and a sequential low-rank branch on one linear layer.

Kim, Yang, Kim, Hong & Park, 2024, "Hydra: Multi-head Low-rank Adaptation for Parameter
Efficient Fine-tuning" (Neural Networks; arXiv:2309.06922). For a linear module
``y0 = W0 x + b0``:

    y = y0 + s (B_p A_p x + B_s A_s y0)

The parallel branch (``A_p: (r_p, in)``, ``B_p: (out, r_p)``) reads the module's input, as
LoRA does; the sequential branch (``A_s: (r_s, out)``, ``B_s: (out, r_s)``) reads the
module's output *with its bias*, a linear combination of the pre-trained features (the
official code feeds it the output projection's result). Both are linear in ``x``, so

    dW = s (B_p A_p + B_s A_s W0),    db = s B_s A_s b0

and merging, folding and task vectors are exact. ``A``s start as ``nn.Linear``'s weights
(Kaiming-uniform), ``B``s at zero, so a new delta changes nothing. Unmerged it runs as one
rank-``r_p + r_s`` product ``[s B_p, s B_s] [A_p; A_s W0] x`` (``A_s W0`` is ``(r_s, in)``,
formed per call) plus the constant ``db``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ...core.build import first_input, linear_shape, per_module
from ...core.config import DeltaConfig, check
from ...core.registry import MethodSpec, Mixing, register_method
from ...core.roles import default_targets
from ...core.rows import as_rows, gathered
from ...core.unit import Placements
from ...core.weight_delta import WeightDelta

__all__ = ["HydraConfig", "HydraLinear"]

DEFAULT_ROLES = ["ffn_down"]


@dataclass(frozen=True)
class HydraConfig(DeltaConfig):
    """Hydra: ``y = y0 + scale (B_p A_p x + B_s A_s y0)`` with ``y0 = W0 x + b0``.

    Args:
        r_parallel: rank of the parallel branch (reads the module's input).
        r_sequential: rank of the sequential branch (reads the module's output).
        scale: both branches are multiplied by it (the official language-model code uses 1;
            its vision code sets it per task).
    """

    method = "hydra"

    r_parallel: int = field(default=4, metadata={"aliases": ("r_par",)})
    r_sequential: int = field(default=8, metadata={"aliases": ("r_seq",)})
    scale: float = 1.0

    def validate(self) -> None:
        for name in ("r_parallel", "r_sequential"):
            value = getattr(self, name)
            check(isinstance(value, int) and value > 0,
                  f"hydra {name} must be a positive integer (a branch's rank), got {value!r}")
        check(math.isfinite(self.scale) and self.scale != 0,
              f"hydra scale must be a finite non-zero number, got {self.scale!r}")


def _kaiming(rows: int, cols: int) -> torch.Tensor:
    value = torch.empty(rows, cols)
    nn.init.kaiming_uniform_(value, a=math.sqrt(5))
    return value


class HydraLinear(WeightDelta):
    """One module's two branches: ``dW = s (B_p A_p + B_s A_s W0)``, ``db = s B_s A_s b0``."""

    def __init__(self, fan_in: int, fan_out: int, transposed: bool, config: HydraConfig):
        super().__init__(fan_in, fan_out, transposed)
        self.scale = config.scale
        self.parallel_A = nn.Parameter(_kaiming(config.r_parallel, fan_in))
        self.parallel_B = nn.Parameter(torch.zeros(fan_out, config.r_parallel))
        self.sequential_A = nn.Parameter(_kaiming(config.r_sequential, fan_out))
        self.sequential_B = nn.Parameter(torch.zeros(fan_out, config.r_sequential))

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        B, A = self.factors(weight)
        return B @ A

    def factors(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, A)`` with ``dW = B @ A`` for the ``(out, in)`` base weight ``weight``:
        ``B = s [B_p, B_s]`` (out, r_p + r_s) and ``A = [A_p; A_s W0]`` (r_p + r_s, in)."""
        A = torch.cat([self.parallel_A, self.sequential_A @ weight.to(self.sequential_A.dtype)])
        return torch.cat([self.parallel_B, self.sequential_B], dim=1) * self.scale, A

    def bias_shift(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        """``db = s B_s A_s b0``: the sequential branch applied to the module's bias."""
        if bias is None:
            return None
        return self.scale * (self.sequential_B @ (self.sequential_A @ bias.to(self.sequential_A.dtype)))

    def forward_post(self, module, args, kwargs, output):
        B, A = self.factors(self.base_weight(module))
        x = first_input(args, kwargs)
        update = F.linear(F.linear(x.to(A.dtype), A), B, self.bias_shift(module.bias))
        return output + update.to(output.dtype)

    def merge_params(self, module, params):
        changed = super().merge_params(module, params)  # the weight, from the current (out, in) weight
        bias = params.get("bias")
        if bias is not None:
            changed["bias"] = bias + self.bias_shift(bias).to(bias.dtype)
        return changed

    @classmethod
    def mixed_post(cls, units, module, args, kwargs, output, routing):
        """Each row through its own delta's ``(B, A)`` (ranks padded with zeros, zeros for base
        rows) in two batched products, plus its ``db``. Not cached: ``A_s W0`` depends on the
        module's weight, which the stacking cache does not watch."""
        batch = routing.index.numel()
        weight = next(u for u in units if u is not None).base_weight(module)
        pairs = {id(u): u.factors(weight) for u in units if u is not None}
        A_t = gathered(units, routing.index, lambda u: pairs[id(u)][1].T, 0.0)  # (batch, in, k)
        B_t = gathered(units, routing.index, lambda u: pairs[id(u)][0].T, 0.0)  # (batch, k, out)
        x = as_rows(first_input(args, kwargs), batch).to(A_t.dtype)
        result = torch.baddbmm(as_rows(output, batch).to(A_t.dtype), torch.bmm(x, A_t), B_t)
        if module.bias is not None:
            shifts = gathered(units, routing.index, lambda u: u.bias_shift(module.bias), 0.0)  # (batch, out)
            result = result + shifts.unsqueeze(1)
        return result.view(output.shape).to(output.dtype)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", r_parallel={self.parallel_A.shape[0]}, "
                f"r_sequential={self.sequential_A.shape[0]}, scale={self.scale:g}")


def build(model: nn.Module, config: HydraConfig) -> Placements:
    def make(path: str, module: nn.Module):
        shape = linear_shape(module)
        if shape is None:
            weight = getattr(module, "weight", None)
            size = f" with weight {list(weight.shape)}" if isinstance(weight, torch.Tensor) else ""
            return f"{type(module).__name__}{size} is not a Linear or Conv1D layer (hydra changes linear weights)"
        return HydraLinear(*shape, config)

    return per_module(model, config, lambda: default_targets(model, DEFAULT_ROLES, config.method), make)


register_method(MethodSpec(
    "hydra", HydraConfig, build, size_option="r_sequential", mergeable=True, identity_at_init=True,
    summary="a parallel low-rank branch on the input plus a sequential one on the output of each "
            "feed-forward output projection (Hydra)",
    default_lr=2e-3, mixing=Mixing("batched"),
    peft_refusal="peft has no Hydra: its LoRA has no sequential branch reading the layer's output"))
