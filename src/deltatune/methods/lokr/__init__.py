"""LoKr: a weight change that is the Kronecker product of two small (optionally low-rank) factors.

Yeh et al., 2023, "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model
Evaluation" (arXiv:2309.14859), as LyCORIS and peft define it:

    dW = (alpha / r) * kron(W1, W2),   W1: (out_l, in_m),  W2: (out_k, in_n)

with ``out = out_l * out_k`` and ``in = in_m * in_n`` split by ``decompose_factor``, ``W2`` (and
with ``decompose_both`` ``W1``) a rank-``r`` product when ``r`` is small against its sides.
``W1`` starts at zero, so ``dW = 0`` at start.
"""

from __future__ import annotations

from torch import nn

from ...core.build import per_linear
from ...core.registry import MethodSpec, Mixing, register_method
from ...core.unit import Placements
from .config import LoKrConfig
from .layer import LoKrLinear, factorization
from .peft import LoKrCodec

__all__ = ["LoKrConfig", "LoKrLinear", "factorization"]

DEFAULT_ROLES = ["q|qkv", "v"]


def build(model: nn.Module, config: LoKrConfig) -> Placements:
    def make(path: str, module: nn.Module, fan_in: int, fan_out: int, transposed: bool):
        return LoKrLinear(fan_in, fan_out, config.for_module(path), transposed)

    return per_linear(model, config, DEFAULT_ROLES, make)


register_method(MethodSpec(
    "lokr", LoKrConfig, build, size_option="r", mergeable=True, identity_at_init=True,
    summary="Kronecker product of two small (optionally low-rank) factors added to linear weights",
    default_lr=1e-2, mixing=Mixing("batched"), peft=LoKrCodec()))
