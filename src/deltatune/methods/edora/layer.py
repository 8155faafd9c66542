"""The EDoRA unit: a LoRA-XS update inside DoRA's weight decomposition."""

from __future__ import annotations

import torch
from torch import nn

from ...core.build import first_input
from ...core.rows import gathered
from ...core.slot import get_slot
from ..loraxs import LoRAXSLinear, mixed_update


class EDoRALinear(LoRAXSLinear):
    """``y = m / ||W + dW||_row * (W x + dW x) + b`` with LoRA-XS's ``dW = s B R A``.

    ``m`` (``(out,)``) starts at the row norms of the base weight, taken with the frozen
    factors when the unit is installed (a loaded delta keeps its saved ``m``).
    """

    def __init__(self, fan_in: int, fan_out: int, r: int, scaling: float, transposed: bool = False):
        super().__init__(fan_in, fan_out, r, scaling, transposed)
        self.magnitude = nn.Parameter(torch.ones(fan_out))

    def take_factors(self, module: nn.Module) -> None:
        super().take_factors(module)
        with torch.no_grad():
            self.magnitude.copy_(self.base_weight(module).float().norm(dim=1))

    def magnitude_scale(self, module: nn.Module) -> torch.Tensor:
        """``m / ||W + dW||_row``, ``(out,)``; the norm is detached, as in DoRA."""
        with torch.no_grad():
            norm = (self.base_weight(module).to(self.R.dtype) + self.delta_weight()).norm(dim=1)
        return self.magnitude / norm

    def forward_post(self, module, args, kwargs, output):
        # m / ||W + dW|| * (W x + dW x) + b, with W x = output - b
        bias = getattr(module, "bias", None)
        base = output - bias if bias is not None else output
        direction = super().forward_post(module, args, kwargs, base)
        changed = direction * self.magnitude_scale(module).to(output.dtype)
        return changed + bias if bias is not None else changed

    @classmethod
    def mixed_post(cls, units, module, args, kwargs, output, routing):
        cache = get_slot(module).mixed_cache
        scale = gathered(units, routing.index, lambda u: u.magnitude_scale(module), 1.0, cache, "edora_scale")
        bias = getattr(module, "bias", None)
        base = output - bias if bias is not None else output
        direction = mixed_update(units, module, first_input(args, kwargs), base, routing)
        shape = (scale.shape[0],) + (1,) * (direction.dim() - 2) + (scale.shape[1],)
        changed = direction * scale.view(shape).to(output.dtype)
        return changed + bias if bias is not None else changed

    def low_rank_update(self):
        return None  # the magnitude rescales W + dW: not a low-rank change

    def delta_weight(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """``dW`` alone (``s B R A``) when ``weight`` is ``None``; with the base ``weight``, the
        whole change ``m (W + dW) / ||W + dW||_row - W`` that merging adds."""
        update = super().delta_weight()
        if weight is None:
            return update
        direction = weight.to(update.dtype) + update
        return (self.magnitude / direction.norm(dim=1)).unsqueeze(1) * direction - weight.to(update.dtype)

    def merge_params(self, module, params):
        weight = params["weight"].T if self.transposed else params["weight"]
        direction = weight.to(self.R.dtype) + super().delta_weight()
        merged = ((self.magnitude / direction.norm(dim=1)).unsqueeze(1) * direction).to(params["weight"].dtype)
        return {"weight": merged.T if self.transposed else merged}

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        return {**super().saved_tensors(), "magnitude": self.magnitude.detach()}

    def load_saved(self, tensors: dict[str, torch.Tensor]) -> None:
        rest = dict(tensors)
        if "magnitude" in rest:
            with torch.no_grad():
                self.magnitude.copy_(rest.pop("magnitude"))
        super().load_saved(rest)
