"""The RoAd unit: a learned 2x2 rotation and scaling of pairs of a module's outputs."""

from __future__ import annotations

import torch
from torch import nn

from ...core.rows import as_rows, gathered
from ...core.slot import get_slot
from ...core.unit import DeltaUnit

#: trainable angles (and scales) per output element, by variant
SIZE_PER_OUTPUT = {"road_1": 0.5, "road_2": 1, "road_4": 2}


def partner_index(width: int, group_size: int) -> torch.Tensor:
    """For every output position, the position it is paired with: within each group of
    ``group_size``, element ``j`` pairs with ``j + group_size / 2`` (and back)."""
    half = group_size // 2
    position = torch.arange(width)
    return torch.where(position % group_size < half, position + half, position - half)


def swap_halves(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """``x[..., partner_index(width, group_size)]`` as a reshape and a flip (cheaper to
    differentiate than an index)."""
    return x.unflatten(-1, (-1, 2, group_size // 2)).flip(-2).flatten(-3)


def partner_sign(width: int, group_size: int) -> torch.Tensor:
    """``-1`` for the first element of each pair, ``+1`` for the second (the rotation's
    ``-sin`` and ``+sin``)."""
    position = torch.arange(width)
    return torch.where(position % group_size < group_size // 2, -1.0, 1.0)


class RoadUnit(DeltaUnit):
    """``y = R (W x + b)``: ``R`` rotates and scales each pair ``(y_j, y_{j+g/2})`` of every
    group of ``g = group_size`` outputs by ``[[a cos t, -a sin t], [a sin t, a cos t]]``.

    ``theta`` and ``alpha`` hold the angles and scales: ``road_1`` one pair ``(a, t)`` per
    output pair (``out / 2`` each), ``road_2`` one per output element (``out``), ``road_4``
    separate ones for the cosine and the sine entry of each element (``2 out``, laid out per
    group as ``[cosine part (g), sine part (g)]``). At start ``a = 1, t = 0``: ``R = I``.

    Args:
        fan_out: the module's output width (a multiple of ``group_size``).
        variant: ``"road_1"``, ``"road_2"`` or ``"road_4"``.
        group_size: the width of the groups whose halves are paired (even).
        transposed: the module stores its weight ``(in, out)`` (GPT-2 ``Conv1D``).
    """

    def __init__(self, fan_out: int, variant: str, group_size: int, transposed: bool = False):
        super().__init__()
        self.fan_out, self.variant, self.group_size, self.transposed = fan_out, variant, group_size, transposed
        size = int(fan_out * SIZE_PER_OUTPUT[variant])
        self.theta = nn.Parameter(torch.zeros(size))
        self.alpha = nn.Parameter(torch.ones(size))
        self.register_buffer("partner", partner_index(fan_out, group_size), persistent=False)
        self.register_buffer("sign", partner_sign(fan_out, group_size), persistent=False)

    def coefficients(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(diagonal, off_diagonal)``, each ``(out,)`` float32: ``y_j = d_j x_j + o_j x_partner(j)``
        (the sign of ``-sin`` folded into ``o``)."""
        theta, alpha = self.theta.float(), self.alpha.float()
        groups, g = self.fan_out // self.group_size, self.group_size
        if self.variant == "road_1":  # one (a, t) per pair, shared by both of its elements
            theta = theta.view(groups, 1, g // 2).expand(groups, 2, g // 2).reshape(-1)
            alpha = alpha.view(groups, 1, g // 2).expand(groups, 2, g // 2).reshape(-1)
            cos_part = sin_part = theta
            cos_scale = sin_scale = alpha
        elif self.variant == "road_2":
            cos_part = sin_part = theta
            cos_scale = sin_scale = alpha
        else:  # road_4
            theta, alpha = theta.view(groups, 2, g), alpha.view(groups, 2, g)
            cos_part, sin_part = theta[:, 0].reshape(-1), theta[:, 1].reshape(-1)
            cos_scale, sin_scale = alpha[:, 0].reshape(-1), alpha[:, 1].reshape(-1)
        return cos_scale * cos_part.cos(), self.sign * sin_scale * sin_part.sin()

    def rotation(self) -> torch.Tensor:
        """``R`` as a dense ``(out, out)`` matrix (for inspection and task vectors)."""
        diagonal, off = self.coefficients()
        matrix = torch.diag(diagonal)
        matrix[torch.arange(self.fan_out), self.partner] += off
        return matrix

    def forward_post(self, module, args, kwargs, output):
        diagonal, off = self.coefficients()
        y = output.to(diagonal.dtype)
        return (y * diagonal + swap_halves(y, self.group_size) * off).to(output.dtype)

    @classmethod
    def mixed_post(cls, units, module, args, kwargs, output, routing):
        """Every row's own ``(diagonal, off_diagonal)`` gathered from the stacked deltas
        (ones and zeros for base rows): element-wise products, one per group size present."""
        cache = get_slot(module).mixed_cache
        rows = as_rows(output, routing.index.numel())
        diagonal = gathered(units, routing.index, lambda u: u.coefficients()[0], 1.0, cache, "road_diagonal")
        y = rows.to(diagonal.dtype)
        result = y * diagonal.unsqueeze(1)
        for size in sorted({u.group_size for u in units if u is not None}):
            same = [u if u is not None and u.group_size == size else None for u in units]
            off = gathered(same, routing.index, lambda u: u.coefficients()[1], 0.0, cache, f"road_off_{size}")
            result = result + swap_halves(y, size) * off.unsqueeze(1)
        return result.to(output.dtype).view(output.shape)

    def merge_params(self, module, params):
        diagonal, off = self.coefficients()
        weight = params["weight"]
        dtype = weight.dtype
        if self.transposed:  # (in, out): R acts on the columns
            new_weight = weight.float() * diagonal + weight.float()[:, self.partner] * off
        else:
            new_weight = diagonal[:, None] * weight.float() + off[:, None] * weight.float()[self.partner]
        out = {"weight": new_weight.to(dtype)}
        if params.get("bias") is not None:
            bias = params["bias"].float()
            out["bias"] = (diagonal * bias + off * bias[self.partner]).to(params["bias"].dtype)
        return out

    def extra_repr(self) -> str:
        return f"out={self.fan_out}, variant={self.variant}, group_size={self.group_size}"
