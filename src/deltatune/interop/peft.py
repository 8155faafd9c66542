"""Deltas to and from peft's adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``).

The format is peft 0.21.2's: ``PeftModel.from_pretrained(base, folder)`` loads what
:func:`save_peft` writes, and :func:`load_peft` reads what peft's ``save_pretrained`` writes,
for LoRA (rsLoRA, DoRA; Linear, GPT-2 ``Conv1D``, Embedding), (IA)3 and prompt tuning,
with ``modules_to_save`` (a trained head) on both sides. Target modules are written as the
exact list of adapted module names. Only safetensors files are read; no pickle.

The original deltatune config rides along in the safetensors metadata, so an export and
re-import gives back the same config (targeting patterns included), not just the same
tensors; a file from anywhere else gets a config naming the exact modules.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.inject import (
    build_placements,
    check_name_free,
    delete,
    install,
    list_deltas,
    saved_config,
)
from ..core.registry import config_from_dict
from ..core.report import AttachReport
from ..core.saved_module import SavedModule
from ..core.slot import SLOT_ATTR, slot_sites
from ..core.unit import Placement
from ..errors import ConfigError, DeltaError, DeltaFileError
from ..io.artifact import Check, load, read_config, read_meta, resolve_delta_name, save
from ..io.meaning import Meaning, meaning_of, model_task, remember
from .peft_files import (
    MEANING_KEY,
    METADATA_KEY,
    PEFT_TASKS,
    MODEL_PREFIX,
    PROMPT_LEARNING_PREFIX,
    TASK_SAVED_MODULES,
    peft_wrapped,
    read_peft_config,
    read_peft_tensors,
    strip_prefixes,
    task_type,
    write_adapter,
)
from .peft_methods import PeftCodec, check_exportable, codec_for_peft_type, module_names


def save_peft(model: nn.Module, directory: str | Path, name: str | None = None, *,
              base_model_name_or_path: str | None = None) -> Path:
    """Write delta ``name`` (default: the only or the active one) as a peft adapter folder.

    Args:
        model: the model the delta is attached to (its base is the adapter's base).
        directory: the folder to write ``adapter_config.json`` and ``adapter_model.safetensors`` to.
        name: the delta to export.
        base_model_name_or_path: recorded for peft's ``AutoPeftModel`` (default: the model's own).

    Returns:
        the directory.

    Raises:
        ConfigError: peft cannot represent the method or one of its options (the message says why).
        DeltaFileError: the delta holds NaN or inf.

    Example:
        >>> save_peft(model, "out/peft")  # then peft.PeftModel.from_pretrained(base, "out/peft")
    """
    name = resolve_delta_name(model, name, "export")
    config = saved_config(model, name)
    codec = check_exportable(config)
    sites, saved = [], []
    for path, _, slot in slot_sites(model):
        if name in slot:
            (saved if isinstance(slot[name], SavedModule) else sites).append((path, slot[name]))
    for path, unit in sites:
        codec.check_site(path, model.get_submodule(path), unit)
    names = module_names(model)
    fields, adapter_tensors = codec.export_delta(config, sites, names)
    saved_paths = [path for path, _ in saved]
    task = task_type(model)
    task_heads = TASK_SAVED_MODULES.get(task or "", ())
    if task_heads and not codec.prompt_learning and not peft_wrapped(saved_paths, task_heads):
        # peft's task model would require a trained head in the file; the plain PeftModel
        # (no task type) computes the same with the base's head. Prompt tuning needs its task.
        task = None
    patterns = [*saved_paths, *TASK_SAVED_MODULES.get(task or "", ())]
    wrapped = peft_wrapped(names, patterns)
    _check_targets_outside_saved(fields.get("target_modules"), patterns, names)
    prefix = "" if codec.prompt_learning else MODEL_PREFIX
    saved_prefix = PROMPT_LEARNING_PREFIX if codec.prompt_learning else MODEL_PREFIX
    tensors = {(PROMPT_LEARNING_PREFIX if key in codec.tuner_keys else prefix) + key: value
               for key, value in adapter_tensors.items()}
    for path, unit in saved:
        tensors.update({f"{saved_prefix}{path}.{key}": value for key, value in unit.copy.state_dict().items()})
    for path in wrapped:
        if path not in saved_paths:  # peft copies it and needs its weights: the base's, unchanged
            tensors.update({f"{saved_prefix}{path}.{key}": value for key, value in _base_state(model, path).items()})
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in tensors.items()}
    for key, value in tensors.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise DeltaFileError(f"delta {name!r} tensor {key!r} holds NaN or inf; not exported")
    model_config = getattr(model, "config", None)
    peft_config = {
        "peft_type": codec.peft_type, "task_type": task, "inference_mode": True, "revision": None,
        "base_model_name_or_path": base_model_name_or_path or getattr(model_config, "_name_or_path", None) or None,
        "auto_mapping": None if task or model_config is None else {
            "base_model_class": type(model).__name__, "parent_library": type(model).__module__},
        "modules_to_save": saved_paths or None,
        **fields,
    }
    directory = Path(directory)
    write_adapter(directory, peft_config, tensors, {"format": "pt", METADATA_KEY: json.dumps(config.to_dict()),
                                                    MEANING_KEY: json.dumps(meaning_of(model, name).to_meta())})
    return directory


def _base_state(model: nn.Module, path: str) -> dict[str, torch.Tensor]:
    """A base module's own state, without deltatune's slots."""
    state = model.get_submodule(path).state_dict()
    return {key: value for key, value in state.items() if SLOT_ATTR not in key.split(".")}


def _check_targets_outside_saved(targets: Any, patterns: list[str], names: list[str]) -> None:
    """peft never adapts a module inside one it trains whole (``modules_to_save``, its own or the task's)."""
    if targets is None:
        return
    adapted = [n for n in names if (re.fullmatch(targets, n) if isinstance(targets, str) else n in targets)]
    for pattern in patterns:
        inside = [n for n in adapted if re.match(rf"(^|.*\.){re.escape(pattern)}($|\..*)", n)]
        if inside:
            raise ConfigError(f"cannot export to peft: {inside[0]!r} is adapted, but peft trains the modules named "
                              f"{pattern!r} whole (modules_to_save) and never adapts anything inside them")


def _saved_module_paths(model: nn.Module, patterns: list[str], tensors: dict[str, torch.Tensor]) -> list[str]:
    """The modules peft's ``modules_to_save`` rule picked that the file holds weights for."""
    return [n for n in peft_wrapped(module_names(model), patterns) if any(k.startswith(n + ".") for k in tensors)]


def _take(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Remove and return the entries under ``prefix.``, keyed by the rest of their name."""
    keys = [k for k in tensors if k.startswith(prefix + ".")]
    return {k[len(prefix) + 1:]: tensors.pop(k) for k in keys}


def _check_base_copies(model: nn.Module, tensors: dict[str, torch.Tensor], sites: list[str]) -> None:
    """peft may save an adapted embedding's own weights (``<module>.base_layer.weight``); they
    must be the base's, since a deltatune delta never changes base weights."""
    for path in sites:
        for key, value in _take(tensors, f"{path}.base_layer").items():
            base = dict(model.get_submodule(path).named_parameters(recurse=False)).get(key)
            if base is None or base.shape != value.shape or not torch.equal(base.detach().cpu(), value):
                raise DeltaFileError(
                    f"the adapter carries its own {path}.{key}, which differs from this base's (a resized or trained "
                    f"embedding?); deltatune deltas never change base weights, so it cannot be imported onto this base"
                )


def _load_unit(placement: Placement, tensors: dict[str, torch.Tensor]) -> None:
    unit = placement.unit
    if isinstance(unit, SavedModule):
        buffers = dict(unit.copy.named_buffers())
        for key in [k for k in tensors if k in buffers]:
            if not torch.equal(buffers[key].cpu(), tensors.pop(key)):
                raise DeltaFileError(f"modules_to_save buffer {placement.path}.{key} differs from the base's")
        tensors = {f"copy.{k}": v for k, v in tensors.items()}
    expected = {k: v.shape for k, v in unit.saved_tensors().items()}
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise DeltaFileError(f"peft tensors of {placement.path or 'the model'!r} do not fit the "
                             f"{type(unit).__name__} deltatune builds there: missing {missing}, unexpected {extra}")
    for key, shape in expected.items():
        if tensors[key].shape != shape:
            raise DeltaFileError(f"peft tensor {placement.path}.{key} has shape {list(tensors[key].shape)}; "
                                 f"this base needs {list(shape)}")
    unit.load_saved(tensors)


def _exact(paths: list[str]) -> tuple[str, ...]:
    return tuple("re:" + re.escape(p) for p in paths)


def _layout(placements: list[Placement]) -> list[tuple]:
    return sorted((p.path, type(p.unit).__name__, tuple((k, tuple(v.shape)) for k, v in p.unit.saved_tensors().items()))
                  for p in placements)


def _original(model: nn.Module, metadata: dict[str, str], codec: PeftCodec, derived, sites: list[str],
              saved: list[str], placements: list[Placement]):
    """The deltatune config recorded at export and its placements, if it still describes this adapter."""
    try:
        original = config_from_dict(json.loads(metadata[METADATA_KEY]))
    except (KeyError, ValueError, TypeError, RecursionError, DeltaError):
        return None
    if original.method != derived.method or any(
            (getattr(original, f, None) or None) != (getattr(derived, f, None) or None) for f in codec.carried):
        return None
    modules = [s for s in sites if s]
    on_modules = bool(modules)  # prompt tuning sits on the model itself and takes no targets
    try:  # rebuilt the way deltatune.load rebuilds a saved delta
        rebuilt = build_placements(model, original.replace(
            targets=_exact(modules) if on_modules else original.targets, layers=None if on_modules else original.layers,
            target_types=() if on_modules else original.target_types, exclude=(), modules_to_save=_exact(saved)))
    except DeltaError:
        return None
    return (original, rebuilt) if _layout(rebuilt) == _layout(placements) else None


def load_peft(model: nn.Module, directory: str | Path, name: str = "default", *, activate: bool = True) -> AttachReport:
    """Attach a peft adapter (LoRA, DoRA, (IA)3 or prompt tuning) to ``model`` as a deltatune delta.

    Args:
        model: the base the adapter was trained on; it is changed only if everything checks out.
        directory: a folder written by peft's ``save_pretrained``.
        name: the delta's name on ``model``.
        activate: make it the only active delta.

    Raises:
        ConfigError: an unsupported peft type or option (the message names it and says why).
        DeltaFileError: missing or unreadable files, or tensors that do not fit ``model``.
    """
    peft_config = read_peft_config(directory)
    codec = codec_for_peft_type(peft_config.get("peft_type"))
    codec.check_options(peft_config)
    check_name_free(model, name)
    raw, metadata = read_peft_tensors(directory)
    config, site_tensors, rest = codec.import_delta(peft_config, strip_prefixes(raw, codec.prompt_learning,
                                                                                codec.tuner_keys))
    sites = sorted(site_tensors)
    modules = [s for s in sites if s]  # "" is the model itself (a table shared by the adapted modules)
    patterns = list(dict.fromkeys(peft_config.get("modules_to_save") or []))
    saved = _saved_module_paths(model, patterns, rest)
    unit_tensors = {**site_tensors, **{path: _take(rest, path) for path in saved}}
    _check_base_copies(model, rest, [s for s in sites if s])
    if rest:
        raise DeltaFileError(f"the peft adapter holds tensors deltatune cannot place: {sorted(rest)[:5]} (neither "
                             f"{codec.peft_type} tensors of a supported layer nor a modules_to_save module)")
    derived = config.replace(targets=_exact(modules) if modules else None, modules_to_save=_exact(saved))
    placements = _build(model, derived, sites, codec)
    for placement in placements:
        _load_unit(placement, unit_tensors[placement.path])
    record = derived
    original = _original(model, metadata, codec, derived, sites, saved, placements)
    if original is not None:
        record, rebuilt = original
        by_path = {p.path: p for p in placements}
        for placement in rebuilt:
            placement.unit.load_state_dict(by_path[placement.path].unit.state_dict())
        placements = rebuilt
    report = install(model, name, record, placements, activate=activate)
    remember(model, name, _adapter_meaning(model, directory, peft_config, metadata))
    return report


def _adapter_meaning(model: nn.Module, directory: str | Path, peft_config: dict[str, Any],
                     metadata: dict[str, str]) -> Meaning:
    """What an adapter means: label names from a deltatune export's metadata or a ``config.json``
    in the adapter folder, else none; the task from the metadata, peft's task type or the model."""
    try:
        recorded = json.loads(metadata.get(MEANING_KEY) or "{}")
    except ValueError:
        recorded = {}
    recorded = recorded if isinstance(recorded, dict) else {}
    labels = recorded.get("labels") or _folder_labels(Path(directory))
    task = recorded.get("task") or PEFT_TASKS.get(peft_config.get("task_type") or "") or model_task(model)
    return Meaning.of(labels if isinstance(labels, list) else None, task)


def _folder_labels(directory: Path) -> list[str] | None:
    """Label names of a transformers ``config.json`` saved next to the adapter, unless the default ``LABEL_i``."""
    try:
        id2label = json.loads((directory / "config.json").read_text(encoding="utf-8")).get("id2label") or {}
        names = [str(id2label[str(i)]) for i in range(len(id2label))]
    except (OSError, ValueError, AttributeError, KeyError):
        return None
    return names if names and names != [f"LABEL_{i}" for i in range(len(names))] else None


def _build(model: nn.Module, config, sites: list[str], codec: PeftCodec) -> list[Placement]:
    """deltatune's units for an imported adapter, exactly on its modules, or an error saying why not."""
    names = set(module_names(model))
    absent = [s for s in sites if s and s not in names]
    if absent:
        raise DeltaFileError(f"the peft adapter adapts {absent[0]!r}, which this {type(model).__name__} does not "
                             f"have; load it onto the base it was trained on")
    try:
        placements = build_placements(model, config)
    except DeltaError as error:
        raise ConfigError(f"cannot import the peft {codec.peft_type} adapter: {error}") from None
    skipped = dict(getattr(placements, "skipped", []))
    for path in sites:
        if path in skipped:
            raise ConfigError(f"cannot import the peft {codec.peft_type} adapter: deltatune cannot adapt {path!r}: "
                              f"{skipped[path]}")
    for placement in placements:
        if not isinstance(placement.unit, SavedModule):
            codec.check_site(placement.path, model.get_submodule(placement.path), placement.unit)
    return placements


def _free_name(model: nn.Module, wanted: str) -> str:
    taken = set(list_deltas(model))
    name, counter = wanted, 1
    while name in taken:
        counter += 1
        name = f"{wanted}-{counter}"
    return name


def export_peft(delta_dir: str | Path, out_dir: str | Path, model: nn.Module, *, check: Check = "base",
                base_model_name_or_path: str | None = None) -> Path:
    """Convert a deltatune delta folder into a peft adapter folder.

    The base is needed to tell each adapted module's kind (Linear, ``Conv1D`` or Embedding
    name their tensors differently in peft) and to check the delta belongs to it. ``model``
    is left as it was.

    Raises:
        ConfigError: the delta's method or an option has no peft equivalent (the message says why).
        FingerprintError: the delta was made for another base (``check="strict"``).
    """
    meta = read_meta(delta_dir)
    check_exportable(read_config(delta_dir, meta))
    name = _free_name(model, meta["name"])
    load(model, delta_dir, name, check=check, activate=False)
    try:
        return save_peft(model, out_dir, name, base_model_name_or_path=base_model_name_or_path)
    finally:
        delete(model, name)


def import_peft(adapter_dir: str | Path, out_dir: str | Path, model: nn.Module, *, name: str = "default") -> Path:
    """Convert a peft adapter folder into a deltatune delta folder for the base ``model``.

    ``delta.json`` records ``model``'s fingerprint, so load the delta onto the same base
    weights, and the adapter's label names when its folder has them (a deltatune export's
    metadata, or a ``config.json``), else none. ``model`` is left as it was.
    """
    peft_config = read_peft_config(adapter_dir)
    load_peft(model, adapter_dir, name, activate=False)
    try:
        provenance = {"imported_from": str(adapter_dir), "format": "peft", "peft_type": peft_config.get("peft_type"),
                      "peft_version": peft_config.get("peft_version"),
                      "base_model_name_or_path": peft_config.get("base_model_name_or_path")}
        return save(model, out_dir, name, provenance=provenance)
    finally:
        delete(model, name)
