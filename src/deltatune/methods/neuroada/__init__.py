"""NeuroAda: a trainable bypass on each neuron's strongest input connections.

"NeuroAda: Activating Each Neuron's Potential for Parameter-Efficient Fine-Tuning", 2025
(the authors' code: https://github.com/FightingFighting/NeuroAda).

For an adapted module with weight ``W`` (``out x in``), each output neuron ``o`` keeps the
indices ``S_o`` of its ``k`` input weights largest in magnitude ``|W[o, :]|`` (found once, at
attach, from the base weight) and a trainable bypass ``B[o, :]`` (zero at start) on them::

    W' = W + D,    D[o, S_o[j]] = B[o, j],  D = 0 elsewhere

Unmerged, ``(D x)_o = sum_j B[o, j] x[S_o[j]]`` is computed by gathering the inputs (or, on
inputs of many tokens, with the scattered ``D`` in one product). The
indices (``out x k`` integers) are part of the delta and saved with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...core.build import first_input, per_linear, weight_as_out_in
from ...core.config import DeltaConfig, check
from ...core.registry import MethodSpec, Mixing, register_method
from ...core.rows import as_rows, gathered
from ...core.slot import get_slot
from ...core.unit import Placements
from ...core.weight_delta import WeightDelta
from ...errors import DeltaFileError, NotApplicableError

__all__ = ["NeuroAdaConfig", "NeuroAdaUnit"]

DEFAULT_ROLES = ["q|qkv", "v"]


@dataclass(frozen=True)
class NeuroAdaConfig(DeltaConfig):
    """NeuroAda on Linear and GPT-2 ``Conv1D`` layers.

    Args:
        k: input connections per output neuron that get a bypass (those of largest
            ``|W|``); at most the target's input width.
    """

    method = "neuroada"

    k: int = 8

    def validate(self) -> None:
        check(self.k > 0, f"NeuroAdaConfig: field 'k' must be a positive integer (connections per neuron), got {self.k}")


def top_connections(weight: torch.Tensor, k: int) -> torch.Tensor:
    """Per row of an ``(out, in)`` weight, the input indices of its ``k`` largest ``|W|``, ascending."""
    return weight.detach().abs().topk(k, dim=1).indices.sort(dim=1).values


class NeuroAdaUnit(WeightDelta):
    """``dW[o, indices[o, j]] = bypass[o, j]``; ``indices`` (``out x k``) is a saved integer
    buffer, ``bypass`` the trainable ``(out, k)`` values."""

    def __init__(self, fan_in: int, fan_out: int, indices: torch.Tensor, transposed: bool = False):
        super().__init__(fan_in, fan_out, transposed)
        self.register_buffer("indices", indices.to(torch.int64).clone())
        self.bypass = nn.Parameter(torch.zeros(indices.shape, dtype=torch.float32))

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        dense = torch.zeros(self.fan_out, self.fan_in, dtype=torch.float32, device=self.bypass.device)
        return dense.scatter_add(1, self.indices, self.bypass.float())

    def forward_post(self, module, args, kwargs, output):
        """Gathers the chosen inputs when that reads fewer values than the weight has (few
        tokens, as in decoding); otherwise forms the sparse ``dW`` and runs one product, which
        measured faster forward and backward on longer inputs."""
        x = first_input(args, kwargs)
        if (x.numel() // max(x.shape[-1], 1)) * self.indices.shape[1] > self.fan_in:
            return super().forward_post(module, args, kwargs, output)
        bypass = self.bypass.float()
        chosen = x[..., self.indices].to(bypass.dtype)  # (..., out, k)
        return output + (chosen * bypass).sum(-1).to(output.dtype)

    @classmethod
    def mixed_post(cls, units, module, args, kwargs, output, routing):
        """Every row's own indices and bypass gathered from the stacked deltas (smaller ``k``
        padded with zero bypass; base rows all zeros): one batched gather and product."""
        batch = routing.index.numel()
        x = as_rows(first_input(args, kwargs), batch)
        bypass = gathered(units, routing.index, lambda u: u.bypass.float(), 0.0,
                          get_slot(module).mixed_cache, "neuroada_bypass")  # (batch, out, K)
        indices = _stacked_indices(units, routing.index, tuple(bypass.shape[1:]), x.device)  # (batch, out, K)
        tokens, (fan_out, width) = x.shape[1], bypass.shape[1:]
        spread = x.unsqueeze(2).expand(batch, tokens, fan_out, x.shape[-1])
        chosen = torch.gather(spread, 3, indices[:, None].expand(batch, tokens, fan_out, width))
        change = (chosen.to(bypass.dtype) * bypass[:, None]).sum(-1)
        return (as_rows(output, batch) + change.to(output.dtype)).view(output.shape)

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        return {"bypass": self.bypass.detach(), "indices": self.indices}

    def load_saved(self, tensors: dict[str, torch.Tensor]) -> None:
        if "indices" in tensors:
            indices = tensors["indices"]
            if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.fan_in):
                raise DeltaFileError(f"NeuroAda connection indices must lie in [0, {self.fan_in}), got "
                                     f"[{int(indices.min())}, {int(indices.max())}]; the delta file is corrupt")
            self.indices.copy_(indices)
        super().load_saved({k: v for k, v in tensors.items() if k != "indices"})

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.indices.shape[1]}"


def _stacked_indices(units, index: torch.Tensor, shape: tuple[int, int], device) -> torch.Tensor:
    """Each row's ``(out, K)`` indices, padded with index 0 (where the bypass is padded with zeros)."""
    rows = [torch.zeros(shape, dtype=torch.long, device=device)
            if u is None else nn.functional.pad(u.indices.to(device), (0, shape[1] - u.indices.shape[1]))
            for u in (*units, None)]
    return torch.stack(rows)[index.to(device)]


def build(model: nn.Module, config: NeuroAdaConfig) -> Placements:
    def make(path: str, module: nn.Module, fan_in: int, fan_out: int, transposed: bool):
        if config.k > fan_in:
            raise NotApplicableError(
                f"neuroada cannot adapt {path!r} ({type(module).__name__}, in={fan_in}, out={fan_out}): k={config.k} "
                f"connections per neuron exceed its input width {fan_in}; choose k <= {fan_in} or exclude this module"
            )
        indices = top_connections(weight_as_out_in(module, transposed), config.k).cpu()
        return NeuroAdaUnit(fan_in, fan_out, indices, transposed)

    return per_linear(model, config, DEFAULT_ROLES, make)


register_method(MethodSpec(
    "neuroada", NeuroAdaConfig, build, size_option="k", mergeable=True, identity_at_init=True,
    summary="trainable bypass on each neuron's k largest-magnitude input weights (NeuroAda)",
    default_lr=3e-3, mixing=Mixing("batched"),
    peft_refusal="peft has no per-neuron sparse bypass adapter"))
