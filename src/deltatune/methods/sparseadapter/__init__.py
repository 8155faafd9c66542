"""SparseAdapter: bottleneck adapters pruned at initialisation.

He, Ding, Dong, Zhang & Tao, 2022, "SparseAdapter: An Easy Approach for Improving the
Parameter-Efficiency of Adapters" (arXiv:2210.04284). Each adapter projection keeps a fixed
subset of its entries, chosen once when the delta is attached; the rest are zero for good::

    W_down = M_down ⊙ V_down      W_up = M_up ⊙ V_up        (M: fixed 0/1 masks)
    y' = y + s * (W_up act(W_down h + b_down) + b_up)       (h = y, or the module input when parallel)

a fraction ``sparsity`` of each weight matrix pruned. "Large-Sparse" widens the bottleneck to
``round(bottleneck / (1 - sparsity))`` so the kept entries number about as many as a dense
adapter of ``bottleneck``'s weights.

Only the kept entries are stored and trained (a vector of values and the flat indices of their
positions, a saved integer buffer), so pruned entries are structurally zero through training
and the trainable-parameter count is the kept count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ...core.config import DeltaConfig, check
from ...core.registry import MethodSpec, Mixing, register_method
from ...core.unit import Placements
from ...errors import DeltaFileError
from ..adapter import ACTIVATIONS, PLACEMENT_ROLES, Bottleneck, build_bottlenecks

CRITERIA = ("random", "magnitude")


@dataclass(frozen=True)
class SparseAdapterConfig(DeltaConfig):
    """Bottleneck adapters with a fixed fraction of each projection's weights pruned at attach.

    Args:
        bottleneck: width of the bottleneck (with ``large_sparse``: of the dense adapter whose
            weight count the sparse one matches).
        sparsity: fraction of each projection's weight entries pruned, in [0, 1).
        large_sparse: widen the bottleneck to ``round(bottleneck / (1 - sparsity))`` (the
            paper's "Large-Sparse" setting: the dense adapter's budget, a wider bottleneck).
        criterion: how the kept entries are chosen at initialisation: ``"random"`` (uniform) or
            ``"magnitude"`` (the largest initial ``|w|``; ties, such as the zero-started
            up-projection's, broken at random).
        placement: ``"houlsby"``, ``"pfeiffer"`` or ``"parallel"``, as for ``adapter``.
        non_linearity: one of ``relu gelu tanh silu swish``.
        scaling: factor on the adapter's output.
    """

    method = "sparseadapter"

    bottleneck: int = 64
    sparsity: float = 0.4
    large_sparse: bool = True
    criterion: Literal["random", "magnitude"] = "random"
    placement: Literal["houlsby", "pfeiffer", "parallel"] = "houlsby"
    non_linearity: str = "relu"
    scaling: float = 1.0

    def validate(self) -> None:
        check(self.bottleneck > 0, f"sparseadapter bottleneck must be a positive integer, got {self.bottleneck!r}")
        check(0.0 <= self.sparsity < 1.0, f"sparseadapter sparsity must lie in [0, 1), got {self.sparsity!r}")
        check(self.criterion in CRITERIA, f"sparseadapter criterion must be one of {CRITERIA}, got {self.criterion!r}")
        check(self.placement in PLACEMENT_ROLES,
              f"sparseadapter placement must be one of {sorted(PLACEMENT_ROLES)}, got {self.placement!r}")
        check(self.non_linearity in ACTIVATIONS,
              f"sparseadapter non_linearity must be one of {sorted(ACTIVATIONS)}, got {self.non_linearity!r}")

    @property
    def width(self) -> int:
        """The bottleneck the adapters are built with (widened under ``large_sparse``)."""
        return max(1, round(self.bottleneck / (1.0 - self.sparsity))) if self.large_sparse else self.bottleneck

    def kept(self, entries: int) -> int:
        """How many of a projection's ``entries`` weights are kept (at least one)."""
        return max(1, entries - round(self.sparsity * entries))


def kept_positions(weight: torch.Tensor, kept: int, criterion: str) -> torch.Tensor:
    """Sorted flat indices of the ``kept`` entries of ``weight`` that ``criterion`` keeps; draws
    from torch's global generator (a random order, which also breaks magnitude ties)."""
    order = torch.randperm(weight.numel())
    if criterion == "magnitude":
        scores = weight.detach().flatten().abs()[order]
        order = order[torch.argsort(scores, descending=True, stable=True)]
    return order[:kept].sort().values


class SparseProjection(nn.Module):
    """A ``(rows, cols)`` weight of which only the entries at ``positions`` (flat, saved) exist."""

    def __init__(self, dense: torch.Tensor, kept: int, criterion: str):
        super().__init__()
        self.shape = tuple(dense.shape)
        positions = kept_positions(dense, kept, criterion)
        self.register_buffer("positions", positions)
        self.values = nn.Parameter(dense.flatten()[positions].clone())

    def weight(self) -> torch.Tensor:
        dense = self.values.new_zeros(self.shape[0] * self.shape[1])
        return dense.scatter(0, self.positions, self.values).view(self.shape)

    def load_positions(self, positions: torch.Tensor, where: str) -> None:
        entries = self.shape[0] * self.shape[1]
        if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= entries
                                  or positions.unique().numel() != positions.numel()):
            raise DeltaFileError(f"sparseadapter {where} positions must be distinct flat indices in [0, {entries}); "
                                 f"the delta file is corrupt")
        self.positions.copy_(positions)


class SparseBottleneck(Bottleneck):
    """One site's SparseAdapter: a :class:`Bottleneck` whose projections keep fixed entries."""

    def __init__(self, in_features: int, out_features: int, config: SparseAdapterConfig):
        super().__init__(config.placement == "parallel", config.non_linearity, config.scaling)
        width = config.width
        down = torch.empty(width, in_features)
        nn.init.normal_(down, std=0.02)
        self.down = SparseProjection(down, config.kept(down.numel()), config.criterion)
        up = torch.zeros(out_features, width)
        self.up = SparseProjection(up, config.kept(up.numel()), config.criterion)
        self.down_b = nn.Parameter(torch.zeros(width))
        self.up_b = nn.Parameter(torch.zeros(out_features))

    def down_weight(self) -> torch.Tensor:
        return self.down.weight()

    def up_weight(self) -> torch.Tensor:
        return self.up.weight()

    def down_bias(self) -> torch.Tensor:
        return self.down_b

    def up_bias(self) -> torch.Tensor:
        return self.up_b

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        # int32 on file (half the bytes of int64; a projection has far fewer than 2^31 entries)
        return {**super().saved_tensors(), "down.positions": self.down.positions.to(torch.int32),
                "up.positions": self.up.positions.to(torch.int32)}

    def load_saved(self, tensors: dict[str, torch.Tensor]) -> None:
        rest = dict(tensors)
        for side in ("down", "up"):
            if f"{side}.positions" in rest:
                getattr(self, side).load_positions(rest.pop(f"{side}.positions"), side)
        super().load_saved(rest)


def build(model: nn.Module, config: SparseAdapterConfig) -> Placements:
    return build_bottlenecks(model, config, SparseBottleneck)


register_method(MethodSpec(
    "sparseadapter", SparseAdapterConfig, build, size_option="bottleneck", mergeable=False, identity_at_init=True,
    merge_refusal="a bottleneck adapter applies a non-linearity to the layer's output",
    summary="bottleneck adapters pruned at initialisation to a fixed sparsity (Large-Sparse: a wider bottleneck)",
    default_lr=1e-3, mixing=Mixing("batched"),
    peft_refusal="peft has no SparseAdapter (nor any bottleneck adapter)"))
