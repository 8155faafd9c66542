"""LoHa (FedPara's low-rank Hadamard product): the formula against a hand-computed reference,
its options, mixed batches, merging, the command line and parity with peft's LOHA."""

from __future__ import annotations

import pytest
import torch
from lycoris_checks import (
    LinearAndConv1D,
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
    unit_output,
)
from method_checks import assert_conv1d_export_is_refused, saved_config, train_from_the_command_line
from tiny_models import MODELS

import deltatune as dt
from deltatune.core.registry import config_from_dict
from deltatune.methods.loha import LoHaConfig, LoHaLinear

peft = pytest.importorskip("peft")


def _hadamard_reference(unit: LoHaLinear) -> torch.Tensor:
    """dW[o, n] = alpha / r * (sum_i W1a[o, i] W1b[i, n]) * (sum_j W2a[o, j] W2b[j, n]), entry by entry."""
    out, r = unit.w1_a.shape
    fan_in = unit.w1_b.shape[1]
    change = torch.zeros(out, fan_in)
    with torch.no_grad():
        for o in range(out):
            for n in range(fan_in):
                first = sum(unit.w1_a[o, i] * unit.w1_b[i, n] for i in range(r))
                second = sum(unit.w2_a[o, j] * unit.w2_b[j, n] for j in range(r))
                change[o, n] = unit.alpha / r * first * second
    return change


def _attached(config: LoHaConfig):
    return attached_to_linear_and_conv1d(config, "h")


def test_unmerged_and_merged_outputs_follow_the_hadamard_formula_on_linear_and_conv1d():
    model = _attached(LoHaConfig(r=3, alpha=5.0, targets=["linear", "conv"]))
    x = torch.randn(4, 12)
    for path in ("linear", "conv"):
        module = model.get_submodule(path)
        unit = module.deltas["h"]
        change = _hadamard_reference(unit)
        torch.testing.assert_close(unit.delta_weight(), change, rtol=1e-5, atol=1e-6)
        left, right = unit.hadamard_factors()  # the rank-r^2 form the mixed batches use
        torch.testing.assert_close(left @ right, change, rtol=1e-5, atol=1e-6)
        inputs = x if path == "linear" else model.linear(x)
        got, reference, base = unit_output(model, unit, module, inputs, change)
        torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)
        assert (got - base).abs().max() > 1e-3
    with torch.no_grad():
        unmerged = model(x)
        dt.merge(model, "h")
        torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)


def test_starts_at_zero_and_random_init_does_not():
    torch.manual_seed(0)
    model = LinearAndConv1D()
    dt.attach(model, LoHaConfig(r=2, targets=["linear", "conv"]), name="zero")
    dt.attach(model, LoHaConfig(r=2, targets=["linear", "conv"], init="random"), name="random")
    assert torch.count_nonzero(model.linear.deltas["zero"].delta_weight()) == 0
    assert torch.count_nonzero(model.linear.deltas["zero"].w1_a) > 0  # only W2b is zero
    assert torch.count_nonzero(model.linear.deltas["random"].delta_weight()) > 0


def test_rank_and_alpha_patterns_set_rank_and_scaling_per_module():
    model = _attached(LoHaConfig(r=2, alpha=4.0, targets=["linear", "conv"], rank_pattern={"conv": 5},
                                 alpha_pattern={"linear": 3.0}))
    assert model.conv.deltas["h"].w1_a.shape == (8, 5) and model.conv.deltas["h"].scaling == 4.0 / 5
    assert model.linear.deltas["h"].w1_a.shape == (18, 2) and model.linear.deltas["h"].scaling == 3.0 / 2


@pytest.mark.parametrize("fields, field", [({"r": 0}, "r"), ({"alpha": 0.0}, "alpha"), ({"rank_dropout": 1.0}, "rank_dropout"),
                                           ({"module_dropout": -0.1}, "module_dropout"), ({"init": "gaussian"}, "init"),
                                           ({"rank_pattern": {"linear": 0}}, "rank_pattern")])
def test_bad_field_values_fail_at_construction_naming_the_field(fields, field):
    with pytest.raises(dt.ConfigError, match=field):
        LoHaConfig(**fields)


def test_a_module_that_is_not_linear_fails_at_attach_and_leaves_no_delta():
    model = MODELS["llama"].build()
    with pytest.raises(dt.TargetError, match=r"model\.embed_tokens \(Embedding is not a Linear"):
        dt.attach(model, LoHaConfig(targets=["embed_tokens"]), name="h")
    assert dt.list_deltas(model) == []


