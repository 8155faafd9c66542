"""RoAd (Liao et al., 2024): each pair of outputs rotated and scaled by a learned 2x2 matrix.

The reference is the paper's formula written out: a dense block matrix ``R`` built pair by
pair from ``[[a cos t, -a sin t], [a sin t, a cos t]]`` (the variants' cosine and sine
entries taken from their own parameters), applied to ``W x + b``.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from tiny_models import MODELS
from method_checks import assert_rows_equal_alone, randomise as _randomise

import deltatune as dt
from deltatune.algebra import TaskVector, merge_deltas
from deltatune.cli import main
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
    case = MODELS[case_name]
    model = case.build()
    dt.attach(model, RoadConfig(variant=variant, group_size=8, targets=[f"re:{path}"]), name="x")
    _randomise(model, "x", 1)
    module = model.get_submodule(path)
    unit = module.deltas["x"]
    rotation = _reference_rotation(unit)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), dt.base_only(model):
        base = module(x)
    with torch.no_grad():
        torch.testing.assert_close(module(x), base @ rotation.T, rtol=1e-5, atol=1e-6)
    weight = module.weight.detach().clone()
    bias = module.bias.detach().clone() if module.bias is not None else None
    dt.merge(model)
    transposed = case_name == "gpt2"  # Conv1D stores (in, out)
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
    model = MODELS["llama"].build()
    # q_proj is 32 wide, v_proj (grouped-query) 16: a group of 32 fits the first, not the second
    with pytest.raises(dt.NotApplicableError, match=r"'model.layers.0.self_attn.v_proj' \(Linear, in=32, out=16\)"):
        dt.attach(model, RoadConfig(group_size=32, targets=["q_proj", "v_proj"]), name="x")
    assert dt.list_deltas(model) == [] and not hasattr(model.get_submodule("model.layers.0.self_attn.q_proj"), "deltas")


def test_mixed_batch_rows_equal_each_row_alone():
    case = MODELS["llama"]
    model = case.build()
    configs = {"r1": RoadConfig(variant="road_1", group_size=8), "r2": RoadConfig(variant="road_2", group_size=16),
               "r4": RoadConfig(variant="road_4", group_size=8, targets=["q_proj", "k_proj"]),
               "lora": dt.LoRAConfig(r=2)}
    for seed, (name, config) in enumerate(configs.items()):
        dt.attach(model, config, name=name)
        _randomise(model, name, seed + 1)
    rows = ["r1", None, "r2", "r4", "lora", "r1", None, "r4"]
    inputs = {"input_ids": torch.randint(1, 100, (len(rows), 6), generator=torch.Generator().manual_seed(2))}
    assert_rows_equal_alone(case, model, rows, inputs)
    assert dt.get_method("road").mixing.mode == "batched"


def test_mixed_batch_trains_every_delta_through_the_batched_kernel():
    case = MODELS["bert"]
    model = case.build()
    for name in ("a", "b"):
        dt.attach(model, RoadConfig(group_size=8), name=name)
        _randomise(model, name, ord(name))
    with dt.route(model, ["a", "b", None]):
        case.output(model, {"input_ids": torch.randint(1, 100, (3, 5))}).sum().backward()
    for name in ("a", "b"):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in dt.delta_parameters(model, name))


def test_task_vectors_and_linear_merging_are_the_dense_rotation_changes(tmp_path):
    case = MODELS["bert"]
    folders = []
    for seed, variant in enumerate(["road_1", "road_4"]):
        model = case.build()
        dt.attach(model, RoadConfig(variant=variant, group_size=8, targets=["query"]), name=variant)
        _randomise(model, variant, seed + 1)
        folders.append(dt.save(model, tmp_path / variant))
    sources = case.build()
    for folder in folders:
        dt.load(sources, folder, activate=False)
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


def _quiet(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return function(*args, **kwargs)


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("variant", VARIANTS)
def test_trainable_count_equals_peft(variant):
    case = MODELS["llama"]
    report = dt.attach(case.build(), RoadConfig(variant=variant, group_size=8, targets=["q_proj", "v_proj", "down_proj"]),
                       name="x")
    theirs = _quiet(peft.get_peft_model, case.build(),
                    peft.RoadConfig(variant=variant, group_size=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    assert report.trainable == theirs.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_peft_adapter_imports_with_peft_outputs(variant, tmp_path):
    case = MODELS["llama"]
    theirs = _quiet(peft.get_peft_model, case.build(),
                    peft.RoadConfig(variant=variant, group_size=8, target_modules=["q_proj", "v_proj"])).eval()
    _randomise_peft(theirs)
    _quiet(theirs.save_pretrained, tmp_path / "peft")
    import_peft(tmp_path / "peft", tmp_path / "delta", case.build())
    ours = case.build()
    dt.load(ours, tmp_path / "delta")
    inputs = case.inputs()
    difference = (_logits(ours, inputs) - _logits(theirs, inputs)).abs().max().item()
    assert difference <= 1e-5
    assert (_logits(ours, inputs) - _logits(case.build(), inputs)).abs().max() > 1e-3
    assert dt.get_config(ours, dt.list_deltas(ours)[0]).variant == variant


def _randomise_peft(model):
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=generator))


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
    assert (_logits(ours, inputs) - _logits(theirs, inputs)).abs().max().item() <= 1e-5
    theirs.merge_adapter()
    dt.merge(ours)
    assert (_logits(ours, inputs) - _logits(theirs, inputs)).abs().max().item() <= 1e-5


def test_peft_options_deltatune_lacks_are_refused_by_name(tmp_path):
    case = MODELS["llama"]
    theirs = _quiet(peft.get_peft_model, case.build(), peft.RoadConfig(group_size=8, target_modules=["q_proj"]))
    _quiet(theirs.save_pretrained, tmp_path / "peft")
    config_file = tmp_path / "peft" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "some_future_option": 3}))
    model = case.build()
    with pytest.raises(dt.ConfigError, match="some_future_option"):
        load_peft(model, tmp_path / "peft")
    assert dt.list_deltas(model) == []


def test_road_on_a_gpt2_conv1d_cannot_be_exported_since_peft_adapts_linear_only(tmp_path):
    case = MODELS["gpt2"]
    model = case.build()
    dt.attach(model, RoadConfig(group_size=8, targets=["c_attn"]), name="x")
    dt.save(model, tmp_path / "delta")
    with pytest.raises(dt.ConfigError, match="nn.Linear layers only"):
        export_peft(tmp_path / "delta", tmp_path / "peft", case.build())


def test_road_trains_from_the_command_line(tmp_path, tiny_bert, reviews_csv):
    args = ["train", "--model", str(tiny_bert), "--data", str(reviews_csv), "--text-column", "review",
            "--label-column", "sentiment", "--steps", "6", "--batch-size", "8", "--max-length", "16", "--no-progress",
            "--method", "road", "--variant", "road_2", "--group-size", "8", "--out", str(tmp_path / "run")]
    assert main(args) == 0
    saved = json.loads((tmp_path / "run" / "delta.json").read_text())
    assert saved["config"]["method"] == "road" and saved["config"]["variant"] == "road_2"
    assert saved["config"]["group_size"] == 8
