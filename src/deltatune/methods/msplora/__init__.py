"""MSPLoRA: a global, a group and a layer-specific LoRA summed on every adapted module.

Zhao, Yu & Yang, 2025, "MSPLoRA: A Multi-Scale Pyramid Low-Rank Adaptation for Efficient
Model Fine-Tuning" (arXiv:2503.21838). For an adapted module ``l`` of a kind (same role and
shape, see :mod:`deltatune.methods.tiedlora.sharing`) in layer ``n``:

    dW_l = (alpha / r_global) B_g A_g + (alpha / r_group) B_{g(n)} A_{g(n)} + (alpha / r_layer) B_l A_l

where ``B_g A_g`` is shared by every module of the kind, ``B_{g(n)} A_{g(n)}`` by the
modules of the kind in the consecutive layers ``n // group_size``, and ``B_l A_l`` is the
module's own; ranks shrink from global to layer (the pyramid). Every ``B`` starts at zero,
every ``A`` as LoRA's, so a new delta changes nothing. As one low-rank product, ``dW_l`` is
``[s_g B_g, s_m B_m, s_l B_l] @ [A_g; A_m; A_l]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ...core.build import linear_shape, per_module, with_shared
from ...core.config import DeltaConfig, check
from ...core.registry import MethodSpec, Mixing, register_method
from ...core.roles import default_targets
from ...core.unit import Placements
from ..tiedlora.sharing import LowRankFactors, ModuleKinds, SharedLowRankLinear, SharedTable

__all__ = ["MSPLoRAConfig", "MSPLoRALinear"]

DEFAULT_ROLES = ["q|qkv", "v"]


@dataclass(frozen=True)
class MSPLoRAConfig(DeltaConfig):
    """Multi-scale pyramid LoRA: a global, a group and a layer-specific low-rank update per module.

    Args:
        r_global: rank of the update shared by all adapted modules of a kind (role and shape).
        r_group: rank of the update shared by a kind's modules in ``group_size`` consecutive layers.
        r_layer: rank of each module's own update.
        group_size: consecutive layers (transformer blocks) sharing one group update.
        alpha: scale numerator; each scale's update is multiplied by ``alpha / its rank``.
    """

    method = "msplora"

    r_global: int = 8
    r_group: int = 4
    r_layer: int = 2
    group_size: int = 4
    alpha: float = 16.0

    def validate(self) -> None:
        for name in ("r_global", "r_group", "r_layer", "group_size"):
            value = getattr(self, name)
            check(value > 0, f"msplora {name} must be a positive integer, got {value!r}")
        check(self.r_global >= self.r_group >= self.r_layer,
              f"msplora ranks must not grow from global to layer (the pyramid), got r_global={self.r_global}, "
              f"r_group={self.r_group}, r_layer={self.r_layer}; e.g. 8, 4, 2")
        check(self.alpha > 0, f"msplora alpha must be positive, got {self.alpha!r}")

    @property
    def scalings(self) -> tuple[float, float, float]:
        """``alpha / r`` of the global, group and layer updates."""
        return self.alpha / self.r_global, self.alpha / self.r_group, self.alpha / self.r_layer


class MSPLoRALinear(SharedLowRankLinear):
    """One module's ``s_g B_g A_g + s_m B_m A_m + s_l B A``: the global and group pairs belong
    to the delta's :class:`~deltatune.methods.tiedlora.sharing.SharedTable`, ``A``, ``B`` to the module."""

    def __init__(self, global_pair: LowRankFactors, group_pair: LowRankFactors, fan_in: int, fan_out: int,
                 transposed: bool, config: MSPLoRAConfig, group: int):
        super().__init__(fan_in, fan_out, transposed)
        self._shared = (global_pair, group_pair)  # plain references: the table owns (and counts, saves) them
        self.group = group
        self.scalings = config.scalings
        self.A = nn.Parameter(torch.empty(config.r_layer, fan_in))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.B = nn.Parameter(torch.zeros(fan_out, config.r_layer))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = (*self._shared, self)
        B = torch.cat([pair.B * scale for pair, scale in zip(pairs, self.scalings)], dim=1)
        return B, torch.cat([pair.A for pair in pairs], dim=0)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group={self.group}"


def build(model: nn.Module, config: MSPLoRAConfig) -> Placements:
    kinds = ModuleKinds(model)
    table = SharedTable()

    def make(path: str, module: nn.Module):
        shape = linear_shape(module)
        if shape is None:
            weight = getattr(module, "weight", None)
            size = f" with weight {list(weight.shape)}" if isinstance(weight, torch.Tensor) else ""
            return f"{type(module).__name__}{size} is not a Linear or Conv1D layer (msplora adapts linear weights)"
        fan_in, fan_out, transposed = shape
        kind = kinds.kind(path, fan_in, fan_out)
        group = kinds.layer(path, kind) // config.group_size
        global_pair = table.group(kind, lambda: LowRankFactors(fan_in, fan_out, config.r_global))
        group_pair = table.group(f"{kind}_group{group}", lambda: LowRankFactors(fan_in, fan_out, config.r_group))
        return MSPLoRALinear(global_pair, group_pair, fan_in, fan_out, transposed, config, group)

    placements = per_module(model, config, lambda: default_targets(model, DEFAULT_ROLES, config.method), make)
    return with_shared(model, table, placements)


register_method(MethodSpec(
    "msplora", MSPLoRAConfig, build, size_option="r_global", mergeable=True, identity_at_init=True,
    summary="global + group-of-layers + layer-specific LoRA per module, ranks shrinking (MSPLoRA)",
    default_lr=2e-3, mixing=Mixing("batched"),
    peft_refusal="peft has no adapter whose low-rank factors are shared across layers (MSPLoRA)"))
