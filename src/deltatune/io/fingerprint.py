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
from ..core.quantized import SourceSample, dense, format_of, packed, sample, source_sample
from ..core.slot import get_slot
from ..core.targeting import base_modules


def tensor_digest(name: str, tensor: torch.Tensor) -> bytes:
    """A digest of one tensor: its name, shape, dtype and up to 64 of its values
    (:func:`deltatune.core.quantized.sample`). A quantised tensor is digested by its format and
    stored parts (codes and scales), so a quantised base has its own fingerprint."""
    fmt = format_of(tensor)
    if fmt is None:
        return hashlib.sha256(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode()
                              + sample(tensor).numpy().tobytes()).digest()
    hasher = hashlib.sha256(f"{name}|{tuple(tensor.shape)}|{fmt.name}|".encode())
    for part in packed(tensor):
        hasher.update(f"{tuple(part.shape)}|{part.dtype}|".encode() + sample(part).numpy().tobytes())
    return hasher.digest()


def rounded_digest(name: str, tensor: torch.Tensor, source: SourceSample | None = None) -> bytes:
    """A digest that does not depend on the precision the base is held in: the tensor's values
    (for a quantised tensor, those of the float tensor it was made from, ``source``) rounded to
    bfloat16. A float32 base, its bfloat16 copy and its int8 or 4-bit versions agree on it."""
    values = source.values if source is not None and format_of(tensor) is not None else sample(dense(tensor))
    rounded = values.to(torch.bfloat16).to(torch.float64)
    return hashlib.sha256(f"{name}|{tuple(tensor.shape)}|rounded|".encode() + rounded.numpy().tobytes()).digest()


def _digest(key: str, module: nn.Module, name: str, tensor: torch.Tensor, rounded: bool) -> bytes:
    return rounded_digest(key, tensor, source_sample(module, name)) if rounded else tensor_digest(key, tensor)


def base_dtype_name(model: nn.Module) -> str:
    """The precision most of ``model``'s base parameters are held in (``"float32"``, ``"bfloat16"``)."""
    counts: dict[str, int] = {}
    for _, p in base_parameters(model):
        key = str(p.dtype).removeprefix("torch.")
        counts[key] = counts.get(key, 0) + p.numel()
    return max(counts, key=counts.get) if counts else "float32"


def quantized_formats(model: nn.Module) -> list[str]:
    """The quantisation formats of ``model``'s base tensors (empty for a float base)."""
    found = {fmt.name for _, p in base_parameters(model) if (fmt := format_of(p)) is not None}
    return sorted(found)


def module_fingerprint(module: nn.Module, rounded: bool = False) -> str:
    """Hash of a base module's tensors (deltatune slots excluded; unmerged values while merged);
    ``rounded=True``: of their precision-independent digests (:func:`rounded_digest`)."""
    hasher = hashlib.sha256()
    for path, sub in base_modules(module):
        slot = get_slot(sub)
        kept = slot.originals if slot is not None else {}
        tensors = [*sub.named_parameters(recurse=False), *sub.named_buffers(recurse=False)]
        for name, tensor in tensors:
            key = f"{path}.{name}" if path else name
            value = kept.get(name, tensor)
            hasher.update(_digest(key, sub, name, value, rounded))
    return hasher.hexdigest()


def combine(per_module: dict[str, str]) -> str:
    """One fingerprint over several modules' fingerprints, in path order."""
    hasher = hashlib.sha256()
    for path in sorted(per_module):
        hasher.update(f"{path}={per_module[path]};".encode())
    return hasher.hexdigest()


WHOLE_BASE = "*"


def whole_base_fingerprint(model: nn.Module, exclude: list[str], rounded: bool = False) -> str:
    """Hash of every base tensor outside the ``exclude`` module paths (for deltas, such as a
    trained head, that adapt no base module but depend on all of them)."""
    hasher = hashlib.sha256()
    for path, sub in base_modules(model):
        if any(path == e or path.startswith(e + ".") for e in exclude):
            continue
        for name, tensor in [*sub.named_parameters(recurse=False), *sub.named_buffers(recurse=False)]:
            hasher.update(_digest(f"{path}.{name}" if path else name, sub, name, tensor, rounded))
    return hasher.hexdigest()
