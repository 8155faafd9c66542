"""Merging N deltas into one: on task vectors, and on a model from delta folders or names.

Example:
    >>> report = merge_deltas(model, ["runs/sentiment", "runs/spam"], method="ties", density=0.5)
    >>> print(report)                       # per-layer result: rank, kept energy, non-zeros
    >>> deltatune.save(model, "runs/merged", report.name)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.inject import delete, get_config, list_deltas
from ..core.report import AttachReport
from ..core.slot import get_state
from ..errors import ConfigError, DeltaStateError, MergeError
from ..io.artifact import META_FILE, load, read_meta
from ..io.meaning import Meaning, agreed, disagreement, from_meta, inferred, meaning_of, remember
from . import combine
from .merge_heads import carry_heads, check_policy, check_shapes, head_values, meta_shapes, shapes_of
from .task_vector import LowRankEntry, TaskVector, entry_dense

#: an element-wise merge of one parameter: (dense changes, weights, density, generator) -> merged change
Elementwise = Callable[[list[torch.Tensor], list[float], float, torch.Generator], torch.Tensor]


@dataclass(frozen=True)
class Combination:
    """How one merge method combines the sources' updates.

    Args:
        description: what it does, for listings and error messages.
        elementwise: merges each parameter's dense changes (TIES, DARE, pruning); ``None``
            is the exact weighted sum, which keeps LoRA entries factored.
        unit_weights: default weights are all 1 (stacking, or a disjoint mean that already
            averages) instead of 1/N.
        factored_only: every source's update must be low rank (ranks concatenate).
        needs_rank: the result is compressed to ``rank``, which must be given.
        uses_density, random, metric_weights: whether ``density``, ``seed`` and the metric
            options mean anything to it.
    """

    description: str
    elementwise: Elementwise | None = None
    unit_weights: bool = False
    factored_only: bool = False
    needs_rank: bool = False
    uses_density: bool = False
    random: bool = False
    metric_weights: bool = False


def _seeded(merge: Callable) -> Elementwise:
    return lambda deltas, weights, density, generator: merge(deltas, weights, density, generator)


def _unseeded(merge: Callable) -> Elementwise:
    return lambda deltas, weights, density, generator: merge(deltas, weights, density)


#: merge method -> how it combines
COMBINATIONS: dict[str, Combination] = {
    "linear": Combination("weighted sum of the updates (exact; LoRAs stay factored)"),
    "cat": Combination("LoRA ranks concatenated (exact; low-rank sources only)", unit_weights=True,
                       factored_only=True),
    "svd": Combination("weighted sum re-compressed to rank r by truncated SVD", needs_rank=True),
    "ties": Combination("trim to top density, elect sign, disjoint mean (Yadav et al., 2023)",
                        _unseeded(combine.ties), unit_weights=True, uses_density=True),
    "dare_linear": Combination("random drop with rescale, then weighted sum (Yu et al., 2023)",
                               _seeded(combine.dare_linear), uses_density=True, random=True),
    "dare_ties": Combination("random drop with rescale, then TIES sign election and disjoint mean",
                             _seeded(combine.dare_ties), unit_weights=True, uses_density=True, random=True),
    "magnitude_prune": Combination("each update trimmed to its top density by magnitude, then weighted sum",
                                   _unseeded(combine.magnitude_prune), uses_density=True),
    "metrics": Combination("weighted sum with weights exp(-penalty * metric) from each delta.json, normalised",
                           metric_weights=True),
}
#: method -> what it does, for listings and error messages
METHODS = {name: combination.description for name, combination in COMBINATIONS.items()}


@dataclass(frozen=True)
class LayerMerge:
    """One merged parameter: its form in the result and what the merge kept."""

    key: str
    form: str  # "low rank" or "dense"
    rank: int | None
    energy_kept: float | None
    nonzero: float | None  # fraction of non-zero values (dense results)


@dataclass(frozen=True)
class MergeReport:
    """What :func:`merge_deltas` did; ``print(report)`` shows a table.

    Attributes:
        name: the merged delta's name on the model.
        method: the merge method.
        sources: the sources as given (folders or delta names).
        weights: the weight used for each source.
        result: ``"lora"`` or ``"dense"``, the method of the attached delta.
        heads: the modules_to_save carried over and from which source, in words.
        layers: one row per merged parameter.
        attach: the attach report of the new delta.
        labels: the label names the merged delta records (``None``: the sources disagree or
            record none).
        task: its task (``None`` likewise).
        warning: where the sources' label names or tasks differ, so the result records none.
    """

    name: str
    method: str
    sources: tuple[str, ...]
    weights: tuple[float, ...]
    result: str
    heads: str
    layers: tuple[LayerMerge, ...]
    attach: AttachReport
    options: dict[str, Any] = field(default_factory=dict)
    labels: tuple[str, ...] | None = None
    task: str | None = None
    warning: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (for ``delta.json`` provenance)."""
        return {"method": self.method, "sources": list(self.sources), "weights": list(self.weights),
                "result": self.result, "heads": self.heads, **self.options}

    def __str__(self) -> str:
        options = ", ".join(f"{k} {v}" for k, v in self.options.items() if v is not None)
        lines = [(f"merged {len(self.sources)} deltas with {self.method}{f' ({options})' if options else ''} into "
                 f"{self.name!r} ({self.result}); weights {', '.join(f'{w:.4g}' for w in self.weights)}")]
        rows = [(layer.key, layer.form, "-" if layer.rank is None else str(layer.rank),
                 "-" if layer.energy_kept is None else f"{layer.energy_kept:.4f}",
                 "-" if layer.nonzero is None else f"{layer.nonzero:.3f}") for layer in self.layers]
        header = ("parameter", "form", "rank", "energy kept", "non-zero")
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(5)]
        lines += ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
                  for r in [header, *rows]]
        lines.append(f"heads: {self.heads}")
        lines.append(f"means: {Meaning(self.labels, self.task).describe_labels()}, task {self.task or 'unknown'}")
        return "\n".join(lines)


