"""Compressing a saved delta: top-k sparsification and int8 / ternary quantisation.

A compressed delta is an ordinary delta folder (``delta.json`` + ``delta.safetensors``,
same base fingerprint, a checksum of the new tensor file) whose tensors are stored in the
format of :mod:`deltatune.io.compressed`; :func:`deltatune.load` decompresses it on reading.

Example:
    >>> report = compress("runs/lora", "runs/lora-int8", bits=8)
    >>> print(report)            # bytes before / after, ratio, reconstruction error
    >>> dt.load(model, "runs/lora-int8")
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch

from ..errors import ConfigError
from ..io.artifact import FORMAT, META_FILE, TENSORS_FILE, file_sha256, read_meta, read_tensors
from ..io.atomic import atomic_path, write_text_atomic
from ..io.compressed import PACKING, CompressedTensor, encode
from ..io.meaning import Meaning, from_meta, run_folder_meaning
from ..io.schema import check_seal, seal

#: ternary threshold as a multiple of the mean magnitude (Li & Liu 2016, "Ternary Weight Networks")
TERNARY_THRESHOLD = 0.7
#: the training options of a run folder, copied along so ``deltatune eval --delta OUT`` evaluates the same way
RUN_CONFIG = "config.yaml"


@dataclass(frozen=True)
class CompressionReport:
    """What :func:`compress` did.

    Attributes:
        directory: the compressed delta folder.
        density: kept fraction of each compressed tensor's elements (None: all kept).
        bits: 8 (int8), 2 (ternary) or None (values kept as floats).
        bytes_before: size of the source ``delta.safetensors``.
        bytes_after: size of the compressed ``delta.safetensors``.
        relative_error: ``||x - x̂||_F / ||x||_F`` over all compressed tensors together.
        compressed: names of the tensors compressed.
        kept: names of the tensors stored unchanged (vectors: biases, norms, scales).
    """

    directory: Path
    density: float | None
    bits: int | None
    bytes_before: int
    bytes_after: int
    relative_error: float
    compressed: tuple[str, ...]
    kept: tuple[str, ...]

    @property
    def ratio(self) -> float:
        """``bytes_before / bytes_after``."""
        return self.bytes_before / self.bytes_after

    def __str__(self) -> str:
        scheme = describe_scheme(self.density, self.bits)
        return (
            f"compressed delta ({scheme}) -> {self.directory}\n"
            f"size      {self.bytes_before:,} -> {self.bytes_after:,} bytes ({self.ratio:.2f}x smaller)\n"
            f"tensors   {len(self.compressed)} compressed, {len(self.kept)} stored as they were (vectors)\n"
            f"error     relative reconstruction error {self.relative_error:.4g} (Frobenius, compressed tensors)"
        )


def describe_scheme(density: float | None, bits: int | None) -> str:
    """A short name for a compression setting, e.g. ``"top 25% + int8"``."""
    parts = []
    if density is not None:
        parts.append(f"top {density:.0%}")
    if bits is not None:
        parts.append("int8" if bits == 8 else "ternary")
    return " + ".join(parts) or "none"


def top_k_mask(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """A bool mask of the ``ceil(density * numel)`` elements largest in magnitude.

    Raises:
        ConfigError: ``density`` outside (0, 1].
    """
    _check_density(density)
    flat = tensor.detach().reshape(-1)
    count = math.ceil(density * flat.numel())
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    mask[torch.topk(flat.abs(), count, sorted=False).indices] = True
    return mask.reshape(tensor.shape)


def quantize_int8(values: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Symmetric int8 codes in [-127, 127] and the per-tensor scale ``max|x| / 127``.

    ``codes * scale`` is within ``scale / 2`` of every element.
    """
    values = values.detach().to(torch.float64)
    largest = float(values.abs().max()) if values.numel() else 0.0
    scale = largest / 127.0
    if scale == 0.0:
        return torch.zeros(values.shape, dtype=torch.int8), 0.0
    return torch.round(values / scale).clamp(-127, 127).to(torch.int8), scale


