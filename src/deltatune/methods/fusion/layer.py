"""The AdapterFusion attention at one module (Pfeiffer et al., 2021, arXiv:2005.00247)."""

from __future__ import annotations

import torch
from torch import nn

from ...core.unit import DeltaUnit


class FusionAttention(DeltaUnit):
    """Attention over the outputs ``z_i`` of several deltas at one module, queried by the
    module's own output ``y``: ``sum_i softmax_i((Q y) . (K z_i) / T) V z_i``.

    ``Q`` and ``K`` start small and random, ``V`` at the identity, so at the start the result
    is a near-uniform mix of the deltas' outputs (exactly ``z_1`` for a single delta). The
    unit does nothing on its own; a :class:`~deltatune.compose.Fuse` block calls :meth:`fuse`.
    """

    def __init__(self, width: int, temperature: float) -> None:
        super().__init__()
        self.temperature = temperature
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        for projection in (self.query, self.key):
            nn.init.normal_(projection.weight, std=0.02)
            nn.init.zeros_(projection.bias)
        with torch.no_grad():
            self.value.weight.copy_(torch.eye(width))
        nn.init.zeros_(self.value.bias)

    def attention(self, output: torch.Tensor, candidates: list[torch.Tensor]) -> torch.Tensor:
        """The weights over ``candidates``: shape ``(*output.shape[:-1], len(candidates))``."""
        dtype = self.query.weight.dtype
        stacked = torch.stack([c.to(dtype) for c in candidates], dim=-2)  # (..., n, width)
        query = self.query(output.to(dtype)).unsqueeze(-2)  # (..., 1, width)
        scores = (query * self.key(stacked)).sum(-1) / self.temperature
        return torch.softmax(scores, dim=-1)

    def fuse(self, output: torch.Tensor, candidates: list[torch.Tensor]) -> torch.Tensor:
        """The fused output of a module whose plain output is ``output`` and whose fused deltas
        give ``candidates`` (one tensor each, all of ``output``'s shape)."""
        dtype = self.query.weight.dtype
        weights = self.attention(output, candidates)
        values = self.value(torch.stack([c.to(dtype) for c in candidates], dim=-2))
        return (weights.unsqueeze(-1) * values).sum(-2).to(output.dtype)
