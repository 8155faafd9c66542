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
from pathlib import Path

import torch
from torch import nn

from ..core.inject import delete, list_deltas
from ..core.params import base_parameters
from ..core.quantized import dense, write
from ..core.report import AttachReport
from ..core.slot import get_state
from ..errors import ConfigError, DeltaStateError, MergeError
from ..io.artifact import load
from ..io.meaning import Meaning, agreed, inferred, meaning_of
from ..methods.head import find_head
from .convert import attach_entries, check_fits, delta_entries
from .entries import Entry, LowRankEntry, add_entries, as_entry, entry_dense, low_rank_entry, wide

__all__ = ["Entry", "LowRankEntry", "TaskVector", "entry_dense", "interpolate", "task_vector_of"]


class TaskVector:
    """Changes to a base model's parameters, by parameter name.

    Build one with :meth:`from_delta`, :meth:`from_folder` or :meth:`from_models`, or from a
    dict of entries. Entries are float32 (or float64) and never NaN/inf.

    ``meaning`` is what the delta it came from means (label names, task); arithmetic keeps
    what the operands agree on and :meth:`to_delta` gives it to the new delta.
    """

    def __init__(self, entries: Mapping[str, Entry], meaning: Meaning | None = None):
        self._entries: dict[str, Entry] = {key: as_entry(key, value) for key, value in entries.items()}
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
            entries[key] = add_entries(key, entries[key], value) if key in entries else value
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
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ConfigError(f"rank must be a positive integer, got {rank!r}")
        vectors = [k for k, v in self.items() if len(v.shape) != 2]
        if vectors:
            raise MergeError(
                f"only matrices can be compressed to low rank; {vectors[:3]} are not (biases or norm scales). "
                f"Drop them first with .select(lambda name: not name.endswith('bias')), or keep them dense (rank=None)"
            )
        return TaskVector({key: low_rank_entry(entry, rank) for key, entry in self.items()}, self.meaning)

    # -- building and applying -------------------------------------------------------------
    @classmethod
    def from_delta(cls, model: nn.Module, name: str, *, include_saved: bool = False) -> TaskVector:
        """The weight change delta ``name`` on ``model`` makes (see :func:`task_vector_of`)."""
        return task_vector_of(model, name, include_saved=include_saved)

    @classmethod
    def from_folder(cls, model: nn.Module, directory: str | Path, *, check: str = "base",
                    include_saved: bool = False) -> TaskVector:
        """The weight change of a saved delta on base ``model``; the model is left as it was.

        Raises:
            FingerprintError: the delta was made for another base (``check="strict"``).
        """
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
            old, new = dense(old), dense(new)
            if not torch.equal(old, new):
                entries[key] = wide(new) - wide(old)
        meaning = inferred(finetuned, [find_head(finetuned) or ""])
        return cls(entries, meaning if meaning.known else None)

    def apply_to(self, model: nn.Module, scale: float = 1.0) -> nn.Module:
        """Add ``scale`` times this vector to ``model``'s weights, in place; returns the model.

        Every new value is computed and checked before any is written.

        Raises:
            MergeError: a name the model lacks, a shape mismatch, or a NaN/inf result.
            DeltaStateError: the model has merged deltas (unmerging would undo this).
        """
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
                param = dense(params[key])
                value = param + (scale * entry_dense(entry)).to(device=param.device, dtype=param.dtype)
                if not bool(torch.isfinite(value).all()):
                    raise MergeError(f"adding the task vector to {key!r} gives NaN or inf; nothing was changed")
                new[key] = value
        for key, value in new.items():
            write(model, key, value)  # a quantised weight is quantised again
        return model

    def to_delta(self, model: nn.Module, name: str, rank: int | None = None, *,
                 saved_modules: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
                 activate: bool = True) -> AttachReport:
        """Attach this vector to ``model`` as delta ``name`` (see :func:`attach_task_vector`)."""
        return attach_task_vector(model, self, name, rank, saved_modules=saved_modules, activate=activate)


def interpolate(a: TaskVector, b: TaskVector, t: float) -> TaskVector:
    """``(1 - t) a + t b``: ``a`` at ``t = 0``, ``b`` at ``t = 1``."""
    return (1.0 - t) * a + t * b


def task_vector_of(model: nn.Module, name: str, *, include_saved: bool = False) -> TaskVector:
    """The change delta ``name`` makes to ``model``'s base weights, as a task vector.

    A delta whose units are low-rank products (LoRA) stays factored; every other mergeable
    unit gives the dense difference ``merge_params(module, base) - base``. Modules the delta
    trains as copies (``modules_to_save``, e.g. a classifier head) are left out unless
    ``include_saved``, in which case they become dense differences from the base's module.

    Raises:
        MergeError: the delta changes activations rather than weights (adapters, prefix and
            prompt tuning), so it has no weight change.
    """
    meaning = meaning_of(model, name)
    return TaskVector(delta_entries(model, name, include_saved=include_saved), meaning if meaning.known else None)


def attach_task_vector(model: nn.Module, vector: TaskVector, name: str, rank: int | None = None, *,
                       saved_modules: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
                       activate: bool = True) -> AttachReport:
    """Attach ``vector`` to ``model`` as a new delta called ``name`` (see :func:`.convert.attach_entries`);
    ``rank`` first compresses every entry to its best rank-``rank`` approximation."""
    if rank is not None and len(vector):
        check_fits(vector, model)
        vector = vector.low_rank(rank)
    return attach_entries(model, vector, name, saved_modules=saved_modules, activate=activate, meaning=vector.meaning)
