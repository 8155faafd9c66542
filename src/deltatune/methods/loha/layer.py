"""The LoHa unit, and the training-time dropouts it shares with LoKr."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...core.build import first_input
from ...core.rows import as_rows, gathered, per_delta_post
from ...core.slot import get_slot
from ...core.weight_delta import WeightDelta
from .config import LoHaConfig, LycorisConfig


class LycorisDropout:
    """LyCORIS's two training-time dropouts, as peft applies them.

    Per call in training: the whole delta is skipped with probability ``module_dropout``;
    otherwise each output row of ``dW`` is kept with probability ``1 - rank_dropout`` (one
    mask for the batch), and with ``rescale`` the kept rows are divided by the kept fraction.
    Dropping a row of ``dW`` is masking that feature of ``dW x``, which is how it is applied.
    The random draws follow peft's order (one number, then the mask), from torch's generator.
    """

    def __init__(self, config: LycorisConfig, rescale: bool):
        self.rank_dropout = config.rank_dropout
        self.module_dropout = config.module_dropout
        self.rescale = rescale

    @property
    def active(self) -> bool:
        return self.rank_dropout > 0 or self.module_dropout > 0

    def skips(self) -> bool:
        """Whether this call leaves the delta out (draws only when a dropout is set)."""
        return self.active and bool(torch.rand(1) <= self.module_dropout)

    def apply(self, change: torch.Tensor) -> torch.Tensor:
        """``change`` (``(..., out)``, the delta's output) with its dropped features zeroed."""
        if self.rank_dropout <= 0:
            return change
        keep = (torch.rand(change.shape[-1]) > self.rank_dropout).to(change.dtype)
        if self.rescale and keep.any():
            keep = keep / keep.mean()
        return change * keep.to(change.device)


def dropping(units) -> bool:
    """Whether any of ``units`` is training with a dropout (mixed batches then run per delta)."""
    return any(u is not None and u.training and u.dropout.active for u in units)


class LoHaLinear(WeightDelta):
    """``dW = s * (W1a W1b) * (W2a W2b)``, ``W1a, W2a: (out, r)``, ``W1b, W2b: (r, in)``, ``s = alpha / r``.

    Hyeon-Woo et al., 2022 (FedPara, arXiv:2108.06098): the element-wise product of two
    rank-``r`` matrices has rank up to ``r^2`` for the parameters of two rank-``r`` LoRAs.
    """

    def __init__(self, fan_in: int, fan_out: int, config: LoHaConfig, transposed: bool = False):
        super().__init__(fan_in, fan_out, transposed)
        r = config.r
        self.r, self.alpha, self.scaling = r, config.alpha, config.scaling
        self.dropout = LycorisDropout(config, rescale=True)
        self.w1_a = nn.Parameter(torch.empty(fan_out, r))
        self.w1_b = nn.Parameter(torch.empty(r, fan_in))
        self.w2_a = nn.Parameter(torch.empty(fan_out, r))
        self.w2_b = nn.Parameter(torch.empty(r, fan_in))
        for param in (self.w1_a, self.w1_b, self.w2_a, self.w2_b):
            nn.init.kaiming_uniform_(param, a=math.sqrt(5))
        if config.init == "zero":  # one zero factor is enough for dW = 0 (peft's choice: W2b)
            nn.init.zeros_(self.w2_b)

    def delta_weight(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        return ((self.w1_a @ self.w1_b) * (self.w2_a @ self.w2_b)) * self.scaling

    def hadamard_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U, V)`` with ``dW = U V``, rank ``r^2``: ``U[:, i r + j] = s W1a[:, i] W2a[:, j]``,
        ``V[i r + j] = W1b[i] W2b[j]`` (element-wise), since
        ``(W1a W1b)[o, n] (W2a W2b)[o, n] = sum_ij W1a[o, i] W2a[o, j] W1b[i, n] W2b[j, n]``."""
        left = (self.w1_a.unsqueeze(2) * self.w2_a.unsqueeze(1)).reshape(self.fan_out, -1) * self.scaling
        right = (self.w1_b.unsqueeze(1) * self.w2_b.unsqueeze(0)).reshape(-1, self.fan_in)
        return left, right

    def forward_post(self, module, args, kwargs, output):
        if self.training and self.dropout.skips():
            return output
        delta = self.delta_weight()
        change = F.linear(first_input(args, kwargs).to(delta.dtype), delta)
        if self.training:
            change = self.dropout.apply(change)
        return output + change.to(output.dtype)

    @classmethod
    def mixed_post(cls, units, module, args, kwargs, output, routing):
        """Each row through its own LoHa as a rank-``r^2`` product: two batched products over
        the rows' stacked factors (:meth:`hadamard_factors`; base rows get zeros). Training
        with a dropout runs each delta on its own rows instead (its own random masks)."""
        if dropping(units):
            return per_delta_post(units, module, args, kwargs, output, routing)
        batch = routing.index.numel()
        cache = get_slot(module).mixed_cache
        right_t = gathered(units, routing.index, lambda u: u.hadamard_factors()[1].T, 0.0, cache, "loha_right_t")
        left_t = gathered(units, routing.index, lambda u: u.hadamard_factors()[0].T, 0.0, cache, "loha_left_t")
        x = as_rows(first_input(args, kwargs), batch).to(right_t.dtype)
        rows = torch.baddbmm(as_rows(output, batch).to(right_t.dtype), torch.bmm(x, right_t), left_t)
        return rows.view(output.shape).to(output.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, alpha={self.alpha:g}"
