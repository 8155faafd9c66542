"""The entries of a task vector: a factored low-rank change ``B @ A`` or a dense tensor,
with their arithmetic. Pure tensor code: no model, no delta."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..errors import ConfigError, MergeError
from .lowrank import low_rank


@dataclass(frozen=True)
class LowRankEntry:
    """A factored parameter change ``B @ A`` in ``(out, in)`` orientation.

    Attributes:
        B: ``(out, k)``.
        A: ``(k, in)``.
        transposed: the parameter is stored ``(in, out)`` (GPT-2 ``Conv1D``; an embedding
            table, whose LoRA product is ``(dim, num_embeddings)``), so its change is ``(B A)^T``.
        energy_kept: set when the entry is an SVD compression of something larger: the
            fraction of that thing's squared Frobenius norm it keeps.
    """

    B: torch.Tensor
    A: torch.Tensor
    transposed: bool = False
    energy_kept: float | None = None

    def __post_init__(self) -> None:
        if self.B.dim() != 2 or self.A.dim() != 2 or self.B.shape[1] != self.A.shape[0]:
            raise MergeError(f"a low-rank entry needs B (out, k) and A (k, in), "
                             f"got {tuple(self.B.shape)} and {tuple(self.A.shape)}")

    @property
    def rank(self) -> int:
        return self.B.shape[1]

    @property
    def shape(self) -> torch.Size:
        """The parameter's shape."""
        out_in = (self.B.shape[0], self.A.shape[1])
        return torch.Size(out_in[::-1] if self.transposed else out_in)

    def dense(self) -> torch.Tensor:
        """The change as a tensor of the parameter's shape."""
        product = self.B @ self.A
        return product.T if self.transposed else product

    def oriented(self, transposed: bool) -> LowRankEntry:
        """The same change factored for the other orientation when asked: ``(B A)^T = A^T B^T``."""
        if transposed == self.transposed:
            return self
        return LowRankEntry(self.A.T.contiguous(), self.B.T.contiguous(), transposed, self.energy_kept)

    def scaled(self, factor: float) -> LowRankEntry:
        return LowRankEntry(self.B * factor, self.A, self.transposed)

    def squared_norm(self) -> float:
        """``||B A||_F^2 = trace((B^T B)(A A^T))``, without forming ``B A``."""
        return float(((self.B.T @ self.B) * (self.A @ self.A.T)).sum())


Entry = LowRankEntry | torch.Tensor


def entry_dense(entry: Entry) -> torch.Tensor:
    """An entry as a dense tensor of its parameter's shape."""
    return entry.dense() if isinstance(entry, LowRankEntry) else entry


def add_entries(key: str, a: Entry, b: Entry) -> Entry:
    if tuple(a.shape) != tuple(b.shape):
        raise MergeError(f"cannot add task vectors: {key!r} has shape {tuple(a.shape)} in one "
                         f"and {tuple(b.shape)} in the other")
    if isinstance(a, LowRankEntry) and isinstance(b, LowRankEntry) and a.transposed == b.transposed:
        return LowRankEntry(torch.cat([a.B, b.B], dim=1), torch.cat([a.A, b.A], dim=0), a.transposed)
    return entry_dense(a) + entry_dense(b)


def as_entry(key: str, value: Entry) -> Entry:
    if isinstance(value, LowRankEntry):
        tensors = (value.B, value.A)
    elif isinstance(value, torch.Tensor):
        tensors = (value,)
    else:
        raise MergeError(f"task vector entry {key!r} must be a tensor or a LowRankEntry, got {type(value).__name__}")
    for tensor in tensors:
        if not tensor.is_floating_point():
            raise MergeError(f"task vector entry {key!r} must hold floating-point values, got {tensor.dtype}")
        if not bool(torch.isfinite(tensor).all()):
            raise MergeError(f"task vector entry {key!r} holds NaN or inf; the delta or model it came from is diverged")
    if isinstance(value, LowRankEntry):
        return replace(value, B=wide(value.B), A=wide(value.A))
    return wide(value)


def wide(tensor: torch.Tensor) -> torch.Tensor:
    """Detached, in float32 or a wider float type."""
    return tensor.detach().to(torch.promote_types(tensor.dtype, torch.float32))


def low_rank_entry(entry: Entry, rank: int) -> LowRankEntry:
    """The best rank-``rank`` approximation of an entry (truncated SVD), with the energy it keeps.

    Raises:
        ConfigError: ``rank`` is not a positive integer.
        MergeError: the entry is not a matrix (a bias, a norm's scale).
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"rank must be a positive integer, got {rank!r}")
    if len(entry.shape) != 2:
        raise MergeError(f"only matrices can be compressed to low rank, got an entry of shape {tuple(entry.shape)}")
    transposed = entry.transposed if isinstance(entry, LowRankEntry) else False
    change = entry_dense(entry)  # the parameter's shape
    approx = low_rank(change.T if transposed else change, rank=rank)
    return LowRankEntry(approx.B, approx.A, transposed, approx.energy_kept)
