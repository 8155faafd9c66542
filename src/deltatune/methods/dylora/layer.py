"""DyLoRA's unit: LoRA factors used up to a rank ``b`` that changes every training step."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...core.build import first_input
from ...core.rows import add_row_low_rank, gathered
from ...core.slot import get_slot
from ...core.weight_delta import WeightDelta
from .config import DyLoRAConfig


class DyLoRALinear(WeightDelta):
    """``y = W x + b + (alpha / b) * B[:, :b] A[:b] dropout(x)`` (Valipour et al., 2022).

    ``A`` is ``(r, in)`` (Kaiming uniform, as LoRA), ``B`` ``(out, r)`` zero at start. In
    training ``b`` is the buffer ``train_rank`` (set for each step by the method's step hook);
    otherwise ``b`` is the config's ``eval_rank`` (default ``r``).
    """

    def __init__(self, fan_in: int, fan_out: int, config: DyLoRAConfig, transposed: bool = False):
        super().__init__(fan_in, fan_out, transposed)
        self.alpha = config.alpha
        self.eval_rank = config.rank
        self.lora_A = nn.Parameter(torch.empty(config.r, fan_in))
        self.lora_B = nn.Parameter(torch.zeros(fan_out, config.r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        self.register_buffer("train_rank", torch.tensor(config.rank_for_step(0)))

    def active_rank(self) -> int:
        """The rank this forward pass uses."""
        return int(self.train_rank) if self.training else self.eval_rank

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``((alpha / rank) * B[:, :rank], A[:rank])``: the update at ``rank`` is their product."""
        return self.lora_B[:, :rank] * (self.alpha / rank), self.lora_A[:rank]

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        left, right = self.factors(self.eval_rank)
        return left @ right

    def forward_post(self, module, args, kwargs, output):
        x = first_input(args, kwargs).to(self.lora_A.dtype)
        if self.dropout is not None:
            x = self.dropout(x)
        rank = self.active_rank()
        update = F.linear(F.linear(x, self.lora_A[:rank]), self.lora_B[:, :rank]) * (self.alpha / rank)
        return output + update.to(output.dtype)

    @classmethod
    def mixed_post(cls, units, module, args, kwargs, output, routing):
        cache = get_slot(module).mixed_cache
        ranks = tuple(u.active_rank() if u is not None else 0 for u in units)
        suffix = "-".join(map(str, ranks))  # the stack depends on the ranks in use
        right_t = gathered(units, routing.index, lambda u: u.factors(u.active_rank())[1].T, 0.0, cache, f"dylora_A_{suffix}")
        left_t = gathered(units, routing.index, lambda u: u.factors(u.active_rank())[0].T, 0.0, cache, f"dylora_B_{suffix}")
        return add_row_low_rank(units, routing, first_input(args, kwargs), right_t, left_t, output)

    def low_rank_update(self):
        left, right = self.factors(self.eval_rank)
        return left.detach(), right.detach(), self.transposed

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        """All ``r`` rows, so a later load may pick any rank."""
        return {"lora_A": self.lora_A.detach(), "lora_B": self.lora_B.detach()}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.lora_A.shape[0]}, eval_rank={self.eval_rank}"
