"""Task vectors: what a delta or a fine-tune changes in a base's weights, as arithmetic objects.

A :class:`TaskVector` maps base parameter names (``bert.encoder.layer.0.attention.self.query.weight``)
to the change of that parameter: a :class:`LowRankEntry` ``B @ A`` kept factored (a LoRA's
update), or a dense tensor of the parameter's shape. Task vectors add, subtract, scale,
negate and interpolate (Ilharco et al., 2023, "Editing Models with Task Arithmetic",
arXiv:2212.04089); sums of factored entries stay factored by concatenating ranks, so a sum
of LoRAs never builds a dense ``d x d`` matrix.

Example:
    >>> a = TaskVector.from_folder(model, "runs/sentiment")
    >>> b = TaskVector.from_folder(model, "runs/spam")
    >>> both = a + b                     # exact; each entry's rank is r_a + r_b
    >>> forget = -b                      # negation: subtract a task
    >>> (0.5 * a + 0.5 * b).to_delta(model, "mix")
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import ConfigError, DeltaStateError, MergeError
from ..io.meaning import Meaning, agreed, inferred, meaning_of

if TYPE_CHECKING:
    from ..core.report import AttachReport


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


def _add(key: str, a: Entry, b: Entry) -> Entry:
    if tuple(a.shape) != tuple(b.shape):
        raise MergeError(f"cannot add task vectors: {key!r} has shape {tuple(a.shape)} in one "
                         f"and {tuple(b.shape)} in the other")
    if isinstance(a, LowRankEntry) and isinstance(b, LowRankEntry) and a.transposed == b.transposed:
        return LowRankEntry(torch.cat([a.B, b.B], dim=1), torch.cat([a.A, b.A], dim=0), a.transposed)
    return entry_dense(a) + entry_dense(b)


def _as_entry(key: str, value: Entry) -> Entry:
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
        return replace(value, B=_wide(value.B), A=_wide(value.A))
    return _wide(value)


def _wide(tensor: torch.Tensor) -> torch.Tensor:
    """Detached, in float32 or a wider float type."""
    return tensor.detach().to(torch.promote_types(tensor.dtype, torch.float32))


class TaskVector:
    """Changes to a base model's parameters, by parameter name.

    Build one with :meth:`from_delta`, :meth:`from_folder` or :meth:`from_models`, or from a
    dict of entries. Entries are float32 (or float64) and never NaN/inf.

    ``meaning`` is what the delta it came from means (label names, task); arithmetic keeps
    what the operands agree on and :meth:`to_delta` gives it to the new delta.
    """

    def __init__(self, entries: Mapping[str, Entry], meaning: Meaning | None = None):
        self._entries: dict[str, Entry] = {key: _as_entry(key, value) for key, value in entries.items()}
        self.meaning = meaning

    # -- container -------------------------------------------------------------------------
    def __getitem__(self, key: str) -> Entry:
        return self._entries[key]

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self):
        return self._entries.keys()

    def items(self):
        return self._entries.items()

    def __repr__(self) -> str:
        factored = sum(isinstance(e, LowRankEntry) for e in self._entries.values())
        return f"TaskVector({len(self)} entries: {factored} low-rank, {len(self) - factored} dense)"

    @property
    def is_factored(self) -> bool:
        """Whether every entry is low rank (the vector can become a LoRA exactly)."""
        return all(isinstance(e, LowRankEntry) for e in self._entries.values())

    def dense(self) -> dict[str, torch.Tensor]:
        """Every entry as a dense tensor of its parameter's shape."""
        return {key: entry_dense(entry) for key, entry in self._entries.items()}

    def norm(self) -> float:
        """The Frobenius norm over all entries."""
        total = 0.0
        for entry in self._entries.values():
            total += entry.squared_norm() if isinstance(entry, LowRankEntry) else float(entry.square().sum())
        return math.sqrt(total)

    def select(self, keep: Callable[[str], bool] | Iterable[str]) -> TaskVector:
        """The entries whose names pass ``keep`` (a predicate, or a collection of names)."""
        wanted = keep if callable(keep) else set(keep).__contains__
        return TaskVector({k: v for k, v in self._entries.items() if wanted(k)}, self.meaning)

    # -- arithmetic ------------------------------------------------------------------------
    def __add__(self, other: TaskVector) -> TaskVector:
        if not isinstance(other, TaskVector):
            return NotImplemented
        entries = dict(self._entries)
        for key, value in other.items():
            entries[key] = _add(key, entries[key], value) if key in entries else value
        return TaskVector(entries, agreed([self.meaning, other.meaning]))

    def __radd__(self, other: object) -> TaskVector:
        if isinstance(other, (int, float)) and other == 0:  # sum([a, b, c]) starts from 0
            return self
        return NotImplemented

    def __mul__(self, factor: float) -> TaskVector:
        if isinstance(factor, bool) or not isinstance(factor, (int, float)):
            return NotImplemented
        if not math.isfinite(factor):
            raise ConfigError(f"a task vector can only be scaled by a finite number, got {factor!r}")
        return TaskVector({k: v.scaled(factor) if isinstance(v, LowRankEntry) else v * factor for k, v in self.items()},
                          self.meaning)

    __rmul__ = __mul__

    def __truediv__(self, divisor: float) -> TaskVector:
        if isinstance(divisor, bool) or not isinstance(divisor, (int, float)):
            return NotImplemented
        if divisor == 0:
            raise ConfigError("cannot divide a task vector by zero")
        return self * (1.0 / divisor)

    def __neg__(self) -> TaskVector:
        return self * -1.0

    def __sub__(self, other: TaskVector) -> TaskVector:
        if not isinstance(other, TaskVector):
            return NotImplemented
        return self + (-other)

    def low_rank(self, rank: int) -> TaskVector:
        """Every entry replaced by its best rank-``rank`` approximation (truncated SVD).

        Entries that already have rank <= ``rank`` are still re-factored, so the result's
        ranks are ``min(rank, out, in)`` and each entry records the energy it keeps.

        Raises:
            ConfigError: ``rank`` is not a positive integer.
            MergeError: an entry is not a matrix (a bias, a norm's scale).
        """
        from .lowrank import low_rank

        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ConfigError(f"rank must be a positive integer, got {rank!r}")
        vectors = [k for k, v in self.items() if len(v.shape) != 2]
        if vectors:
            raise MergeError(
                f"only matrices can be compressed to low rank; {vectors[:3]} are not (biases or norm scales). "
                f"Drop them first with .select(lambda name: not name.endswith('bias')), or keep them dense (rank=None)"
            )
        entries = {}
        for key, entry in self.items():
            transposed = entry.transposed if isinstance(entry, LowRankEntry) else False
            change = entry_dense(entry)  # the parameter's shape
            approx = low_rank(change.T if transposed else change, rank=rank)
            entries[key] = LowRankEntry(approx.B, approx.A, transposed, approx.energy_kept)
        return TaskVector(entries, self.meaning)

    # -- building and applying -------------------------------------------------------------
    @classmethod
    def from_delta(cls, model: nn.Module, name: str, *, include_saved: bool = False) -> TaskVector:
        """The weight change delta ``name`` on ``model`` makes (see :func:`.convert.task_vector_of`)."""
        from .convert import task_vector_of

        vector = task_vector_of(model, name, include_saved=include_saved)
        meaning = meaning_of(model, name)
        vector.meaning = meaning if meaning.known else None
        return vector

    @classmethod
    def from_folder(cls, model: nn.Module, directory: str | Path, *, check: str = "strict",
                    include_saved: bool = False) -> TaskVector:
        """The weight change of a saved delta on base ``model``; the model is left as it was.

        Raises:
            FingerprintError: the delta was made for another base (``check="strict"``).
        """
        from ..core.inject import delete, list_deltas
        from ..io.artifact import load

        taken = set(list_deltas(model))
        name = next(f"task_vector_{i}" for i in range(len(taken) + 1) if f"task_vector_{i}" not in taken)
        load(model, directory, name, check=check, activate=False)
        try:
            return cls.from_delta(model, name, include_saved=include_saved)
        finally:
            delete(model, name)

    @classmethod
    def from_models(cls, base: nn.Module, finetuned: nn.Module) -> TaskVector:
        """``finetuned - base`` over every parameter (unchanged ones left out).

        Raises:
            MergeError: the two models have different parameter names or shapes.
        """
        from ..core.params import base_parameters

        before, after = dict(base_parameters(base)), dict(base_parameters(finetuned))
        if before.keys() != after.keys():
            differ = sorted(set(before) ^ set(after))
            raise MergeError(f"base and fine-tuned models have different parameters (e.g. {differ[:3]}); "
                             f"they must be the same architecture")
        entries = {}
        for key, old in before.items():
            new = after[key]
            if old.shape != new.shape:
                raise MergeError(f"parameter {key!r} has shape {tuple(old.shape)} in the base and {tuple(new.shape)} "
                                 f"in the fine-tuned model; they must be the same architecture")
            if not torch.equal(old, new):
                entries[key] = _wide(new) - _wide(old)
        from ..methods.head import find_head

        meaning = inferred(finetuned, [find_head(finetuned) or ""])
        return cls(entries, meaning if meaning.known else None)

    def apply_to(self, model: nn.Module, scale: float = 1.0) -> nn.Module:
        """Add ``scale`` times this vector to ``model``'s weights, in place; returns the model.

        Every new value is computed and checked before any is written.

        Raises:
            MergeError: a name the model lacks, a shape mismatch, or a NaN/inf result.
            DeltaStateError: the model has merged deltas (unmerging would undo this).
        """
        from ..core.slot import get_state

        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ConfigError(f"scale must be a finite number, got {scale!r}")
        state = get_state(model)
        if state is not None and state.merged:
            raise DeltaStateError(f"deltas {list(state.merged)} are merged into {type(model).__name__}; "
                                  f"call unmerge(model) before changing its base weights")
        params = check_fits(self, model)
        new = {}
        with torch.no_grad():
            for key, entry in self.items():
                param = params[key]
                value = param + (scale * entry_dense(entry)).to(device=param.device, dtype=param.dtype)
                if not bool(torch.isfinite(value).all()):
                    raise MergeError(f"adding the task vector to {key!r} gives NaN or inf; nothing was changed")
                new[key] = value
            for key, value in new.items():
                params[key].copy_(value)
        return model

    def to_delta(self, model: nn.Module, name: str, rank: int | None = None, *,
                 saved_modules: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
                 activate: bool = True) -> AttachReport:
        """Attach this vector to ``model`` as delta ``name`` (see :func:`.convert.attach_task_vector`)."""
        from .convert import attach_task_vector

        return attach_task_vector(model, self, name, rank, saved_modules=saved_modules, activate=activate)


def interpolate(a: TaskVector, b: TaskVector, t: float) -> TaskVector:
    """``(1 - t) a + t b``: ``a`` at ``t = 0``, ``b`` at ``t = 1``."""
    return (1.0 - t) * a + t * b


def check_fits(vector: TaskVector, model: nn.Module) -> dict[str, nn.Parameter]:
    """The model's base parameters, after checking every entry names one of the right shape."""
    from ..core.params import base_parameters

    params = dict(base_parameters(model))
    missing = [key for key in vector if key not in params]
    if missing:
        raise MergeError(
            f"{type(model).__name__} has no parameter {missing[0]!r} "
            f"({len(missing)} of {len(vector)} entries missing); "
            f"the task vector was made for another architecture (parameters look like {next(iter(params), '')!r})"
        )
    for key, entry in vector.items():
        if tuple(entry.shape) != tuple(params[key].shape):
            raise MergeError(f"task vector entry {key!r} has shape {tuple(entry.shape)} but the model's parameter "
                             f"has {tuple(params[key].shape)}; it was made for another architecture")
    return params
