"""How a compressed delta stores its tensors in ``delta.safetensors``, and how they are read back.

A compressed tensor ``key`` is stored as parts next to the uncompressed ones:

- ``key#mask``: which elements are kept (sparsified deltas), one bit per element, packed
  eight to a ``uint8``, row-major;
- ``key#values``: the kept elements in row-major order: floats as they were (no
  quantisation), ``int8`` codes (8 bits), or ternary codes in {-1, 0, 1} packed five to a
  ``uint8`` in base 3 (``bits=2``, 1.6 bits per element);
- ``key#scale``: one ``float32``; a quantised element is ``code * scale``.

``delta.json`` keeps listing the original tensors (name, shape, dtype) under ``tensors`` and
records the scheme under ``compression``; :func:`decode` turns the stored parts back into
those tensors, so a compressed delta loads like any other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import DeltaFileError

MASK, VALUES, SCALE = "#mask", "#values", "#scale"
#: quantisation schemes: bits -> (base, digits per stored byte) of the packed codes, None: int8 as they are
PACKING = {8: None, 2: (3, 5)}


@dataclass(frozen=True)
class CompressedTensor:
    """A tensor as kept elements (``mask``), their values or codes, and a quantisation scale.

    Attributes:
        mask: flat bool tensor of the kept elements, or None when all are kept.
        values: the kept elements (floats), or their integer codes when ``bits`` is set.
        scale: the quantisation step (``element = code * scale``); None without quantisation.
        bits: 8 (int8 codes), 2 (ternary codes in {-1, 0, 1}) or None.
    """

    mask: torch.Tensor | None
    values: torch.Tensor
    scale: float | None
    bits: int | None

    def reconstruct(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The dense tensor these parts stand for."""
        values = self.values.to(torch.float32) * self.scale if self.bits else self.values.to(torch.float32)
        if self.mask is None:
            return values.reshape(shape).to(dtype)
        dense = torch.zeros(self.mask.numel(), dtype=torch.float32)
        dense[self.mask] = values
        return dense.reshape(shape).to(dtype)


def pack_digits(digits: torch.Tensor, base: int, per_byte: int) -> torch.Tensor:
    """Packs a flat tensor of digits in ``[0, base)`` into ``uint8``, ``per_byte`` digits a byte."""
    padded = torch.zeros(math.ceil(digits.numel() / per_byte) * per_byte, dtype=torch.int32)
    padded[: digits.numel()] = digits.to(torch.int32)
    weights = base ** torch.arange(per_byte, dtype=torch.int32)
    return (padded.reshape(-1, per_byte) * weights).sum(1).to(torch.uint8)


def unpack_digits(packed: torch.Tensor, base: int, per_byte: int, count: int) -> torch.Tensor:
    """The first ``count`` digits packed by :func:`pack_digits`, as ``int64``."""
    weights = base ** torch.arange(per_byte, dtype=torch.int64)
    digits = (packed.to(torch.int64)[:, None] // weights) % base
    return digits.reshape(-1)[:count]


def encode(key: str, compressed: CompressedTensor) -> dict[str, torch.Tensor]:
    """The stored parts of one compressed tensor, by their names in ``delta.safetensors``."""
    parts = {}
    if compressed.mask is not None:
        parts[key + MASK] = pack_digits(compressed.mask.reshape(-1), 2, 8)
    packing = PACKING.get(compressed.bits) if compressed.bits else None
    if packing is not None:
        parts[key + VALUES] = pack_digits(compressed.values.reshape(-1) + 1, *packing)
    else:
        parts[key + VALUES] = compressed.values.reshape(-1).contiguous()
    if compressed.bits:
        parts[key + SCALE] = torch.tensor([compressed.scale], dtype=torch.float32)
    return parts


def decode(stored: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The delta's tensors as ``meta["tensors"]`` lists them, rebuilt from a compressed file.

    Raises:
        DeltaFileError: the scheme is unknown, or parts are missing, extra, or inconsistent.
    """
    scheme = meta["compression"]
    if not isinstance(scheme, dict) or not isinstance(scheme.get("tensors"), list):
        raise DeltaFileError(f"delta.json 'compression' is malformed ({scheme!r}); compress the delta again")
    bits, density = scheme.get("bits"), scheme.get("density")
    if bits is not None and bits not in PACKING:
        raise DeltaFileError(f"delta.json names an unknown quantisation (bits={bits!r}); upgrade deltatune")
    sparse = density is not None and density < 1.0
    tensors, used = {}, set()
    for key, info in meta["tensors"].items():
        if key not in scheme["tensors"]:
            tensors[key] = _part(stored, key, used)
            continue
        shape, count = tuple(info["shape"]), math.prod(info["shape"])
        mask = None
        if sparse:
            packed = _part(stored, key + MASK, used, torch.uint8, math.ceil(count / 8))
            mask = unpack_digits(packed, 2, 8, count).bool()
        kept = count if mask is None else int(mask.sum())
        values = _values(stored, key, used, bits, kept)
        scale = None
        if bits:
            scale = float(_part(stored, key + SCALE, used, torch.float32, 1)[0])
            if not math.isfinite(scale) or scale < 0:
                raise DeltaFileError(f"tensor {key!r} has an invalid quantisation scale {scale}; the file is corrupt")
        dtype = getattr(torch, info["dtype"], None)
        if not isinstance(dtype, torch.dtype):
            raise DeltaFileError(f"tensor {key!r} has an unknown dtype {info['dtype']!r} in delta.json")
        tensors[key] = CompressedTensor(mask, values, scale, bits).reconstruct(shape, dtype)
    extra = sorted(set(stored) - used)
    if extra:
        raise DeltaFileError(f"the compressed delta file holds tensors delta.json does not describe: {extra[:5]}")
    return tensors


def _values(stored: dict[str, torch.Tensor], key: str, used: set[str], bits: int | None, kept: int) -> torch.Tensor:
    if bits is None:
        return _part(stored, key + VALUES, used, None, kept)
    packing = PACKING[bits]
    if packing is None:
        return _part(stored, key + VALUES, used, torch.int8, kept)
    base, per_byte = packing
    packed = _part(stored, key + VALUES, used, torch.uint8, math.ceil(kept / per_byte))
    if bool((packed.to(torch.int64) >= base**per_byte).any()):
        raise DeltaFileError(f"tensor {key!r} holds ternary codes out of range; the file is corrupt")
    return unpack_digits(packed, base, per_byte, kept) - 1


def _part(stored: dict[str, torch.Tensor], name: str, used: set[str], dtype: torch.dtype | None = None,
          count: int | None = None) -> torch.Tensor:
    if name not in stored:
        raise DeltaFileError(f"the compressed delta file lacks the tensor {name!r}; the file is incomplete")
    part = stored[name]
    if dtype is not None and part.dtype != dtype:
        raise DeltaFileError(f"tensor {name!r} has dtype {part.dtype}, expected {dtype}; the file is corrupt")
    if count is not None and part.numel() != count:
        raise DeltaFileError(f"tensor {name!r} has {part.numel()} elements, expected {count}; the file is corrupt")
    used.add(name)
    return part
