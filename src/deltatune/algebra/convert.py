"""Between deltas and task vectors: reading a delta's weight change, attaching a vector as a delta."""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from ..core.build import linear_shape
from ..core.inject import attach, check_name_free
from ..core.merge import require_mergeable
from ..core.params import base_parameters, tensor_key
from ..core.report import AttachReport
from ..core.saved_module import SavedModule
from ..core.slot import get_slot, slot_sites
from ..errors import MergeError
from ..io.meaning import remember
from ..methods.dense import DenseConfig, dense_kind
from ..methods.lora import LoRAConfig
from ..methods.lora.layer import LoRAEmbedding, LoRALinear
from .task_vector import LowRankEntry, TaskVector, check_fits, entry_dense


def split_key(key: str) -> tuple[str, str]:
    """``"a.b.weight"`` -> ``("a.b", "weight")``: the module path and the parameter's own name."""
    path, _, param = key.rpartition(".")
    return path, param


def exact_patterns(paths: list[str]) -> tuple[str, ...]:
    """Target patterns that select exactly these module paths."""
    return tuple("re:" + re.escape(path) for path in paths)


def _factored(unit: nn.Module) -> LowRankEntry | None:
    """A plain LoRA unit's update ``s B A`` with the scaling folded into B; None for anything else."""
    if type(unit) is LoRALinear:
        return LowRankEntry(unit.lora_B.detach() * unit.scaling, unit.lora_A.detach(), unit.fan_in_fan_out)
    if type(unit) is LoRAEmbedding:
        return LowRankEntry(unit.lora_B.detach() * unit.scaling, unit.lora_A.detach(), transposed=True)
    return None


def task_vector_of(model: nn.Module, name: str, *, include_saved: bool = False) -> TaskVector:
    """The change delta ``name`` makes to ``model``'s base weights, as a task vector.

    A LoRA stays factored (``B`` carries the scaling); every other mergeable unit gives the
    dense difference ``merge_params(module, base) - base``. Modules the delta trains as
    copies (``modules_to_save``, e.g. a classifier head) are left out unless ``include_saved``,
    in which case they become dense differences from the base's module.

    Raises:
        MergeError: the delta changes activations rather than weights (adapters, prefix and
            prompt tuning), so it has no weight change.
    """
    require_mergeable(model, name, "it has no task vector and cannot be merged with others; use weight deltas "
                                   "(lora, dora, ia3, bitfit, dense, head)")
    entries = {}
    for path, module, slot in slot_sites(model):
        if name not in slot:
            continue
        unit = slot[name]
        if isinstance(unit, SavedModule) and not include_saved:
            continue
        factored = _factored(unit)
        if factored is not None:
            entries[tensor_key(path, "weight")] = factored
            continue
        # the base values even when some delta is merged into the module right now
        base = {key: slot._originals.get(key, param).detach() for key, param in base_parameters(module)}
        with torch.no_grad():
            changed = unit.merge_params(module, dict(base))
        for key, value in changed.items():
            wide = torch.promote_types(value.dtype, torch.float32)
            difference = value.detach().to(wide) - base[key].to(wide)
            entries[tensor_key(path, key)] = difference
    return TaskVector(entries)


def attach_task_vector(
    model: nn.Module,
    vector: TaskVector,
    name: str,
    rank: int | None = None,
    *,
    saved_modules: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    activate: bool = True,
) -> AttachReport:
    """Attach ``vector`` to ``model`` as a new delta called ``name``.

    - all entries low rank: an exact LoRA with each module's own rank (``r`` the largest,
      others in ``rank_pattern``) and ``alpha = r``; each module's scaling ``alpha / rank``
      is divided out of its ``B``, so ``s B A`` is the entry;
    - ``rank`` given: every entry compressed to its best rank-``rank`` approximation first
      (truncated SVD), then a LoRA as above;
    - otherwise: a ``dense`` delta holding each weight (and bias) difference exactly.

    The new delta means what ``vector.meaning`` records (label names, task), when it records any.

    Args:
        saved_modules: module path -> parameter values of a trained copy of that module
            (a classifier head) to carry with the delta, as ``modules_to_save`` does.

    Raises:
        MergeError: an entry names no parameter of ``model``, has the wrong shape, or sits on a
            module the chosen delta cannot run on (e.g. a convolution).
        DeltaStateError: a delta called ``name`` exists.
    """
    check_name_free(model, name)
    if len(vector) == 0:
        raise MergeError("the task vector is empty: there is nothing to attach")
    check_fits(vector, model)
    if rank is not None:
        vector = vector.low_rank(rank)
    saved_modules = dict(saved_modules or {})
    _check_saved_modules(model, saved_modules)
    if vector.is_factored:
        report = _attach_lora(model, vector, name, saved_modules, activate)
    else:
        report = _attach_dense(model, vector, name, saved_modules, activate)
    _load_saved_modules(model, name, saved_modules)
    if vector.meaning is not None:
        remember(model, name, vector.meaning)
    return report


