"""LoRA and DoRA units for linear layers (``nn.Linear``, GPT-2 ``Conv1D``) and embeddings."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...core.build import first_input, weight_as_out_in
from ...core.rows import as_rows, gathered
from ...core.slot import get_slot
from ...core.unit import DeltaUnit
from ...errors import MergeError
from .config import LoRAConfig


def add_lora(output: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """``output + scaling * x A^T B^T`` as two matrix products, the second fused with the add.

    One ``addmm`` instead of matmul, scale and add: one pass over the ``(tokens, out)``
    activations rather than three, and no extra full-size tensor kept for backward.
    """
    hidden = F.linear(x.reshape(-1, x.shape[-1]), lora_A)
    return torch.addmm(output.reshape(-1, output.shape[-1]), hidden, lora_B.T, alpha=scaling).view(output.shape)


def add_lora_(output: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor, lora_B_t: torch.Tensor, scaling: float) -> torch.Tensor:
    """:func:`add_lora` written into ``output`` (no grad, ``output`` fresh from the module):
    no new ``(tokens, out)`` tensor. ``lora_B_t`` is ``B^T``, contiguous: BLAS runs the
    rank-``r`` product several times faster on it than on the transposed view."""
    hidden = F.linear(x.reshape(-1, x.shape[-1]), lora_A)
    output.view(-1, output.shape[-1]).addmm_(hidden, lora_B_t, alpha=scaling)
    return output


def _mixed_lora(units, module, x, output, routing, in_place: bool = False) -> torch.Tensor:
    """``output + s_i B_i A_i x`` for each row ``i`` with its own delta's A, B and scaling,
    as ``(batch, tokens, out)``: two batched products over the per-row gathered factors
    (ranks padded with zeros to the largest; the base's rows get zero factors), both stacked
    transposed so each product reads contiguous factors. ``in_place``: add into ``output``
    (no grad, and ``output`` is a tensor nothing else holds)."""
    batch = routing.index.numel()
    cache = get_slot(module).mixed_cache
    lora_A_t = gathered(units, routing.index, lambda u: u.lora_A.T, 0.0, cache, "lora_A_t")  # (batch, in, r)
    lora_B_t = gathered(units, routing.index, lambda u: u.lora_B.T * u.scaling, 0.0, cache, "lora_B_t")  # (batch, r, out)
    x = as_rows(x, batch).to(lora_A_t.dtype)
    present = [u for u in units if u is not None]
    if present[0].training and any(isinstance(u.dropout, nn.Dropout) for u in present):
        rates = torch.tensor([u.dropout.p if isinstance(u.dropout, nn.Dropout) else 0.0 for u in units] + [0.0])
        rate = rates[routing.index].to(x.device, x.dtype).view(batch, 1, 1)
        x = x * (torch.rand_like(x) >= rate) / (1 - rate)
    hidden = torch.bmm(x, lora_A_t)
    if in_place and output.dtype == lora_A_t.dtype and not torch.is_grad_enabled():
        return as_rows(output, batch).baddbmm_(hidden, lora_B_t)
    return torch.baddbmm(as_rows(output, batch).to(lora_A_t.dtype), hidden, lora_B_t)


def load_factors(unit: LoRALinear | LoRAEmbedding, B: torch.Tensor, A: torch.Tensor) -> bool:
    """``lora_B = B / s`` and ``lora_A = A``, zero-padded to the unit's rank: then ``s B A`` is the given product."""
    rank = unit.lora_A.shape[0]
    if B.shape[1] != A.shape[0] or B.shape[1] > rank:
        raise MergeError(f"factors of rank {B.shape[1]} / {A.shape[0]} do not fit a LoRA of rank {rank}")
    pad = rank - B.shape[1]
    with torch.no_grad():
        unit.lora_B.copy_(torch.cat([B, B.new_zeros(B.shape[0], pad)], dim=1) / unit.scaling)
        unit.lora_A.copy_(torch.cat([A, A.new_zeros(pad, A.shape[1])], dim=0))
    return True


def _fresh_output(module: nn.Module, unit: LoRALinear) -> bool:
    """Whether ``module``'s output is a tensor it just made (``nn.Linear``, GPT-2 ``Conv1D``),
    so it may be written in place; a subclass with its own forward might return a shared one."""
    return type(module) is nn.Linear or unit.fan_in_fan_out


class LoRALinear(DeltaUnit):
    """``y = W x + b + s * B A dropout(x)`` (Hu et al., 2021), ``A: (r, in)``, ``B: (out, r)``."""

    def __init__(self, in_features: int, out_features: int, config: LoRAConfig, fan_in_fan_out: bool = False):
        super().__init__()
        self.scaling = config.scaling
        self.fan_in_fan_out = fan_in_fan_out
        self.lora_A = nn.Parameter(torch.empty(config.r, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, config.r))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        #: (version, address, B^T contiguous) for inference; rebuilt when B is written
        self._lora_B_t: tuple[int, int, torch.Tensor] | None = None
        if config.init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / config.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def dropped(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.dropout is None else self.dropout(x)

    def lora_output(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropped(x.to(self.lora_A.dtype))
        return F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling

    def lora_B_t(self) -> torch.Tensor:
        """``B^T`` as a contiguous ``(r, out)`` tensor, cached until ``B`` changes (no grad only)."""
        B = self.lora_B
        cached = self._lora_B_t
        if cached is None or cached[0] != B._version or cached[1] != B.data_ptr():
            cached = (B._version, B.data_ptr(), B.detach().T.contiguous())
            self._lora_B_t = cached
        return cached[2]

    def delta_weight(self) -> torch.Tensor:
        """``s * B A`` as an ``(out, in)`` matrix."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward_post(self, module, args, kwargs, output):
        x = first_input(args, kwargs)
        if output.dtype != self.lora_A.dtype:
            return output + self.lora_output(x).to(output.dtype)
        return add_lora(output, self.dropped(x), self.lora_A, self.lora_B, self.scaling)

    def run(self, module, own, args, kwargs):
        output = own(*args, **kwargs)
        if torch.is_grad_enabled() or output.dtype != self.lora_A.dtype or not _fresh_output(module, self):
            return self.forward_post(module, args, kwargs, output)
        # inference, alone at a Linear whose output is a new tensor: add in place
        return add_lora_(output, first_input(args, kwargs), self.lora_A, self.lora_B_t(), self.scaling)

    @classmethod
    def mixed_post(cls, units, module, args, kwargs, output, routing):
        fresh = _fresh_output(module, next(u for u in units if u is not None))
        direction = _mixed_lora(units, module, first_input(args, kwargs), output, routing, in_place=fresh)
        return direction.view(output.shape).to(output.dtype)

    def low_rank_update(self):
        return self.lora_B.detach() * self.scaling, self.lora_A.detach(), self.fan_in_fan_out

    load_low_rank = load_factors

    def merge_params(self, module, params):
        delta = self.delta_weight().to(params["weight"].dtype)
        return {"weight": params["weight"] + (delta.T if self.fan_in_fan_out else delta)}


class DoRALinear(LoRALinear):
    """``y = m / ||W + s B A||_row * (W x + s B A x) + b`` (Liu et al., 2024).

    The row norm is detached from the graph, as the paper recommends (section 4.3).
    """

    run = DeltaUnit.run  # LoRA's in-place kernel does not apply the magnitude

    def __init__(self, module: nn.Module, in_features: int, out_features: int, config: LoRAConfig, fan_in_fan_out: bool):
        super().__init__(in_features, out_features, config, fan_in_fan_out)
        with torch.no_grad():
            norm = weight_as_out_in(module, fan_in_fan_out).float().norm(dim=1)
        self.magnitude = nn.Parameter(norm)

    def _magnitude_scale(self, module: nn.Module) -> torch.Tensor:
        with torch.no_grad():  # detached: no (out, in) graph is kept for backward
            weight = weight_as_out_in(module, self.fan_in_fan_out).to(self.lora_A.dtype)
            norm = (weight + self.delta_weight()).norm(dim=1)
        return self.magnitude / norm

    def forward_post(self, module, args, kwargs, output):
        # m / ||W + sBA|| * (W x + s B A x) + b, with W x = output - b
        scale = self._magnitude_scale(module).to(output.dtype)
        bias = getattr(module, "bias", None)
        base = output - bias if bias is not None else output
        x = first_input(args, kwargs)
        if output.dtype == self.lora_A.dtype:
            direction = add_lora(base, self.dropped(x), self.lora_A, self.lora_B, self.scaling)
        else:
            direction = base + self.lora_output(x).to(output.dtype)
        return direction * scale + bias if bias is not None else direction * scale

    @classmethod
    def mixed_post(cls, units, module, args, kwargs, output, routing):
        cache = get_slot(module).mixed_cache
        scale = gathered(units, routing.index, lambda u: u._magnitude_scale(module), 1.0, cache, "dora_scale")
        bias = getattr(module, "bias", None)
        base = output - bias if bias is not None else output
        direction = _mixed_lora(units, module, first_input(args, kwargs), base, routing,
                                in_place=bias is not None) * scale.unsqueeze(1)  # base: a new tensor
        direction = direction.view(output.shape).to(output.dtype)
        return direction + bias if bias is not None else direction

    def low_rank_update(self):
        return None  # the magnitude rescales W + s B A: not a low-rank change

    def load_low_rank(self, B, A):
        return False  # the magnitude is a parameter too

    def merge_params(self, module, params):
        weight = params["weight"].T if self.fan_in_fan_out else params["weight"]
        direction = weight.to(self.lora_A.dtype) + self.delta_weight()
        merged = (self.magnitude / direction.norm(dim=1)).unsqueeze(1) * direction
        merged = merged.to(params["weight"].dtype)
        return {"weight": merged.T if self.fan_in_fan_out else merged}


class LoRAEmbedding(DeltaUnit):
    """LoRA on an embedding table: ``E[i] + s * (A[:, i] B^T)``; A starts at zero, B random."""

    def __init__(self, module: nn.Embedding, config: LoRAConfig):
        super().__init__()
        self.scaling = config.scaling
        self.lora_A = nn.Parameter(torch.zeros(config.r, module.num_embeddings))
        self.lora_B = nn.Parameter(torch.randn(module.embedding_dim, config.r))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def delta_weight(self) -> torch.Tensor:
        """``s * (B A)^T`` as a ``(num_embeddings, embedding_dim)`` table."""
        return (self.lora_B @ self.lora_A).T * self.scaling

    def forward_post(self, module, args, kwargs, output):
        ids = first_input(args, kwargs)
        rows = F.embedding(ids, self.lora_A.T, padding_idx=module.padding_idx)
        return output + (self.dropout(rows) @ self.lora_B.T * self.scaling).to(output.dtype)

    def low_rank_update(self):
        return self.lora_B.detach() * self.scaling, self.lora_A.detach(), True

    load_low_rank = load_factors

    def merge_params(self, module, params):
        return {"weight": params["weight"] + self.delta_weight().to(params["weight"].dtype)}