def test_rank_dropout_and_module_dropout_act_only_in_training_as_in_peft():
    config = dict(r=4, alpha=8, rank_dropout=0.4, module_dropout=0.3, target_modules=["q_proj", "v_proj"])
    case = MODELS["llama"]
    theirs = quiet(peft.get_peft_model, case.build(0), peft.LoHaConfig(**config))
    ours = case.build(0)
    dt.attach(ours, LoHaConfig(r=4, alpha=8, rank_dropout=0.4, module_dropout=0.3, targets=["q_proj", "v_proj"]), name="h")
    copy_into_peft(ours, "h", theirs)
    inputs = case.inputs()
    assert_same_dropout_as_peft(ours, theirs, inputs)
    ours.train()
    torch.manual_seed(6)
    first = ours(**inputs).logits
    assert not torch.allclose(first, ours(**inputs).logits)  # fresh masks per call


def test_mixed_batches_equal_each_row_alone():
    deltas = {"a": {"method": "loha", "r": 4}, "b": {"method": "loha", "r": 2, "alpha": 3.0},
              "lora": {"method": "lora", "r": 2}}
    for case_name in ("llama", "gpt2"):
        assert_rows_equal_alone(case_name, {k: dict(v) for k, v in deltas.items()}, ["a", None, "b", "lora", "a", "b"])


def test_mixed_batches_in_training_with_dropout_run_each_delta_on_its_rows():
    case = MODELS["llama"]
    model = case.build()
    for name in ("a", "b"):
        dt.attach(model, LoHaConfig(r=2, rank_dropout=0.5), name=name)
    model.train()
    ids = torch.randint(1, 100, (3, 5))
    with dt.route(model, ["a", "b", None]):
        loss = model(input_ids=ids).logits.pow(2).mean()
    loss.backward()
    assert all(p.grad is not None for _, p in dt.delta_parameters(model, "a") if p.shape[0] != 2)


def test_linear_merge_of_two_loha_deltas_is_the_weighted_dense_sum(tmp_path):
    assert_linear_merge_is_the_dense_sum(tmp_path, [LoHaConfig(r=2, targets=["q_proj", "v_proj"]),
                                                    LoHaConfig(r=3, alpha=2.0, targets=["q_proj", "o_proj"])])


@pytest.mark.parametrize("case_name, targets", [("llama", ["q_proj", "v_proj", "down_proj"]), ("bert", ["query", "value"])])
def test_trainable_count_equals_peft(case_name, targets):
    model = MODELS[case_name].build()
    report = dt.attach(model, LoHaConfig(r=4, alpha=8, targets=targets), name="h")
    assert report.trainable == peft_trainable(case_name, peft.LoHaConfig(r=4, alpha=8, target_modules=targets))


PEFT_CASES = {
    "plain": (dict(r=4, alpha=8, targets=["q_proj", "v_proj"]), dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"])),
    "patterns-dropout-random": (
        dict(r=4, alpha=8, rank_dropout=0.1, module_dropout=0.2, init="random", targets=["q_proj", "down_proj"],
             rank_pattern={"model.layers.0.self_attn.q_proj": 2}, alpha_pattern={"model.layers.1.mlp.down_proj": 3.0}),
        dict(r=4, alpha=8, rank_dropout=0.1, module_dropout=0.2, init_weights=False, target_modules=["q_proj", "down_proj"],
             rank_pattern={"layers.0.self_attn.q_proj": 2}, alpha_pattern={r"1\.mlp\.down_proj": 3})),
}


@pytest.mark.parametrize("case", PEFT_CASES)
def test_export_loads_in_peft_with_the_same_outputs(case, tmp_path):
    assert_export_loads_in_peft(tmp_path, "llama", LoHaConfig(**PEFT_CASES[case][0]))


@pytest.mark.parametrize("case", PEFT_CASES)
def test_peft_adapter_imports_with_peft_outputs(case, tmp_path):
    assert_peft_adapter_imports(tmp_path, "llama", peft.LoHaConfig(**PEFT_CASES[case][1]))
    recorded = config_from_dict(saved_config(tmp_path / "delta"))
    assert recorded == LoHaConfig(**PEFT_CASES[case][0]).replace(targets=recorded.targets)


def test_export_of_a_conv1d_delta_is_refused_naming_the_layer(tmp_path):
    assert_conv1d_export_is_refused(tmp_path, LoHaConfig(r=2, targets=["c_attn"]), "transformer.h.0.attn.c_attn.*Conv1D.*LOHA",
                                    name="h")


def test_unknown_peft_option_is_refused_by_name(tmp_path):
    assert_unknown_peft_option_is_refused(tmp_path, peft.LoHaConfig(r=2, target_modules=["q_proj"]))


def test_trains_from_the_command_line(tmp_path, tiny_bert, reviews_csv):
    out = train_from_the_command_line(tmp_path, tiny_bert, reviews_csv,
                                      ["--method", "loha", "--r", "2", "--rank-dropout", "0.1"])
    config = saved_config(out)
    assert config["method"] == "loha" and config["r"] == 2 and config["rank_dropout"] == 0.1
