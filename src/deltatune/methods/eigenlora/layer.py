"""The EigenLoRAx unit: LoRA factors written as trained loadings over frozen components."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..loraxs import FactoredDelta


def random_orthonormal(rows: int, columns: int, generator: torch.Generator) -> torch.Tensor:
    """``columns`` orthonormal columns of length ``rows`` (QR of a Gaussian draw, signs fixed so
    the result depends only on the draw)."""
    q, r = torch.linalg.qr(torch.randn(rows, columns, generator=generator, dtype=torch.float64))
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return (q * signs).float()


class EigenLoRALinear(FactoredDelta):
    """``dW = s * (U L_B) (L_A D)``: LoRA's ``B = U L_B`` and ``A = L_A D`` over frozen components.

    ``U`` (``up_basis``, ``(out, k)``, orthonormal columns) and ``D`` (``down_basis``, ``(k, in)``,
    orthonormal rows) are buffers saved with the delta; only the loadings ``L_B`` (``(k, r)``,
    zero at start, so the delta starts as the identity) and ``L_A`` (``(r, k)``, Kaiming-uniform as
    LoRA's ``A``) train: ``2 k r`` numbers per module. Kaushik et al., 2025, "EigenLoRAx"
    (arXiv:2502.04700).

    A unit built without components (``needs_basis``) gets them from a delta file
    (:meth:`load_saved`) or, when attached fresh, as random orthonormal directions drawn from
    ``seed``.
    """

    def __init__(self, fan_in: int, fan_out: int, k: int, r: int, scaling: float, transposed: bool = False,
                 seed: int = 0):
        super().__init__(fan_in, fan_out, transposed)
        self.scaling, self.seed = scaling, seed
        self.register_buffer("up_basis", torch.zeros(fan_out, k))
        self.register_buffer("down_basis", torch.zeros(k, fan_in))
        self.up_loadings = nn.Parameter(torch.zeros(k, r))
        self.down_loadings = nn.Parameter(torch.empty(r, k))
        nn.init.kaiming_uniform_(self.down_loadings, a=math.sqrt(5))
        #: the components have yet to come (from a basis, a delta file, or a random draw)
        self.needs_basis = True

    def set_basis(self, up: torch.Tensor, down: torch.Tensor) -> None:
        """Take ``up (out, k)`` and ``down (k, in)`` as the frozen components."""
        with torch.no_grad():
            self.up_basis.copy_(up)
            self.down_basis.copy_(down)
        self.needs_basis = False

    def attached(self, module, model):
        if self.needs_basis:
            generator = torch.Generator().manual_seed(self.seed)
            k = self.up_basis.shape[1]
            up = random_orthonormal(self.fan_out, k, generator)
            self.set_basis(up, random_orthonormal(self.fan_in, k, generator).T)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s U L_B, L_A D)``: LoRA's ``(out, r)`` and ``(r, in)`` factors, scaling in the first (with grad)."""
        return self.up_basis @ self.up_loadings * self.scaling, self.down_loadings @ self.down_basis

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        return {"up_loadings": self.up_loadings.detach(), "down_loadings": self.down_loadings.detach(),
                "up_basis": self.up_basis, "down_basis": self.down_basis}

    def load_saved(self, tensors: dict[str, torch.Tensor]) -> None:
        own = {"up_loadings": self.up_loadings, "down_loadings": self.down_loadings,
               "up_basis": self.up_basis, "down_basis": self.down_basis}
        with torch.no_grad():
            for name, value in tensors.items():
                own[name].copy_(value)
        self.needs_basis = self.needs_basis and not {"up_basis", "down_basis"} <= set(tensors)

    def extra_repr(self) -> str:
        k, r = self.up_loadings.shape
        return f"k={k}, r={r}, scaling={self.scaling:g}, " + super().extra_repr()