def check_options(method: str, density: float, rank: int | None) -> None:
    """Raise :class:`ConfigError` for an unknown method, a density outside (0, 1] or a bad rank."""
    if method not in COMBINATIONS:
        raise ConfigError(f"unknown merge method {method!r}; available: {', '.join(COMBINATIONS)}")
    combine.check_density(density)
    if COMBINATIONS[method].needs_rank and rank is None:
        raise ConfigError(f"the {method} merge compresses to a rank: pass rank=r (e.g. 8)")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ConfigError(f"rank must be a positive integer, got {rank!r}")


def default_weights(method: str, count: int) -> list[float]:
    """1 each for cat, ties and dare_ties; the mean (1/N each) for the others."""
    return [1.0] * count if COMBINATIONS[method].unit_weights else [1.0 / count] * count


def merge_task_vectors(
    vectors: Sequence[TaskVector],
    method: str = "linear",
    weights: Sequence[float] | None = None,
    *,
    density: float = 0.5,
    rank: int | None = None,
    seed: int = 0,
) -> TaskVector:
    """Merge task vectors of one base into one (``metrics`` weights come from :func:`merge_deltas`).

    ``linear`` and ``cat`` keep low-rank entries factored (ranks concatenate); ``ties``,
    ``dare_*`` and ``magnitude_prune`` work element-wise on each parameter's dense change;
    ``svd`` (or any method with ``rank``) compresses the result to rank ``rank`` per entry.
    A source without an entry for a parameter counts as zero there.

    Raises:
        ConfigError: unknown method, bad weights, density or rank, ``svd`` without ``rank``.
        MergeError: ``cat`` with entries that are not low rank.
    """
    check_options(method, density, rank)
    if not vectors:
        raise ConfigError("nothing to merge: pass at least one task vector")
    weights = combine.check_weights(default_weights(method, len(vectors)) if weights is None else weights, len(vectors))
    combination = COMBINATIONS[method]
    if combination.factored_only:
        dense = [key for vector in vectors for key, entry in vector.items() if not isinstance(entry, LowRankEntry)]
        if dense:
            raise MergeError(f"{method} concatenates LoRA ranks, so every entry must be low rank; {dense[0]!r} is "
                             f"dense. Use method='linear', which adds any weight changes exactly")
    if combination.elementwise is None:
        merged = sum((w * v for w, v in zip(weights, vectors)), TaskVector({}))
    else:
        merged = TaskVector({key: _elementwise(combination.elementwise, key, vectors, weights, density, seed)
                             for key in dict.fromkeys(k for v in vectors for k in v)},
                            agreed(v.meaning for v in vectors))
    return merged.low_rank(rank) if rank is not None else merged


