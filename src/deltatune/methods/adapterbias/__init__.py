"""AdapterBias: a token-dependent shift of a layer's output along one learned vector.

Fu, Chen, Lee & Lee, 2022, "AdapterBias: Parameter-efficient Token-dependent Representation
Shift for Adapters in NLP Tasks" (Findings of NAACL 2022, arXiv:2205.00305). At the output
projection of each feed-forward block (the paper's placement, found here as the role
``ffn_down``), for a module input ``x``:

    y = W x + b + alpha(x) * v,        alpha(x) = w . x + c

with ``v`` a vector of the output width (zero at start, so a new delta changes nothing) and
``alpha`` a linear map from the module's *input* width to one scalar per token (the official
code's ``nn.Linear(intermediate_size, 1)`` reads the feed-forward hidden states that enter the
output projection). Because ``alpha`` is linear, the shift is a rank-1 weight change plus a
bias change, ``dW = v w^T`` and ``db = c v``: merging, folding and task vectors are exact.
With ``share_alpha`` (the paper's partial weight-sharing variant) one ``alpha`` per input width
serves every layer, each keeping its own ``v``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...core.build import first_input, linear_shape, per_module, with_shared
from ...core.config import DeltaConfig
from ...core.registry import MethodSpec, Mixing, register_method
from ...core.roles import default_targets
from ...core.rows import as_rows, gathered
from ...core.slot import get_slot
from ...core.unit import DeltaUnit, Placements
from ...core.weight_delta import WeightDelta

__all__ = ["AdapterBiasConfig", "AdapterBiasLinear", "AlphaMap", "AlphaTable"]

DEFAULT_ROLES = ["ffn_down"]


@dataclass(frozen=True)
class AdapterBiasConfig(DeltaConfig):
    """AdapterBias: ``y = W x + b + (w . x + c) v`` on each target, ``v`` zero at start.

    Args:
        alpha_bias: give ``alpha`` its bias ``c`` (the official ``nn.Linear(d, 1)`` has one).
            At a module without a bias of its own (Llama's ``down_proj``) ``c`` is left out,
            since the constant shift ``c v`` could not be folded into a weight there.
        share_alpha: one ``alpha`` shared by all adapted modules of the same input width (the
            paper's partial weight-sharing variant); each module keeps its own ``v``.
    """

    method = "adapterbias"

    alpha_bias: bool = True
    share_alpha: bool = False


class AlphaMap(nn.Module):
    """``alpha(x) = w . x + c``, started as ``nn.Linear(in, 1)`` is (uniform in ``+-1/sqrt(in)``)."""

    def __init__(self, fan_in: int, with_bias: bool):
        super().__init__()
        bound = 1.0 / math.sqrt(fan_in)
        self.weight = nn.Parameter(torch.empty(fan_in).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(1).uniform_(-bound, bound)) if with_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The per-token scalar, shape ``x.shape[:-1] + (1,)``."""
        return F.linear(x.to(self.weight.dtype), self.weight.unsqueeze(0), self.bias)


class AlphaTable(DeltaUnit):
    """The ``alpha`` maps of a delta with ``share_alpha``, on the model itself (path ``""``), one
    per input width (and bias presence); it changes nothing itself, the per-module units use them."""

    def __init__(self) -> None:
        super().__init__()
        self.maps = nn.ModuleDict()

    def get(self, fan_in: int, with_bias: bool) -> AlphaMap:
        key = f"in{fan_in}" + ("" if with_bias else "_nobias")
        if key not in self.maps:
            self.maps[key] = AlphaMap(fan_in, with_bias)
        return self.maps[key]

    def merge_params(self, module, params):
        return {}  # the per-module units carry the weight changes

    def fingerprint_module(self, module, model):
        return None  # the adapted modules carry the base's identity


class AdapterBiasLinear(WeightDelta):
    """One module's shift ``alpha(x) v``: ``dW = v w^T`` and, with ``c``, ``db = c v``.

    ``alpha`` is the unit's own :class:`AlphaMap`, or a shared one (``shared=``) that the
    delta's :class:`AlphaTable` owns; ``v`` starts at zero.
    """

    def __init__(self, fan_in: int, fan_out: int, transposed: bool, with_bias: bool, shared: AlphaMap | None = None):
        super().__init__(fan_in, fan_out, transposed)
        self.vector = nn.Parameter(torch.zeros(fan_out))
        if shared is None:
            self.alpha = AlphaMap(fan_in, with_bias)
        else:
            self._shared = (shared,)  # a plain reference: the table owns (and counts, saves) it

    @property
    def alpha_map(self) -> AlphaMap:
        return self.alpha if "alpha" in self._modules else self._shared[0]

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.outer(self.vector, self.alpha_map.weight)

    def forward_post(self, module, args, kwargs, output):
        shift = self.alpha_map(first_input(args, kwargs)) * self.vector
        return output + shift.to(output.dtype)

    def merge_params(self, module, params):
        changed = super().merge_params(module, params)
        c = self.alpha_map.bias
        if c is not None:
            changed["bias"] = params["bias"] + (c * self.vector).to(params["bias"].dtype)
        return changed

    def low_rank_update(self):
        alpha = self.alpha_map
        if alpha.bias is not None:
            return None  # a bias change too: task vectors take the dense differences of weight and bias
        return self.vector.detach().unsqueeze(1), alpha.weight.detach().unsqueeze(0), self.transposed

    @classmethod
    def mixed_post(cls, units, module, args, kwargs, output, routing):
        """Each row's ``(w . x + c) v`` from its delta's stacked ``w``, ``c``, ``v`` (zeros for
        base rows). Cached without grad unless an ``alpha`` is shared (the cache watches only the
        units' own parameters)."""
        batch = routing.index.numel()
        shared = any(u is not None and "alpha" not in u._modules for u in units)
        cache = None if shared else get_slot(module).mixed_cache
        w = gathered(units, routing.index, lambda u: u.alpha_map.weight, 0.0, cache, "adapterbias_w")  # (batch, in)
        v = gathered(units, routing.index, lambda u: u.vector, 0.0, cache, "adapterbias_v")  # (batch, out)
        c = gathered(units, routing.index, _bias_or_zero, 0.0, cache, "adapterbias_c")  # (batch, 1)
        x = as_rows(first_input(args, kwargs), batch).to(w.dtype)
        alpha = torch.bmm(x, w.unsqueeze(2)) + c.unsqueeze(1)  # (batch, tokens, 1)
        return (as_rows(output, batch) + (alpha * v.unsqueeze(1)).to(output.dtype)).view(output.shape)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", shared alpha" if "alpha" not in self._modules else "")


def _bias_or_zero(unit: AdapterBiasLinear) -> torch.Tensor:
    c = unit.alpha_map.bias
    return c if c is not None else unit.vector.new_zeros(1)


def not_linear(module: nn.Module, method: str) -> str:
    """Why ``module`` cannot take a weight method's unit: its type and weight shape."""
    weight = getattr(module, "weight", None)
    size = f" with weight {list(weight.shape)}" if isinstance(weight, torch.Tensor) else ""
    return f"{type(module).__name__}{size} is not a Linear or Conv1D layer ({method} changes linear weights)"


def build(model: nn.Module, config: AdapterBiasConfig) -> Placements:
    table = AlphaTable() if config.share_alpha else None

    def make(path: str, module: nn.Module):
        shape = linear_shape(module)
        if shape is None:
            return not_linear(module, config.method)
        with_bias = config.alpha_bias and isinstance(getattr(module, "bias", None), torch.Tensor)
        shared = table.get(shape[0], with_bias) if table is not None else None
        return AdapterBiasLinear(*shape, with_bias, shared)

    placements = per_module(model, config, lambda: default_targets(model, DEFAULT_ROLES, config.method), make)
    return with_shared(model, table, placements)


register_method(MethodSpec(
    "adapterbias", AdapterBiasConfig, build, mergeable=True, identity_at_init=True,
    summary="a token-dependent shift (w.x + c) v of each feed-forward output (AdapterBias)",
    default_lr=1e-2, mixing=Mixing("batched"),
    peft_refusal="peft has no AdapterBias (a linear per-token scalar times a learned output vector)"))
