"""ABBA (methods/abba): the update against the paper's Hadamard formula with explicit matrices,
the SVD start, refusals, mixed batches, task vectors and merging, and the CLI."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune as dt
from deltatune.methods.abba import ABBAConfig, ABBALinear
from method_checks import (assert_peft_export_is_refused, assert_rows_equal_alone, randomise, saved_config, token_batch,
                           train_from_the_command_line)
from tiny_models import MODELS

TOL = {"atol": 1e-5, "rtol": 1e-5}


def _unit(module, r1, r2, alpha, transposed):
    fan_in, fan_out = (module.weight.shape if transposed else module.weight.shape[::-1])
    unit = ABBALinear(fan_in, fan_out, r1, r2, alpha ** 2 / math.sqrt(r1 * r2), transposed)
    unit.attached(module, None)
    return unit


def _hadamard(unit, alpha):
    """s (B1 A1) ⊙ (B2 A2), entry by entry, s = alpha^2 / sqrt(r1 r2)."""
    r1, r2 = unit.B1.shape[1], unit.B2.shape[1]
    first, second = unit.B1 @ unit.A1, unit.B2 @ unit.A2
    out, inp = first.shape
    product = torch.tensor([[first[i, j] * second[i, j] for j in range(inp)] for i in range(out)])
    return alpha ** 2 / math.sqrt(r1 * r2) * product


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_update_is_the_scaled_hadamard_product_of_the_two_pairs(kind):
    torch.manual_seed(0)
    module = nn.Linear(9, 7) if kind == "linear" else Conv1D(7, 9)
    transposed = kind == "conv1d"
    weight = module.weight.detach().T if transposed else module.weight.detach()
    unit = _unit(module, 3, 2, 1.5, transposed)
    with torch.no_grad():
        for p in unit.parameters():
            p.copy_(torch.randn(p.shape))
        delta = _hadamard(unit, 1.5)
        x = torch.randn(2, 4, 9)
        torch.testing.assert_close(unit.delta_weight(), delta, **TOL)
        torch.testing.assert_close(unit.forward_post(module, (x,), {}, module(x)), F.linear(x, weight + delta, module.bias), **TOL)
        merged = unit.merge_params(module, dict(module.named_parameters()))["weight"]
        torch.testing.assert_close(merged, (weight + delta).T if transposed else weight + delta, **TOL)
        up, down, layout = unit.low_rank_update()
        assert layout == transposed and up.shape == (7, 6) and down.shape == (6, 9)  # rank r1 r2
        torch.testing.assert_close(up @ down, delta, **TOL)


def test_first_pair_starts_from_the_top_singular_triplets_and_the_update_from_zero():
    torch.manual_seed(1)
    module = nn.Linear(10, 8)
    unit = _unit(module, 3, 4, 2.0, False)
    U, S, Vh = torch.linalg.svd(module.weight.detach().double(), full_matrices=False)
    torch.testing.assert_close((unit.B1 @ unit.A1).double(), (U[:, :3] * S[:3]) @ Vh[:3], **TOL)
    torch.testing.assert_close(unit.B1.T @ unit.B1, unit.A1 @ unit.A1.T, **TOL)  # both diag(S): balanced split
    assert torch.count_nonzero(unit.B2) == 0 and torch.count_nonzero(unit.A2) > 0
    assert torch.count_nonzero(unit.delta_weight()) == 0


def test_all_four_factors_train_and_count_r1_plus_r2_times_in_plus_out():
    model = MODELS["llama"].build()
    report = dt.attach(model, ABBAConfig(r1=2, r2=3))
    shapes = [model.get_submodule(p).weight.shape for p in report.modules]
    assert report.trainable == sum(5 * (o + i) for o, i in shapes)
    assert {n.rsplit(".", 1)[1] for n, _ in dt.delta_parameters(model, "default")} == {"A1", "B1", "A2", "B2"}


def test_r1_above_min_in_out_is_refused_at_attach_naming_the_module_and_shape():
    model = MODELS["mlp"].build()
    with pytest.raises(dt.NotApplicableError, match=r"abba cannot adapt 'head' \(Linear, weight \(out, in\) = \(3, 16\)\): r1=4"):
        dt.attach(model, ABBAConfig(r1=4, target_types=("Linear",)))
    assert not dt.list_deltas(model) and not hasattr(model.head, "deltas")
    dt.attach(model, ABBAConfig(r1=3, r2=9, target_types=("Linear",)))  # r2 has no such bound


@pytest.mark.parametrize("fields,name", [({"r1": 0}, "'r1'"), ({"r2": -3}, "'r2'"), ({"alpha": 0.0}, "'alpha'")])
def test_bad_field_values_fail_at_construction_naming_the_field(fields, name):
    with pytest.raises(dt.ConfigError, match=f"abba field {name}"):
        ABBAConfig(**fields)


@pytest.mark.parametrize("case_name", ["bert", "gpt2"])
def test_mixed_batch_rows_equal_each_row_run_alone(case_name):
    case = MODELS[case_name]
    model = case.build()
    dt.attach(model, ABBAConfig(r1=2, r2=3), name="a")
    dt.attach(model, ABBAConfig(r1=4, r2=1, alpha=2.0), name="b")
    dt.attach(model, dt.LoRAConfig(r=2), name="lora")
    for seed, name in enumerate(("a", "b", "lora")):
        randomise(model, name, seed + 1, scale=0.2)
    rows = ["a", None, "b", "lora", "a", None]
    assert_rows_equal_alone(case, model, rows, token_batch(len(rows), seed=3, attention_mask=True))


def test_task_vector_stays_factored_and_merges_equal_the_hand_computed_updates(tmp_path):
    case = MODELS["bert"]
    model = case.build()
    dt.attach(model, ABBAConfig(r1=2, r2=2), name="a")
    dt.attach(model, ABBAConfig(r1=3, r2=1, alpha=3.0), name="b")
    randomise(model, "a", 1, scale=0.2)
    randomise(model, "b", 2, scale=0.2)
    path = "bert.encoder.layer.0.attention.self.value"
    units = model.get_submodule(path).deltas
    with torch.no_grad():
        hand = {"a": _hadamard(units["a"], 4.0), "b": _hadamard(units["b"], 3.0)}
    vector = dt.TaskVector.from_delta(model, "a")
    assert vector.is_factored
    torch.testing.assert_close(vector.dense()[f"{path}.weight"], hand["a"], **TOL)
    dt.merge_deltas(model, ["a", "b"], "linear", [0.5, 2.0])
    merged = dt.TaskVector.from_delta(model, "merged").dense()[f"{path}.weight"]
    torch.testing.assert_close(merged, 0.5 * hand["a"] + 2.0 * hand["b"], **TOL)
    dt.merge_deltas(model, ["a", "b"], "ties", density=1.0, name="ties")  # TIES accepts it too
    assert torch.isfinite(dt.TaskVector.from_delta(model, "ties").dense()[f"{path}.weight"]).all()


def test_train_from_the_command_line(tmp_path, tiny_bert, reviews_csv):
    out = train_from_the_command_line(tmp_path, tiny_bert, reviews_csv, ["--method", "abba", "--r1", "2", "--r2", "3"],
                                      steps=12)
    config = saved_config(out)
    assert config["method"] == "abba" and (config["r1"], config["r2"]) == (2, 3)


def test_peft_export_is_refused_with_the_reason(tmp_path):
    model = MODELS["bert"].build()
    dt.attach(model, ABBAConfig())
    assert_peft_export_is_refused(tmp_path, model, "cannot export a 'abba' delta to peft: peft has no .*LoHa")
