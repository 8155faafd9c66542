"""LoKr (LyCORIS's Kronecker product): the formula against an explicit Kronecker matrix, the
width split, its options, mixed batches, merging, the command line and parity with peft's LOKR."""

from __future__ import annotations

import pytest
import torch
from lycoris_checks import (
    assert_export_loads_in_peft,
    assert_linear_merge_is_the_dense_sum,
    assert_peft_adapter_imports,
    assert_rows_equal_alone,
    assert_same_dropout_as_peft,
    assert_unknown_peft_option_is_refused,
    attached_to_linear_and_conv1d,
    copy_into_peft,
    peft_trainable,
    quiet,
    randomise,
    unit_output,
)
from method_checks import assert_conv1d_export_is_refused, saved_config, train_from_the_command_line
from tiny_models import MODELS

import deltatune as dt
from deltatune.core.registry import config_from_dict
from deltatune.methods.lokr import LoKrConfig, LoKrLinear, factorization

peft = pytest.importorskip("peft")


def _kron_reference(unit: LoKrLinear) -> torch.Tensor:
    """dW[a out_k + b, c in_n + d] = alpha / r * W1[a, c] * W2[b, d], entry by entry, with
    W1, W2 multiplied out from their factors by hand where they are low rank."""
    with torch.no_grad():
        w1 = unit.w1 if unit.w1 is not None else torch.einsum("ar,rc->ac", unit.w1_a, unit.w1_b)
        w2 = unit.w2 if unit.w2 is not None else torch.einsum("br,rd->bd", unit.w2_a, unit.w2_b)
        (out_l, in_m), (out_k, in_n) = w1.shape, w2.shape
        change = torch.zeros(out_l * out_k, in_m * in_n)
        for a in range(out_l):
            for b in range(out_k):
                for c in range(in_m):
                    for d in range(in_n):
                        change[a * out_k + b, c * in_n + d] = unit.alpha / unit.r * w1[a, c] * w2[b, d]
    return change


def _attached(config: LoKrConfig):
    return attached_to_linear_and_conv1d(config, "k")


@pytest.mark.parametrize("fields", [dict(r=1, decompose_both=True), dict(r=8), dict(r=1, decompose_factor=2)])
def test_unmerged_and_merged_outputs_follow_the_kronecker_formula_on_linear_and_conv1d(fields):
    model = _attached(LoKrConfig(alpha=3.0, targets=["linear", "conv"], **fields))
    x = torch.randn(2, 3, 12)
    for path in ("linear", "conv"):
        module = model.get_submodule(path)
        unit = module.deltas["k"]
        change = _kron_reference(unit)
        torch.testing.assert_close(unit.delta_weight(), change, rtol=1e-5, atol=1e-6)
        inputs = x if path == "linear" else model.linear(x)
        got, reference, base = unit_output(model, unit, module, inputs, change)  # the reshaped kernel, no kron formed
        torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)
        assert (got - base).abs().max() > 1e-3
    with torch.no_grad():
        unmerged = model(x)
        dt.merge(model, "k")
        torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)


def test_factors_are_full_or_low_rank_as_peft_decides():
    low = _attached(LoKrConfig(r=1, decompose_both=True, targets=["linear", "conv"])).linear.deltas["k"]
    assert low.shapes == ((3, 3), (6, 4)) and low.w1 is None and low.w2 is None  # out 18 = 3 x 6, in 12 = 3 x 4
    full = _attached(LoKrConfig(r=4, targets=["linear", "conv"])).linear.deltas["k"]
    assert full.w1 is not None and full.w2 is not None and full.w1_a is None


def test_width_split_equals_peft_factorization():
    from peft.tuners.lokr.layer import factorization as peft_factorization

    for width in range(1, 400):
        for factor in (-1, 1, 2, 3, 4, 5, 8, 16, 64):
            assert factorization(width, factor) == peft_factorization(width, factor), (width, factor)


