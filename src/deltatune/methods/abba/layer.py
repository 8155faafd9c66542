"""The ABBA unit: the Hadamard product of two trained low-rank products."""

from __future__ import annotations

import torch
from torch import nn

from ..loraxs import FactoredDelta, truncated_svd


def khatri_rao_rows(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Row-wise Khatri-Rao product: ``(n, p)`` and ``(n, q)`` -> ``(n, p q)`` with row ``i`` the
    outer product of the two rows ``i``, flattened."""
    return (left.unsqueeze(2) * right.unsqueeze(1)).flatten(1)


class ABBALinear(FactoredDelta):
    """``dW = s (B1 A1) ⊙ (B2 A2)`` (Singhal et al., 2025), ``B_k: (out, r_k)``, ``A_k: (r_k, in)``.

    Unmerged, the update runs factored through the Khatri-Rao identity
    ``(B1 A1) ⊙ (B2 A2) = (B1 ⊙_row B2)(A1^T ⊙_row A2^T)^T``: a rank ``r1 r2`` product that
    never forms the ``(out, in)`` matrix.
    """

    def __init__(self, fan_in: int, fan_out: int, r1: int, r2: int, scaling: float, transposed: bool = False):
        super().__init__(fan_in, fan_out, transposed)
        self.scaling = scaling
        self.B1 = nn.Parameter(torch.zeros(fan_out, r1))
        self.A1 = nn.Parameter(torch.zeros(r1, fan_in))
        self.B2 = nn.Parameter(torch.zeros(fan_out, r2))
        self.A2 = nn.Parameter(torch.empty(r2, fan_in))
        nn.init.kaiming_uniform_(self.A2)  # as the authors' code (default gain); B2 = 0 makes dW = 0
        #: the first pair still has to come from the base weight (not yet taken, nor loaded)
        self.needs_factors = True

    def take_factors(self, module: nn.Module) -> None:
        """``B1 = U_r1 sqrt(S_r1)``, ``A1 = sqrt(S_r1) V_r1^T`` from the module weight's SVD."""
        U, S, Vh = truncated_svd(module, self.transposed, self.B1.shape[1])
        root = S.sqrt()
        with torch.no_grad():
            self.B1.copy_(U * root)
            self.A1.copy_(root.unsqueeze(1) * Vh)
        self.needs_factors = False

    def attached(self, module, model):
        if self.needs_factors:
            self.take_factors(module)

    def load_saved(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_saved(tensors)
        self.needs_factors = self.needs_factors and not {"B1", "A1"} <= set(tensors)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s B1 ⊙_row B2, A1^T ⊙_row A2^T ^T)``: the update as one ``(out, r1 r2)`` by
        ``(r1 r2, in)`` product (with grad)."""
        up = khatri_rao_rows(self.B1, self.B2) * self.scaling
        down = khatri_rao_rows(self.A1.T, self.A2.T).T
        return up, down

    def delta_weight(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        return self.scaling * (self.B1 @ self.A1) * (self.B2 @ self.A2)

    def extra_repr(self) -> str:
        return f"r1={self.B1.shape[1]}, r2={self.B2.shape[1]}, scaling={self.scaling:g}, " + super().extra_repr()
