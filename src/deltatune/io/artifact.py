"""Saving a delta as ``delta.safetensors`` + ``delta.json`` and loading it onto a base.

``delta.safetensors`` holds only the delta's tensors, named ``<module path>.<tensor>``.
``delta.json`` holds the method config, schema and deltatune versions, the tensor list,
the base fingerprint and the SHA-256 of the tensor file, so a truncated or mismatched pair
is caught before anything is loaded. Both files are written atomically. No pickle.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from ..core.config import SCHEMA_VERSION, DeltaConfig
from ..version import __version__
from ..core.inject import build_placements, check_name_free, install, saved_config
from ..core.params import tensor_key
from ..core.registry import config_from_dict
from ..core.report import AttachReport
from ..core.slot import require_state, slot_sites
from ..errors import ConfigError, DeltaFileError, DeltaStateError, TargetError
from .atomic import atomic_path, write_text_atomic
from .compressed import decode as decode_compressed
from .base_check import Check, base_fingerprint, check_fingerprint
from .meaning import from_meta, meaning_of, remember
from .schema import FORMAT, FIX, check_meta, check_seal, seal

TENSORS_FILE = "delta.safetensors"
META_FILE = "delta.json"


def file_sha256(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(block)
    return hasher.hexdigest()


def _delta_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    tensors = {}
    for path, _, slot in slot_sites(model):
        if name in slot:
            for key, value in slot[name].saved_tensors().items():
                tensors[tensor_key(path, key)] = value.detach().to("cpu").contiguous()
    return tensors


def resolve_delta_name(model: nn.Module, name: str | None, purpose: str = "save") -> str:
    """``name`` checked, or the model's only delta, or its only active one."""
    state = require_state(model)
    if name is not None:
        state.require(name)
        return name
    if len(state.configs) == 1:
        return next(iter(state.configs))
    if len(state.active) == 1:
        return state.active[0]
    raise DeltaStateError(f"the model has deltas {list(state.configs)}; name the one to {purpose}")


def save(
    model: nn.Module,
    directory: str | Path,
    name: str | None = None,
    *,
    metrics: dict[str, Any] | None = None,
    provenance: dict[str, Any] | None = None,
    labels: list[str] | None = None,
    task: str | None = None,
) -> Path:
    """Write delta ``name`` (default: the only or the active one) to ``directory``.

    ``delta.json`` records what the delta means: ``labels`` (its head's label names, in output
    order) and ``task`` (``"classification"`` or ``"causal_lm"``). Given here they win; else
    they are what the delta was loaded or derived with; else the model's (its config's
    ``id2label`` when the delta carries the classification head and the names are not the
    default ``LABEL_i``; the task from the model's structure); else ``None``.

    Returns:
        the directory.

    Raises:
        DeltaFileError: the delta holds NaN or inf (nothing is written).
    """
    state = require_state(model)
    name = resolve_delta_name(model, name)
    directory = Path(directory)
    tensors = _delta_tensors(model, name)
    for key, value in tensors.items():
        if not torch.isfinite(value).all():
            raise DeltaFileError(f"delta {name!r} tensor {key!r} holds NaN or inf; not saved (training diverged?)")
    config = saved_config(model, name)
    meaning = meaning_of(model, name, labels, task)
    tensor_file = directory / TENSORS_FILE
    with atomic_path(tensor_file) as tmp:
        safetensors.torch.save_file(tensors, str(tmp), metadata={"format": FORMAT, "method": config.method, "name": name})
    meta = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "deltatune_version": __version__,
        "name": name,
        "method": config.method,
        "config": config.to_dict(),
        "sites": state.sites[name],
        "modules_to_save": state.saved_modules[name],
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in tensors.items()},
        "num_parameters": sum(v.numel() for v in tensors.values() if v.is_floating_point()),  # indices are structure
        "tensors_sha256": file_sha256(tensor_file),
        "base": base_fingerprint(model, name),
        **meaning.to_meta(),
        "metrics": metrics or {},
        "provenance": {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(), **(provenance or {})},
    }
    write_text_atomic(directory / META_FILE, json.dumps(seal(meta), indent=2) + "\n")
    return directory


