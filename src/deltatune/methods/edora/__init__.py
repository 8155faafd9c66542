"""EDoRA: DoRA's magnitude and direction, with LoRA-XS's frozen SVD factors in the direction.

Nasiri and Garraghan, 2025, "EDoRA: Efficient Weight-Decomposed Low-Rank Adaptation via
Singular Value Decomposition" (arXiv:2501.12067). With the truncated SVD ``W ~ U_r S_r V_r^T``
of each adapted ``(out, in)`` weight and ``dW = (alpha / r) U_r R S_r V_r^T`` (as LoRA-XS)::

    W' = m * (W + dW) / ||W + dW||_row,    y = W' x + b

``m`` (one value per output, started at the row norms of ``W`` as in DoRA) and ``R`` (``r x r``,
started at zero) train; the row norm is taken over the input dimension for each output, as in
peft's DoRA, and is detached from the graph (DoRA, section 4.3). At start ``W' = W``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ...core.build import per_linear
from ...core.registry import MethodSpec, Mixing, register_method
from ...core.unit import Placements
from ..loraxs import LoRAXSConfig, check_rank
from .layer import EDoRALinear

__all__ = ["EDoRAConfig", "EDoRALinear"]

DEFAULT_ROLES = ["q|qkv", "v"]


@dataclass(frozen=True)
class EDoRAConfig(LoRAXSConfig):
    """EDoRA: ``m * (W + dW) / ||W + dW||_row`` with ``dW = (alpha / r) U_r R S_r V_r^T``.

    Args:
        r: number of singular vectors kept; ``R`` is ``r x r``. At most ``min(in, out)`` of
            every adapted module (a larger ``r`` is refused at attach).
        alpha: scale numerator; ``dW`` is multiplied by ``alpha / r``.
    """

    method = "edora"


def build(model: nn.Module, config: EDoRAConfig) -> Placements:
    def make(path: str, module: nn.Module, fan_in: int, fan_out: int, transposed: bool):
        check_rank("edora", path, module, config.r)
        return EDoRALinear(fan_in, fan_out, config.r, config.scaling, transposed)

    return per_linear(model, config, DEFAULT_ROLES, make)


register_method(MethodSpec(
    "edora", EDoRAConfig, build, size_option="r", mergeable=True, identity_at_init=True,
    summary="DoRA magnitude and direction with LoRA-XS's frozen SVD factors and a trained r x r matrix (EDoRA)",
    default_lr=1e-2, mixing=Mixing("batched"),
    peft_refusal="peft has no EDoRA adapter: its DoRA (use_dora) trains full LoRA factors, not an r x r matrix "
                 "between frozen SVD factors"))
