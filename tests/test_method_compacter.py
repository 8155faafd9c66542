"""Compacter (Karimi Mahabadi et al., 2021): the Kronecker-sum projections against explicit
``torch.kron`` sums, the adapter against a naive reference on Linear and GPT-2 Conv1D, the shared
slow weights, the variants, refusals, mixed batches, merging refused, the CLI."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import deltatune as dt
from deltatune.methods.compacter import CompacterAdapter, CompacterConfig, PHMRule
from method_checks import (assert_each_row_equals_it_alone, assert_merging_is_refused_as_not_a_weight_change,
                           assert_peft_export_is_refused, padded_token_batch,
                           randomise, saved_config, train_from_the_command_line)
from tiny_models import MODELS

#: model -> (an attention-output module, the feed-forward down projection); GPT-2's are Conv1D
SITES = {"bert": ("bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.1.output.dense"),
         "gpt2": ("transformer.h.0.attn.c_proj", "transformer.h.1.mlp.c_proj")}
TOL = {"rtol": 1e-5, "atol": 1e-5}


def _units(model, name="x") -> dict[str, CompacterAdapter]:
    return {path: m.deltas[name] for path, m in model.named_modules()
            if hasattr(m, "deltas") and name in m.deltas and isinstance(m.deltas[name], CompacterAdapter)}


def _attached(model_name="bert", name="x", seed=1, **fields):
    model = MODELS[model_name].build(0)
    dt.attach(model, CompacterConfig(**{"bottleneck": 8, **fields}), name=name)
    randomise(model, name, seed)
    return model.eval()


def _rule_matrices(unit, side):
    """The A_i of one projection, read from the stored tensors (not through the unit's code)."""
    rule = unit._shared() if hasattr(unit, "_shared") else getattr(unit, f"{side}_rule")
    if hasattr(rule, "rule_left"):
        return [rule.rule_left[i] @ rule.rule_right[i] for i in range(rule.rule_left.shape[0])]
    return list(rule.rule)


def _naive_weight(unit, side):
    """``sum_i kron(A_i, B_i)`` with ``B_i = s_i @ t_i`` (or the stored B_i), by ``torch.kron``."""
    rules = _rule_matrices(unit, side)
    if hasattr(unit, f"{side}_blocks"):
        blocks = list(getattr(unit, f"{side}_blocks"))
    else:
        blocks = [s @ t for s, t in zip(getattr(unit, f"{side}_left"), getattr(unit, f"{side}_right"))]
    return sum(torch.kron(a, b) for a, b in zip(rules, blocks))


OPTIONS = [{}, {"factorized_phm_W": False}, {"shared_phm_rule": False}, {"factorized_phm_rule": True},
           {"phm_rank": 3, "phm_dim": 2}, {"phm_dim": 8, "phm_c_init": "uniform"}]


@pytest.mark.parametrize("fields", OPTIONS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()) or "default")
def test_projections_are_sums_of_kronecker_products(fields):
    model = _attached(**fields)
    for unit in _units(model).values():
        with torch.no_grad():
            torch.testing.assert_close(unit.down_weight(), _naive_weight(unit, "down"), **TOL)
            torch.testing.assert_close(unit.up_weight(), _naive_weight(unit, "up"), **TOL)
        assert unit.down_weight().shape == (8, 32) and unit.up_weight().shape == (32, 8)