def read_meta(directory: str | Path) -> dict[str, Any]:
    """The parsed ``delta.json`` of a delta folder, checked for format, version and schema
    (:mod:`deltatune.io.schema`): every field has the type :func:`save` writes.

    Raises:
        DeltaFileError: the file is missing, not JSON, not a delta description, newer than this
            deltatune, or a field is missing or of the wrong type (the message names it).
    """
    directory = Path(directory)
    meta_file = directory / META_FILE
    if not meta_file.is_file():
        raise DeltaFileError(
            f"{meta_file} not found; a delta folder holds {META_FILE} and {TENSORS_FILE} (written by deltatune.save)"
        )
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as error:  # not JSON, not UTF-8, too deep, a number too long
        raise DeltaFileError(f"{meta_file} is not valid JSON ({error}); the file is corrupt, save the delta again") from None
    if not isinstance(meta, dict):
        raise DeltaFileError(f"{meta_file} holds {type(meta).__name__} JSON, not a JSON object; {FIX}")
    if meta.get("format") != FORMAT:
        raise DeltaFileError(f"{meta_file} is not a deltatune delta description (format {meta.get('format')!r})")
    version = meta.get("schema_version", 0)
    if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
        raise DeltaFileError(f"{meta_file} has schema version {version}; upgrade deltatune to read it")
    check_meta(meta, meta_file)
    meta.setdefault("labels", None)  # older files do not record what the delta means
    meta.setdefault("task", None)
    return meta


