"""The LoKr unit: a Kronecker product of two (optionally low-rank) factors, applied without
forming it."""

from __future__ import annotations

import math

import torch
from torch import nn

from ...core.build import first_input
from ...core.rows import as_rows, gathered, per_delta_post
from ...core.slot import get_slot
from ...core.weight_delta import WeightDelta
from ..loha.layer import LycorisDropout, dropping
from .config import LoKrConfig


def factorization(width: int, factor: int = -1) -> tuple[int, int]:
    """Two numbers whose product is ``width``, as LyCORIS (and peft) split a layer's width.

    ``factor`` dividing ``width`` gives ``(factor, width // factor)`` as it is. Otherwise the
    divisors of ``width`` are walked upwards (only up to ``factor`` when it is positive) until
    one reaches the square root, and that divisor with its cofactor is returned, smaller first:
    with ``-1`` the pair nearest the square root (``(8, 16)`` for 128, ``(1, 127)`` for 127).
    """
    if factor > 0 and width % factor == 0:
        return factor, width // factor
    limit = width if factor <= 0 else factor
    chosen = 1
    for divisor in range(2, width + 1):
        if width % divisor:
            continue
        if divisor > limit:
            break
        chosen = divisor
        if chosen * chosen >= width:
            break
    other = width // chosen
    return min(chosen, other), max(chosen, other)


class LoKrLinear(WeightDelta):
    """``dW = s * kron(W1, W2)``, ``W1: (out_l, in_m)``, ``W2: (out_k, in_n)``, ``s = alpha / r``;
    each factor a full matrix or a rank-``r`` product (``W1a W1b``, ``W2a W2b``).

    Unmerged, ``kron(W1, W2) x`` is ``W1 X W2^T`` with ``x`` read as an ``(in_m, in_n)`` matrix
    ``X`` and the result read back as a vector of ``out_l * out_k``: ``dW`` is never formed.
    """

    def __init__(self, fan_in: int, fan_out: int, config: LoKrConfig, transposed: bool = False):
        super().__init__(fan_in, fan_out, transposed)
        r = config.r
        self.r, self.alpha, self.scaling = r, config.alpha, config.scaling
        self.dropout = LycorisDropout(config, rescale=config.rank_dropout_scale)
        out_l, out_k = factorization(fan_out, config.decompose_factor)
        in_m, in_n = factorization(fan_in, config.decompose_factor)
        self.shapes = ((out_l, in_m), (out_k, in_n))
        # which factors are low rank: peft's rule, kept so the tensors match its files
        low_rank_w1 = config.decompose_both and r < max(out_l, in_m) / 2
        low_rank_w2 = r < max(out_k, in_n) / 2
        self.w1 = self.w1_a = self.w1_b = self.w2 = self.w2_a = self.w2_b = None
        if low_rank_w1:
            self.w1_a, self.w1_b = nn.Parameter(torch.empty(out_l, r)), nn.Parameter(torch.empty(r, in_m))
        else:
            self.w1 = nn.Parameter(torch.empty(out_l, in_m))
        if low_rank_w2:
            self.w2_a, self.w2_b = nn.Parameter(torch.empty(out_k, r)), nn.Parameter(torch.empty(r, in_n))
        else:
            self.w2 = nn.Parameter(torch.empty(out_k, in_n))
        for param in self.parameters():
            nn.init.kaiming_uniform_(param, a=math.sqrt(5))
        # a zero factor makes dW = 0: W1 (or W1a) for "zero", W2 (or W2b) for "lycoris"
        zero = {"zero": self.w1 if self.w1 is not None else self.w1_a,
                "lycoris": self.w2 if self.w2 is not None else self.w2_b}.get(config.init)
        if zero is not None:
            nn.init.zeros_(zero)

    def left(self) -> torch.Tensor:
        """``W1`` as an ``(out_l, in_m)`` matrix."""
        return self.w1 if self.w1 is not None else self.w1_a @ self.w1_b

    def right(self) -> torch.Tensor:
        """``W2`` as an ``(out_k, in_n)`` matrix."""
        return self.w2 if self.w2 is not None else self.w2_a @ self.w2_b

    def delta_weight(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        return torch.kron(self.left(), self.right()) * self.scaling

    def kron_apply(self, x: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """``x kron(left, right)^T`` for ``x: (..., in)``, through ``left X right^T`` per vector
        (``left``, ``right`` may carry a leading batch dimension matching ``x``'s first)."""
        (out_l, in_m), (out_k, in_n) = self.shapes
        grid = x.reshape(*x.shape[:-1], in_m, in_n)
        if left.dim() == 3:  # per-row factors: (batch, 1, ...) against x (batch, tokens, in_m, in_n)
            left, right = left.unsqueeze(1), right.unsqueeze(1)
        # of the two orders, the one with fewer multiplications per vector
        if out_l * in_n * (in_m + out_k) <= out_k * in_m * (in_n + out_l):
            result = (left @ grid) @ right.transpose(-1, -2)
        else:
            result = left @ (grid @ right.transpose(-1, -2))
        return result.reshape(*x.shape[:-1], out_l * out_k)

    def forward_post(self, module, args, kwargs, output):
        if self.training and self.dropout.skips():
            return output
        left = self.left()
        change = self.kron_apply(first_input(args, kwargs).to(left.dtype), left * self.scaling, self.right())
        if self.training:
            change = self.dropout.apply(change)
        return output + change.to(output.dtype)

    @classmethod
    def mixed_post(cls, units, module, args, kwargs, output, routing):
        """Each row through its own LoKr, batched over the rows' stacked ``W1``, ``W2`` when the
        deltas at this module split the widths alike (base rows get zero factors); otherwise, or
        in training with a dropout, each delta runs on its own rows."""
        present = [u for u in units if u is not None]
        if dropping(units) or len({u.shapes for u in present}) > 1:
            return per_delta_post(units, module, args, kwargs, output, routing)
        batch = routing.index.numel()
        cache = get_slot(module).mixed_cache
        left = gathered(units, routing.index, lambda u: u.left() * u.scaling, 0.0, cache, "lokr_left")
        right = gathered(units, routing.index, lambda u: u.right(), 0.0, cache, "lokr_right")
        x = as_rows(first_input(args, kwargs), batch).to(left.dtype)
        change = present[0].kron_apply(x, left, right)
        return (as_rows(output, batch) + change.to(output.dtype)).view(output.shape)

    def extra_repr(self) -> str:
        (out_l, in_m), (out_k, in_n) = self.shapes
        return (f"{super().extra_repr()}, r={self.r}, alpha={self.alpha:g}, "
                f"W1=({out_l}, {in_m}){'' if self.w1 is not None else ' low rank'}, "
                f"W2=({out_k}, {in_n}){'' if self.w2 is not None else ' low rank'}")