def _elementwise(merge: Elementwise, key: str, vectors: Sequence[TaskVector], weights: list[float], density: float,
                 seed: int) -> torch.Tensor:
    present = {index: entry_dense(v[key]) for index, v in enumerate(vectors) if key in v}
    like = next(iter(present.values()))
    deltas = [present[index] if index in present else torch.zeros_like(like) for index in range(len(vectors))]
    return merge(deltas, weights, density, combine.generator_for(seed, key))


@dataclass
class _Source:
    label: str
    name: str  # the delta's name on the model
    loaded: bool  # loaded by merge_deltas (deleted afterwards)
    meta: dict | None


def _resolve_sources(model: nn.Module, sources: Sequence[str | Path], check: str, heads: str | int) -> list[_Source]:
    """The sources on ``model``: folders are read and checked first, then loaded (their heads only
    when ``heads`` may carry them, so a delta of another label count merges for its body)."""
    existing = list_deltas(model)
    planned: list[tuple[str, Path | None, dict | None]] = []
    for source in sources:
        if isinstance(source, str) and source in existing:
            planned.append((source, None, None))
            continue
        folder = Path(source)
        if not (folder / META_FILE).is_file():
            raise MergeError(f"source {str(source)!r} is neither a delta folder (no {META_FILE}) nor a delta on "
                             f"this model (deltas: {existing or 'none'})")
        meta = read_meta(folder)
        carried = tuple(f"{path}." for path in meta.get("modules_to_save", []))
        if all(key.startswith(carried) for key in meta["tensors"]):
            raise MergeError(f"{str(source)!r} changes no base weight (only trained module copies such as a head); "
                             f"there is nothing to merge")
        planned.append((str(source), folder, meta))
    check_shapes([label for label, _, _ in planned],
                 [meta_shapes(meta) if meta else shapes_of(head_values(model, label)) for label, _, meta in planned],
                 [_planned_meaning(model, label, meta) for label, _, meta in planned], heads)
    resolved: list[_Source] = []
    try:
        for index, (label, folder, meta) in enumerate(planned):
            if folder is None:
                resolved.append(_Source(label, label, False, None))
                continue
            taken = list_deltas(model)
            name = next(f"merge_source_{index}_{i}" for i in range(len(taken) + 1)
                        if f"merge_source_{index}_{i}" not in taken)
            keep_head = heads in ("merge", "identical") or heads == index
            load(model, folder, name, check=check, activate=False, saved_modules=keep_head)
            resolved.append(_Source(label, name, True, meta))
    except BaseException:
        _cleanup(model, resolved)
        raise
    return resolved


def _planned_meaning(model: nn.Module, label: str, meta: dict | None) -> Meaning:
    """What a source means before it is loaded: its ``delta.json``'s record, else what the model says."""
    if meta is None:
        return meaning_of(model, label)
    return from_meta(meta) or inferred(model, meta.get("modules_to_save", []))


