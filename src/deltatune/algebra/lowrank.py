"""Best low-rank approximation of a weight delta by (randomised) SVD (Eckart–Young).

Example:
    >>> approx = low_rank(finetuned.weight - base.weight, energy=0.9)
    >>> approx.rank, approx.energy_kept, approx.relative_error
    >>> torch.testing.assert_close(approx.B @ approx.A, delta, atol=..., rtol=...)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError

# Cumulative energy fractions are compared with this slack so that energy=1.0 selects the
# numerical rank instead of failing on rounding in the last bits.
_ENERGY_SLACK = 1e-12


@dataclass(frozen=True)
class LowRank:
    """A rank-``rank`` factorisation ``B @ A`` of a delta of shape (out, in).

    Attributes:
        B: (out, rank) factor, ``U_k sqrt(S_k)``.
        A: (rank, in) factor, ``sqrt(S_k) V_k^T``.
        rank: number of kept singular directions (0 only for an all-zero delta in energy mode).
        energy_kept: kept fraction of the squared Frobenius norm, ``||B A||² / ||delta||²``
            (1.0 for an all-zero delta).
        relative_error: ``||delta - B A||_F / ||delta||_F`` (0.0 for an all-zero delta).
    """

    B: torch.Tensor
    A: torch.Tensor
    rank: int
    energy_kept: float
    relative_error: float


def low_rank(
    delta: torch.Tensor,
    rank: int | None = None,
    energy: float | None = None,
    *,
    randomized: bool = False,
    oversample: int = 8,
    seed: int = 0,
) -> LowRank:
    """Approximates ``delta`` (out, in) by ``B @ A`` of a given rank or energy.

    Exactly one of ``rank`` and ``energy`` is given. With ``rank`` the result has
    ``min(rank, out, in)`` columns (the optimal rank-k approximation). With ``energy`` it has
    the smallest rank whose approximation keeps at least that fraction of
    ``||delta||_F²``. The SVD runs in float64; B and A come back in ``delta``'s dtype and device.

    Args:
        delta: the weight change, a finite 2-D tensor (out, in).
        rank: number of singular directions to keep, >= 1.
        energy: fraction of the squared Frobenius norm to keep, in (0, 1].
        randomized: use ``torch.svd_lowrank`` (Halko et al. 2011) instead of a full SVD;
            in energy mode the sketch size doubles until the target energy is reached.
        oversample: extra sketch columns for the randomised SVD, >= 0.
        seed: seed of the randomised SVD's test matrix (the global RNG is left untouched).

    Returns:
        The factorisation with its rank, kept energy and relative error.

    Raises:
        ConfigError: both or neither of rank/energy, rank < 1, energy outside (0, 1],
            oversample < 0, a delta that is not 2-D or has non-finite values.
    """
    _check_arguments(delta, rank, energy, oversample)
    matrix = delta.detach().to(torch.float64)
    total_energy = float(matrix.square().sum())
    smallest_side = min(matrix.shape)
    if total_energy == 0.0:
        kept_rank = 0 if rank is None else min(rank, smallest_side)
        return LowRank(delta.new_zeros(matrix.shape[0], kept_rank), delta.new_zeros(kept_rank, matrix.shape[1]),
                       kept_rank, 1.0, 0.0)
    if rank is not None:
        kept_rank = min(rank, smallest_side)
        if randomized and kept_rank + oversample < smallest_side:
            u, s, v = _randomized_svd(matrix, kept_rank + oversample, seed)
        else:
            u, s, v = _exact_svd(matrix)
    elif randomized:
        u, s, v, kept_rank = _randomized_svd_for_energy(matrix, energy, total_energy, oversample, seed)
    else:
        u, s, v = _exact_svd(matrix)
        kept_rank = _rank_for_energy(s, energy, total_energy)
    return _factorise(delta, matrix, u, s, v, kept_rank, total_energy)


def check_rank_or_energy(rank: int | None, energy: float | None) -> None:
    """Raise :class:`ConfigError` unless exactly one of a rank >= 1 and an energy in (0, 1] is given."""
    if (rank is None) == (energy is None):
        raise ConfigError(f"a low-rank approximation needs exactly one of rank or energy, got rank={rank!r}, "
                          f"energy={energy!r}; pass rank=8 (a fixed rank) or energy=0.9 (fraction of the delta's energy to keep)")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ConfigError(f"rank must be an integer >= 1, got {rank!r}; "
                          "to drop a layer's delta entirely, leave the layer out")
    if energy is not None and not (isinstance(energy, (int, float)) and 0.0 < energy <= 1.0):
        raise ConfigError(f"energy must be a fraction in (0, 1], got {energy!r}; e.g. energy=0.9")


def _check_arguments(delta: torch.Tensor, rank: int | None, energy: float | None, oversample: int) -> None:
    check_rank_or_energy(rank, energy)
    if not isinstance(oversample, int) or oversample < 0:
        raise ConfigError(f"low_rank oversample must be an integer >= 0, got {oversample!r}")
    if delta.dim() != 2:
        raise ConfigError(f"low_rank needs a 2-D delta (out, in), got shape {tuple(delta.shape)}; "
                          "reshape a convolution kernel to (out, in * kernel) first")
    if not bool(torch.isfinite(delta).all()):
        raise ConfigError("low_rank got a delta with NaN or inf values; check the weights it was computed from")


def _exact_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u, s, vh.mT


def _randomized_svd(matrix: torch.Tensor, sketch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    devices = [matrix.device] if matrix.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return torch.svd_lowrank(matrix, q=sketch, niter=4)


def _rank_for_energy(singular_values: torch.Tensor, energy: float, total_energy: float) -> int:
    cumulative = torch.cumsum(singular_values.square(), 0) / total_energy
    reached = torch.nonzero(cumulative >= energy - _ENERGY_SLACK)
    return int(reached[0]) + 1 if len(reached) else len(singular_values)


def _randomized_svd_for_energy(
    matrix: torch.Tensor, energy: float, total_energy: float, oversample: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Grows the sketch until its leading singular values hold ``energy`` of the total."""
    smallest_side = min(matrix.shape)
    sketch_rank = 8
    while sketch_rank + oversample < smallest_side:
        u, s, v = _randomized_svd(matrix, sketch_rank + oversample, seed)
        cumulative = torch.cumsum(s.square(), 0) / total_energy
        reached = torch.nonzero(cumulative[:sketch_rank] >= energy - _ENERGY_SLACK)
        if len(reached):
            return u, s, v, int(reached[0]) + 1
        sketch_rank *= 2
    u, s, v = _exact_svd(matrix)
    return u, s, v, _rank_for_energy(s, energy, total_energy)


def _factorise(delta: torch.Tensor, matrix: torch.Tensor, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor,
               kept_rank: int, total_energy: float) -> LowRank:
    root = s[:kept_rank].sqrt()
    b = u[:, :kept_rank] * root
    a = root[:, None] * v[:, :kept_rank].mT
    kept_energy = float(s[:kept_rank].square().sum()) / total_energy
    residual = float((matrix - b @ a).square().sum())
    return LowRank(
        B=b.to(dtype=delta.dtype, device=delta.device).contiguous(),
        A=a.to(dtype=delta.dtype, device=delta.device).contiguous(),
        rank=kept_rank,
        energy_kept=min(kept_energy, 1.0),
        relative_error=math.sqrt(residual / total_energy),
    )
