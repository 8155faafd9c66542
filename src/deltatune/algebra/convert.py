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
from ..core.quantized import dense
from ..core.report import AttachReport
from ..core.saved_module import SavedModule
from ..core.slot import get_slot, slot_sites
from ..core.unit import DeltaUnit
from ..errors import MergeError
from ..io.meaning import Meaning, remember
from ..methods.dense import DenseConfig, dense_kind
from ..methods.lora import LoRAConfig
from .entries import Entry, LowRankEntry, entry_dense


def split_key(key: str) -> tuple[str, str]:
    """``"a.b.weight"`` -> ``("a.b", "weight")``: the module path and the parameter's own name."""
    path, _, param = key.rpartition(".")
    return path, param


def exact_patterns(paths: list[str]) -> tuple[str, ...]:
    """Target patterns that select exactly these module paths."""
    return tuple("re:" + re.escape(path) for path in paths)


def _factored(unit: DeltaUnit) -> LowRankEntry | None:
    """The unit's update as low-rank factors (scaling folded into B), when it is one."""
    update = unit.low_rank_update()
    return None if update is None else LowRankEntry(*update)


def delta_entries(model: nn.Module, name: str, *, include_saved: bool = False) -> dict[str, Entry]:
    """The change delta ``name`` makes to ``model``'s base weights, by parameter name
    (see :func:`deltatune.algebra.task_vector_of`).

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
        base = {key: dense(slot.originals.get(key, param).detach()) for key, param in base_parameters(module)}
        with torch.no_grad():
            changed = unit.merge_params(module, dict(base))
        for key, value in changed.items():
            wide = torch.promote_types(value.dtype, torch.float32)
            difference = value.detach().to(wide) - base[key].to(wide)
            entries[tensor_key(path, key)] = difference
    return entries


def attach_entries(
    model: nn.Module,
    vector: Mapping[str, Entry],
    name: str,
    *,
    saved_modules: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    activate: bool = True,
    meaning: Meaning | None = None,
) -> AttachReport:
    """Attach ``vector`` to ``model`` as a new delta called ``name``.

    - all entries low rank: an exact LoRA with each module's own rank (``r`` the largest,
      others in ``rank_pattern``) and ``alpha = r``; each module's scaling ``alpha / rank``
      is divided out of its ``B``, so ``s B A`` is the entry;
    - otherwise: a ``dense`` delta holding each weight (and bias) difference exactly.

    The new delta means what ``meaning`` records (label names, task), when given.

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
    saved_modules = dict(saved_modules or {})
    _check_saved_modules(model, saved_modules)
    if all(isinstance(entry, LowRankEntry) for _, entry in vector.items()):
        report = _attach_lora(model, vector, name, saved_modules, activate)
    else:
        report = _attach_dense(model, vector, name, saved_modules, activate)
    _load_saved_modules(model, name, saved_modules)
    if meaning is not None:
        remember(model, name, meaning)
    return report


def _check_modules(model: nn.Module, vector: Mapping[str, Entry], allowed, what: str) -> dict[str, dict[str, object]]:
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


def _attach_lora(model, vector: Mapping[str, Entry], name: str, saved_modules, activate: bool) -> AttachReport:
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


def _attach_dense(model, vector: Mapping[str, Entry], name: str, saved_modules, activate: bool) -> AttachReport:
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


def check_fits(vector: Mapping[str, Entry], model: nn.Module) -> dict[str, nn.Parameter]:
    """The model's base parameters, after checking every entry names one of the right shape."""
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