@pytest.mark.parametrize("model_name", sorted(SITES))
def test_output_adds_the_bottleneck_of_kronecker_projections(model_name):
    model = _attached(model_name, non_linearity="tanh", scaling=0.5)
    for path in SITES[model_name]:
        module = model.get_submodule(path)
        unit = module.deltas["x"]
        weight = module.weight.T if model_name == "gpt2" else module.weight  # Conv1D stores (in, out)
        inputs = torch.randn(2, 5, weight.shape[1], generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            y = F.linear(inputs, weight, module.bias)
            hidden = torch.tanh(y @ _naive_weight(unit, "down").T + unit.down_b)
            expected = y + 0.5 * (hidden @ _naive_weight(unit, "up").T + unit.up_b)
            torch.testing.assert_close(module(inputs), expected, **TOL)


def test_a_new_compacter_is_the_identity_with_a_zero_up_projection():
    model = MODELS["bert"].build(0)
    dt.attach(model, CompacterConfig(bottleneck=8), name="x")
    for unit in _units(model).values():
        assert torch.count_nonzero(unit.up_weight()) == 0 and torch.count_nonzero(unit.down_weight()) > 0
        assert torch.count_nonzero(unit.up_right) == 0 and torch.count_nonzero(unit.up_left) > 0


def test_the_slow_weights_are_one_tensor_shared_by_every_layer_and_both_projections():
    model = _attached()
    shared = [u for _, u in model.deltas.named_children() if isinstance(u, PHMRule)] if hasattr(model, "deltas") else []
    assert len(shared) == 1 and shared[0].rule.shape == (4, 4, 4)
    units = _units(model)
    assert len(units) == 4 and all(u._shared() is shared[0] for u in units.values())
    names = [k for k, _ in dt.delta_parameters(model, "x")]
    assert names.count("rule") == 1 and not any(k.endswith(".rule") for k in names)
    x = torch.randn(1, 3, 32)
    module = model.get_submodule(SITES["bert"][0])
    before = module(x)
    with torch.no_grad():
        shared[0].rule.mul_(2.0)
    assert not torch.allclose(module(x), before)


def test_unshared_rules_are_per_projection_and_reload_exactly(tmp_path):
    model = _attached(shared_phm_rule=False)
    assert not hasattr(model, "deltas")  # nothing at the model itself
    unit = next(iter(_units(model).values()))
    assert unit.down_rule.rule is not unit.up_rule.rule
    expected = MODELS["bert"].output(model)
    dt.save(model, tmp_path / "d")
    fresh = MODELS["bert"].build(0)
    dt.load(fresh, tmp_path / "d")
    torch.testing.assert_close(MODELS["bert"].output(fresh), expected, rtol=0, atol=0)


@pytest.mark.parametrize("variant,suffixes", [("compacter", ("attention.output.dense", "output.dense")),
                                              ("compacter++", ("output.dense",))])
def test_compacter_plus_plus_adapts_only_after_the_feed_forward_block(variant, suffixes):
    report = dt.attach(MODELS["bert"].build(0), CompacterConfig(bottleneck=8, variant=variant))
    assert report.modules == ["", *(f"bert.encoder.layer.{i}.{s}" for i in range(2) for s in suffixes)]


def test_the_bottleneck_follows_the_reduction_factor_when_not_given():
    model = MODELS["bert"].build(0)
    dt.attach(model, CompacterConfig(reduction_factor=4), name="x")
    assert {u.down_weight().shape for u in _units(model).values()} == {(8, 32)}
    # rounded down to a multiple of phm_dim: 32 // 3 = 10 -> 8 (SmolLM2's defaults: 576 // 32 = 18 -> 16)
    model = MODELS["bert"].build(0)
    dt.attach(model, CompacterConfig(reduction_factor=3), name="x")
    assert {u.down_weight().shape for u in _units(model).values()} == {(8, 32)}


@pytest.mark.parametrize("fields,match", [
    ({"phm_dim": 3}, r"phm_dim 3 must divide its output width 32"),
    ({"phm_dim": 16, "bottleneck": 8}, r"phm_dim 16 must divide .* the bottleneck 8"),
    ({"reduction_factor": 64}, r"32 // reduction_factor 64 is a bottleneck of 0, below phm_dim 4"),
    ({"reduction_factor": 16}, r"32 // reduction_factor 16 is a bottleneck of 2, below phm_dim 4"),
])
def test_a_phm_dim_that_does_not_divide_the_widths_fails_at_attach_naming_the_module(fields, match):
    model = MODELS["gpt2"].build(0)
    with pytest.raises(dt.NotApplicableError, match=r"compacter cannot adapt transformer\.h\.0\.attn\.c_proj "
                                                    r"\(Conv1D, 32 -> 32\).*" + match):
        dt.attach(model, CompacterConfig(**fields), name="x")
    assert dt.list_deltas(model) == [] and not hasattr(model, "deltas")
    assert not any(hasattr(m, "deltas") for m in model.modules())


@pytest.mark.parametrize("field,value", [("phm_dim", 0), ("reduction_factor", 0), ("bottleneck", -1),
                                         ("phm_rank", 0), ("phm_init_range", 0.0), ("non_linearity", "softmax"),
                                         ("variant", "compacter+"), ("phm_c_init", "zeros")])
def test_bad_field_values_fail_at_construction_naming_the_field(field, value):
    with pytest.raises(dt.ConfigError, match=field):
        CompacterConfig(**{field: value})


@pytest.mark.parametrize("model_name", sorted(SITES))
def test_mixed_batch_rows_equal_each_row_alone(model_name):
    case = MODELS[model_name]
    model = case.build(0)
    for i, (name, fields) in enumerate({"a": {}, "b": {"shared_phm_rule": False, "phm_rank": 2},
                                        "c": {"variant": "compacter++", "bottleneck": 4}}.items()):
        dt.attach(model, CompacterConfig(**{"bottleneck": 8, **fields}), name=name)
        randomise(model, name, i + 1)
    dt.attach(model, dt.AdapterConfig(bottleneck=8, non_linearity="gelu"), name="plain")
    randomise(model, "plain", 9)
    model.eval()
    inputs = padded_token_batch(6)
    ids = ["a", None, "b", "c", "plain", "a"]
    with torch.no_grad():
        mixed = case.output(model, {**inputs, "delta_ids": ids})
    assert_each_row_equals_it_alone(case, model, ids, inputs, mixed)


def test_a_mixed_batch_sees_a_change_to_the_shared_slow_weights_at_once():
    case = MODELS["bert"]
    model = case.build(0)
    for i, name in enumerate("ab"):
        dt.attach(model, CompacterConfig(bottleneck=8), name=name)
        randomise(model, name, i + 1)
    model.eval()
    inputs = padded_token_batch(3)
    ids = ["a", "b", None]
    with torch.no_grad():
        case.output(model, {**inputs, "delta_ids": ids})  # a first mixed batch, as a server would run
        model.deltas["a"].rule.mul_(3.0)
        mixed = case.output(model, {**inputs, "delta_ids": ids})
    assert_each_row_equals_it_alone(case, model, ids, inputs, mixed)


def test_merging_and_task_vectors_refuse_it_as_not_a_weight_change(tmp_path):
    assert_merging_is_refused_as_not_a_weight_change(tmp_path, _attached(), "compacter", MODELS["bert"].build(0))


def test_peft_export_is_refused_with_the_reason(tmp_path):
    assert_peft_export_is_refused(tmp_path, _attached(), "peft has no Compacter")


def test_cli_trains_compacter_from_flags(tmp_path, tiny_bert, reviews_csv):
    out = train_from_the_command_line(tmp_path, tiny_bert, reviews_csv,
                                      ["--method", "compacter", "--variant", "compacter++", "--phm-dim", "2",
                                       "--bottleneck", "4"])
    config = saved_config(out)
    assert config["method"] == "compacter" and config["variant"] == "compacter++" and config["phm_dim"] == 2


@pytest.mark.parametrize("shared", [True, False])
def test_it_composes_in_a_stack_and_a_batch_split_only_without_the_shared_unit(shared):
    """The shared A_i live in a unit on the model itself, which a BatchSplit cannot split (the
    model's output is not a tensor): refused by name, as for VeRA's and VB-LoRA's shared units;
    with shared_phm_rule=False every unit sits at an adapted module and the split runs."""
    case = MODELS["bert"]
    model = case.build(0)
    config = CompacterConfig(bottleneck=8, shared_phm_rule=shared)
    for i, (name, c) in enumerate({"a": config, "b": config, "lora": dt.LoRAConfig(r=2)}.items()):
        dt.attach(model, c, name=name)
        randomise(model, name, i + 1)
    inputs = padded_token_batch(4)
    with torch.no_grad():
        with dt.using(model, ["a", "lora"]):
            expected = case.output(model, inputs)
        with dt.compose(model, dt.Stack("a", "lora")):
            torch.testing.assert_close(case.output(model, inputs), expected, rtol=0, atol=0)
        if shared:
            with pytest.raises(dt.NotApplicableError, match=r"'a' \(compacter\) cannot take part in BatchSplit"):
                with dt.compose(model, dt.BatchSplit("a", "b", sizes=[1, 3])):
                    case.output(model, inputs)
            return
        with dt.compose(model, dt.BatchSplit("a", "b", sizes=[1, 3])):
            split = case.output(model, inputs)
        for rows, name in ((slice(0, 1), "a"), (slice(1, 4), "b")):
            with dt.using(model, name):
                torch.testing.assert_close(split[rows], case.output(model, {k: v[rows] for k, v in inputs.items()}),
                                           **TOL)
