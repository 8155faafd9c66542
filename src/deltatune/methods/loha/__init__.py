"""LoHa: a weight change that is the element-wise (Hadamard) product of two low-rank products.

Hyeon-Woo, Ye-Bin and Oh, 2022, "FedPara: Low-Rank Hadamard Product for Communication-Efficient
Federated Learning" (arXiv:2108.06098), as LyCORIS and peft apply it to fine-tuning:

    dW = (alpha / r) * (W1a W1b) ⊙ (W2a W2b),   W1a, W2a: (out, r),  W1b, W2b: (r, in)

``2 r (in + out)`` parameters reach rank ``r^2``. ``W2b`` starts at zero, so ``dW = 0`` at start.
"""

from __future__ import annotations

from torch import nn

from ...core.build import per_linear
from ...core.registry import MethodSpec, Mixing, register_method
from ...core.unit import Placements
from .config import LoHaConfig, LycorisConfig
from .layer import LoHaLinear
from .peft import LoHaCodec

__all__ = ["LoHaConfig", "LoHaLinear", "LycorisConfig"]

DEFAULT_ROLES = ["q|qkv", "v"]


def build(model: nn.Module, config: LoHaConfig) -> Placements:
    def make(path: str, module: nn.Module, fan_in: int, fan_out: int, transposed: bool):
        return LoHaLinear(fan_in, fan_out, config.for_module(path), transposed)

    return per_linear(model, config, DEFAULT_ROLES, make)


register_method(MethodSpec(
    "loha", LoHaConfig, build, size_option="r", mergeable=True, identity_at_init=True,
    summary="Hadamard product of two low-rank products (W1a W1b) * (W2a W2b) added to linear weights",
    default_lr=1e-2, mixing=Mixing("batched"), peft=LoHaCodec()))
