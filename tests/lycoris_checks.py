"""Checks shared by the LoHa and LoKr tests: a model with one Linear and one GPT-2 Conv1D,
random delta tensors, the mixed-batch and merging contracts, and both directions of peft interop."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from tiny_models import MODELS, small_config
from method_checks import (assert_linear_merge_equals_dense_reference,
                           assert_rows_equal_alone as assert_routed_rows_equal_alone, edit_adapter_config, logits,
                           quiet, saved_peft_adapter, token_batch)

import deltatune as dt
from deltatune.interop import export_peft, import_peft

TOL = 1e-5


class LinearAndConv1D(nn.Module):
    """``x -> Conv1D(Linear(x))``: one module of each layout, widths with several factorisations."""

    def __init__(self, fan_in: int = 12, hidden: int = 18, fan_out: int = 8) -> None:
        from transformers.pytorch_utils import Conv1D

        super().__init__()
        self.linear = nn.Linear(fan_in, hidden)
        self.conv = Conv1D(fan_out, hidden)  # GPT-2 layout: weight (in, out)

    def forward(self, x):
        return self.conv(self.linear(x))


def randomise(params, seed: int = 7, scale: float = 0.3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in params:
            param.add_(scale * torch.randn(param.shape, generator=generator))


def attached_to_linear_and_conv1d(config, name: str) -> nn.Module:
    """A ``LinearAndConv1D`` (seed 0) with ``config`` attached as ``name``, its tensors randomised."""
    torch.manual_seed(0)
    model = LinearAndConv1D()
    dt.attach(model, config, name=name)
    randomise([p for _, p in dt.delta_parameters(model, name)])
    return model


def unit_output(model, unit, module, x, weight_change):
    """The unit's unmerged output, ``x (W + weight_change)^T + b`` (the reference) and the base output."""
    weight = module.weight.T if getattr(unit, "transposed", False) else module.weight
    reference = torch.nn.functional.linear(x, weight + weight_change, module.bias)
    with dt.base_only(model):
        base = module(x)
    return unit.forward_post(module, (x,), {}, base), reference, base


def copy_into_peft(model, name, peft_model) -> None:
    """Random values for the delta ``name``, copied in order into ``peft_model``'s adapter tensors."""
    ours = [p for _, p in dt.delta_parameters(model, name)]
    randomise(ours)
    theirs = [p for _, p in peft_model.named_parameters() if p.requires_grad]
    assert [p.shape for p in ours] == [p.shape for p in theirs]
    with torch.no_grad():
        for mine, their in zip(ours, theirs):
            their.copy_(mine)


def assert_rows_equal_alone(case_name: str, configs: dict, rows: list) -> None:
    """Rows routed to ``configs``' deltas (and ``None``: the base) equal each row run alone."""
    case = MODELS[case_name]
    model = case.build()
    for i, (name, fields) in enumerate(configs.items()):
        method = fields.pop("method")
        dt.attach(model, small_config(method, case, **fields), name=name)
        randomise([p for _, p in dt.delta_parameters(model, name)], seed=i + 1)
    model.eval()
    assert_routed_rows_equal_alone(case, model, rows, token_batch(len(rows), seed=3, attention_mask=True), TOL)


def assert_linear_merge_is_the_dense_sum(tmp_path, configs: list) -> None:
    """``merge_deltas(..., "linear", weights)`` of two deltas equals the base plus the weighted
    sum of their units' own weight changes, added by hand."""
    case = MODELS["llama"]
    folders, changes = [], {}
    weights = (0.7, -0.4)
    for i, config in enumerate(configs):
        model = case.build()
        dt.attach(model, config, name=f"d{i}")
        randomise([p for _, p in dt.delta_parameters(model, f"d{i}")], seed=10 + i)
        for path, module in model.named_modules():
            slot = getattr(module, "deltas", None)
            if slot is not None and f"d{i}" in slot:
                change = slot[f"d{i}"].delta_weight().detach()
                changes[path] = changes.get(path, 0) + weights[i] * change
        folders.append(dt.save(model, tmp_path / f"d{i}"))
    assert_linear_merge_equals_dense_reference(case, folders, list(weights), changes)


def assert_export_loads_in_peft(tmp_path, case_name: str, config) -> float:
    """A deltatune delta with random tensors, exported, gives the same logits in peft; the
    largest difference is returned."""
    case = MODELS[case_name]
    ours = case.build(0)
    dt.attach(ours, config, name="x")
    randomise([p for _, p in dt.delta_parameters(ours, "x")])
    ours.eval()
    dt.save(ours, tmp_path / "delta")
    export_peft(tmp_path / "delta", tmp_path / "peft", case.build(0))
    peft = __import__("peft")
    theirs = quiet(peft.PeftModel.from_pretrained, case.build(0), tmp_path / "peft").eval()
    inputs = case.inputs()
    mine, their = logits(ours, inputs), logits(theirs, inputs)
    base = logits(case.build(0), inputs)
    assert (mine - base).abs().max() > 100 * TOL, "the delta changes nothing"
    torch.testing.assert_close(mine, their, rtol=0, atol=TOL)
    return (mine - their).abs().max().item()


def assert_peft_adapter_imports(tmp_path, case_name: str, peft_config) -> float:
    """A peft adapter with random tensors, saved by peft and imported, gives peft's logits; the
    largest difference is returned."""
    case = MODELS[case_name]
    theirs = saved_peft_adapter(tmp_path / "peft", case.build(0), peft_config, seed=7, scale=0.3)
    import_peft(tmp_path / "peft", tmp_path / "delta", case.build(0))
    ours = case.build(0)
    dt.load(ours, tmp_path / "delta")
    ours.eval()
    inputs = case.inputs()
    mine, their = logits(ours, inputs), logits(theirs, inputs)
    assert (their - logits(case.build(0), inputs)).abs().max() > 100 * TOL, "the adapter changes nothing"
    torch.testing.assert_close(mine, their, rtol=0, atol=TOL)
    return (mine - their).abs().max().item()


def assert_same_dropout_as_peft(ours, theirs, inputs: dict) -> None:
    """In training and in eval, ``ours`` and ``theirs`` (equal tensors) give the same logits under
    the same seed: the same draws in the same order, so the same dropout masks."""
    for training in (True, False):
        theirs.train(training), ours.train(training)
        outputs = []
        for model in (ours, theirs):
            torch.manual_seed(5)
            outputs.append(model(**inputs).logits.detach())
        torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=1e-5)


def assert_unknown_peft_option_is_refused(tmp_path, peft_config, option: str = "use_tucker") -> None:
    """A peft adapter of ``peft_config`` on the tiny Llama, its adapter_config.json given
    ``option=True``, is refused by ``import_peft`` with a ConfigError naming ``option``."""
    peft = __import__("peft")
    theirs = quiet(peft.get_peft_model, MODELS["llama"].build(0), peft_config)
    quiet(theirs.save_pretrained, tmp_path / "peft")
    edit_adapter_config(tmp_path / "peft", **{option: True})
    with pytest.raises(dt.ConfigError, match=option):
        import_peft(tmp_path / "peft", tmp_path / "delta", MODELS["llama"].build(0))


def peft_trainable(case_name: str, peft_config) -> int:
    peft = __import__("peft")
    return quiet(peft.get_peft_model, MODELS[case_name].build(0), peft_config).get_nb_trainable_parameters()[0]
