"""LoRA-XS (methods/loraxs): the update against the paper's formula computed by hand, refusals,
mixed batches, saved SVD factors, task vectors and merging, and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune as dt
from deltatune.methods.loraxs import LoRAXSConfig, LoRAXSLinear
from method_checks import (assert_peft_export_is_refused, assert_rows_equal_alone, saved_config, token_batch,
                           train_from_the_command_line)
from tiny_models import MODELS

TOL = {"atol": 1e-5, "rtol": 1e-5}


def _attached_unit(module, r, alpha, transposed):
    fan_in, fan_out = (module.weight.shape if transposed else module.weight.shape[::-1])
    unit = LoRAXSLinear(fan_in, fan_out, r, alpha / r, transposed)
    unit.attached(module, None)
    return unit


def _reference(weight_out_in, R, alpha):
    """(alpha / r) U_r R S_r V_r^T from the (out, in) weight's SVD, computed here."""
    r = R.shape[0]
    U, S, Vh = torch.linalg.svd(weight_out_in.float(), full_matrices=False)
    return alpha / r * U[:, :r] @ R @ torch.diag(S[:r]) @ Vh[:r]


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_update_is_scaled_U_R_S_Vt_of_the_base_weight(kind):
    torch.manual_seed(0)
    module = nn.Linear(12, 7) if kind == "linear" else Conv1D(7, 12)  # Conv1D(out, in) stores (in, out)
    transposed = kind == "conv1d"
    weight = module.weight.detach().T if transposed else module.weight.detach()
    unit = _attached_unit(module, 5, 3.0, transposed)
    with torch.no_grad():
        unit.R.copy_(torch.randn(5, 5))
    delta = _reference(weight, unit.R.detach(), 3.0)
    x = torch.randn(2, 4, 12)
    expected = F.linear(x, weight + delta, module.bias)
    torch.testing.assert_close(unit.forward_post(module, (x,), {}, module(x)), expected, **TOL)
    merged = unit.merge_params(module, dict(module.named_parameters()))["weight"]
    torch.testing.assert_close(merged, (weight + delta).T if transposed else weight + delta, **TOL)
    B, A, layout = unit.low_rank_update()
    assert layout == transposed
    torch.testing.assert_close(B @ A, delta, **TOL)


def test_with_R_the_identity_the_update_is_the_truncated_svd_of_W():
    """Sign-free check of the frozen factors: B A = U_r S_r V_r^T, the best rank-r approximation."""
    torch.manual_seed(1)
    module = nn.Linear(9, 6)
    unit = _attached_unit(module, 4, 4.0, False)  # scaling 1
    with torch.no_grad():
        unit.R.copy_(torch.eye(4))
    U, S, Vh = torch.linalg.svd(module.weight.detach().double(), full_matrices=False)
    best = (U[:, :4] * S[:4]) @ Vh[:4]
    torch.testing.assert_close(unit.delta_weight().double(), best, **TOL)
    torch.testing.assert_close(unit.B.T @ unit.B, torch.eye(4), **TOL)  # B = U_r: orthonormal columns


def test_only_R_trains_and_counts_r_squared_per_module():
    model = MODELS["bert"].build()
    report = dt.attach(model, LoRAXSConfig(r=3))
    assert report.trainable == len(report.modules) * 9
    names = [n for n, _ in dt.delta_parameters(model, "default")]
    assert names and all(n.endswith(".R") for n in names)


def test_rank_above_min_in_out_is_refused_at_attach_naming_the_module_and_shape():
    model = MODELS["mlp"].build()
    with pytest.raises(dt.NotApplicableError, match=r"loraxs cannot adapt 'head' \(Linear, weight \(out, in\) = \(3, 16\)\)"):
        dt.attach(model, LoRAXSConfig(r=4, target_types=("Linear",)))
    assert not dt.list_deltas(model) and not hasattr(model.head, "deltas")
    dt.attach(model, LoRAXSConfig(r=3, target_types=("Linear",)))  # r = min(in, out) fits


