"""ABBA: the weight update as the Hadamard product of two trained low-rank products.

Singhal, Ponkshe, Vartak and Vepakomma, 2025, "ABBA: Highly Expressive Hadamard Product
Adaptation for Large Language Models" (arXiv:2505.14238)::

    dW = s (B1 A1) ⊙ (B2 A2),    s = alpha^2 / sqrt(r1 r2),    y = W x + b + dW x

All four factors train, ``(r1 + r2)(in + out)`` values per module, and ``dW`` can reach rank
``r1 r2``. Initialisation as in the paper and the authors' code: ``B1 = U sqrt(S)``,
``A1 = sqrt(S) V^T`` from the top ``r1`` singular triplets of the base weight, ``A2`` Kaiming
uniform and ``B2 = 0``, so ``dW = 0`` at start. ``s`` is the product of the two pairs'
rank-stable (rsLoRA) scalings ``alpha / sqrt(r_k)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from ...core.build import per_linear
from ...core.config import DeltaConfig, check
from ...core.registry import MethodSpec, Mixing, register_method
from ...core.unit import Placements
from ..loraxs import check_rank
from .layer import ABBALinear, khatri_rao_rows

__all__ = ["ABBAConfig", "ABBALinear", "khatri_rao_rows"]

DEFAULT_ROLES = ["q|qkv", "v"]


@dataclass(frozen=True)
class ABBAConfig(DeltaConfig):
    """ABBA: ``W x + s ((B1 A1) ⊙ (B2 A2)) x`` with ``s = alpha^2 / sqrt(r1 r2)``.

    Args:
        r1: rank of the first pair, started from the base weight's top ``r1`` singular
            vectors; at most ``min(in, out)`` of every adapted module (refused at attach).
        r2: rank of the second pair (``B2 = 0`` at start).
        alpha: scale; ``s = alpha^2 / sqrt(r1 r2)``. With ``alpha = r1 = r2`` (the authors'
            runs) ``s = alpha``.
    """

    method = "abba"

    r1: int = 4
    r2: int = 4
    alpha: float = 4.0

    def validate(self) -> None:
        check(self.r1 > 0, f"abba field 'r1' must be a positive integer, got {self.r1!r}; try r1=4")
        check(self.r2 > 0, f"abba field 'r2' must be a positive integer, got {self.r2!r}; try r2=4")
        check(self.alpha > 0, f"abba field 'alpha' must be positive, got {self.alpha!r}; try alpha=4")

    @property
    def scaling(self) -> float:
        return self.alpha ** 2 / math.sqrt(self.r1 * self.r2)


def build(model: nn.Module, config: ABBAConfig) -> Placements:
    def make(path: str, module: nn.Module, fan_in: int, fan_out: int, transposed: bool):
        check_rank("abba", path, module, config.r1, field="r1")
        return ABBALinear(fan_in, fan_out, config.r1, config.r2, config.scaling, transposed)

    return per_linear(model, config, DEFAULT_ROLES, make)


register_method(MethodSpec(
    "abba", ABBAConfig, build, size_option="r1", mergeable=True, identity_at_init=True,
    summary="Hadamard product of two trained low-rank products, the first from the weight's SVD (ABBA)",
    default_lr=5e-3, mixing=Mixing("batched"),
    peft_refusal="peft has no ABBA adapter; its closest relative, LoHa, also multiplies two low-rank products "
                 "element-wise but starts them from random values (not the weight's SVD) and scales by alpha / r"))
