"""The EigenLoRAx basis file: per adapted module, frozen orthonormal components on the output
side and on the input side, and what they were made from.

One ``.safetensors`` file (written by :func:`deltatune.algebra.eigenbasis.save_basis`, built by
:func:`deltatune.algebra.eigenbasis.eigen_basis` or ``deltatune eigenbasis``). For each module
path ``P`` it holds:

- ``P.up`` ``(out, m)``: orthonormal columns spanning the output side (the first ``k`` are the
  principal directions of the source deltas' updates, the rest random orthogonal directions);
- ``P.down`` ``(m, in)``: orthonormal rows spanning the input side, likewise;
- ``P.up_values`` / ``P.down_values`` ``(k,)``: the singular values behind the principal ones.

Its metadata (strings) records the format, the sources, ``k``, ``augment``, the seed, and per
module a digest of the base weight (:func:`weight_digest`), so a basis is refused on another base.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ...core.quantized import dense, format_of, sample, source_sample
from ...core.shapes import linear_shape
from ...core.slot import get_slot
from ...errors import ConfigError, DeltaFileError

FORMAT = "deltatune.eigenbasis"
VERSION = "1"
SIDES = ("up", "down", "up_values", "down_values")


@dataclass
class SiteBasis:
    """One module's components: ``up (out, m)`` and ``down (m, in)``, both orthonormal (columns,
    rows), of which the first ``len(up_values)`` are principal; ``digest`` identifies the base weight."""

    up: torch.Tensor
    down: torch.Tensor
    up_values: torch.Tensor
    down_values: torch.Tensor
    digest: str

    @property
    def size(self) -> int:
        """``m``: the components on each side (principal plus random)."""
        return self.up.shape[1]


@dataclass
class EigenBasis:
    """Per-module components shared by every delta trained over them.

    Attributes:
        sites: module path -> :class:`SiteBasis`.
        k: principal components per side; ``augment``: random orthogonal ones added after them.
        sources: the deltas it was built from (folder paths or delta names).
        seed: the seed of the random directions.
    """

    sites: dict[str, SiteBasis]
    k: int
    augment: int = 0
    sources: list[str] = field(default_factory=list)
    seed: int = 0

    @property
    def size(self) -> int:
        return self.k + self.augment

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"{path}.{side}": getattr(site, side).detach().float().contiguous()
                for path, site in self.sites.items() for side in SIDES}

    def metadata(self) -> dict[str, str]:
        return {"format": FORMAT, "version": VERSION, "k": str(self.k), "augment": str(self.augment),
                "seed": str(self.seed), "sources": json.dumps(self.sources),
                "digests": json.dumps({path: site.digest for path, site in self.sites.items()})}


def weight_digest(module: nn.Module) -> str:
    """A digest of a module's base weight that a basis records and checks: its shape and up to 64
    evenly spaced values rounded to bfloat16, those of the float weight a quantised one was made
    from, so the base's precision or quantisation does not change it; nor does a merged delta."""
    slot = get_slot(module)
    weight = slot.originals.get("weight", module.weight) if slot is not None else module.weight
    source = source_sample(module, "weight") if format_of(weight) is not None else None
    if source is not None:
        shape, values = tuple(source.shape), source.values
    else:
        shape, values = tuple(weight.shape), sample(dense(weight.detach()))
    rounded = values.to(torch.bfloat16).to(torch.float64).numpy().tobytes()
    return hashlib.sha256(f"{shape}|".encode() + rounded).hexdigest()


def file_sha256(path: str | Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(block)
    return hasher.hexdigest()


def read_basis(path: str | Path) -> EigenBasis:
    """The basis saved at ``path``.

    Raises:
        ConfigError: no file there.
        DeltaFileError: the file is not a deltatune basis, or its tensors are incomplete.
    """
    import safetensors
    import safetensors.torch

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"eigenlora basis file {str(path)!r} not found; build one from trained LoRA deltas of this "
                          f"base with `deltatune eigenbasis DIR1 DIR2 ... --k 8 --out basis.safetensors` "
                          f"(or deltatune.eigen_basis in Python)")
    try:
        with safetensors.safe_open(str(path), "pt") as handle:
            meta = handle.metadata() or {}
        tensors = safetensors.torch.load_file(str(path))
    except Exception as error:  # noqa: BLE001 - any unreadable file gets one message
        raise DeltaFileError(f"{path} is not a readable safetensors file ({error}); rebuild the basis with "
                             f"`deltatune eigenbasis`") from None
    if meta.get("format") != FORMAT:
        raise DeltaFileError(f"{path} is not an eigenlora basis (format {meta.get('format')!r}, expected {FORMAT!r}); "
                             f"build one with `deltatune eigenbasis`")
    try:
        digests = json.loads(meta["digests"])
        k, augment, seed = int(meta["k"]), int(meta["augment"]), int(meta["seed"])
        sources = list(json.loads(meta["sources"]))
        sites = {p: SiteBasis(*(tensors[f"{p}.{side}"] for side in SIDES), digest=d) for p, d in digests.items()}
    except (KeyError, ValueError, TypeError) as error:
        raise DeltaFileError(f"{path} is an incomplete eigenlora basis (missing or bad {error}); rebuild it with "
                             f"`deltatune eigenbasis`") from None
    for p, site in sites.items():
        if site.up.dim() != 2 or site.down.dim() != 2 or {site.up.shape[1], site.down.shape[0]} != {k + augment}:
            raise DeltaFileError(f"{path}: the components of {p!r} have shapes {list(site.up.shape)} and "
                                 f"{list(site.down.shape)}, not (out, {k + augment}) and ({k + augment}, in); "
                                 f"rebuild the basis")
    return EigenBasis(sites, k, augment, sources, seed)


def site_basis_for(basis: EigenBasis, path: str, module: nn.Module, k: int, where: str) -> SiteBasis:
    """``basis``'s components for the module at ``path``, checked against it.

    Raises:
        TargetError: the basis has no components for this module.
        FingerprintError: the basis was built on another base (shape or weights differ).
        NotApplicableError: ``k`` exceeds the components the basis holds.
    """
    from ...errors import FingerprintError, NotApplicableError, TargetError

    site = basis.sites.get(path)
    if site is None:
        covered = sorted(basis.sites)
        raise TargetError(f"eigenlora basis {where} has no components for module {path!r} (it covers "
                          f"{covered[:4]}{' ...' if len(covered) > 4 else ''}); leave targets unset to adapt "
                          f"the modules the basis covers, or build a basis over these targets")
    fan_in, fan_out, _ = linear_shape(module)
    out_in = (fan_out, fan_in)
    if (site.up.shape[0], site.down.shape[1]) != out_in or site.digest != weight_digest(module):
        raise FingerprintError(f"eigenlora basis {where} was built on another base: module {path!r} "
                               f"(weight (out, in) = {out_in}) differs from the one it records; build the basis "
                               f"from deltas trained on this base")
    if k > site.size:
        raise NotApplicableError(f"eigenlora k={k} exceeds the {site.size} components basis {where} holds "
                                 f"({basis.k} principal + {basis.augment} random); lower k or rebuild the basis "
                                 f"with a larger --k or --augment")
    return site
