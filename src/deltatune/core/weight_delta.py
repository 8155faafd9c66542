"""The common shape of a weight method: a unit whose whole effect is a change of its Linear
(or GPT-2 ``Conv1D``) module's weight, ``y = x (W + dW)^T + b``.

A method states ``dW`` once (:meth:`WeightDelta.delta_weight`, from its parameters and, for
multiplicative methods such as orthogonal rotations, the weight it changes); running
unmerged, merging and dense task vectors then all follow from that one formula. A method
with a cheaper unmerged kernel (a low-rank product never forms ``dW``) overrides
:meth:`~deltatune.core.unit.DeltaUnit.forward_post` and keeps ``delta_weight`` for merging.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .build import first_input
from .quantized import format_of
from .shapes import weight_as_out_in
from .unit import DeltaUnit


class WeightDelta(DeltaUnit):
    """A change ``dW`` of a linear module's ``(out, in)`` weight.

    Args:
        fan_in, fan_out: the module's input and output widths.
        transposed: the module stores its weight ``(in, out)`` (GPT-2 ``Conv1D``).
    """

    def __init__(self, fan_in: int, fan_out: int, transposed: bool = False):
        super().__init__()
        self.fan_in, self.fan_out, self.transposed = fan_in, fan_out, transposed

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``dW``, ``(out, in)`` in float32, for the module weight ``weight`` (``(out, in)``;
        additive methods ignore it, multiplicative ones change it)."""
        raise NotImplementedError

    def base_weight(self, module: nn.Module) -> torch.Tensor:
        """The module's weight as ``(out, in)`` floats (a view, or dequantised when quantised)."""
        return weight_as_out_in(module, self.transposed)

    def forward_post(self, module, args, kwargs, output):
        x = first_input(args, kwargs)
        delta = self.delta_weight(self.base_weight(module).float())
        return output + F.linear(x.to(delta.dtype), delta).to(output.dtype)

    def run(self, module, own, args, kwargs):
        # alone at a float32 nn.Linear with the generic kernel: one matmul with W + dW
        x = first_input(args, kwargs)
        generic = type(self).forward_post is WeightDelta.forward_post
        if generic and type(module) is nn.Linear and x.dtype == module.weight.dtype == torch.float32 \
                and format_of(module.weight) is None:
            return F.linear(x, module.weight + self.delta_weight(module.weight), module.bias)
        return super().run(module, own, args, kwargs)

    def merge_params(self, module, params):
        weight = params["weight"]
        delta = self.delta_weight((weight.T if self.transposed else weight).float())
        return {"weight": weight + (delta.T if self.transposed else delta).to(weight.dtype)}

    def extra_repr(self) -> str:
        return f"in={self.fan_in}, out={self.fan_out}" + (", transposed" if self.transposed else "")
