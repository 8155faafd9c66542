"""The ETHER unit: block-diagonal hyperplane reflections multiplying a linear module's weight.

Every reflection is applied as ``x - 2 (x . u) u / |u|^2`` (ETHER) or
``x - (x . u) u / |u|^2 + (x . v) v / |v|^2`` (ETHER+), block by block, so no ``n x n``
matrix is formed; both matrices are symmetric, so it does not matter from which side a
row is multiplied.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...core.weight_delta import WeightDelta


def reflect(rows: torch.Tensor, blocks: int, u: torch.Tensor, v: torch.Tensor | None = None) -> torch.Tensor:
    """``rows H`` for the block-diagonal ``H`` of ``blocks`` blocks: ETHER's
    ``I - 2 u u^T / |u|^2`` without ``v``, ETHER+'s ``I - u u^T / |u|^2 + v v^T / |v|^2`` with it.

    Args:
        rows: ``(..., width)``; ``width = blocks * size``.
        u, v: ``(blocks, size)`` hyperplane normals.
    """
    blocked = rows.reshape(*rows.shape[:-1], blocks, -1)
    unit_u = u / u.norm(dim=-1, keepdim=True)
    along_u = (blocked * unit_u).sum(-1, keepdim=True) * unit_u
    if v is None:
        out = blocked - 2 * along_u
    else:
        unit_v = v / v.norm(dim=-1, keepdim=True)
        out = blocked - along_u + (blocked * unit_v).sum(-1, keepdim=True) * unit_v
    return out.reshape(rows.shape)


def _normals(blocks: int, size: int) -> nn.Parameter:
    """Hyperplane normals initialised as the ETHER authors do (Kaiming-uniform, ``a = sqrt(5)``:
    uniform in ``+-1/sqrt(size)``), from torch's RNG."""
    bound = 1 / math.sqrt(size)
    return nn.Parameter(torch.empty(blocks, size).uniform_(-bound, bound))


class ETHERLinear(WeightDelta):
    """ETHER on a Linear or GPT-2 ``Conv1D`` layer.

    ``ether``: ``W H`` with ``H = diag(I - 2 u_i u_i^T / |u_i|^2)`` over the input features (a
    reflection: the model changes at once, by a bounded amount). ``ether_plus``:
    ``H~ W H`` with ``H = diag(I - u_i u_i^T/|u_i|^2 + v_i v_i^T/|v_i|^2)`` over the input features
    and ``H~`` (its own ``u, v``) over the output features; ``v = u`` at start, so ``H = I``.

    Args:
        fan_in, fan_out, transposed: the module's shape and weight layout.
        blocks: diagonal blocks of each ``H`` (dividing the widths it acts on).
        plus: ETHER+ (two-sided, identity at start) instead of ETHER.
    """

    def __init__(self, fan_in: int, fan_out: int, transposed: bool, blocks: int, plus: bool = False):
        super().__init__(fan_in, fan_out, transposed)
        self.blocks, self.plus = blocks, plus
        #: normals of the input-side hyperplanes, one per block
        self.u = _normals(blocks, fan_in // blocks)
        if plus:
            self.v = nn.Parameter(self.u.detach().clone())
            #: the output side's normals (ETHER+ only)
            self.u_out = _normals(blocks, fan_out // blocks)
            self.v_out = nn.Parameter(self.u_out.detach().clone())

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.plus:
            return reflect(weight, self.blocks, self.u.float()) - weight
        changed = reflect(weight, self.blocks, self.u.float(), self.v.float())  # W H
        changed = reflect(changed.T, self.blocks, self.u_out.float(), self.v_out.float()).T  # H~ (W H)
        return changed - weight

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, blocks={self.blocks}, {'ether_plus' if self.plus else 'ether'}"
