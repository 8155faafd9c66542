"""PaCA: fine-tuning randomly chosen partial connections (input columns) of each weight.

"PaCA: Partial Connection Adaptation for Efficient Fine-Tuning", 2025 (the authors' code:
https://github.com/WooSunghyeon/paca).

For an adapted module with weight ``W`` (``out x in``), ``k`` input columns ``S`` are drawn
at random (from torch's RNG, once, at attach) and a trainable ``out x k`` block ``P`` changes
exactly those columns::

    W' = W + D,    D[:, S] = P,  D = 0 elsewhere,    P zero at start

Unmerged, ``D x = P x[S]`` reads only the chosen inputs. The column indices are part of
the delta: saved with it, so a loaded delta changes the same columns on any copy of the base.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...core.build import first_input, per_linear
from ...core.config import DeltaConfig, check
from ...core.registry import MethodSpec, Mixing, register_method
from ...core.rows import as_rows, gathered
from ...core.slot import get_slot
from ...core.unit import Placements
from ...core.weight_delta import WeightDelta
from ...errors import DeltaFileError, NotApplicableError

__all__ = ["PaCAConfig", "PaCAUnit"]

DEFAULT_ROLES = ["q|qkv", "v"]


@dataclass(frozen=True)
class PaCAConfig(DeltaConfig):
    """PaCA on Linear and GPT-2 ``Conv1D`` layers.

    Args:
        k: the number of input columns (partial connections) of each target that train;
            at most the target's input width.
    """

    method = "paca"

    k: int = 8

    def validate(self) -> None:
        check(self.k > 0, f"PaCAConfig: field 'k' must be a positive integer (columns per target), got {self.k}")


class PaCAUnit(WeightDelta):
    """``dW[:, columns] = partial``; ``columns`` (``k`` distinct input indices, sorted) is a
    saved integer buffer, ``partial`` the trainable ``(out, k)`` block."""

    def __init__(self, fan_in: int, fan_out: int, k: int, transposed: bool = False):
        super().__init__(fan_in, fan_out, transposed)
        self.register_buffer("columns", torch.randperm(fan_in)[:k].sort().values)
        self.partial = nn.Parameter(torch.zeros(fan_out, k))

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        dense = torch.zeros(self.fan_out, self.fan_in, dtype=torch.float32, device=self.partial.device)
        return dense.index_add(1, self.columns, self.partial.float())

    def forward_post(self, module, args, kwargs, output):
        x = first_input(args, kwargs)
        partial = self.partial.float()
        change = x.index_select(-1, self.columns).to(partial.dtype) @ partial.T
        return output + change.to(output.dtype)

    @classmethod
    def mixed_post(cls, units, module, args, kwargs, output, routing):
        """Every row's own columns and block gathered from the stacked deltas (smaller ``k``
        padded with zero columns of the block; base rows all zeros): one batched product."""
        batch = routing.index.numel()
        x = as_rows(first_input(args, kwargs), batch)
        partial = gathered(units, routing.index, lambda u: u.partial.float(), 0.0,
                           get_slot(module).mixed_cache, "paca_partial")  # (batch, out, K)
        columns = _stacked_indices(units, routing.index, partial.shape[-1], x.device)  # (batch, K)
        chosen = torch.gather(x, 2, columns[:, None, :].expand(batch, x.shape[1], -1))
        change = torch.bmm(chosen.to(partial.dtype), partial.transpose(1, 2))
        return (as_rows(output, batch) + change.to(output.dtype)).view(output.shape)

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        return {"partial": self.partial.detach(), "columns": self.columns}

    def load_saved(self, tensors: dict[str, torch.Tensor]) -> None:
        if "columns" in tensors:
            columns = tensors["columns"]
            if columns.numel() and (int(columns.min()) < 0 or int(columns.max()) >= self.fan_in):
                raise DeltaFileError(f"PaCA column indices must lie in [0, {self.fan_in}), got "
                                     f"[{int(columns.min())}, {int(columns.max())}]; the delta file is corrupt")
            self.columns.copy_(columns)
        super().load_saved({k: v for k, v in tensors.items() if k != "columns"})

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.columns.numel()}"


def _stacked_indices(units, index: torch.Tensor, width: int, device) -> torch.Tensor:
    """Each row's column indices, padded with index 0 to ``width`` (the padded block columns are zero)."""
    rows = [torch.zeros(width, dtype=torch.long, device=device)
            if u is None else nn.functional.pad(u.columns.to(device), (0, width - u.columns.numel()))
            for u in (*units, None)]
    return torch.stack(rows)[index.to(device)]


def build(model: nn.Module, config: PaCAConfig) -> Placements:
    def make(path: str, module: nn.Module, fan_in: int, fan_out: int, transposed: bool):
        if config.k > fan_in:
            raise NotApplicableError(
                f"paca cannot adapt {path!r} ({type(module).__name__}, in={fan_in}, out={fan_out}): k={config.k} "
                f"columns exceed its input width {fan_in}; choose k <= {fan_in} or exclude this module"
            )
        return PaCAUnit(fan_in, fan_out, config.k, transposed)

    return per_linear(model, config, DEFAULT_ROLES, make)


register_method(MethodSpec(
    "paca", PaCAConfig, build, size_option="k", mergeable=True, identity_at_init=True,
    summary="trainable change of k randomly chosen input columns of each weight (PaCA)",
    default_lr=3e-3, mixing=Mixing("batched"),
    peft_refusal="peft has no partial-connection adapter"))
