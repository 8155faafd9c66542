"""RoAd (Liao et al., 2024): each pair of outputs rotated and scaled by a learned 2x2 matrix.

The reference is the paper's formula written out: a dense block matrix ``R`` built pair by
pair from ``[[a cos t, -a sin t], [a sin t, a cos t]]`` (the variants' cosine and sine
entries taken from their own parameters), applied to ``W x + b``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny_models import MODELS
from method_checks import (assert_a_mixed_batch_trains_every_routed_delta, assert_conv1d_export_is_refused,
                           assert_refused_at_attach, assert_rows_equal_alone, attach_randomised, attached_at,
                           edit_adapter_config, loaded_inactive, logits, quiet, randomise as _randomise, saved_config,
                           saved_peft_adapter, token_batch, train_from_the_command_line)

import deltatune as dt
from deltatune.algebra import TaskVector, merge_deltas
from deltatune.interop import export_peft, import_peft, load_peft
from deltatune.methods.road import RoadConfig

peft = pytest.importorskip("peft")

VARIANTS = ["road_1", "road_2", "road_4"]


def _reference_rotation(unit) -> torch.Tensor:
    """``R`` from the paper, built one 2x2 block at a time from the unit's raw parameters."""
    theta, alpha, g, out = unit.theta.detach(), unit.alpha.detach(), unit.group_size, unit.fan_out
    half = g // 2
    rotation = torch.zeros(out, out)
    for group in range(out // g):
        for j in range(half):
            top, bottom = group * g + j, group * g + j + half
            if unit.variant == "road_1":  # one (a, t) per pair
                a, t = alpha[group * half + j], theta[group * half + j]
                block = [[a * t.cos(), -a * t.sin()], [a * t.sin(), a * t.cos()]]
            elif unit.variant == "road_2":  # one (a, t) per element: row i uses element i's
                (a0, t0), (a1, t1) = (alpha[top], theta[top]), (alpha[bottom], theta[bottom])
                block = [[a0 * t0.cos(), -a0 * t0.sin()], [a1 * t1.sin(), a1 * t1.cos()]]
            else:  # road_4: per group, g cosine entries then g sine entries
                def entry(i, part):
                    k = group * 2 * g + part * g + (i - group * g)
                    return alpha[k], theta[k]
                (ac0, tc0), (as0, ts0) = entry(top, 0), entry(top, 1)
                (ac1, tc1), (as1, ts1) = entry(bottom, 0), entry(bottom, 1)
                block = [[ac0 * tc0.cos(), -as0 * ts0.sin()], [as1 * ts1.sin(), ac1 * tc1.cos()]]
            for r, row in enumerate((top, bottom)):
                for c, col in enumerate((top, bottom)):
                    rotation[row, col] = block[r][c]
    return rotation


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case_name,path", [("llama", "model.layers.0.self_attn.q_proj"),
                                            ("gpt2", "transformer.h.0.attn.c_attn"),
                                            ("bert", "bert.encoder.layer.0.attention.self.value")])
def test_output_is_the_rotation_of_the_module_output_and_merge_rotates_weight_and_bias(variant, case_name, path):
    attached = attached_at(case_name, path, RoadConfig(variant=variant, group_size=8, targets=[f"re:{path}"]))
    model, module, unit = attached.model, attached.module, attached.unit
    rotation = _reference_rotation(unit)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), dt.base_only(model):
        base = module(x)
    with torch.no_grad():
        torch.testing.assert_close(module(x), base @ rotation.T, rtol=1e-5, atol=1e-6)
    weight = module.weight.detach().clone()
    bias = module.bias.detach().clone() if module.bias is not None else None
    dt.merge(model)
    transposed = attached.transposed  # Conv1D stores (in, out)
    expected = (rotation @ (weight.T if transposed else weight))
    torch.testing.assert_close(module.weight.detach(), expected.T if transposed else expected, rtol=1e-5, atol=1e-6)
    if bias is not None:
        torch.testing.assert_close(module.bias.detach(), rotation @ bias, rtol=1e-5, atol=1e-6)
    dt.unmerge(model)
    assert torch.equal(module.weight, weight)


def test_a_new_delta_is_the_identity_and_counts_as_the_variant_says():
    model = MODELS["llama"].build()
    for variant, per_output in [("road_1", 1), ("road_2", 2), ("road_4", 4)]:
        report = dt.attach(model, RoadConfig(variant=variant, group_size=8, targets=["q_proj"]), name=variant)
        assert report.trainable == 2 * 32 * per_output  # two layers of width 32
        unit = model.get_submodule("model.layers.0.self_attn.q_proj").deltas[variant]
        assert torch.equal(unit.rotation(), torch.eye(32))


@pytest.mark.parametrize("fields,field", [({"group_size": 7}, "group_size"), ({"group_size": 0}, "group_size"),
                                          ({"variant": "road_3"}, "variant")])
def test_bad_field_values_are_refused_at_construction(fields, field):
    with pytest.raises(dt.ConfigError, match=field):
        RoadConfig(**fields)


def test_a_group_size_that_does_not_divide_an_output_width_is_refused_at_attach():
    # q_proj is 32 wide, v_proj (grouped-query) 16: a group of 32 fits the first, not the second
    assert_refused_at_attach("llama", RoadConfig(group_size=32, targets=["q_proj", "v_proj"]),
                             r"'model.layers.0.self_attn.v_proj' \(Linear, in=32, out=16\)", "model.layers.0.self_attn.q_proj")


