"""The shared weight-method unit (core/weight_delta.py): unmerged output, merge and Conv1D layout,
against ``F.linear`` with the changed weight computed by hand."""

from __future__ import annotations

import torch
from torch import nn

from deltatune.core.weight_delta import WeightDelta


class Scaled(WeightDelta):
    """dW = W * s (a multiplicative change, so the base weight must reach delta_weight)."""

    def __init__(self, fan_in, fan_out, transposed=False):
        super().__init__(fan_in, fan_out, transposed)
        self.s = nn.Parameter(torch.randn(fan_out, 1))

    def delta_weight(self, weight):
        return weight * self.s


def test_unmerged_and_merged_equal_the_changed_weight_linear_and_conv1d():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    x = torch.randn(3, 5)
    for module, transposed in ((nn.Linear(5, 4), False), (Conv1D(4, 5), True)):
        unit = Scaled(5, 4, transposed)
        w = module.weight.T if transposed else module.weight
        expected = torch.nn.functional.linear(x, w + w * unit.s, module.bias)
        torch.testing.assert_close(unit.forward_post(module, (x,), {}, module(x)), expected)
        merged = unit.merge_params(module, dict(module.named_parameters()))["weight"]
        assert merged.shape == module.weight.shape
        torch.testing.assert_close(merged, (w + w * unit.s).T if transposed else w + w * unit.s)
