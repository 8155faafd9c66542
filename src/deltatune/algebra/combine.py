"""Merging N weight differences of one parameter: pure functions on lists of dense tensors.

Each function takes the per-source differences ``deltas`` (same shape) and one weight per
source, and returns the merged difference. Nothing here knows about models or files; see
:mod:`deltatune.algebra.merging` for that.

- :func:`linear`: task arithmetic, ``sum_i w_i d_i`` (Ilharco et al., 2023, arXiv:2212.04089).
- :func:`magnitude_prune`: keep each ``d_i``'s largest-magnitude fraction ``density``, then sum.
- :func:`ties`: trim, elect sign, disjoint mean (Yadav et al., 2023, arXiv:2306.01708).
- :func:`dare_linear` / :func:`dare_ties`: drop each value with probability ``1 - density``
  and rescale the rest by ``1 / density`` (Yu et al., 2023, arXiv:2311.03099), then sum or
  elect sign and take the disjoint mean.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch

from ..errors import ConfigError, MergeError


def check_weights(weights: Sequence[float], count: int) -> list[float]:
    """``weights`` as floats, checked: one finite number per source.

    Raises:
        ConfigError: wrong length or a NaN/inf weight.
    """
    values = [float(w) for w in weights]
    if len(values) != count:
        raise ConfigError(f"got {len(values)} weights for {count} deltas; pass one weight per delta, in order")
    bad = [w for w in values if not math.isfinite(w)]
    if bad:
        raise ConfigError(f"merge weights must be finite numbers, got {values}")
    return values


def check_density(density: float) -> float:
    """``density`` checked to lie in (0, 1]."""
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
        raise ConfigError(f"density is the fraction of values kept and must be in (0, 1], got {density!r}; e.g. 0.5")
    return float(density)


def _stack(deltas: Sequence[torch.Tensor], weights: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """The deltas stacked on a new first dimension (float32 or wider) and the weights shaped to broadcast."""
    if not deltas:
        raise MergeError("nothing to merge: the list of deltas is empty")
    shapes = {tuple(d.shape) for d in deltas}
    if len(shapes) > 1:
        raise MergeError(f"deltas to merge must have one shape, got {sorted(shapes)}")
    values = check_weights(weights, len(deltas))
    dtype = torch.promote_types(deltas[0].dtype, torch.float32)
    stacked = torch.stack([d.detach().to(dtype) for d in deltas])
    weight = torch.tensor(values, dtype=dtype, device=stacked.device).view(-1, *([1] * (stacked.dim() - 1)))
    return stacked, weight


def linear(deltas: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``sum_i w_i d_i``."""
    stacked, weight = _stack(deltas, weights)
    return (stacked * weight).sum(0)


def keep_count(numel: int, density: float) -> int:
    """How many values a top-``density`` trim keeps: the nearest integer to ``density * numel``, at least 1."""
    return min(numel, max(1, math.floor(check_density(density) * numel + 0.5)))


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """``delta`` with all but its ``keep_count`` largest-magnitude values set to zero."""
    flat = delta.reshape(-1)
    k = keep_count(flat.numel(), density)
    if k >= flat.numel():
        return delta.clone()
    kept = torch.zeros_like(flat)
    index = flat.abs().topk(k).indices
    kept[index] = flat[index]
    return kept.view_as(delta)


def drop_and_rescale(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: each value kept with probability ``density`` and divided by it, else zero.

    The expectation over the random mask is ``delta`` itself.
    """
    density = check_density(density)
    keep = torch.rand(delta.shape, generator=generator, device=generator.device) < density
    return torch.where(keep.to(delta.device), delta / density, torch.zeros_like(delta))


def elect_sign(weighted: torch.Tensor) -> torch.Tensor:
    """Per position, the sign (+1 or -1) of the total over sources (dimension 0); a zero total elects +1."""
    return torch.where(weighted.sum(0) >= 0, 1.0, -1.0).to(weighted.dtype)


def disjoint_mean(weighted: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Per position, the mean of the non-zero source values whose sign agrees with ``sign`` (0 if none)."""
    agrees = (weighted.sign() == sign) & (weighted != 0)
    total = (weighted * agrees).sum(0)
    return total / agrees.sum(0).clamp(min=1)


def magnitude_prune(deltas: Sequence[torch.Tensor], weights: Sequence[float], density: float) -> torch.Tensor:
    """``sum_i w_i trim(d_i)``."""
    stacked, weight = _stack(deltas, weights)
    return (torch.stack([trim(d, density) for d in stacked]) * weight).sum(0)


def ties(deltas: Sequence[torch.Tensor], weights: Sequence[float], density: float) -> torch.Tensor:
    """TIES-merging: trim each ``d_i`` to its top ``density``, weight it, elect each position's
    sign by total mass, and average the values that agree with it.

    The sign is elected on the weighted values, so a negative weight (forgetting a task)
    votes against that task's signs.
    """
    stacked, weight = _stack(deltas, weights)
    weighted = torch.stack([trim(d, density) for d in stacked]) * weight
    return disjoint_mean(weighted, elect_sign(weighted))


def dare_linear(
    deltas: Sequence[torch.Tensor], weights: Sequence[float], density: float, generator: torch.Generator
) -> torch.Tensor:
    """``sum_i w_i dare(d_i)``: DARE's random drop and rescale, then a weighted sum."""
    stacked, weight = _stack(deltas, weights)
    return (torch.stack([drop_and_rescale(d, density, generator) for d in stacked]) * weight).sum(0)


def dare_ties(
    deltas: Sequence[torch.Tensor], weights: Sequence[float], density: float, generator: torch.Generator
) -> torch.Tensor:
    """DARE's random drop and rescale in place of TIES's trim, then sign election and disjoint mean."""
    stacked, weight = _stack(deltas, weights)
    weighted = torch.stack([drop_and_rescale(d, density, generator) for d in stacked]) * weight
    return disjoint_mean(weighted, elect_sign(weighted))


def metrics_weights(values: Sequence[float], penalty: float) -> list[float]:
    """Weights ``w_i = exp(-penalty * v_i) / sum_j exp(-penalty * v_j)`` from one recorded metric per source.

    With a loss as ``v`` and ``penalty > 0`` the better-fitting deltas weigh more; ``penalty = 0``
    is the plain mean; a negative penalty favours larger values (accuracy, steps).
    """
    if not math.isfinite(penalty):
        raise ConfigError(f"penalty must be a finite number, got {penalty!r}")
    bad = [v for v in values if not math.isfinite(v)]
    if not values or bad:
        raise ConfigError(f"metrics-weighted merging needs one finite metric value per delta, got {list(values)}")
    scores = [-penalty * v for v in values]
    top = max(scores)
    raw = [math.exp(s - top) for s in scores]
    return [r / sum(raw) for r in raw]


def generator_for(seed: int, key: str) -> torch.Generator:
    """A CPU generator seeded from ``(seed, key)``: one parameter's random drops do not depend
    on which other parameters are merged, or in what order."""
    digest = hashlib.sha256(f"{int(seed)}:{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
