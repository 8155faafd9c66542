"""LoRA-XS: a trainable ``r x r`` matrix between frozen factors from the base weight's SVD.

Bałazy, Banaei, Aberer and Tabor, 2024, "LoRA-XS: Low-Rank Adaptation with Extremely Small
Number of Parameters" (arXiv:2405.17604). With the truncated SVD ``W ~ U_r S_r V_r^T`` of each
adapted ``(out, in)`` weight::

    dW = (alpha / r) * U_r R S_r V_r^T,    y = W x + b + dW x

Only ``R`` (``r x r``) trains, so the count per module is ``r^2`` whatever the module's width.
``R`` starts at zero (the authors draw it from N(0, 1e-5^2); zero makes the delta an exact
identity at start and still trains, since the frozen factors are not zero).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ...core.build import per_linear
from ...core.config import DeltaConfig, check
from ...core.registry import MethodSpec, Mixing, register_method
from ...core.unit import Placements
from .layer import FactoredDelta, LoRAXSLinear, check_rank, mixed_update, truncated_svd

__all__ = ["FactoredDelta", "LoRAXSConfig", "LoRAXSLinear", "check_rank", "mixed_update", "truncated_svd"]

DEFAULT_ROLES = ["q|qkv", "v"]


@dataclass(frozen=True)
class LoRAXSConfig(DeltaConfig):
    """LoRA-XS: ``W x + (alpha / r) * U_r R S_r V_r^T x`` with only ``R`` trained.

    Args:
        r: number of singular vectors kept; ``R`` is ``r x r``. At most ``min(in, out)`` of
            every adapted module (a larger ``r`` is refused at attach).
        alpha: scale numerator; the update is multiplied by ``alpha / r`` (as in LoRA, and in
            the authors' code, which builds on peft's LoRA).
    """

    method = "loraxs"

    r: int = field(default=8, metadata={"aliases": ("rank",)})
    alpha: float = 16.0

    def validate(self) -> None:
        check(self.r > 0, f"{self.method} field 'r' must be a positive integer, got {self.r!r}; try r=8")
        check(self.alpha > 0, f"{self.method} field 'alpha' must be positive, got {self.alpha!r}; try alpha=16")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def build(model: nn.Module, config: LoRAXSConfig) -> Placements:
    def make(path: str, module: nn.Module, fan_in: int, fan_out: int, transposed: bool):
        check_rank("loraxs", path, module, config.r)
        return LoRAXSLinear(fan_in, fan_out, config.r, config.scaling, transposed)

    return per_linear(model, config, DEFAULT_ROLES, make)


register_method(MethodSpec(
    "loraxs", LoRAXSConfig, build, size_option="r", mergeable=True, identity_at_init=True,
    summary="r x r matrix trained between frozen factors from the SVD of each weight (LoRA-XS)",
    default_lr=1e-2, mixing=Mixing("batched"),
    peft_refusal="peft has no LoRA-XS adapter: its frozen SVD factors and r x r matrix have no peft layout"))
