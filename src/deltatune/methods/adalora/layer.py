"""AdaLoRA's unit: an SVD-shaped low-rank update ``s * P diag(lambda) Q`` of a linear weight,
and the orthogonality penalty on ``P`` and ``Q``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...core.build import first_input
from ...core.rows import add_row_low_rank, gathered
from ...core.slot import get_slot
from ...core.weight_delta import WeightDelta
from .config import AdaLoRAConfig

#: the unit's tensors, in peft's names: Q (r, in), lambda (r, 1), P (out, r)
FACTORS = ("lora_A", "lora_E", "lora_B")


class AdaLoRALinear(WeightDelta):
    """``y = W x + b + s * P diag(lambda) Q dropout(x)`` (Zhang et al., 2023).

    ``lora_A`` is ``Q`` (``r x in``, right singular vectors), ``lora_E`` is ``lambda``
    (``r x 1``, zero at start), ``lora_B`` is ``P`` (``out x r``); ``s = alpha / init_r``.
    The buffers are the rank allocator's state: ``mask`` (the triplets the last allocation
    kept) and the smoothed sensitivity and uncertainty of every factor entry.
    """

    def __init__(self, fan_in: int, fan_out: int, rank: int, config: AdaLoRAConfig, transposed: bool = False):
        super().__init__(fan_in, fan_out, transposed)
        self.scaling = config.scaling
        self.lora_A = nn.Parameter(torch.empty(rank, fan_in))
        self.lora_E = nn.Parameter(torch.zeros(rank, 1))
        self.lora_B = nn.Parameter(torch.empty(fan_out, rank))
        orthonormal = config.init == "orthonormal"
        nn.init.normal_(self.lora_A, mean=0.0, std=fan_in ** -0.5 if orthonormal else 0.02)
        nn.init.normal_(self.lora_B, mean=0.0, std=fan_out ** -0.5 if orthonormal else 0.02)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        self.register_buffer("mask", torch.ones(rank, dtype=torch.bool))
        for name in FACTORS:
            shape = getattr(self, name).shape
            self.register_buffer(f"sensitivity_{name}", torch.zeros(shape))
            self.register_buffer(f"uncertainty_{name}", torch.zeros(shape))

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    def scaled_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s * P, diag(lambda) Q)``: ``dW`` is their product."""
        return self.lora_B * self.scaling, self.lora_A * self.lora_E

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        left, right = self.scaled_factors()
        return left @ right

    def forward_post(self, module, args, kwargs, output):
        x = first_input(args, kwargs).to(self.lora_A.dtype)
        if self.dropout is not None:
            x = self.dropout(x)
        update = F.linear(F.linear(x, self.lora_A * self.lora_E), self.lora_B) * self.scaling
        return output + update.to(output.dtype)

    @classmethod
    def mixed_post(cls, units, module, args, kwargs, output, routing):
        cache = get_slot(module).mixed_cache
        right_t = gathered(units, routing.index, lambda u: (u.lora_A * u.lora_E).T, 0.0, cache, "adalora_right_t")
        left_t = gathered(units, routing.index, lambda u: u.lora_B.T * u.scaling, 0.0, cache, "adalora_left_t")
        return add_row_low_rank(units, routing, first_input(args, kwargs), right_t, left_t, output)

    def low_rank_update(self):
        left, right = self.scaled_factors()
        return left.detach(), right.detach(), self.transposed

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        """The kept triplets only: rows of ``Q`` and ``lambda``, columns of ``P`` that the
        last allocation did not mask (all of them before any allocation)."""
        tensors = {name: getattr(self, name).detach() for name in FACTORS}
        if bool(self.mask.all()):
            return tensors
        keep = self.mask
        return {"lora_A": tensors["lora_A"][keep], "lora_E": tensors["lora_E"][keep], "lora_B": tensors["lora_B"][:, keep]}

    def load_saved(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy saved triplets in; tensors of the kept rank only (a hot swap into a live unit
        whose allocation masked some) go to the kept positions, and the masked ``lambda`` stay 0."""
        rows = tensors["lora_A"].shape[0] if "lora_A" in tensors else self.rank
        if rows == self.rank:
            return super().load_saved(tensors)
        keep = self.mask
        with torch.no_grad():
            self.lora_E.zero_()
            self.lora_A[keep] = tensors["lora_A"].to(self.lora_A)
            self.lora_E[keep] = tensors["lora_E"].to(self.lora_E)
            self.lora_B[:, keep] = tensors["lora_B"].to(self.lora_B)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.rank}"


def orthogonality_penalty(units: list[AdaLoRALinear], weight: float) -> torch.Tensor | None:
    """``weight * mean over all P and Q of ||P^T P - I||_F`` and ``||Q Q^T - I||_F``: the
    regulariser of the authors' code and peft (the paper writes the squared norms summed)."""
    terms = []
    for unit in units:
        for cov in (unit.lora_A @ unit.lora_A.T, unit.lora_B.T @ unit.lora_B):
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)))
    if not terms:
        return None
    return weight * (torch.stack(terms).sum() / len(terms))
