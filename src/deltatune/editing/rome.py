"""ROME: a rank-one update of one down projection (Meng et al., 2022, "Locating and Editing
Factual Associations in GPT", arXiv:2202.05262).

The key ``k*`` is the layer's input at the subject's last token (averaged over contexts), the
residual ``r = v* - (W k* + b)`` what the layer must add there (:mod:`.value`), ``C = E[k kᵀ]``
the key statistics. The update minimising ``tr(ΔW C ΔWᵀ)`` subject to ``(W + ΔW) k* = v*`` is

    ΔW = r (C⁻¹ k*)ᵀ / ((C⁻¹ k*)ᵀ k*),

returned as factors ``B = r`` (out × 1) and ``A = (C⁻¹ k*)ᵀ / ((C⁻¹ k*)ᵀ k*)`` (1 × in).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from .facts import Fact
from .sites import Site, contexts, frozen, mean_at_subject
from .stats import KeyStatistics
from .value import EditSettings, Value, optimise_value


@dataclass(frozen=True)
class LayerUpdate:
    """A layer's weight change as factors, ``ΔW = B @ A`` (out × in, float64)."""

    site: Site
    B: torch.Tensor
    A: torch.Tensor

    @property
    def delta_weight(self) -> torch.Tensor:
        return self.B @ self.A

    @property
    def rank(self) -> int:
        return self.A.shape[0]


def solve_psd(matrix: torch.Tensor, rhs: torch.Tensor, what: str) -> torch.Tensor:
    """``matrix⁻¹ rhs`` for a symmetric positive definite ``matrix`` (Cholesky, float64)."""
    factor, info = torch.linalg.cholesky_ex(matrix.to(torch.float64))
    if int(info) != 0:
        raise ConfigError(f"{what} is singular (not positive definite); compute the key statistics over more "
                          f"corpus tokens (KeyStatistics(tokens=...), --stats-tokens) than the layer's input width "
                          f"{matrix.shape[0]}")
    return torch.cholesky_solve(rhs.to(torch.float64), factor)


def rome_factors(second_moment: torch.Tensor, key: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` with ``B @ A = r (C⁻¹k)ᵀ / ((C⁻¹k)ᵀ k)``: the smallest change in the ``C``
    metric that adds ``residual`` to the layer's output at ``key``."""
    key, residual = key.to(torch.float64), residual.to(torch.float64)
    direction = solve_psd(second_moment, key.unsqueeze(1), "the key second moment C").squeeze(1)
    return residual.unsqueeze(1), (direction / (direction @ key)).unsqueeze(0)


def subject_key(model: nn.Module, tokenizer, fact: Fact, site: Site) -> torch.Tensor:
    """``k*``: the layer's input at the subject's last token, averaged over the contexts."""
    with frozen(model):
        return mean_at_subject(model, tokenizer, site.path, contexts(tokenizer, fact.prompt, fact.subject), inputs=True)


def rome(model: nn.Module, tokenizer, fact: Fact, site: Site, stats: KeyStatistics,
         settings: EditSettings) -> tuple[LayerUpdate, Value]:
    """ROME's update of ``site`` for ``fact``, and the value it reaches (the model is not changed)."""
    moment = stats.second_moments(model, tokenizer, [site.path])[site.path]
    key = subject_key(model, tokenizer, fact, site)
    value = optimise_value(model, tokenizer, fact, site.path, settings)
    B, A = rome_factors(moment, key, value.delta)
    return LayerUpdate(site, B, A), value
