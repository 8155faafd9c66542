"""EigenLoRAx: a new task trains only loadings over the principal subspace of existing LoRAs.

Kaushik, Vaidya, Chaudhari and Yuille, 2025, "EigenLoRAx: Recycling Adapters to Find Principal
Subspaces for Resource-Efficient Adaptation and Inference" (arXiv:2502.04700). From ``N`` deltas
of one base, per adapted module, the top ``k`` principal directions of their updates on the
output side (``U``, ``(out, k)``) and on the input side (``D``, ``(k, in)``), optionally followed
by random orthogonal ones, are frozen; a new task trains the loadings ``L_B (k, r)`` and
``L_A (r, k)`` of LoRA factors written in them::

    dW = (alpha / r) * U L_B L_A D,    y = W x + b + dW x

The basis comes from a file (``basis=``, built by :func:`deltatune.eigen_basis` or
``deltatune eigenbasis``); a saved delta carries its components, so it loads without the file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from ...core.build import per_linear
from ...core.config import DeltaConfig, check
from ...core.registry import MethodSpec, Mixing, register_method
from ...core.unit import Placements
from ..loraxs import check_rank
from .basis import EigenBasis, SiteBasis, file_sha256, read_basis, site_basis_for, weight_digest
from .layer import EigenLoRALinear, random_orthonormal

__all__ = ["EigenBasis", "EigenLoRAConfig", "EigenLoRALinear", "SiteBasis", "random_orthonormal", "read_basis",
           "weight_digest"]

DEFAULT_ROLES = ["q|qkv", "v"]


@dataclass(frozen=True)
class EigenLoRAConfig(DeltaConfig):
    """EigenLoRAx: ``W x + (alpha / r) U L_B L_A D x`` with the components ``U``, ``D`` frozen and
    only the loadings ``L_B (k, r)``, ``L_A (r, k)`` trained.

    Args:
        basis: a basis file (``deltatune eigenbasis``) giving each module's components; with no
            targets the delta adapts the modules the basis covers. Empty: random orthonormal
            components drawn from ``basis_seed`` (no recycled knowledge; a saved delta records an
            empty basis since it carries its components).
        k: components used per side: the basis's first ``k`` (principal first, then its random
            ones); at most what the basis holds.
        r: the rank of the loadings (LoRA's rank), so a module's update has rank at most ``min(k, r)``.
        alpha: scale numerator; the update is multiplied by ``alpha / r``, as in LoRA.
        basis_seed: seed of the random components used when ``basis`` is empty.
        basis_sha256: the SHA-256 of the basis file the delta was attached with (filled in at
            attach; provenance: deltas trained over one basis share their components).
    """

    method = "eigenlora"

    basis: str = ""
    k: int = 8
    r: int = 8
    alpha: float = 16.0
    basis_seed: int = 0
    basis_sha256: str = ""

    def validate(self) -> None:
        check(self.k > 0, f"eigenlora field 'k' must be a positive integer, got {self.k!r}; try k=8")
        check(self.r > 0, f"eigenlora field 'r' must be a positive integer, got {self.r!r}; try r=8")
        check(self.alpha > 0, f"eigenlora field 'alpha' must be positive, got {self.alpha!r}; try alpha=16")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def build(model: nn.Module, config: EigenLoRAConfig) -> Placements:
    basis = read_basis(config.basis) if config.basis else None
    targets = config.targets
    if basis is not None and targets is None and not config.target_types:
        targets = tuple("re:" + re.escape(path) for path in sorted(basis.sites))
    sites: list[tuple[EigenLoRALinear, SiteBasis | None]] = []

    def make(path: str, module: nn.Module, fan_in: int, fan_out: int, transposed: bool):
        check_rank("eigenlora", path, module, config.k, "k")
        site = site_basis_for(basis, path, module, config.k, repr(config.basis)) if basis else None
        unit = EigenLoRALinear(fan_in, fan_out, config.k, config.r, config.scaling, transposed,
                               seed=config.basis_seed + len(sites))
        sites.append((unit, site))
        return unit

    placements = per_linear(model, config.replace(targets=targets), DEFAULT_ROLES, make)
    for unit, site in sites:
        if site is not None:
            unit.set_basis(site.up[:, :config.k], site.down[:config.k])
    if basis is not None:
        placements.resolved = config.replace(basis_sha256=file_sha256(config.basis))
    return placements


def _saved_config(config: EigenLoRAConfig, sites) -> EigenLoRAConfig:
    # the delta file carries the components: a saved delta never needs the basis file again
    return config.replace(basis="")


register_method(MethodSpec(
    "eigenlora", EigenLoRAConfig, build, size_option="k", mergeable=True, identity_at_init=True,
    summary="LoRA loadings trained over frozen principal components of other LoRAs (EigenLoRAx)",
    default_lr=3e-2, mixing=Mixing("batched"), saved_config=_saved_config,
    peft_refusal="peft has no EigenLoRAx adapter: its frozen components and loadings have no peft layout"))
