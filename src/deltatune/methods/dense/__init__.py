"""``dense``: a full weight difference per adapted module.

The delta form of anything that is not low rank: a full fine-tune's task vector, or the
exact result of a TIES / DARE / magnitude-pruned merge. ``y = W x + D x`` unmerged and
``W + D`` merged, with ``D`` zero at start (so it is also a trainable, if large, method).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ...core.build import per_module
from ...core.config import DeltaConfig, check
from ...core.registry import MethodSpec, register_method
from ...core.unit import Placements
from ...core.roles import default_targets
from .layer import KINDS, DenseDelta, dense_kind

__all__ = ["KINDS", "DenseConfig", "DenseDelta", "dense_kind"]

DEFAULT_ROLES = ["q|qkv", "v"]


@dataclass(frozen=True)
class DenseConfig(DeltaConfig):
    """A full difference ``D`` on the weight (and optionally the bias) of each target.

    Targets may be Linear, GPT-2 ``Conv1D``, Embedding and LayerNorm modules.

    Args:
        weight: store a weight difference (the module's weight shape).
        bias: also store a bias difference, on targets that have a bias.
    """

    method = "dense"

    weight: bool = True
    bias: bool = False

    def validate(self) -> None:
        check(self.weight or self.bias, "DenseConfig with weight=False and bias=False stores nothing; set one of them")


def build(model: nn.Module, config: DenseConfig) -> Placements:
    def make(path: str, module: nn.Module):
        kind = dense_kind(module)
        if kind is None:
            return f"{type(module).__name__} is not a Linear, Conv1D, Embedding or LayerNorm layer"
        if not config.weight and not isinstance(getattr(module, "bias", None), nn.Parameter):
            return f"{type(module).__name__} has no bias and the config stores no weight difference"
        return DenseDelta(module, kind, config.weight, config.bias)

    return per_module(model, config, lambda: default_targets(model, DEFAULT_ROLES, config.method), make)


register_method(MethodSpec(
    "dense", DenseConfig, build, mergeable=True, identity_at_init=True,
    summary="full weight difference D added to linear, embedding and norm weights (from merges and extraction)",
    peft_refusal="peft has no full weight-difference adapter"))
