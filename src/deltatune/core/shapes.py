"""Reading a module's shape: linear layers, whatever their weight layout."""

from __future__ import annotations

from torch import nn

from .quantized import dense


def linear_shape(module: nn.Module) -> tuple[int, int, bool] | None:
    """``(in_features, out_features, fan_in_fan_out)`` of a Linear or GPT-2 ``Conv1D``, else None.

    GPT-2's ``Conv1D`` is a linear layer whose weight is stored ``(in, out)``.
    """
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None and module.weight.dim() == 2:
        fan_in, fan_out = module.weight.shape
        return fan_in, fan_out, True
    return None


def weight_as_out_in(module: nn.Module, fan_in_fan_out: bool):
    """The module's weight as an ``(out, in)`` float matrix: a view (transposed for ``Conv1D``),
    or a dequantised copy when the base is quantised (:func:`deltatune.core.quantized.dense`)."""
    weight = dense(module.weight)
    return weight.T if fan_in_fan_out else weight