def _cleanup(model: nn.Module, sources: list[_Source]) -> None:
    for source in sources:
        if source.loaded and source.name in list_deltas(model):
            delete(model, source.name)


def _metric_weights(sources: list[_Source], metric: str, penalty: float) -> list[float]:
    values = []
    for source in sources:
        recorded: Any = (source.meta or {}).get("metrics", {})
        for part in metric.split("."):
            recorded = recorded.get(part) if isinstance(recorded, dict) else None
        if not isinstance(recorded, (int, float)):
            where = "it is a delta on the model, not a folder" if source.meta is None else \
                f"its {META_FILE} metrics are {_numeric_keys(source.meta.get('metrics', {}))}"
            raise MergeError(f"metrics-weighted merging needs the metric {metric!r} of every source; {source.label!r} "
                             f"has none ({where}). Pass weights=[...] instead, or another metric")
        values.append(float(recorded))
    return combine.metrics_weights(values, penalty)


def _numeric_keys(data: Any, prefix: str = "") -> list[str]:
    """Dotted keys of the numeric leaves of a nested dict."""
    if not isinstance(data, dict):
        return [prefix] if isinstance(data, (int, float)) else []
    keys = []
    for key, value in data.items():
        keys += _numeric_keys(value, f"{prefix}{key}." if isinstance(value, dict) else f"{prefix}{key}")
    return keys


def merge_deltas(
    model: nn.Module,
    sources: Sequence[str | Path],
    method: str = "linear",
    weights: Sequence[float] | None = None,
    *,
    density: float = 0.5,
    rank: int | None = None,
    seed: int = 0,
    penalty: float = 1.0,
    metric: str = "test.loss",
    heads: str | int = "merge",
    name: str = "merged",
    check: str = "base",
) -> MergeReport:
    """Merge deltas into one new delta on ``model`` and report what was kept.

    Args:
        model: the base all sources were made for.
        sources: delta folders (loaded with the fingerprint ``check``; removed again after the
            merge) or names of deltas already on ``model``.
        method: one of :data:`METHODS`.
        weights: one per source; default 1 each for cat/ties/dare_ties, else 1/N each.
        density: fraction of values kept by ties, dare_* and magnitude_prune.
        rank: compress the result to this rank per layer (required for svd).
        seed: seed of DARE's random drops (one generator per parameter from seed and name).
        penalty, metric: for ``metrics``: ``w_i ∝ exp(-penalty * metric_i)``, the metric read
            from each folder's ``delta.json`` metrics by dotted key.
        heads: trained module copies (``modules_to_save``, a classifier head) to carry:
            ``"merge"`` averages them with the merge weights normalised to sum 1, for every
            method (a head is a new module with no base value, so there is nothing to trim or
            rescale; see :mod:`.merge_heads`), and refuses heads of different shapes or label
            names; ``"identical"`` keeps them only if every source's are equal; ``"drop"``
            keeps none; an index keeps that source's.
        name: the new delta's name; it becomes the only active delta.
        check: fingerprint check for folder sources: ``"base"`` (default), ``"strict"``, ``"warn"`` or ``"off"`` (see :mod:`deltatune.io.base_check`).

    Returns:
        A :class:`MergeReport`. The result is a LoRA when exact (low-rank sources with
        linear/cat/metrics) or when ``rank`` is given, else a ``dense`` delta. It means what
        the sources agree on (label names, task; with ``heads=i`` source ``i``'s label
        names), which :func:`deltatune.save` records; ``report.warning`` says what differed.

    Raises:
        FingerprintError: a folder's delta was made for another base.
        MergeError: a source that cannot merge (prefix, prompt, adapter), cat of non-LoRA
            deltas, heads of different shapes or label names under ``"merge"`` (or of
            different values under ``"identical"``), or a missing metric.
        ConfigError: unknown method, bad weights (count, NaN), density, rank or heads.
    """
    check_options(method, density, rank)
    if not sources:
        raise ConfigError("nothing to merge: pass at least one delta folder or name")
    if weights is not None:
        weights = combine.check_weights(weights, len(sources))
    check_policy(heads)
    state = get_state(model)
    if state is not None and name in state.configs:
        raise DeltaStateError(f"a delta named {name!r} already exists; pass another name=")
    resolved = _resolve_sources(model, sources, check, heads)
    try:
        combination = COMBINATIONS[method]
        if combination.metric_weights:
            weights = _metric_weights(resolved, metric, penalty)
        weights = default_weights(method, len(resolved)) if weights is None else weights
        meanings = [meaning_of(model, source.name) for source in resolved]
        values = [head_values(model, s.name) for s in resolved]
        carried = carry_heads([s.label for s in resolved], values, meanings, heads, weights)
        vectors = [TaskVector.from_delta(model, source.name) for source in resolved]
        for source, vector in zip(resolved, vectors):
            if combination.factored_only and not all(isinstance(entry, LowRankEntry) for _, entry in vector.items()):
                raise MergeError(f"{method} concatenates LoRA ranks, so every source must be a low-rank delta; "
                                 f"{source.label!r} is {get_config(model, source.name).method}, whose change is not "
                                 f"low rank. Use method='linear' (exact for any weight deltas)")
        empty = [s.label for s, v in zip(resolved, vectors) if len(v) == 0]
        if empty:
            raise MergeError(f"{empty[0]!r} changes no base weight (only trained module copies such as a head); "
                             f"there is nothing to merge")
        merged = merge_task_vectors(vectors, method, weights, density=density, rank=rank, seed=seed)
    finally:
        _cleanup(model, resolved)
    report = merged.to_delta(model, name, saved_modules=carried.values)
    had_heads = any(v or (s.meta or {}).get("modules_to_save") for s, v in zip(resolved, values))
    dropped = heads == "drop" and had_heads  # the label names named the outputs of heads now gone
    meaning, warning = _merged_meaning([s.label for s in resolved], meanings, carried.source, dropped)
    remember(model, name, meaning)
    combination = COMBINATIONS[method]
    options = {"density": density if combination.uses_density else None, "rank": rank,
               "seed": seed if combination.random else None,
               "penalty": penalty if combination.metric_weights else None,
               "metric": metric if combination.metric_weights else None}
    return MergeReport(name=name, method=method, sources=tuple(s.label for s in resolved), weights=tuple(weights),
                       result=report.method, heads=carried.text, layers=tuple(_layer_rows(merged)), attach=report,
                       options={k: v for k, v in options.items() if v is not None}, labels=meaning.labels,
                       task=meaning.task, warning=warning)


