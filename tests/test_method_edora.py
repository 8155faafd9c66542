"""EDoRA (methods/edora): the merged weight against DoRA's formula with a LoRA-XS update computed
by hand, refusals, mixed batches, saved factors, task vectors and merging, and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune as dt
from deltatune.methods.edora import EDoRAConfig, EDoRALinear
from method_checks import (assert_peft_export_is_refused, assert_rows_equal_alone, randomise, saved_config, token_batch,
                           train_from_the_command_line)
from tiny_models import MODELS

TOL = {"atol": 1e-5, "rtol": 1e-5}


def _reference(weight_out_in, R, magnitude, alpha):
    """m * (W + dW) / ||W + dW||_row with dW = (alpha / r) U_r R S_r V_r^T, each norm over a row's inputs."""
    r = R.shape[0]
    U, S, Vh = torch.linalg.svd(weight_out_in.float(), full_matrices=False)
    changed = weight_out_in + alpha / r * U[:, :r] @ R @ torch.diag(S[:r]) @ Vh[:r]
    norms = torch.stack([row.square().sum().sqrt() for row in changed])
    return magnitude[:, None] * changed / norms[:, None]


def _unit(module, r, alpha, transposed):
    fan_in, fan_out = (module.weight.shape if transposed else module.weight.shape[::-1])
    unit = EDoRALinear(fan_in, fan_out, r, alpha / r, transposed)
    unit.attached(module, None)
    return unit


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_weight_is_magnitude_times_normalised_W_plus_loraxs_update(kind):
    torch.manual_seed(0)
    module = nn.Linear(10, 6) if kind == "linear" else Conv1D(6, 10)
    transposed = kind == "conv1d"
    weight = module.weight.detach().T if transposed else module.weight.detach()
    unit = _unit(module, 4, 8.0, transposed)
    torch.testing.assert_close(unit.magnitude.detach(), torch.stack([row.norm() for row in weight]), **TOL)
    with torch.no_grad():
        unit.R.copy_(torch.randn(4, 4))
        unit.magnitude.mul_(1 + 0.1 * torch.randn(6))
    expected_weight = _reference(weight, unit.R.detach(), unit.magnitude.detach(), 8.0)
    x = torch.randn(3, 5, 10)
    torch.testing.assert_close(unit.forward_post(module, (x,), {}, module(x)), F.linear(x, expected_weight, module.bias), **TOL)
    merged = unit.merge_params(module, dict(module.named_parameters()))["weight"]
    torch.testing.assert_close(merged, expected_weight.T if transposed else expected_weight, **TOL)
    assert unit.low_rank_update() is None


def test_trains_R_and_the_magnitude_only():
    model = MODELS["gpt2"].build()
    report = dt.attach(model, EDoRAConfig(r=3))
    widths = [model.get_submodule(p).weight.shape[1] for p in report.modules]  # Conv1D: (in, out)
    assert report.trainable == sum(9 + w for w in widths)
    assert {n.rsplit(".", 1)[1] for n, _ in dt.delta_parameters(model, "default")} == {"R", "magnitude"}


def test_rank_above_min_in_out_is_refused_at_attach_naming_the_module_and_shape():
    model = MODELS["cnn"].build()
    with pytest.raises(dt.NotApplicableError, match=r"edora cannot adapt 'fc' \(Linear, weight \(out, in\) = \(4, 8\)\): r=5"):
        dt.attach(model, EDoRAConfig(r=5, target_types=("Linear",)))
    assert not dt.list_deltas(model) and not hasattr(model.fc, "deltas")


@pytest.mark.parametrize("fields,name", [({"r": -1}, "'r'"), ({"alpha": -2.0}, "'alpha'")])
def test_bad_field_values_fail_at_construction_naming_the_field(fields, name):
    with pytest.raises(dt.ConfigError, match=f"edora field {name}"):
        EDoRAConfig(**fields)


def test_a_loaded_delta_uses_its_saved_factors_and_magnitude(tmp_path, monkeypatch):
    case = MODELS["bert"]
    model = case.build()
    dt.attach(model, EDoRAConfig(r=4))
    with torch.no_grad():
        for _, p in dt.delta_parameters(model, "default"):
            p.add_(0.1 * torch.randn(p.shape))
        expected = case.output(model)
    dt.save(model, tmp_path / "d")
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: (_ for _ in ()).throw(AssertionError("SVD on load")))
    fresh = case.build()
    dt.load(fresh, tmp_path / "d")
    with torch.no_grad():
        torch.testing.assert_close(case.output(fresh), expected, rtol=0, atol=0)


@pytest.mark.parametrize("case_name", ["bert", "gpt2", "llama"])
def test_mixed_batch_rows_equal_each_row_run_alone(case_name):
    case = MODELS[case_name]
    model = case.build()
    dt.attach(model, EDoRAConfig(r=4), name="a")
    dt.attach(model, EDoRAConfig(r=2, alpha=5.0), name="b")
    dt.attach(model, dt.get_method("loraxs").config_class(r=2), name="xs")
    dt.attach(model, dt.DoRAConfig(r=2), name="dora")
    for seed, name in enumerate(("a", "b", "xs", "dora")):
        randomise(model, name, seed + 1, scale=0.1)
    rows = ["a", None, "b", "xs", "a", "dora", None]
    assert_rows_equal_alone(case, model, rows, token_batch(len(rows), seed=3, attention_mask=True))


def test_task_vector_and_linear_merge_equal_the_hand_computed_changes():
    case = MODELS["bert"]
    model = case.build()
    dt.attach(model, EDoRAConfig(r=4), name="a")
    dt.attach(model, EDoRAConfig(r=2, alpha=3.0), name="b")
    randomise(model, "a", 1, scale=0.1)
    randomise(model, "b", 2, scale=0.1)
    path = "bert.encoder.layer.1.attention.self.value"
    module = model.get_submodule(path)
    weight = module.weight.detach()
    hand = {n: _reference(weight, module.deltas[n].R.detach(), module.deltas[n].magnitude.detach(), alpha) - weight
            for n, alpha in (("a", 16.0), ("b", 3.0))}
    torch.testing.assert_close(dt.TaskVector.from_delta(model, "a").dense()[f"{path}.weight"], hand["a"], **TOL)
    dt.merge_deltas(model, ["a", "b"], "linear", [0.5, 2.0])
    merged = dt.TaskVector.from_delta(model, "merged").dense()[f"{path}.weight"]
    torch.testing.assert_close(merged, 0.5 * hand["a"] + 2.0 * hand["b"], **TOL)


def test_train_from_the_command_line(tmp_path, tiny_bert, reviews_csv):
    out = train_from_the_command_line(tmp_path, tiny_bert, reviews_csv, ["--method", "edora", "--r", "3"], steps=12)
    assert json.loads((out / "metrics.json").read_text())["method"] == "edora"
    assert saved_config(out)["r"] == 3


def test_peft_export_is_refused_with_the_reason(tmp_path):
    model = MODELS["bert"].build()
    dt.attach(model, EDoRAConfig(r=2))
    assert_peft_export_is_refused(tmp_path, model, "cannot export a 'edora' delta to peft: peft has no .*EDoRA")