@pytest.mark.parametrize("fields,name", [({"r": 0}, "'r'"), ({"alpha": 0.0}, "'alpha'"), ({"r": "8"}, "r")])
def test_bad_field_values_fail_at_construction_naming_the_field(fields, name):
    with pytest.raises(dt.ConfigError, match=name):
        LoRAXSConfig(**fields)


def test_a_loaded_delta_uses_its_saved_factors_and_computes_no_svd(tmp_path, monkeypatch):
    case = MODELS["gpt2"]
    model = case.build()
    dt.attach(model, LoRAXSConfig(r=4))
    with torch.no_grad():
        for _, p in dt.delta_parameters(model, "default"):
            p.normal_()
        expected = case.output(model)
    dt.save(model, tmp_path / "d")
    meta = json.loads((tmp_path / "d" / "delta.json").read_text())
    assert {k.rsplit(".", 1)[1] for k in meta["tensors"]} == {"A", "B", "R"}

    def no_svd(*args, **kwargs):
        raise AssertionError("load computed an SVD")

    monkeypatch.setattr(torch.linalg, "svd", no_svd)
    fresh = case.build()
    dt.load(fresh, tmp_path / "d")
    with torch.no_grad():
        torch.testing.assert_close(case.output(fresh), expected, rtol=0, atol=0)


def _randomised(model, name, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in dt.delta_parameters(model, name):
            p.copy_(0.05 * torch.randn(p.shape, generator=generator))


@pytest.mark.parametrize("case_name", ["bert", "gpt2"])
def test_mixed_batch_rows_equal_each_row_run_alone(case_name):
    case = MODELS[case_name]
    model = case.build()
    dt.attach(model, LoRAXSConfig(r=4), name="a")
    dt.attach(model, LoRAXSConfig(r=2, alpha=5.0), name="b")
    dt.attach(model, dt.LoRAConfig(r=2), name="lora")
    for seed, name in enumerate(("a", "b", "lora")):
        _randomised(model, name, seed + 1)
    rows = ["a", None, "b", "a", "lora", None]
    assert_rows_equal_alone(case, model, rows, token_batch(len(rows), seed=3, attention_mask=True))


def test_task_vector_and_linear_merge_equal_the_hand_computed_updates():
    case = MODELS["bert"]
    model = case.build()
    dt.attach(model, LoRAXSConfig(r=4), name="a")
    dt.attach(model, LoRAXSConfig(r=2, alpha=3.0), name="b")
    _randomised(model, "a", 1)
    _randomised(model, "b", 2)
    path = "bert.encoder.layer.0.attention.self.query"
    module = model.get_submodule(path)
    weight = module.weight.detach()
    hand = {n: _reference(weight, module.deltas[n].R.detach(), alpha)
            for n, alpha in (("a", 16.0), ("b", 3.0))}
    vector = dt.TaskVector.from_delta(model, "a")
    torch.testing.assert_close(vector.dense()[f"{path}.weight"], hand["a"], **TOL)
    dt.merge_deltas(model, ["a", "b"], "linear", [0.5, 2.0])
    merged = dt.TaskVector.from_delta(model, "merged").dense()[f"{path}.weight"]
    torch.testing.assert_close(merged, 0.5 * hand["a"] + 2.0 * hand["b"], **TOL)


def test_train_from_the_command_line(tmp_path, tiny_bert, reviews_csv):
    out = train_from_the_command_line(tmp_path, tiny_bert, reviews_csv, ["--method", "loraxs", "--r", "3", "--alpha", "6"],
                                      steps=12)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "loraxs"
    config = saved_config(out)
    assert config["r"] == 3 and config["alpha"] == 6.0


def test_peft_export_is_refused_with_the_reason(tmp_path):
    model = MODELS["bert"].build()
    dt.attach(model, LoRAXSConfig(r=2))
    assert_peft_export_is_refused(tmp_path, model, "cannot export a 'loraxs' delta to peft: peft has no .*LoRA-XS")
