"""RoAd: 2D rotary adaptation of a linear module's outputs.

Liao et al., 2024, "3-in-1: 2D Rotary Adaptation for Efficient Finetuning, Efficient
Batching and Composability" (arXiv:2409.00119).

The outputs of an adapted module are split into groups of ``g = group_size``; within a group,
element ``j`` and element ``j + g/2`` form a 2D vector that is rotated and scaled::

    [y_j      ]   [a cos t   -a sin t] [h_j      ]
    [y_{j+g/2}] = [a sin t    a cos t] [h_{j+g/2}],     h = W x + b

with learned ``a`` (start 1) and ``t`` (start 0), so a new delta is the identity. ``road_1``
shares one ``(a, t)`` by the two elements of a pair, ``road_2`` gives every element its own,
``road_4`` separate ones to the cosine and the sine entry. Running it is an element-wise
product, so rows of different deltas share a batch cheaply; merged, ``W <- R W`` and
``b <- R b``.
"""

from __future__ import annotations

from torch import nn

from ...core.build import per_linear
from ...core.registry import MethodSpec, Mixing, register_method
from ...core.unit import Placements
from ...errors import NotApplicableError
from .config import RoadConfig
from .layer import RoadUnit
from .peft import RoadCodec

__all__ = ["RoadConfig", "RoadUnit"]

DEFAULT_ROLES = ["q|qkv", "v"]


def build(model: nn.Module, config: RoadConfig) -> Placements:
    def make(path: str, module: nn.Module, fan_in: int, fan_out: int, transposed: bool):
        if fan_out % config.group_size:
            raise NotApplicableError(
                f"road cannot adapt {path!r} ({type(module).__name__}, in={fan_in}, out={fan_out}): its output width "
                f"{fan_out} is not a multiple of group_size={config.group_size}; choose a group_size that divides "
                f"every target's output width, or exclude this module"
            )
        return RoadUnit(fan_out, config.variant, config.group_size, transposed)

    return per_linear(model, config, DEFAULT_ROLES, make)


register_method(MethodSpec(
    "road", RoadConfig, build, mergeable=True, identity_at_init=True,
    summary="learned 2D rotation and scaling of pairs of a module's outputs (RoAd)",
    default_lr=1e-2, mixing=Mixing("batched"), peft=RoadCodec()))
