"""Which peft codec serves a delta or a peft adapter, read from the methods' registrations.

Each method that peft can represent declares a :class:`~deltatune.core.codec.PeftCodec`
(``MethodSpec.peft``); the others declare why they cannot (``MethodSpec.peft_refusal``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from ..core.codec import PeftCodec
from ..core.config import DeltaConfig
from ..core.registry import get_method, method_specs
from ..core.targeting import base_modules
from ..errors import ConfigError


def _codecs() -> list[PeftCodec]:
    return list({id(spec.peft): spec.peft for spec in method_specs() if spec.peft is not None}.values())


def codec_for_method(method: str) -> PeftCodec:
    """The codec that exports deltas of ``method``; a clear refusal for the others."""
    spec = get_method(method)
    if spec.peft is not None:
        return spec.peft
    supported = ", ".join(s.name for s in method_specs() if s.peft is not None)
    raise ConfigError(f"cannot export a {method!r} delta to peft: {spec.peft_refusal}. peft export supports "
                      f"{supported} deltas")


def codec_for_peft_type(peft_type: Any) -> PeftCodec:
    """The codec that imports adapters of ``peft_type``; a clear refusal for the others."""
    for codec in _codecs():
        if peft_type == codec.peft_type:
            return codec
    supported = ", ".join(c.peft_type for c in _codecs())
    raise ConfigError(f"cannot import a peft {peft_type!r} adapter: deltatune imports peft {supported} adapters only")


def check_exportable(config: DeltaConfig) -> PeftCodec:
    """The codec for ``config``, after refusing any option its peft type cannot carry."""
    codec = codec_for_method(config.method)
    targeting = {"targets", "target_types", "layers", "exclude", "modules_to_save"}
    defaults = type(config)()
    for field in dataclasses.fields(config):
        if field.name in targeting or field.name in codec.exported_fields:
            continue
        if getattr(config, field.name) != getattr(defaults, field.name):
            raise ConfigError(f"cannot export the {config.method} delta to peft: its option {field.name}="
                              f"{getattr(config, field.name)!r} has no peft {codec.peft_type} equivalent")
    return codec


def module_names(model: nn.Module) -> list[str]:
    """Names of the base model's modules, as peft sees them (deltatune's own slots left out)."""
    return [name for name, _ in base_modules(model) if name]
