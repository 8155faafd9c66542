"""DiaBlo: fine-tuning only the diagonal blocks of each weight matrix.

"DiaBlo: Diagonal Blocks Are Sufficient For Finetuning", 2025 (the authors' code:
https://github.com/ziyangjoy/DiaBlo).

The weight ``W`` (``out x in``) of an adapted module is split into an ``N x N`` grid of
``(out/N) x (in/N)`` blocks and a trainable change of the ``N`` diagonal blocks is learned::

    W' = W + D,    D = blockdiag(D_1, ..., D_N),    D_k zero at start

so a new delta is the identity. Unmerged, ``D x`` is a batched product of each block with its
slice of ``x``; merged, ``W <- W + D``. ``N`` must divide both widths of every target.
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
from ...errors import NotApplicableError

__all__ = ["DiaBloConfig", "DiaBloUnit"]

DEFAULT_ROLES = ["q|qkv", "v"]


@dataclass(frozen=True)
class DiaBloConfig(DeltaConfig):
    """DiaBlo on Linear and GPT-2 ``Conv1D`` layers.

    Args:
        num_blocks: ``N``, the number of diagonal blocks; each is ``(out/N) x (in/N)``, so
            ``N`` must divide both the input and the output width of every target.
    """

    method = "diablo"

    num_blocks: int = 64

    def validate(self) -> None:
        check(self.num_blocks > 0, f"DiaBloConfig: field 'num_blocks' must be a positive integer, got {self.num_blocks}")


def _block_product(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``x @ blockdiag(blocks)^T`` for ``x`` ``(..., N * i)`` and ``blocks`` ``(N, o, i)``."""
    count, _, width = blocks.shape
    pieces = x.reshape(*x.shape[:-1], count, width)
    return torch.einsum("...ni,noi->...no", pieces, blocks).reshape(*x.shape[:-1], -1)


class DiaBloUnit(WeightDelta):
    """``dW = blockdiag(D_1, ..., D_N)``; ``blocks`` holds the ``D_k`` as ``(N, out/N, in/N)``."""

    def __init__(self, fan_in: int, fan_out: int, num_blocks: int, transposed: bool = False):
        super().__init__(fan_in, fan_out, transposed)
        self.num_blocks = num_blocks
        self.blocks = nn.Parameter(torch.zeros(num_blocks, fan_out // num_blocks, fan_in // num_blocks))

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.block_diag(*self.blocks.float())

    def forward_post(self, module, args, kwargs, output):
        x = first_input(args, kwargs)
        blocks = self.blocks.float()
        return output + _block_product(x.to(blocks.dtype), blocks).to(output.dtype)

    @classmethod
    def mixed_post(cls, units, module, args, kwargs, output, routing):
        """Every row's own blocks gathered from the stacked deltas (zeros for base rows): one
        batched block product per block count present."""
        cache = get_slot(module).mixed_cache
        batch = routing.index.numel()
        x = as_rows(first_input(args, kwargs), batch)
        result = as_rows(output, batch)
        for count in sorted({u.num_blocks for u in units if u is not None}):
            same = [u if u is not None and u.num_blocks == count else None for u in units]
            blocks = gathered(same, routing.index, lambda u: u.blocks.float(), 0.0, cache, f"diablo_{count}")
            pieces = x.to(blocks.dtype).reshape(batch, x.shape[1], count, -1)
            change = torch.einsum("btni,bnoi->btno", pieces, blocks).reshape(batch, x.shape[1], -1)
            result = result + change.to(output.dtype)
        return result.view(output.shape)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_blocks={self.num_blocks}"


def build(model: nn.Module, config: DiaBloConfig) -> Placements:
    def make(path: str, module: nn.Module, fan_in: int, fan_out: int, transposed: bool):
        if fan_in % config.num_blocks or fan_out % config.num_blocks:
            raise NotApplicableError(
                f"diablo cannot adapt {path!r} ({type(module).__name__}, in={fan_in}, out={fan_out}): "
                f"num_blocks={config.num_blocks} does not divide both widths; choose a num_blocks dividing the input "
                f"and output width of every target, or exclude this module"
            )
        return DiaBloUnit(fan_in, fan_out, config.num_blocks, transposed)

    return per_linear(model, config, DEFAULT_ROLES, make)


register_method(MethodSpec(
    "diablo", DiaBloConfig, build, size_option="num_blocks", mergeable=True, identity_at_init=True,
    summary="trainable change of the N diagonal blocks of each weight (DiaBlo)",
    default_lr=3e-3, mixing=Mixing("batched"),
    peft_refusal="peft has no diagonal-block adapter"))