def test_mixed_batch_rows_equal_each_row_alone():
    case = MODELS["llama"]
    model = case.build()
    attach_randomised(model, {"r1": RoadConfig(variant="road_1", group_size=8),
                              "r2": RoadConfig(variant="road_2", group_size=16),
                              "r4": RoadConfig(variant="road_4", group_size=8, targets=["q_proj", "k_proj"]),
                              "lora": dt.LoRAConfig(r=2)})
    rows = ["r1", None, "r2", "r4", "lora", "r1", None, "r4"]
    assert_rows_equal_alone(case, model, rows, token_batch(len(rows), seed=2))
    assert dt.get_method("road").mixing.mode == "batched"


def test_mixed_batch_trains_every_delta_through_the_batched_kernel():
    assert_a_mixed_batch_trains_every_routed_delta(RoadConfig(group_size=8))


def test_task_vectors_and_linear_merging_are_the_dense_rotation_changes(tmp_path):
    case = MODELS["bert"]
    folders = []
    for seed, variant in enumerate(["road_1", "road_4"]):
        model = case.build()
        dt.attach(model, RoadConfig(variant=variant, group_size=8, targets=["query"]), name=variant)
        _randomise(model, variant, seed + 1)
        folders.append(dt.save(model, tmp_path / variant))
    sources = loaded_inactive(case, folders)
    path = "bert.encoder.layer.0.attention.self.query"
    module = sources.get_submodule(path)
    expected = {}
    for name in ("road_1", "road_4"):
        rotation = _reference_rotation(module.deltas[name])
        change = TaskVector.from_delta(sources, name).dense()
        torch.testing.assert_close(change[f"{path}.weight"], rotation @ module.weight - module.weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(change[f"{path}.bias"], rotation @ module.bias - module.bias, rtol=1e-5, atol=1e-6)
        expected[name] = change
    merged = case.build()
    report = merge_deltas(merged, folders, "linear", [0.5, 0.5])
    assert report.result == "dense"
    dt.fold(merged)
    reference = case.build()
    (0.5 * TaskVector.from_delta(sources, "road_1") + 0.5 * TaskVector.from_delta(sources, "road_4")).apply_to(reference)
    torch.testing.assert_close(case.output(merged), case.output(reference), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged.get_submodule(path).weight,
                               module.weight + 0.5 * (expected["road_1"][f"{path}.weight"] + expected["road_4"][f"{path}.weight"]),
                               rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# peft (0.21.2) parity


@pytest.mark.parametrize("variant", VARIANTS)
def test_trainable_count_equals_peft(variant):
    case = MODELS["llama"]
    report = dt.attach(case.build(), RoadConfig(variant=variant, group_size=8, targets=["q_proj", "v_proj", "down_proj"]),
                       name="x")
    theirs = quiet(peft.get_peft_model, case.build(),
                    peft.RoadConfig(variant=variant, group_size=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    assert report.trainable == theirs.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_peft_adapter_imports_with_peft_outputs(variant, tmp_path):
    case = MODELS["llama"]
    theirs = saved_peft_adapter(tmp_path / "peft", case.build(),
                                peft.RoadConfig(variant=variant, group_size=8, target_modules=["q_proj", "v_proj"]),
                                seed=7, scale=0.3)
    import_peft(tmp_path / "peft", tmp_path / "delta", case.build())
    ours = case.build()
    dt.load(ours, tmp_path / "delta")
    inputs = case.inputs()
    difference = (logits(ours, inputs) - logits(theirs, inputs)).abs().max().item()
    assert difference <= 1e-5
    assert (logits(ours, inputs) - logits(case.build(), inputs)).abs().max() > 1e-3
    assert dt.get_config(ours, dt.list_deltas(ours)[0]).variant == variant


@pytest.mark.parametrize("variant", VARIANTS)
def test_an_export_loads_in_peft_with_the_same_outputs_merged_or_not(variant, tmp_path):
    case = MODELS["llama"]
    ours = case.build()
    dt.attach(ours, RoadConfig(variant=variant, group_size=8, targets=["q_proj", "v_proj"]), name="x")
    _randomise(ours, "x", 5)
    dt.save(ours, tmp_path / "delta")
    export_peft(tmp_path / "delta", tmp_path / "peft", case.build())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(case.build(), tmp_path / "peft").eval()
    complaints = [str(w.message) for w in caught if any(s in str(w.message) for s in ("missing", "nexpected", "unknown"))]
    assert not complaints, complaints  # the files are exactly what peft expects
    inputs = case.inputs()
    assert (logits(ours, inputs) - logits(theirs, inputs)).abs().max().item() <= 1e-5
    theirs.merge_adapter()
    dt.merge(ours)
    assert (logits(ours, inputs) - logits(theirs, inputs)).abs().max().item() <= 1e-5


def test_peft_options_deltatune_lacks_are_refused_by_name(tmp_path):
    case = MODELS["llama"]
    theirs = quiet(peft.get_peft_model, case.build(), peft.RoadConfig(group_size=8, target_modules=["q_proj"]))
    quiet(theirs.save_pretrained, tmp_path / "peft")
    edit_adapter_config(tmp_path / "peft", some_future_option=3)
    model = case.build()
    with pytest.raises(dt.ConfigError, match="some_future_option"):
        load_peft(model, tmp_path / "peft")
    assert dt.list_deltas(model) == []


def test_road_on_a_gpt2_conv1d_cannot_be_exported_since_peft_adapts_linear_only(tmp_path):
    assert_conv1d_export_is_refused(tmp_path, RoadConfig(group_size=8, targets=["c_attn"]), "nn.Linear layers only")


def test_road_trains_from_the_command_line(tmp_path, tiny_bert, reviews_csv):
    out = train_from_the_command_line(tmp_path, tiny_bert, reviews_csv,
                                      ["--method", "road", "--variant", "road_2", "--group-size", "8"])
    config = saved_config(out)
    assert config["method"] == "road" and config["variant"] == "road_2"
    assert config["group_size"] == 8