def _merged_meaning(labels: list[str], meanings: list[Meaning], chosen: int | None,
                    dropped: bool) -> tuple[Meaning, str | None]:
    """What the merged delta means, and a warning naming what the sources disagree on.

    Label names and task are kept where every source agrees; a chosen head (``heads=i``)
    brings its source's label names; a delta whose sources' heads were dropped names none.
    """
    shared = agreed(meanings) or Meaning()
    names = shared.labels
    if chosen is not None:
        names = meanings[chosen].labels
    elif dropped:
        names = None
    meaning = Meaning(names, shared.task)
    lost = (names is None and any(m.labels for m in meanings) and not dropped) or \
        (shared.task is None and any(m.task for m in meanings))
    if not lost:
        return meaning, None
    differs = disagreement(list(zip(labels, meanings)))
    return meaning, f"{differs}; the merged delta records {meaning.describe_labels()} and task {meaning.task or 'unknown'}"


def _layer_rows(vector: TaskVector) -> list[LayerMerge]:
    rows = []
    for key, entry in vector.items():
        if isinstance(entry, LowRankEntry):
            rows.append(LayerMerge(key, "low rank", entry.rank, entry.energy_kept, None))
        else:
            rows.append(LayerMerge(key, "dense", None, None, float((entry != 0).float().mean())))
    return rows