def quantize_ternary(values: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Ternary codes in {-1, 0, 1} and a per-tensor scale ``s``; ``codes * s`` approximates ``values``.

    Elements with ``|x| > 0.7 * mean|x|`` keep their sign, the rest become 0, and ``s`` is
    the mean magnitude of the kept ones, which minimises the squared error for that support
    (Li & Liu 2016, "Ternary Weight Networks").
    """
    values = values.detach().to(torch.float64)
    magnitude = values.abs()
    if not values.numel() or float(magnitude.max()) == 0.0:
        return torch.zeros(values.shape, dtype=torch.int8), 0.0
    support = magnitude > TERNARY_THRESHOLD * magnitude.mean()
    scale = float(magnitude[support].mean())
    return (torch.sign(values) * support).to(torch.int8), scale


def compress_tensor(tensor: torch.Tensor, density: float | None = None, bits: int | None = None) -> CompressedTensor:
    """Sparsify (top ``density``) and/or quantise (``bits`` 8 or 2) one tensor.

    Raises:
        ConfigError: a bad ``density`` or ``bits``, or neither given.
    """
    density, bits = check_scheme(density, bits)
    flat = tensor.detach().to("cpu").reshape(-1)
    mask = top_k_mask(flat, density) if density is not None and density < 1.0 else None
    kept = flat if mask is None else flat[mask]
    if bits == 8:
        codes, scale = quantize_int8(kept)
        return CompressedTensor(mask, codes, scale, 8)
    if bits == 2:
        codes, scale = quantize_ternary(kept)
        return CompressedTensor(mask, codes, scale, 2)
    return CompressedTensor(mask, kept.clone(), None, None)


def check_scheme(density: float | None, bits: int | str | None) -> tuple[float | None, int | None]:
    """The validated ``(density, bits)``; ``bits="ternary"`` is read as 2.

    Raises:
        ConfigError: density outside (0, 1], bits other than 8, 2 or "ternary", or neither given.
    """
    if density is None and bits is None:
        raise ConfigError("compress needs density (e.g. 0.25: keep the largest quarter) and/or bits (8 or 2)")
    if density is not None:
        _check_density(density)
    if bits == "ternary":
        bits = 2
    if bits is not None and (isinstance(bits, bool) or bits not in PACKING):
        raise ConfigError(f"compress bits must be 8 (int8) or 2 (ternary), got {bits!r}")
    return density, bits


def _check_density(density: float) -> None:
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
        raise ConfigError(f"density must be the fraction of elements to keep, in (0, 1], got {density!r}; e.g. 0.25")


def compress(
    source: str | Path, out: str | Path, *, density: float | None = None, bits: int | str | None = None
) -> CompressionReport:
    """Compress the delta saved in ``source`` and write it to ``out``.

    Tensors of two or more dimensions (LoRA factors, saved heads, prompts) are compressed;
    vectors (biases, norms, DoRA magnitudes, (IA)3 scales) are small and not centred on zero,
    so they are stored as they were. A compressed delta can be compressed again. The label
    names and task of ``delta.json`` are kept (an older run folder's from its ``metrics.json``).

    Args:
        source: a delta folder (written by :func:`deltatune.save`, possibly compressed).
        out: the folder to write (``source`` itself replaces the delta there).
        density: keep this fraction of each tensor's elements, the largest in magnitude.
        bits: 8 for int8 or 2 (``"ternary"``) for {-s, 0, s}, with one scale per tensor.

    Returns:
        A :class:`CompressionReport` (sizes, ratio, reconstruction error).

    Raises:
        ConfigError: a bad ``density`` or ``bits``.
        DeltaFileError: ``source`` is not a readable delta.
    """
    density, bits = check_scheme(density, bits)
    source, out = Path(source), Path(out)
    meta = read_meta(source)
    tensors = read_tensors(source, meta)
    check_seal(meta, source / META_FILE)  # compressing a changed description would seal the change
    stored, compressed, kept = {}, [], []
    error_energy = total_energy = 0.0
    for key, value in tensors.items():
        if value.dim() < 2 or not value.is_floating_point():
            stored[key] = value
            kept.append(key)
            continue
        parts = compress_tensor(value, density, bits)
        approximation = parts.reconstruct(tuple(value.shape), torch.float64)
        error_energy += float((value.to(torch.float64) - approximation).square().sum())
        total_energy += float(value.to(torch.float64).square().sum())
        stored.update(encode(key, parts))
        compressed.append(key)
    bytes_before = (source / TENSORS_FILE).stat().st_size
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / TENSORS_FILE) as tmp:
        safetensors.torch.save_file(stored, str(tmp), metadata={"format": FORMAT, "method": meta["method"],
                                                                 "name": meta["name"], "compressed": "1"})
    bytes_after = (out / TENSORS_FILE).stat().st_size
    relative_error = math.sqrt(error_energy / total_energy) if total_energy else 0.0
    if from_meta(meta) is None:  # an older run folder: its label names were only in metrics.json
        meta.update((run_folder_meaning(source) or Meaning()).to_meta())
    meta = {
        **meta,
        "tensors_sha256": file_sha256(out / TENSORS_FILE),
        "compression": {"density": density, "bits": bits, "tensors": compressed, "bytes_before": bytes_before,
                        "bytes_after": bytes_after, "relative_error": relative_error},
        "provenance": {**meta.get("provenance", {}), "compressed_from": str(source)},
    }
    write_text_atomic(out / META_FILE, json.dumps(seal(meta), indent=2) + "\n")
    if (source / RUN_CONFIG).is_file() and source.resolve() != out.resolve():
        write_text_atomic(out / RUN_CONFIG, (source / RUN_CONFIG).read_text(encoding="utf-8"))
    return CompressionReport(out, density, bits, bytes_before, bytes_after, relative_error, tuple(compressed), tuple(kept))
