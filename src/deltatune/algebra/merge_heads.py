"""Trained head copies (``modules_to_save``) in a merge: merged, chosen, kept or dropped.

A head is a whole module the delta trains as a copy (a classifier), not a change of a base
weight: it has no base value, so there is no task vector to trim (TIES), drop and rescale
(DARE) or sign-elect. Heads of one task (the same parameter shapes and the same label
names) are therefore merged the same way whatever the merge method: by their weighted
average, the merge weights normalised to sum to one (``w_i / sum(w)``). With the default
weights of ``linear`` that is the linear merge itself; normalising matters for ``ties``,
``dare_ties`` and ``cat`` (weights 1 each) and for task-arithmetic sums, which would
otherwise multiply the head's logits by the number of sources. Heads of different tasks
(other shapes or label names) cannot be averaged: one source's head is chosen, or none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.saved_module import SavedModule
from ..core.slot import get_slot, get_state
from ..errors import ConfigError, MergeError
from ..io.meaning import Meaning

#: the policies besides a source index, with what each does (for help texts and errors)
HEAD_POLICIES = {
    "merge": "average the sources' heads when they have the same shapes and label names (the default)",
    "identical": "keep the heads only when every source's are equal",
    "drop": "carry no head",
}
#: how a user chooses, in an error message
CHOOSE = ("choose with --heads: an index keeps that source's head (e.g. --heads 0, to evaluate on its task), "
          "'drop' keeps none, 'merge' (the default) averages heads of one task (same shapes and label names); "
          "in Python heads=0, 'drop' or 'merge'")

ModuleValues = dict[str, dict[str, torch.Tensor]]
#: ``<module path>.<parameter>`` of a head -> its shape, e.g. ``{"classifier.weight": (2, 384)}``
Shapes = dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class CarriedHeads:
    """The head values the merged delta carries, in words, and the source they came from (an index)."""

    values: ModuleValues
    text: str
    source: int | None = None


def check_policy(heads: str | int) -> None:
    """Raise :class:`ConfigError` for a ``heads`` that is neither a policy nor a source index."""
    if heads not in HEAD_POLICIES and (isinstance(heads, bool) or not isinstance(heads, int)):
        raise ConfigError(f"heads must be {', '.join(repr(p) for p in HEAD_POLICIES)} or a source index, got "
                          f"{heads!r}")


def head_values(model: nn.Module, name: str) -> ModuleValues:
    """Module path -> parameter values (cloned) of the copies delta ``name`` trains whole."""
    values = {}
    for path in get_state(model).saved_modules[name]:
        unit: SavedModule = get_slot(model.get_submodule(path))[name]
        values[path] = {key: p.detach().clone() for key, p in unit.copy.named_parameters()}
    return values


def shapes_of(values: ModuleValues) -> Shapes:
    """The parameter shapes of head values."""
    return {f"{path}.{key}": tuple(t.shape) for path, parts in values.items() for key, t in parts.items()}


def meta_shapes(meta: dict[str, Any]) -> Shapes:
    """The parameter shapes of the heads a saved delta carries, read from its ``delta.json``."""
    shapes = {}
    for path in meta.get("modules_to_save", []):
        prefix = f"{path}.copy."
        for key, info in meta["tensors"].items():
            if key.startswith(prefix):
                shapes[f"{path}.{key[len(prefix):]}"] = tuple(info["shape"])
    return shapes


def check_shapes(labels: Sequence[str], shapes: Sequence[Shapes], meanings: Sequence[Meaning],
                 heads: str | int) -> None:
    """Refuse, before anything is loaded, heads that ``"merge"`` or ``"identical"`` cannot carry
    because their modules or shapes differ (another task's label count).

    Raises:
        MergeError: what differs, by value, and how to choose with ``--heads``.
    """
    if heads in ("merge", "identical") and _differing(shapes):
        raise MergeError(_difference(labels, shapes, meanings))


def carry_heads(labels: Sequence[str], values: Sequence[ModuleValues], meanings: Sequence[Meaning],
                heads: str | int, weights: Sequence[float]) -> CarriedHeads:
    """The heads a merged delta carries under the policy ``heads``.

    Args:
        labels: each source as the user named it (for messages).
        values: each source's head values (:func:`head_values`).
        meanings: each source's label names and task.
        heads: ``"merge"``, ``"identical"``, ``"drop"`` or a source index.
        weights: the merge weights (normalised for the average).

    Raises:
        ConfigError: an index that names no source.
        MergeError: heads that differ where the policy needs them alike, or an average asked
            with weights that are not all positive.
    """
    check_policy(heads)
    if heads == "drop":
        return CarriedHeads({}, "dropped")
    if isinstance(heads, int):
        if not 0 <= heads < len(values):
            raise ConfigError(f"heads={heads} names no source; use 0 to {len(values) - 1}, 'merge', 'identical' "
                              f"or 'drop'")
        chosen = values[heads]
        return CarriedHeads(chosen, f"{', '.join(chosen) or 'none'} from source {heads} ({labels[heads]})", heads)
    if all(_same(values[0], other) for other in values[1:]):
        first = values[0]
        return CarriedHeads(first, f"{', '.join(first)} (identical in every source)" if first else "none")
    shapes = [shapes_of(v) for v in values]
    if heads == "identical" or _differing(shapes) or len({m.labels for m in meanings}) > 1:
        raise MergeError(_difference(labels, shapes, meanings))
    if any(w <= 0 for w in weights):
        raise MergeError(f"heads are merged by their weighted average, which needs positive weights; got "
                         f"{list(weights)}. Keep one source's head or none instead: {CHOOSE}")
    total = sum(weights)
    shares = [w / total for w in weights]
    averaged = {path: {key: _average([v[path][key] for v in values], shares) for key in parts}
                for path, parts in values[0].items()}
    return CarriedHeads(averaged, f"{', '.join(averaged)} averaged with weights "
                                  f"{', '.join(f'{s:.4g}' for s in shares)}")


def _same(a: ModuleValues, b: ModuleValues) -> bool:
    return a.keys() == b.keys() and all(
        a[path].keys() == b[path].keys() and all(torch.equal(a[path][k], b[path][k]) for k in a[path]) for path in a)


def _differing(shapes: Sequence[Shapes]) -> set[str]:
    """The ``path.parameter`` names whose presence or shape differs between the sources."""
    names = set().union(*shapes)
    return {name for name in names if len({s.get(name) for s in shapes}) > 1}


def _average(tensors: list[torch.Tensor], shares: list[float]) -> torch.Tensor:
    wide = torch.promote_types(tensors[0].dtype, torch.float32)
    return sum(s * t.to(wide) for s, t in zip(shares, tensors)).to(tensors[0].dtype)


def _difference(labels: Sequence[str], shapes: Sequence[Shapes], meanings: Sequence[Meaning]) -> str:
    """``heads differ: 'a' has classifier.weight (2, 32) with labels [...], 'b' has ...`` and how to choose."""
    differing = _differing(shapes)
    described = []
    for label, own, meaning in zip(labels, shapes, meanings):
        shown = [n for n in own if n in differing] or [n for n in own if len(own[n]) == 2] or list(own)
        has = ", ".join(f"{n} {own[n]}" for n in shown) if own else "no trained head"
        described.append(f"{label!r} has {has} with {meaning.describe_labels()}")
    if not differing and len({m.labels for m in meanings}) == 1:
        return (f"heads differ: {', '.join(described)}: the same shapes and label names but different values, "
                f"and heads='identical' keeps only equal ones. {CHOOSE}")
    return f"heads differ: {', '.join(described)}; a merged delta carries one head. {CHOOSE}"
