"""The base a delta records in ``delta.json``, and the check that a model is that base.

A delta records the fingerprint of the base modules it adapts (:mod:`.fingerprint`), and
with it the precision the base was held in (its dtype, its quantisation formats) and a second,
precision-independent fingerprint (values rounded to bfloat16; a quantised tensor counts as the
float tensor it was made from). So the check tells three cases apart:

- the same tensors: the delta loads;
- the same base at another precision (a delta trained on the float32 base, loaded on its
  bfloat16, int8 or 4-bit version, or the other way round): under ``check="base"`` (the default)
  it loads with a warning that says how the precisions differ; ``check="strict"`` refuses it;
- another base: refused, unless ``check="warn"`` or ``"off"``.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

from torch import nn

from ..core.quantized import get_format
from ..core.slot import require_state, slot_sites
from ..core.targeting import base_modules
from ..errors import ConfigError, FingerprintError
from .fingerprint import (WHOLE_BASE, base_dtype_name, combine, module_fingerprint, quantized_formats,
                          whole_base_fingerprint)
from .schema import FIX

#: how closely a model must match the base a delta recorded
Check = Literal["strict", "base", "warn", "off"]
CHECKS = ("strict", "base", "warn", "off")


def _fingerprints(model: nn.Module, paths: list[str], saved: list[str], rounded: bool) -> dict[str, str]:
    modules = dict(base_modules(model))
    return {p: whole_base_fingerprint(model, saved, rounded) if p == WHOLE_BASE else module_fingerprint(modules[p], rounded)
            for p in paths}


def _precision(model: nn.Module) -> dict[str, Any]:
    return {"dtype": base_dtype_name(model), "formats": quantized_formats(model)}


def base_fingerprint(model: nn.Module, name: str) -> dict[str, Any]:
    """The fingerprint of the base modules delta ``name`` adapts, as stored in ``delta.json``."""
    paths = {id(module): path for path, module in base_modules(model)}
    sites = [paths[id(target)] for _, module, slot in slot_sites(model) if name in slot
             if (target := slot[name].fingerprint_module(module, model)) is not None]
    saved = require_state(model).saved_modules[name]
    per_module = _fingerprints(model, sites or [WHOLE_BASE], saved, rounded=False)
    config = getattr(model, "config", None)
    return {
        "sha256": combine(per_module),
        "modules": {path: digest[:16] for path, digest in sorted(per_module.items())},
        "model_class": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "precision": {**_precision(model), "rounded_sha256": combine(_fingerprints(model, list(per_module), saved, True))},
    }


def _describe(precision: dict[str, Any]) -> str:
    formats = precision.get("formats") or []
    if not formats:
        return precision.get("dtype", "float32")
    quantised = " and ".join(f"{f} ({get_format(f).description}; about {get_format(f).typical_error:.1%} relative "
                             f"error per weight)" for f in formats)
    return f"{quantised} over {precision.get('dtype', 'float32')}"


def _same_base_other_precision(model: nn.Module, meta: dict[str, Any], paths: list[str]) -> str | None:
    """Why ``model`` is the recorded base at another precision, or ``None`` when it is not."""
    recorded = meta["base"].get("precision")
    now = _precision(model)
    if not recorded or {k: recorded.get(k) for k in now} == now:  # no record, or no precision differs
        return None
    here = combine(_fingerprints(model, paths, meta.get("modules_to_save", []), rounded=True))
    if here != recorded["rounded_sha256"]:
        return None
    return (f"delta {meta['name']!r} was trained on the base in {_describe(recorded)}, and this model is the same base "
            f"in {_describe(now)}, so its outputs will differ from training by the rounding between the two")


def check_fingerprint(model: nn.Module, meta: dict[str, Any], check: Check) -> None:
    """Compare the recorded base fingerprint with ``model``'s; raise, warn or ignore (see the module)."""
    if check == "off":
        return
    if check not in CHECKS:
        raise ConfigError(f"check must be one of {', '.join(map(repr, CHECKS))}, got {check!r}")
    recorded = meta["base"]
    modules = dict(base_modules(model))
    missing = [p for p in recorded["modules"] if p not in modules and p != WHOLE_BASE]
    if missing:
        problem = f"this {type(model).__name__} has no module {missing[0]!r}"
    else:
        here = _fingerprints(model, list(recorded["modules"]), meta.get("modules_to_save", []), rounded=False)
        if combine(here) == recorded["sha256"]:
            return
        precision = _same_base_other_precision(model, meta, list(here))
        if precision is not None:
            if check == "strict":
                raise FingerprintError(f"{precision}. check='strict' asks for the exact tensors: load the base at the "
                                       f"precision it was trained on, or use check='base' to load it with a warning.")
            warnings.warn(precision + ".", stacklevel=3)
            return
        first = next((p for p in sorted(here) if here[p][:16] != recorded["modules"][p]), None)
        if first is None:  # every module digest agrees, the combined one does not
            problem = f"its per-module digests match but the combined fingerprint does not; {FIX}"
        else:
            where = "its base tensors differ" if first == WHOLE_BASE else f"module {first!r} holds different weights"
            problem = f"{where} (fingerprint {here[first][:16]} vs {recorded['modules'][first]})"
    message = (
        f"delta {meta['name']!r} was made for another base ({recorded.get('model_class')}, fingerprint "
        f"{recorded['sha256'][:16]}): {problem}. Load the base it was trained on, or pass check='warn' "
        f"(or 'off') to load it anyway."
    )
    if check == "warn":
        warnings.warn(message, stacklevel=3)
        return
    raise FingerprintError(message)