@pytest.mark.parametrize("init, zero", [("zero", "w1"), ("lycoris", "w2")])
def test_starts_at_zero_with_the_chosen_factor_zero(init, zero):
    unit = _attached(LoKrConfig(r=4, init=init, targets=["linear"])).linear.deltas["k"]
    fresh = LoKrLinear(12, 18, LoKrConfig(r=4, init=init))
    assert torch.count_nonzero(fresh.delta_weight()) == 0 and torch.count_nonzero(getattr(fresh, zero)) == 0
    assert torch.count_nonzero(LoKrLinear(12, 18, LoKrConfig(r=4, init="random")).delta_weight()) > 0
    assert unit.w1.shape == (3, 3)


def test_rank_and_alpha_patterns_set_rank_and_scaling_per_module():
    model = _attached(LoKrConfig(r=1, alpha=4.0, targets=["linear", "conv"], rank_pattern={"conv": 2},
                                 alpha_pattern={"linear": 3.0}))
    assert model.conv.deltas["k"].r == 2 and model.conv.deltas["k"].scaling == 2.0
    assert model.linear.deltas["k"].scaling == 3.0


@pytest.mark.parametrize("fields, field", [({"r": 0}, "r"), ({"alpha": -1.0}, "alpha"), ({"decompose_factor": 0}, "decompose_factor"),
                                           ({"rank_dropout": 1.5}, "rank_dropout"), ({"init": "gaussian"}, "init"),
                                           ({"alpha_pattern": {"linear": 0.0}}, "alpha_pattern")])
def test_bad_field_values_fail_at_construction_naming_the_field(fields, field):
    with pytest.raises(dt.ConfigError, match=field):
        LoKrConfig(**fields)


def test_a_module_that_is_not_linear_fails_at_attach_and_leaves_no_delta():
    model = MODELS["gpt2"].build()
    with pytest.raises(dt.TargetError, match=r"transformer\.wte \(Embedding is not a Linear"):
        dt.attach(model, LoKrConfig(targets=["wte"]), name="k")
    assert dt.list_deltas(model) == []


@pytest.mark.parametrize("scale", [False, True])
def test_rank_dropout_and_module_dropout_act_only_in_training_as_in_peft(scale):
    case = MODELS["llama"]
    options = dict(r=1, alpha=8, rank_dropout=0.4, module_dropout=0.3, rank_dropout_scale=scale, decompose_both=True)
    theirs = quiet(peft.get_peft_model, case.build(0), peft.LoKrConfig(target_modules=["q_proj", "v_proj"], **options))
    ours = case.build(0)
    dt.attach(ours, LoKrConfig(targets=["q_proj", "v_proj"], **options), name="k")
    copy_into_peft(ours, "k", theirs)
    inputs = case.inputs()
    assert_same_dropout_as_peft(ours, theirs, inputs)


def test_mixed_batches_equal_each_row_alone():
    deltas = {"a": {"method": "lokr", "r": 4}, "b": {"method": "lokr", "r": 1, "alpha": 3.0, "decompose_both": True},
              "c": {"method": "lokr", "r": 2, "decompose_factor": 2}, "lora": {"method": "lora", "r": 2}}
    for case_name in ("llama", "gpt2"):
        # a and b split the widths alike (one batched product); c splits them otherwise (per delta)
        assert_rows_equal_alone(case_name, {k: dict(v) for k, v in deltas.items() if k != "c"}, ["a", None, "b", "lora", "a"])
        assert_rows_equal_alone(case_name, {k: dict(v) for k, v in deltas.items()}, ["c", "a", None, "b", "c"])


def test_linear_merge_of_two_lokr_deltas_is_the_weighted_dense_sum(tmp_path):
    assert_linear_merge_is_the_dense_sum(tmp_path, [LoKrConfig(r=2, targets=["q_proj", "v_proj"]),
                                                    LoKrConfig(r=1, alpha=2.0, decompose_both=True, targets=["q_proj", "o_proj"])])


