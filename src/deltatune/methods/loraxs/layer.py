"""The LoRA-XS unit, and the truncated SVD of a base weight that LoRA-XS, EDoRA and ABBA start from."""

from __future__ import annotations

import torch
from torch import nn

from ...core.build import first_input
from ...core.rows import as_rows, gathered
from ...core.shapes import linear_shape, weight_as_out_in
from ...core.slot import get_slot
from ...core.weight_delta import WeightDelta
from ...errors import NotApplicableError
from ..lora.layer import add_lora


def check_rank(method: str, path: str, module: nn.Module, rank: int, field: str = "r") -> None:
    """Refuse a rank the module's weight cannot hold: a truncated SVD of an ``(out, in)`` weight
    has at most ``min(in, out)`` components.

    Raises:
        NotApplicableError: naming the module, its type and shape, the rank and the fix.
    """
    fan_in, fan_out, _ = linear_shape(module)
    if rank > min(fan_in, fan_out):
        raise NotApplicableError(
            f"{method} cannot adapt {path!r} ({type(module).__name__}, weight (out, in) = ({fan_out}, {fan_in})): "
            f"{field}={rank} exceeds min(in, out) = {min(fan_in, fan_out)}, the most singular vectors it has; "
            f"lower {field} or exclude the module")


def truncated_svd(module: nn.Module, transposed: bool, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top ``rank`` singular triplets of the module's ``(out, in)`` weight, computed in float32:
    ``U_r (out, r)``, ``S_r (r,)``, ``Vh_r (r, in)`` with ``W ~ U_r diag(S_r) Vh_r``."""
    with torch.no_grad():
        weight = weight_as_out_in(module, transposed).detach().float()
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
    return U[:, :rank].contiguous(), S[:rank].contiguous(), Vh[:rank].contiguous()


class FactoredDelta(WeightDelta):
    """A weight change ``U D`` given by :meth:`factors` (``U (out, k)`` with the scaling in it,
    ``D (k, in)``): it runs unmerged as two skinny products, mixes per row through
    :func:`mixed_update`, and is a low-rank update for task vectors and routing."""

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def delta_weight(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        up, down = self.factors()
        return up @ down

    def forward_post(self, module, args, kwargs, output):
        x = first_input(args, kwargs)
        up, down = self.factors()
        if output.dtype != up.dtype:
            update = torch.nn.functional.linear(torch.nn.functional.linear(x.to(up.dtype), down), up)
            return output + update.to(output.dtype)
        return add_lora(output, x, down, up, 1.0)

    @classmethod
    def mixed_post(cls, units, module, args, kwargs, output, routing):
        return mixed_update(units, module, first_input(args, kwargs), output, routing)

    def low_rank_update(self):
        up, down = self.factors()
        return up.detach(), down.detach(), self.transposed


class LoRAXSLinear(FactoredDelta):
    """``dW = s * B R A`` (Bałazy et al., 2024) with ``B = U_r`` and ``A = diag(S_r) V_r^T`` frozen
    from the truncated SVD of the base weight ``W = U S V^T``, and only ``R (r, r)`` trained.

    The singular values sit on the input side (``A``), as in the authors' code. ``A`` and ``B``
    are buffers saved with the delta: a delta attached fresh takes them from its module's SVD
    when installed (:meth:`attached`); a loaded one keeps the saved ones and computes no SVD.
    """

    def __init__(self, fan_in: int, fan_out: int, r: int, scaling: float, transposed: bool = False):
        super().__init__(fan_in, fan_out, transposed)
        self.scaling = scaling
        self.register_buffer("B", torch.zeros(fan_out, r))
        self.register_buffer("A", torch.zeros(r, fan_in))
        self.R = nn.Parameter(torch.zeros(r, r))
        #: the factors still have to come from the base weight (not yet taken, nor loaded)
        self.needs_factors = True

    def take_factors(self, module: nn.Module) -> None:
        """Set ``B`` and ``A`` from the truncated SVD of ``module``'s weight."""
        U, S, Vh = truncated_svd(module, self.transposed, self.R.shape[0])
        with torch.no_grad():
            self.B.copy_(U)
            self.A.copy_(S.unsqueeze(1) * Vh)
        self.needs_factors = False

    def attached(self, module, model):
        if self.needs_factors:
            self.take_factors(module)

    def up(self) -> torch.Tensor:
        """``B R``, ``(out, r)``: the trained part folded into the frozen output factor."""
        return self.B @ self.R

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s B R, A)``: the update as one ``(out, r)`` by ``(r, in)`` product (with grad)."""
        return self.up() * self.scaling, self.A

    def delta_weight(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        return self.up() @ self.A * self.scaling

    def forward_post(self, module, args, kwargs, output):
        x = first_input(args, kwargs)
        if output.dtype != self.R.dtype:
            update = torch.nn.functional.linear(torch.nn.functional.linear(x.to(self.R.dtype), self.A), self.up())
            return output + (update * self.scaling).to(output.dtype)
        return add_lora(output, x, self.A, self.up(), self.scaling)

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        return {"R": self.R.detach(), "A": self.A, "B": self.B}

    def load_saved(self, tensors: dict[str, torch.Tensor]) -> None:
        own = {"R": self.R, "A": self.A, "B": self.B}
        with torch.no_grad():
            for name, value in tensors.items():
                own[name].copy_(value)
        self.needs_factors = self.needs_factors and not {"A", "B"} <= set(tensors)

    def extra_repr(self) -> str:
        return f"r={self.R.shape[0]}, scaling={self.scaling:g}, " + super().extra_repr()


def mixed_update(units, module: nn.Module, x: torch.Tensor, output: torch.Tensor, routing) -> torch.Tensor:
    """``output + U_i D_i x`` for each row ``i``, with ``(U_i, D_i) = units[i].factors()`` (an
    ``(out, k)`` by ``(k, in)`` product, scaling in ``U``), shaped like ``output``: two batched
    products over per-row stacked ``D^T`` and ``U^T`` (``k`` padded with zeros to the largest;
    rows of the base, or of units of another class, get zero factors)."""
    batch = routing.index.numel()
    cache = get_slot(module).mixed_cache
    key = type(next(u for u in units if u is not None)).__name__
    down = gathered(units, routing.index, lambda u: u.factors()[1].T, 0.0, cache, f"{key}_down_t")  # (batch, in, k)
    up = gathered(units, routing.index, lambda u: u.factors()[0].T, 0.0, cache, f"{key}_up_t")  # (batch, k, out)
    rows = as_rows(x, batch).to(down.dtype)
    changed = torch.baddbmm(as_rows(output, batch).to(down.dtype), torch.bmm(rows, down), up)
    return changed.view(output.shape).to(output.dtype)
