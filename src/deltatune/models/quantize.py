"""Quantising a base model's frozen Linear layers, so a float delta trains on top (QLoRA).

Every ``nn.Linear`` inside the model's transformer blocks (found from its structure,
:func:`deltatune.core.roles.find_roles`) gets its weight replaced by a torchao tensor in the
chosen format (:data:`deltatune.core.quantized.FORMATS`); the module stays an ``nn.Linear``,
so targeting, roles and every method see the same model (its class becomes
:class:`~deltatune.core.quantized.QuantizedLinear`, an ``nn.Linear`` subclass whose backward pass
dequantises the weight again instead of keeping a float copy). Embeddings, heads and tied weights
stay float: a classification head is trained whole, and a weight tied to the embeddings
would change them too. Deltas attach afterwards and stay float32.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.params import parameter_owners, tied_elsewhere
from ..core.quantized import FORMATS, QuantizedLinear, format_of, get_format, packed, quantize_parameter
from ..core.roles import find_roles
from ..core.slot import get_state
from ..core.targeting import base_modules
from ..errors import ConfigError


@dataclass
class QuantizeReport:
    """What :func:`quantize_model` did."""

    format: str
    quantized: list[str] = field(default_factory=list)
    #: Linear layers left in float, with the reason
    skipped: dict[str, str] = field(default_factory=dict)
    bytes_before: int = 0
    bytes_after: int = 0

    def __str__(self) -> str:
        mib = 1 << 20
        text = (f"quantised {len(self.quantized)} Linear layers to {self.format} ({FORMATS[self.format].description}): "
                f"their weights {self.bytes_before / mib:,.1f} MiB -> {self.bytes_after / mib:,.1f} MiB")
        if self.skipped:
            text += "; left in float: " + "; ".join(f"{p} ({why})" for p, why in self.skipped.items())
        return text


def stored_bytes(tensor: torch.Tensor) -> int:
    """Bytes a (possibly quantised) tensor holds."""
    parts = packed(tensor) if format_of(tensor) is not None else [tensor]
    return sum(p.numel() * p.element_size() for p in parts)


def _candidates(model: nn.Module) -> list[str]:
    """Paths of the Linear-like modules to quantise: those in transformer blocks, or every
    ``nn.Linear`` of a model without blocks."""
    found = find_roles(model)
    if found.blocks:
        return found.linears
    return [path for path, module in base_modules(model) if isinstance(module, nn.Linear) and path]


def _copy_out_of_the_checkpoint(model: nn.Module) -> None:
    """Give the tensors that stay float storage of their own. transformers maps the checkpoint
    file into memory and a loaded tensor may be a view of that mapping; quantising read every
    page of it, and while any float tensor (the embeddings) still views it, all of it stays
    resident: on SmolLM2 505 MB of float32 weights that were just replaced by 101 MB of int8."""
    with torch.no_grad():
        for _, module in base_modules(model):
            for _, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                if tensor is not None and format_of(tensor) is None:
                    tensor.data = tensor.data.clone()


def quantize_model(model: nn.Module, fmt: str) -> QuantizeReport:
    """Quantise ``model``'s frozen Linear layers to ``fmt`` (``"int8"`` or ``"4bit"``), in place.

    Raises:
        ConfigError: an unknown format; deltas already attached (quantise the base first); a
            model that is already quantised; or no Linear layer that the format can hold (named).
    """
    chosen = get_format(fmt)
    state = get_state(model)
    if state is not None and state.configs:
        raise ConfigError(f"{type(model).__name__} already has deltas {list(state.configs)}; quantise the base "
                          f"before attaching any (their fingerprints and merges are taken against the base)")
    already = [p for p, m in base_modules(model) if format_of(getattr(m, "weight", None)) is not None]
    if already:
        raise ConfigError(f"{type(model).__name__} is already quantised ({already[0]!r} holds a "
                          f"{format_of(model.get_submodule(already[0]).weight).name} weight); load the float model to "
                          f"quantise it in another format")
    report = QuantizeReport(fmt)
    owners = parameter_owners(model)
    for path in _candidates(model):
        module = model.get_submodule(path)
        if type(module) is not nn.Linear:
            report.skipped[path] = f"a {type(module).__name__}, not an nn.Linear"
            continue
        tied = tied_elsewhere(model, path, owners).get("weight")
        why = f"its weight is tied to {tied[0]}" if tied else chosen.refuses(module.weight.shape)
        if why:
            report.skipped[path] = why
            continue
        report.bytes_before += stored_bytes(module.weight)
        quantize_parameter(module, "weight", chosen)
        module.__class__ = QuantizedLinear  # keeps only the quantised weight for the backward pass
        report.bytes_after += stored_bytes(module.weight)
        report.quantized.append(path)
    if report.quantized:
        _copy_out_of_the_checkpoint(model)
    if not report.quantized:
        kinds = sorted({type(m).__name__ for _, m in base_modules(model)} - {type(model).__name__})
        reasons = "; ".join(f"{p}: {why}" for p, why in report.skipped.items())
        raise ConfigError(
            f"{type(model).__name__} has no Linear layer to quantise to {fmt}"
            + (f" ({reasons})" if reasons else f"; its modules are {', '.join(kinds[:8]) or 'none'}")
            + ". --quantize works on nn.Linear weights; train this model without it."
        )
    return report
