"""A fingerprint of the base tensors a delta was made for.

It hashes each module's parameter and buffer names, shapes, dtypes and up to
64 values taken at evenly spaced positions, so it is cheap on large models and
still tells two checkpoints of one architecture apart.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from ..core.params import base_parameters
from ..core.quantized import SourceSample, format_of, packed, sample, source_sample
from ..core.slot import get_slot
from ..core.targeting import base_modules


def tensor_digest(name: str, tensor: torch.Tensor, source: SourceSample | None = None) -> bytes:
    """A digest of one tensor: its name, shape, dtype and up to 64 of its values
    (:func:`deltatune.core.quantized.sample`).

    A quantised tensor is digested by its format and stored parts (codes and scales), so a
    quantised base has its own fingerprint. Given the ``source`` a quantised tensor was made from
    (:func:`deltatune.core.quantized.source_sample`), it gives that float tensor's digest instead,
    so a fingerprint can also say "this base, quantised".
    """
    fmt = format_of(tensor)
    if fmt is None or source is not None:
        shape, dtype, values = (tuple(tensor.shape), tensor.dtype, sample(tensor)) if fmt is None else \
            (source.shape, source.dtype, source.values)
        return hashlib.sha256(f"{name}|{shape}|{dtype}|".encode() + values.numpy().tobytes()).digest()
    hasher = hashlib.sha256(f"{name}|{tuple(tensor.shape)}|{fmt.name}|".encode())
    for part in packed(tensor):
        hasher.update(f"{tuple(part.shape)}|{part.dtype}|".encode() + sample(part).numpy().tobytes())
    return hasher.digest()


def quantized_formats(model: nn.Module) -> list[str]:
    """The quantisation formats of ``model``'s base tensors (empty for a float base)."""
    found = {fmt.name for _, p in base_parameters(model) if (fmt := format_of(p)) is not None}
    return sorted(found)


def module_fingerprint(module: nn.Module, source: bool = False) -> str:
    """Hash of a base module's tensors (deltatune slots excluded; unmerged values while merged);
    ``source=True``: of the float tensors its quantised ones were made from."""
    hasher = hashlib.sha256()
    for path, sub in base_modules(module):
        slot = get_slot(sub)
        kept = slot._originals if slot is not None else {}
        tensors = [*sub.named_parameters(recurse=False), *sub.named_buffers(recurse=False)]
        for name, tensor in tensors:
            key = f"{path}.{name}" if path else name
            value = kept.get(name, tensor)
            hasher.update(tensor_digest(key, value, source_sample(sub, name) if source else None))
    return hasher.hexdigest()


def combine(per_module: dict[str, str]) -> str:
    """One fingerprint over several modules' fingerprints, in path order."""
    hasher = hashlib.sha256()
    for path in sorted(per_module):
        hasher.update(f"{path}={per_module[path]};".encode())
    return hasher.hexdigest()


WHOLE_BASE = "*"


def whole_base_fingerprint(model: nn.Module, exclude: list[str], source: bool = False) -> str:
    """Hash of every base tensor outside the ``exclude`` module paths (for deltas, such as a
    trained head, that adapt no base module but depend on all of them)."""
    hasher = hashlib.sha256()
    for path, sub in base_modules(model):
        if any(path == e or path.startswith(e + ".") for e in exclude):
            continue
        for name, tensor in [*sub.named_parameters(recurse=False), *sub.named_buffers(recurse=False)]:
            hasher.update(tensor_digest(f"{path}.{name}" if path else name, tensor,
                                        source_sample(sub, name) if source else None))
    return hasher.hexdigest()