def read_tensors(directory: str | Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The delta's tensors, after checking the file against the checksum and list in ``meta``."""
    tensor_file = Path(directory) / TENSORS_FILE
    if not tensor_file.is_file():
        raise DeltaFileError(f"{tensor_file} not found next to {META_FILE}")
    if file_sha256(tensor_file) != meta["tensors_sha256"]:
        raise DeltaFileError(
            f"{tensor_file} does not match the checksum in {META_FILE}: it is truncated, corrupt, or from another "
            f"save; save the delta again"
        )
    try:
        tensors = safetensors.torch.load_file(str(tensor_file))
    except Exception as error:  # safetensors raises its own error types
        raise DeltaFileError(f"{tensor_file} cannot be read as safetensors: {error}") from None
    if meta.get("compression") is not None:  # written by deltatune.algebra.compress
        tensors = decode_compressed(tensors, meta)
    listed = meta["tensors"]
    if set(listed) != set(tensors):
        raise DeltaFileError(
            f"{tensor_file} holds tensors {sorted(set(tensors) ^ set(listed))[:5]} that differ from the list in {META_FILE}"
        )
    for key, value in tensors.items():
        if list(value.shape) != listed[key]["shape"]:
            raise DeltaFileError(f"tensor {key!r} has shape {list(value.shape)} but {META_FILE} says {listed[key]['shape']}")
        if str(value.dtype).removeprefix("torch.") != listed[key]["dtype"]:
            raise DeltaFileError(f"tensor {key!r} has dtype {value.dtype} but {META_FILE} says {listed[key]['dtype']}; {FIX}")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise DeltaFileError(f"tensor {key!r} in {tensor_file} holds NaN or inf; the delta is unusable")
    return tensors


def read_config(directory: str | Path, meta: dict[str, Any]) -> DeltaConfig:
    """The delta's config, built from ``meta["config"]`` by its method's config class.

    Raises:
        DeltaFileError: an unknown method, an unknown field or a value of the wrong type (named).
    """
    try:
        return config_from_dict(meta["config"])
    except ConfigError as error:
        raise DeltaFileError(f"{Path(directory) / META_FILE}: field 'config' is invalid: {error}; {FIX}") from None


def _exact(paths: list[str]) -> tuple[str, ...]:
    return tuple("re:" + re.escape(p) for p in paths)


def load(
    model: nn.Module,
    directory: str | Path,
    name: str | None = None,
    *,
    check: Check = "base",
    activate: bool = True,
    saved_modules: bool = True,
    overrides: dict[str, Any] | None = None,
) -> AttachReport:
    """Rebuild a saved delta on ``model`` (a fresh base) and load its tensors.

    Args:
        model: the base model; it is changed only if everything checks out.
        directory: a folder written by :func:`save`.
        name: the name to give it on this model (default: its saved name).
        check: ``"base"`` (default) refuses another base and warns for the same base at another
            precision (quantised or not), ``"strict"`` refuses any difference, ``"warn"`` warns,
            ``"off"`` skips.
        activate: make it the only active delta.
        saved_modules: ``False`` leaves out the modules the delta trains whole (its head), so
            a delta of another task's label count loads for its body alone (e.g. to merge it).
        overrides: config fields to change on loading, for options a method lets a user pick
            after training (DyLoRA's ``eval_rank``); checked like the config itself, and a
            field that changes the tensors' shapes fails as a mismatch.

    Raises:
        FingerprintError: the delta was made for another base (or, under ``check="strict"``,
            for the same base at another precision).
        DeltaFileError: files missing, corrupt, truncated, or with missing/extra/misshapen/non-finite tensors;
            a ``delta.json`` field missing or of the wrong type; sealed fields changed after saving.
    """
    meta = read_meta(directory)
    name = name or meta["name"]
    check_name_free(model, name)
    tensors = read_tensors(directory, meta)
    check_fingerprint(model, meta, check)
    carried = meta.get("modules_to_save", []) if saved_modules else []
    if not saved_modules:
        left_out = tuple(f"{path}." for path in meta.get("modules_to_save", []))
        tensors = {key: value for key, value in tensors.items() if not key.startswith(left_out)}
    config = read_config(directory, meta)
    if overrides:
        config = _overridden(config, overrides)
    sites = [p for p in meta["sites"] if p]
    exact = config.replace(
        targets=_exact(sites) if sites else config.targets,
        target_types=() if sites else config.target_types,
        layers=None if sites else config.layers,
        exclude=(),
        modules_to_save=_exact(carried),
    )
    try:
        placements = build_placements(model, exact)
    except TargetError as error:
        raise DeltaFileError(f"delta {meta['name']!r} does not fit this {type(model).__name__}: {error}") from None
    expected = {tensor_key(p.path, k): (p.unit, k, v) for p in placements for k, v in p.unit.saved_tensors().items()}
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise DeltaFileError(f"delta tensors do not fit the model: missing {missing[:5]}, unexpected {extra[:5]}")
    by_unit: dict[int, dict[str, torch.Tensor]] = {}
    for key, (unit, local, needed) in expected.items():
        if tensors[key].shape != needed.shape:
            raise DeltaFileError(f"tensor {key!r} has shape {list(tensors[key].shape)}, the model needs {list(needed.shape)}")
        if tensors[key].is_floating_point() != needed.is_floating_point():
            raise DeltaFileError(f"tensor {key!r} has dtype {tensors[key].dtype}, the model needs {needed.dtype}")
        by_unit.setdefault(id(unit), {})[local] = tensors[key]
    check_seal(meta, Path(directory) / META_FILE)  # last: the checks above name what is wrong more precisely
    for placement in placements:
        placement.unit.load_saved(by_unit.get(id(placement.unit), {}))
    report = install(model, name, config, placements, activate=activate)
    remember(model, name, from_meta(meta))
    return report


def _overridden(config: DeltaConfig, overrides: dict[str, Any]) -> DeltaConfig:
    fields = set(config.to_dict()) - {"method", "schema_version"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(f"overrides {unknown} are not fields of {type(config).__name__}; valid: {sorted(fields)}")
    return config.replace(**overrides)


def head_rows(meta: dict[str, Any]) -> int | None:
    """The output width of the head a delta trains (its ``modules_to_save``): the first
    dimension of the last 2-D weight saved under those modules, else ``None``."""
    saved = tuple(path + "." for path in meta.get("modules_to_save") or ())
    shapes = [info["shape"] for key, info in (meta.get("tensors") or {}).items()
              if key.startswith(saved) and key.endswith("weight") and len(info.get("shape", ())) == 2] if saved else []
    return int(shapes[-1][0]) if shapes else None
