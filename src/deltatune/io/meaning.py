"""What a delta means: the names of its labels and its task, carried from file to file.

``delta.json`` records ``labels`` (the label names of a classification head, in output order,
or ``None``) and ``task`` (``"classification"``, ``"causal_lm"`` or ``None``). Loading a delta
remembers them on the model, so every delta derived from it (saved again, merged, swapped,
turned into a task vector and back) keeps them without the caller passing them along.
When nothing is remembered, :func:`meaning_of` reads them from the model itself.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..core.slot import get_state, require_state
from ..errors import ConfigError
from ..methods.head import find_head

CLASSIFICATION, CAUSAL_LM = "classification", "causal_lm"
TASKS = (CLASSIFICATION, CAUSAL_LM)
#: the metrics file a training run writes next to its delta
RUN_METRICS = "metrics.json"


@dataclass(frozen=True)
class Meaning:
    """A delta's label names (``None``: not known or not a classifier) and task (``None``: unknown)."""

    labels: tuple[str, ...] | None = None
    task: str | None = None

    @classmethod
    def of(cls, labels: Sequence[str] | None = None, task: str | None = None) -> Meaning:
        """A meaning from a list of names (empty counts as none) and a task."""
        return cls(tuple(str(label) for label in labels) if labels else None, task or None)

    @property
    def known(self) -> bool:
        return self.labels is not None or self.task is not None

    def to_meta(self) -> dict[str, Any]:
        """The ``labels`` and ``task`` entries of ``delta.json``."""
        return {"labels": list(self.labels) if self.labels is not None else None, "task": self.task}

    def describe_labels(self, limit: int = 6) -> str:
        """``labels ['neg', 'pos']``, shortened after ``limit`` names, or ``no label names``."""
        if self.labels is None:
            return "no label names"
        shown = ", ".join(repr(label) for label in self.labels[:limit])
        return f"labels [{shown}{', ...' if len(self.labels) > limit else ''}]"


def agreed(meanings: Iterable[Meaning | None]) -> Meaning | None:
    """What all known meanings share: labels and task each kept only where every one agrees.

    ``None`` entries (nothing known) do not disagree; ``None`` when none is known.
    """
    known = [m for m in meanings if m is not None]
    if not known:
        return None
    labels = {m.labels for m in known}
    tasks = {m.task for m in known}
    return Meaning(labels.pop() if len(labels) == 1 else None, tasks.pop() if len(tasks) == 1 else None)


def disagreement(named: Sequence[tuple[str, Meaning]]) -> str | None:
    """Where the sources' label names or tasks differ, by value (``None`` when they agree)."""
    parts = []
    if len({m.labels for _, m in named}) > 1:
        parts.append("label names differ: " + ", ".join(f"{name!r} has {m.describe_labels()}" for name, m in named))
    if len({m.task for _, m in named}) > 1:
        parts.append("tasks differ: " + ", ".join(f"{name!r} is {m.task or 'unknown'}" for name, m in named))
    return "; ".join(parts) or None


def from_meta(meta: dict[str, Any]) -> Meaning | None:
    """The meaning a ``delta.json`` records, or ``None`` when it records none (older files)."""
    meaning = Meaning.of(meta.get("labels"), meta.get("task"))
    return meaning if meaning.known else None


def model_task(model: nn.Module) -> str | None:
    """``"classification"`` for a model with a sequence-classification head, ``"causal_lm"`` for
    one that generates from output embeddings as wide as its vocabulary, else ``None``."""
    config = getattr(model, "config", None)
    if find_head(model) is not None:
        return CLASSIFICATION
    output = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    width = getattr(output, "out_features", None) or getattr(getattr(output, "weight", None), "shape", [None])[0]
    generates = callable(getattr(model, "can_generate", None)) and model.can_generate()
    if output is not None and width == getattr(config, "vocab_size", None) and generates \
            and not getattr(config, "is_encoder_decoder", False):
        return CAUSAL_LM
    return None


def model_labels(model: nn.Module) -> tuple[str, ...] | None:
    """The model config's label names, unless they are transformers' default ``LABEL_i``."""
    config = getattr(model, "config", None)
    id2label = getattr(config, "id2label", None) or {}
    count = getattr(config, "num_labels", None) or len(id2label)
    names = [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(count)]
    if not names or names == [f"LABEL_{i}" for i in range(count)]:
        return None
    return tuple(names)


def inferred(model: nn.Module, saved_modules: Sequence[str] = ()) -> Meaning:
    """What ``model`` says a delta means: its task, and its config's label names when the delta
    carries the model's classification head (``saved_modules``)."""
    head = find_head(model)
    labels = model_labels(model) if head is not None and head in saved_modules else None
    return Meaning(labels, model_task(model))


def remember(model: nn.Module, name: str, meaning: Meaning | None) -> None:
    """Record what delta ``name`` on ``model`` means (``None``: forget it, so the model is asked)."""
    state = require_state(model)
    state.require(name)
    if meaning is None:
        state.meanings.pop(name, None)
    else:
        state.meanings[name] = meaning


def remembered(model: nn.Module, name: str) -> Meaning | None:
    """What was recorded for delta ``name`` (by a load or a derivation), if anything."""
    state = get_state(model)
    return None if state is None else state.meanings.get(name)


def meaning_of(model: nn.Module, name: str, labels: Sequence[str] | None = None, task: str | None = None) -> Meaning:
    """What delta ``name`` means: ``labels`` / ``task`` when given, else what was recorded for it,
    else what the model says (:func:`inferred`).

    Raises:
        ConfigError: a task other than ``"classification"`` / ``"causal_lm"``, or labels that are
            not a list of strings.
    """
    if task is not None and task not in TASKS:
        raise ConfigError(f"task must be one of {', '.join(TASKS)} or None, got {task!r}")
    if labels is not None and (isinstance(labels, str) or not all(isinstance(label, str) for label in labels)):
        raise ConfigError(f"labels must be a list of label names (strings), got {labels!r}")
    found = remembered(model, name)
    if found is None:
        found = inferred(model, require_state(model).saved_modules.get(name, []))
    return Meaning(tuple(str(label) for label in labels) if labels else found.labels, task or found.task)


def run_folder_meaning(directory: str | Path) -> Meaning | None:
    """What a training run's ``metrics.json`` next to a delta says (``data.labels``, ``task``): how
    deltas saved before ``delta.json`` recorded labels are read."""
    metrics = Path(directory) / RUN_METRICS
    if not metrics.is_file():
        return None
    try:
        recorded = json.loads(metrics.read_text(encoding="utf-8"))
        meaning = Meaning.of((recorded.get("data") or {}).get("labels"), recorded.get("task"))
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError):
        return None
    return meaning if meaning.known else None