def _check_modules(model: nn.Module, vector: TaskVector, allowed, what: str) -> dict[str, dict[str, object]]:
    """Entries grouped by module path, after checking each module with ``allowed(module, param, entry)``."""
    by_module: dict[str, dict[str, object]] = {}
    problems = []
    for key, entry in vector.items():
        path, param = split_key(key)
        module = model.get_submodule(path)
        reason = allowed(module, param, entry) if path else "it is a parameter of the model itself"
        if reason:
            problems.append(f"{key} ({reason})")
        by_module.setdefault(path, {})[param] = entry
    if problems:
        raise MergeError(f"cannot attach the task vector as a {what} delta: {'; '.join(problems[:4])}"
                         + (f"; and {len(problems) - 4} more" if len(problems) > 4 else ""))
    return by_module


def _lora_fits(module: nn.Module, param: str, entry: LowRankEntry) -> str | None:
    if param != "weight":
        return f"LoRA changes weights, not {param!r}"
    if _lora_orientation(module) is None:
        return f"{type(module).__name__} is not a Linear, Conv1D or Embedding layer"
    return None


def _lora_orientation(module: nn.Module) -> bool | None:
    """Whether LoRA's ``B A`` is the transpose of the module's weight (Conv1D, Embedding); None if no LoRA fits."""
    shape = linear_shape(module)
    if shape is not None:
        return shape[2]
    return True if isinstance(module, nn.Embedding) else None


def _dense_fits(module: nn.Module, param: str, entry) -> str | None:
    if param not in ("weight", "bias"):
        return f"a dense delta holds weight and bias differences, not {param!r}"
    if dense_kind(module) is None:
        return f"{type(module).__name__} is not a Linear, Conv1D, Embedding or LayerNorm layer; use apply_to instead"
    return None


def _saved_config(saved_modules: Mapping[str, object]) -> tuple[str, ...]:
    return exact_patterns(sorted(saved_modules))


def _units(model: nn.Module, name: str, paths) -> dict[str, nn.Module]:
    return {path: get_slot(model.get_submodule(path))[name] for path in paths}


def _attach_lora(model, vector: TaskVector, name: str, saved_modules, activate: bool) -> AttachReport:
    by_module = _check_modules(model, vector, _lora_fits, "LoRA")
    ranks = {path: max(1, params["weight"].rank) for path, params in by_module.items()}  # a rank-0 entry gets one zero
    rank = max(ranks.values())
    config = LoRAConfig(r=rank, alpha=float(rank), targets=exact_patterns(sorted(by_module)),
                        rank_pattern={path: k for path, k in sorted(ranks.items()) if k != rank} or None,
                        modules_to_save=_saved_config(saved_modules))
    with torch.random.fork_rng(devices=[]):  # LoRA's random init is overwritten; keep the caller's RNG as it was
        report = attach(model, config, name, activate=activate)
    for path, unit in _units(model, name, by_module).items():
        entry = by_module[path]["weight"].oriented(_lora_orientation(model.get_submodule(path)))
        pad = ranks[path] - entry.rank
        lora_b = torch.cat([entry.B, entry.B.new_zeros(entry.B.shape[0], pad)], dim=1) / unit.scaling
        lora_a = torch.cat([entry.A, entry.A.new_zeros(pad, entry.A.shape[1])], dim=0)
        unit.load_saved({"lora_B": lora_b, "lora_A": lora_a})
    return report


def _attach_dense(model, vector: TaskVector, name: str, saved_modules, activate: bool) -> AttachReport:
    by_module = _check_modules(model, vector, _dense_fits, "dense")
    weight = any("weight" in params for params in by_module.values())
    bias = any("bias" in params for params in by_module.values())
    config = DenseConfig(weight=weight, bias=bias, targets=exact_patterns(sorted(by_module)),
                         modules_to_save=_saved_config(saved_modules))
    report = attach(model, config, name, activate=activate)
    for path, unit in _units(model, name, by_module).items():
        values = {f"{param}_delta": entry_dense(entry) for param, entry in by_module[path].items()}
        unit.load_saved({k: v for k, v in values.items() if getattr(unit, k) is not None})
    return report


def _check_saved_modules(model: nn.Module, saved_modules: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    for path, values in saved_modules.items():
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise MergeError(f"{type(model).__name__} has no module {path!r} to carry as a saved module") from None
        expected = {key: param.shape for key, param in base_parameters(module)}
        given = {key: value.shape for key, value in values.items()}
        if expected != given:
            raise MergeError(f"saved module {path!r} needs parameters {expected}, got {given}")


def _load_saved_modules(model: nn.Module, name: str, saved_modules: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    for path, unit in _units(model, name, saved_modules).items():
        unit.load_saved({f"copy.{key}": value for key, value in saved_modules[path].items()})
