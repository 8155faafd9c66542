"""A fingerprint of the base tensors a delta was made for.

It hashes each module's parameter and buffer names, shapes, dtypes and up to
``SAMPLES`` values taken at evenly spaced positions, so it is cheap on large models and
still tells two checkpoints of one architecture apart.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from ..core.slot import get_slot
from ..core.targeting import base_modules

SAMPLES = 64


def tensor_digest(name: str, tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().reshape(-1)
    if flat.numel() > SAMPLES:
        # integer arithmetic: the same positions on every device and for any size (float32
        # linspace rounds past the end above 2**24 elements)
        index = torch.arange(SAMPLES, dtype=torch.int64) * (flat.numel() - 1) // (SAMPLES - 1)
        flat = flat[index.to(flat.device)]
    values = flat.to(torch.float64).cpu().numpy().tobytes()
    header = f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode()
    return hashlib.sha256(header + values).digest()


def module_fingerprint(module: nn.Module) -> str:
    """Hash of a base module's tensors (deltatune slots excluded; unmerged values while merged)."""
    hasher = hashlib.sha256()
    for path, sub in base_modules(module):
        slot = get_slot(sub)
        kept = slot._originals if slot is not None else {}
        tensors = [*sub.named_parameters(recurse=False), *sub.named_buffers(recurse=False)]
        for name, tensor in tensors:
            key = f"{path}.{name}" if path else name
            value = kept.get(name, tensor)
            hasher.update(tensor_digest(key, value))
    return hasher.hexdigest()


def combine(per_module: dict[str, str]) -> str:
    """One fingerprint over several modules' fingerprints, in path order."""
    hasher = hashlib.sha256()
    for path in sorted(per_module):
        hasher.update(f"{path}={per_module[path]};".encode())
    return hasher.hexdigest()


WHOLE_BASE = "*"


def whole_base_fingerprint(model: nn.Module, exclude: list[str]) -> str:
    """Hash of every base tensor outside the ``exclude`` module paths (for deltas, such as a
    trained head, that adapt no base module but depend on all of them)."""
    hasher = hashlib.sha256()
    for path, sub in base_modules(model):
        if any(path == e or path.startswith(e + ".") for e in exclude):
            continue
        for name, tensor in [*sub.named_parameters(recurse=False), *sub.named_buffers(recurse=False)]:
            hasher.update(tensor_digest(f"{path}.{name}" if path else name, tensor))
    return hasher.hexdigest()
