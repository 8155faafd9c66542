"""Each method's forward pass against a naive formula written out by hand."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from torch import nn

import deltatune as dt

torch.manual_seed(0)


class Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 5)
        self.emb = nn.Embedding(10, 5)

    def forward(self, x):
        return self.lin(x)


def _params(model, name="default"):
    return {k.split(".")[-1]: p for k, p in dt.delta_parameters(model, name)}


def _randomise(model, name="default"):
    with torch.no_grad():
        for _, p in dt.delta_parameters(model, name):
            p.copy_(torch.randn_like(p))


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_linear(use_rslora):
    model = Two()
    x = torch.randn(3, 6)
    dt.attach(model, dt.LoRAConfig(r=2, alpha=3.0, use_rslora=use_rslora, targets=["lin"]))
    _randomise(model)
    p = _params(model)
    scale = 3.0 / (math.sqrt(2) if use_rslora else 2)
    expected = x @ model.lin.weight.T + model.lin.bias + scale * (x @ p["lora_A"].T @ p["lora_B"].T)
    torch.testing.assert_close(model(x), expected)


def test_lora_embedding():
    model = Two()
    ids = torch.tensor([[1, 4, 9]])
    dt.attach(model, dt.LoRAConfig(r=2, alpha=4.0, targets=["emb"]))
    _randomise(model)
    p = _params(model)
    table = model.emb.weight + 2.0 * (p["lora_B"] @ p["lora_A"]).T
    torch.testing.assert_close(model.emb(ids), table[ids])
    dt.merge(model)
    torch.testing.assert_close(model.emb.weight, table)


def test_lora_on_gpt2_conv1d():
    config = transformers.GPT2Config(vocab_size=50, n_embd=8, n_layer=1, n_head=2)
    block = transformers.GPT2LMHeadModel(config).transformer.h[0].attn.c_attn  # Conv1D, weight (in, out)
    x = torch.randn(2, 8)
    expected_base = x @ block.weight + block.bias
    holder = nn.Module()
    holder.proj = block
    dt.attach(holder, dt.LoRAConfig(r=2, alpha=2.0, targets=["proj"]))
    _randomise(holder)
    p = _params(holder)
    expected = expected_base + x @ p["lora_A"].T @ p["lora_B"].T
    torch.testing.assert_close(holder.proj(x), expected)


def test_dora_against_the_paper_formula():
    model = Two()
    x = torch.randn(3, 6)
    dt.attach(model, dt.DoRAConfig(r=2, alpha=2.0, targets=["lin"]))
    p = _params(model)
    torch.testing.assert_close(p["magnitude"], model.lin.weight.norm(dim=1))
    _randomise(model)
    direction = model.lin.weight + p["lora_B"] @ p["lora_A"]
    weight = p["magnitude"].unsqueeze(1) * direction / direction.norm(dim=1, keepdim=True)
    torch.testing.assert_close(model(x), x @ weight.T + model.lin.bias)


def test_ia3_scales_outputs_and_inputs():
    model = Two()
    x = torch.randn(3, 6)
    dt.attach(model, dt.IA3Config(targets=["lin"]), name="out")
    _randomise(model, "out")
    l_out = _params(model, "out")["ia3_l"]
    torch.testing.assert_close(model(x), (x @ model.lin.weight.T + model.lin.bias) * l_out)
    dt.attach(model, dt.IA3Config(targets=["lin"], feedforward=["lin"]), name="in")
    _randomise(model, "in")
    l_in = _params(model, "in")["ia3_l"]
    torch.testing.assert_close(model(x), (x * l_in) @ model.lin.weight.T + model.lin.bias)


def test_bitfit_adds_a_bias_change_and_merges_into_the_bias():
    model = Two()
    x = torch.randn(3, 6)
    dt.attach(model, dt.BitFitConfig(targets=["lin"]))
    _randomise(model)
    delta = _params(model)["bias_delta"]
    torch.testing.assert_close(model(x), x @ model.lin.weight.T + model.lin.bias + delta)
    original = model.lin.bias.clone()
    dt.merge(model)
    torch.testing.assert_close(model.lin.bias, original + delta)


def test_a_sequential_root_keeps_working():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(2, 4)
    before = model(x)
    dt.attach(model, dt.LoRAConfig(r=2, target_types=["Linear"]))
    assert len(model) == 3 and isinstance(model[-1], nn.Linear)
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def test_bitfit_on_convolutions_adds_per_channel():
    conv = nn.Sequential(nn.Conv2d(2, 3, 1))
    x = torch.randn(1, 2, 4, 4)
    dt.attach(conv, dt.BitFitConfig())
    _randomise(conv)
    delta = _params(conv)["bias_delta"]
    torch.testing.assert_close(conv(x), nn.functional.conv2d(x, conv[0].weight, conv[0].bias + delta))


@pytest.mark.parametrize("placement", ["houlsby", "parallel"])
def test_bottleneck_adapter(placement):
    model = Two()
    x = torch.randn(3, 6)
    dt.attach(model, dt.AdapterConfig(bottleneck=4, placement=placement, non_linearity="tanh", scaling=0.5, targets=["lin"]))
    _randomise(model)
    unit = model.lin.deltas["default"]
    y = x @ model.lin.weight.T + model.lin.bias
    h = x if placement == "parallel" else y
    expected = y + 0.5 * (torch.tanh(h @ unit.down.weight.T + unit.down.bias) @ unit.up.weight.T + unit.up.bias)
    torch.testing.assert_close(model(x), expected)


def test_a_bottleneck_subclass_supplying_its_own_weights_runs_like_the_dense_adapter():
    """The extension point of methods/adapter: a unit that builds its projections (Compacter,
    SparseAdapter) gets the adapter's forward from the four tensors it supplies."""
    from deltatune.methods.adapter import Bottleneck

    class Supplied(Bottleneck):
        def __init__(self, dense):
            super().__init__(False, "tanh", 0.5)
            self.dense = dense

        def down_weight(self):
            return self.dense.down.weight * 1.0

        def down_bias(self):
            return self.dense.down.bias

        def up_weight(self):
            return self.dense.up.weight * 1.0

        def up_bias(self):
            return self.dense.up.bias

    model = Two()
    x = torch.randn(3, 6)
    dt.attach(model, dt.AdapterConfig(bottleneck=4, non_linearity="tanh", scaling=0.5, targets=["lin"]))
    _randomise(model)
    expected = model(x)
    supplied = Supplied(model.lin.deltas["default"])
    with torch.no_grad():
        torch.testing.assert_close(supplied.forward_post(model.lin, (x,), {}, x @ model.lin.weight.T + model.lin.bias),
                                   expected)


def test_adapter_up_projection_starts_at_zero():
    model = Two()
    dt.attach(model, dt.AdapterConfig(bottleneck=4, targets=["lin"]))
    unit = model.lin.deltas["default"]
    assert torch.count_nonzero(unit.up.weight) == 0 and torch.count_nonzero(unit.up.bias) == 0
    assert torch.count_nonzero(unit.down.weight) > 0


def test_adapter_placements_choose_their_default_roles():
    from tiny_models import MODELS

    houlsby = dt.attach(MODELS["bert"].build(), dt.AdapterConfig(bottleneck=4, placement="houlsby"))
    pfeiffer = dt.attach(MODELS["bert"].build(), dt.AdapterConfig(bottleneck=4, placement="pfeiffer"))
    parallel = dt.attach(MODELS["llama"].build(), dt.AdapterConfig(bottleneck=4, placement="parallel"))
    assert houlsby.modules == [f"bert.encoder.layer.{i}.{m}" for i in range(2) for m in ("attention.output.dense", "output.dense")]
    assert pfeiffer.modules == [f"bert.encoder.layer.{i}.output.dense" for i in range(2)]
    assert parallel.modules == [f"model.layers.{i}.mlp" for i in range(2)]