@pytest.mark.parametrize("case_name, targets, fields", [
    ("llama", ["q_proj", "v_proj", "down_proj"], {}),
    ("llama", ["q_proj", "down_proj"], {"r": 1, "decompose_both": True}),
    ("bert", ["query", "value", "intermediate.dense"], {"decompose_factor": 4}),
])
def test_trainable_count_equals_peft(case_name, targets, fields):
    fields = {"r": 4, "alpha": 8, **fields}
    report = dt.attach(MODELS[case_name].build(), LoKrConfig(targets=targets, **fields), name="k")
    assert report.trainable == peft_trainable(case_name, peft.LoKrConfig(target_modules=targets, **fields))


PEFT_CASES = {
    "plain": (dict(r=4, alpha=8, targets=["q_proj", "v_proj"]), dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"])),
    "low-rank-both-factor": (dict(r=1, alpha=2, decompose_both=True, decompose_factor=4, targets=["q_proj", "down_proj"]),
                             dict(r=1, alpha=2, decompose_both=True, decompose_factor=4, target_modules=["q_proj", "down_proj"])),
    "patterns-dropout-lycoris": (
        dict(r=2, alpha=8, rank_dropout=0.1, module_dropout=0.2, rank_dropout_scale=True, init="lycoris",
             targets=["q_proj", "v_proj"], rank_pattern={"model.layers.0.self_attn.q_proj": 1},
             alpha_pattern={"model.layers.1.self_attn.v_proj": 3.0}),
        dict(r=2, alpha=8, rank_dropout=0.1, module_dropout=0.2, rank_dropout_scale=True, init_weights="lycoris",
             target_modules=["q_proj", "v_proj"], rank_pattern={"layers.0.self_attn.q_proj": 1},
             alpha_pattern={r"1\.self_attn\.v_proj": 3})),
    "random": (dict(r=4, init="random", targets=["o_proj"]), dict(r=4, init_weights=False, target_modules=["o_proj"])),
}


@pytest.mark.parametrize("case", PEFT_CASES)
def test_export_loads_in_peft_with_the_same_outputs(case, tmp_path):
    assert_export_loads_in_peft(tmp_path, "llama", LoKrConfig(**PEFT_CASES[case][0]))


@pytest.mark.parametrize("case", PEFT_CASES)
def test_peft_adapter_imports_with_peft_outputs(case, tmp_path):
    assert_peft_adapter_imports(tmp_path, "llama", peft.LoKrConfig(**PEFT_CASES[case][1]))
    recorded = config_from_dict(saved_config(tmp_path / "delta"))
    assert recorded == LoKrConfig(**PEFT_CASES[case][0]).replace(targets=recorded.targets)


def test_export_of_a_conv1d_delta_is_refused_naming_the_layer(tmp_path):
    assert_conv1d_export_is_refused(tmp_path, LoKrConfig(r=2, targets=["c_attn"]), "transformer.h.0.attn.c_attn.*Conv1D.*LOKR",
                                    name="k")


def test_unknown_peft_option_is_refused_by_name(tmp_path):
    assert_unknown_peft_option_is_refused(tmp_path, peft.LoKrConfig(r=2, target_modules=["q_proj"]))


def test_trains_from_the_command_line(tmp_path, tiny_bert, reviews_csv):
    out = train_from_the_command_line(tmp_path, tiny_bert, reviews_csv,
                                      ["--method", "lokr", "--r", "2", "--decompose-both", "true"])
    config = saved_config(out)
    assert config["method"] == "lokr" and config["r"] == 2 and config["decompose_both"] is True


def test_unmerged_forward_and_mixed_batches_never_form_the_kronecker_product(monkeypatch):
    case = MODELS["llama"]
    model = case.build()
    for name in ("a", "b"):
        dt.attach(model, LoKrConfig(r=2, targets=["q_proj", "down_proj"]), name=name)
        randomise([p for _, p in dt.delta_parameters(model, name)])

    def refuse(*args, **kwargs):
        raise AssertionError("torch.kron called")

    monkeypatch.setattr(torch, "kron", refuse)
    with torch.no_grad():
        with dt.using(model, "a"):
            case.output(model)
        with dt.route(model, ["a", None]):
            case.output(model, {k: v[:2] for k, v in case.inputs().items()})
