"""Bottleneck adapters: down-projection, non-linearity, up-projection, residual.

Houlsby et al., 2019 (arXiv:1902.00751): after the attention block and after the
feed-forward block. Pfeiffer et al., 2020 (arXiv:2005.00247): after the feed-forward block
only. He et al., 2021 (arXiv:2110.04366): in parallel to the feed-forward block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ...core.build import first_input, linear_shape, per_module
from ...core.rows import as_rows, gathered, per_delta_post
from ...core.slot import get_slot
from ...core.config import DeltaConfig, check
from ...core.registry import MethodSpec, Mixing, register_method
from ...core.unit import DeltaUnit, Placements
from ...core.roles import default_targets

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU, "swish": nn.SiLU}
PLACEMENT_ROLES = {"houlsby": ["o", "ffn_down"], "pfeiffer": ["ffn_down"], "parallel": ["ffn_block|ffn_down"]}


@dataclass(frozen=True)
class AdapterConfig(DeltaConfig):
    """Bottleneck adapter.

    Args:
        bottleneck: width of the bottleneck.
        placement: ``"houlsby"``, ``"pfeiffer"`` (serial, on the targets' outputs) or
            ``"parallel"`` (reads the target's input, adds to its output).
        non_linearity: one of ``relu gelu tanh silu swish``.
        scaling: factor on the adapter's output.
    """

    method = "adapter"

    bottleneck: int = 64
    placement: Literal["houlsby", "pfeiffer", "parallel"] = "houlsby"
    non_linearity: str = "relu"
    scaling: float = 1.0

    def validate(self) -> None:
        check(isinstance(self.bottleneck, int) and self.bottleneck > 0,
              f"adapter bottleneck must be a positive integer, got {self.bottleneck!r}")
        check(self.placement in PLACEMENT_ROLES,
              f"adapter placement must be one of {sorted(PLACEMENT_ROLES)}, got {self.placement!r}")
        check(self.non_linearity in ACTIVATIONS,
              f"adapter non_linearity must be one of {sorted(ACTIVATIONS)}, got {self.non_linearity!r}")


class Bottleneck(DeltaUnit):
    """``y + s * (W_up act(W_down h + b_down) + b_up)`` with ``h = y`` (serial) or the module
    input (parallel).

    The extension point for adapters whose projections are built rather than stored
    (Compacter's Kronecker sums, SparseAdapter's pruned weights): a subclass supplies the four
    tensors through :meth:`down_weight` ``(bottleneck, in)``, :meth:`down_bias`,
    :meth:`up_weight` ``(out, bottleneck)`` and :meth:`up_bias`; the forward pass and the
    batched mixed-batch product follow.
    """

    #: whether a mixed batch served without gradients may keep the stacked weights until the
    #: unit's own parameters change; ``False`` for units whose weights also read tensors they do
    #: not own (a table shared by all layers)
    stacks_cacheable: ClassVar[bool] = True

    def __init__(self, parallel: bool, non_linearity: str, scaling: float):
        super().__init__()
        self.parallel = parallel
        self.scaling = scaling
        self.act = ACTIVATIONS[non_linearity]()

    def down_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def down_bias(self) -> torch.Tensor:
        raise NotImplementedError

    def up_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def up_bias(self) -> torch.Tensor:
        raise NotImplementedError

    def forward_post(self, module, args, kwargs, output):
        h = first_input(args, kwargs) if self.parallel else output
        down_bias = self.down_bias()
        hidden = self.act(F.linear(h.to(down_bias.dtype), self.down_weight(), down_bias))
        return output + (F.linear(hidden, self.up_weight(), self.up_bias()) * self.scaling).to(output.dtype)

    @classmethod
    def mixed_post(cls, units, module, args, kwargs, output, routing):
        """Adapters of one form and non-linearity run as batched products over per-row gathered
        weights (bottlenecks padded with zeros); a mix of forms runs each adapter on its rows."""
        present = [u for u in units if u is not None]
        if len({(u.parallel, type(u.act)) for u in present}) > 1:
            return per_delta_post(units, module, args, kwargs, output, routing)
        batch = routing.index.numel()
        cache = get_slot(module).mixed_cache if cls.stacks_cacheable else None
        down = gathered(units, routing.index, lambda u: u.down_weight(), 0.0, cache, "down")  # (batch, k, in)
        down_bias = gathered(units, routing.index, lambda u: u.down_bias(), 0.0, cache, "down_bias")
        up = gathered(units, routing.index, lambda u: u.up_weight() * u.scaling, 0.0, cache, "up")  # (batch, out, k)
        up_bias = gathered(units, routing.index, lambda u: u.up_bias() * u.scaling, 0.0, cache, "up_bias")
        h = as_rows(first_input(args, kwargs) if present[0].parallel else output, batch).to(down.dtype)
        hidden = present[0].act(torch.baddbmm(down_bias.unsqueeze(1), h, down.transpose(1, 2)))
        rows = as_rows(output, batch).to(down.dtype) + up_bias.unsqueeze(1)
        return torch.baddbmm(rows, hidden, up.transpose(1, 2)).view(output.shape).to(output.dtype)


class BottleneckAdapter(Bottleneck):
    """A :class:`Bottleneck` with stored dense projections ``down`` and ``up`` (``nn.Linear``)."""

    def __init__(self, in_features: int, out_features: int, config: AdapterConfig):
        super().__init__(config.placement == "parallel", config.non_linearity, config.scaling)
        self.down = nn.Linear(in_features, config.bottleneck)
        self.up = nn.Linear(config.bottleneck, out_features)
        nn.init.normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def down_weight(self) -> torch.Tensor:
        return self.down.weight

    def down_bias(self) -> torch.Tensor:
        return self.down.bias

    def up_weight(self) -> torch.Tensor:
        return self.up.weight

    def up_bias(self) -> torch.Tensor:
        return self.up.bias


def io_features(module: nn.Module) -> tuple[int, int] | None:
    """Input and output width of a linear layer, or of a block of them (first in, last out)."""
    shape = linear_shape(module)
    if shape is not None:
        return shape[0], shape[1]
    linears = [linear_shape(m) for m in module.modules() if m is not module]
    linears = [s for s in linears if s is not None]
    return (linears[0][0], linears[-1][1]) if linears else None


def build_bottlenecks(model: nn.Module, config, unit_class: type) -> Placements:
    """``unit_class(width in, width out, config)`` at every module ``config.placement`` names
    (the bottleneck adapters of this method and of those built on it)."""
    def make(path: str, module: nn.Module):
        dims = io_features(module)
        if dims is None:
            return f"{type(module).__name__} has no linear layer to read its width from"
        fan_in, fan_out = dims
        return unit_class(fan_in if config.placement == "parallel" else fan_out, fan_out, config)

    roles = PLACEMENT_ROLES[config.placement]
    return per_module(model, config, lambda: default_targets(model, roles, config.method), make)


def build(model: nn.Module, config: AdapterConfig) -> Placements:
    return build_bottlenecks(model, config, BottleneckAdapter)


register_method(MethodSpec(
    "adapter", AdapterConfig, build, size_option="bottleneck", mergeable=False, identity_at_init=True,
    merge_refusal="a bottleneck adapter applies a non-linearity to the layer's output",
    summary="bottleneck adapters (Houlsby, Pfeiffer or parallel)", default_lr=1e-3, mixing=Mixing("batched"),
    peft_refusal="peft has no bottleneck-adapter method (Houlsby/Pfeiffer adapters are adapter-hub's format)"))
