"""ETHER / ETHER+ (Bini et al., 2024, arXiv:2405.20271): the maths against explicit
block-diagonal Householder matrices, attach-time refusals, mixed batches, task vectors and
merging, the peft refusal, and training from the command line."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from method_checks import assert_rows_equal_alone, randomise, saved_config, token_batch, train_from_the_command_line
from tiny_models import MODELS, small_config

import deltatune as dt
from deltatune.errors import ConfigError
from deltatune.methods.ether import ETHERConfig, ETHERLinear

TOL = {"atol": 1e-5, "rtol": 1e-5}


def _householder(u: torch.Tensor) -> torch.Tensor:
    u = u.double().reshape(-1, 1)
    return torch.eye(len(u), dtype=torch.float64) - 2 * (u @ u.T) / (u.T @ u)


def _relaxed(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    u, v = u.double().reshape(-1, 1), v.double().reshape(-1, 1)
    return torch.eye(len(u), dtype=torch.float64) - (u @ u.T) / (u.T @ u) + (v @ v.T) / (v.T @ v)


def _explicit(unit: ETHERLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """(H over the inputs, H~ over the outputs) as dense block-diagonal matrices."""
    if not unit.plus:
        return torch.block_diag(*[_householder(u) for u in unit.u.detach()]).float(), torch.eye(unit.fan_out)
    inputs = torch.block_diag(*[_relaxed(u, v) for u, v in zip(unit.u.detach(), unit.v.detach())])
    outputs = torch.block_diag(*[_relaxed(u, v) for u, v in zip(unit.u_out.detach(), unit.v_out.detach())])
    return inputs.float(), outputs.float()


def _randomised(unit: ETHERLinear) -> ETHERLinear:
    with torch.no_grad():
        for p in unit.parameters():
            p.add_(0.3 * torch.randn(p.shape))
    return unit


@pytest.mark.parametrize("plus", [False, True])
def test_output_and_merge_equal_the_weight_times_explicit_reflections(plus):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    x = torch.randn(2, 3, 12)
    for module, transposed in ((nn.Linear(12, 8), False), (Conv1D(8, 12), True)):
        unit = _randomised(ETHERLinear(12, 8, transposed, 4, plus))
        h_in, h_out = _explicit(unit)
        w = module.weight.T if transposed else module.weight
        changed = h_out @ w @ h_in
        expected = x @ changed.T + module.bias
        torch.testing.assert_close(unit.forward_post(module, (x,), {}, module(x)), expected, **TOL)
        merged = unit.merge_params(module, dict(module.named_parameters()))["weight"]
        torch.testing.assert_close(merged, changed.T if transposed else changed, **TOL)


def test_ether_is_a_reflection_at_a_fixed_distance_from_the_identity_and_ether_plus_starts_at_it():
    torch.manual_seed(0)
    ether = ETHERLinear(12, 8, False, 3)
    h_in, _ = _explicit(ether)
    torch.testing.assert_close(h_in @ h_in, torch.eye(12), **TOL)  # orthogonal and symmetric
    blocks = h_in.reshape(3, 4, 3, 4).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    distances = torch.linalg.matrix_norm(blocks - torch.eye(4))
    torch.testing.assert_close(distances, torch.full((3,), 2.0), **TOL)  # |H - I|_F = 2: not the identity
    plus = ETHERLinear(12, 9, False, 3, plus=True)
    weight = torch.randn(9, 12)
    assert plus.delta_weight(weight).abs().max() < 1e-6


def test_trainable_count_is_the_normals():
    model = MODELS["llama"].build(0)
    report = dt.attach(model, ETHERConfig(targets=["q_proj", "v_proj"]), name="a")
    assert report.trainable == 4 * 32
    plus = dt.attach(MODELS["llama"].build(0), ETHERConfig(variant="ether_plus", targets=["v_proj"]), name="b")
    assert plus.trainable == 2 * 2 * (32 + 16)


# ---------------------------------------------------------------------------------------------
# refusals


@pytest.mark.parametrize("fields,side", [({"blocks": 5}, "input width 32"), ({"blocks": 64}, "input width 32"),
                                         ({"blocks": 32, "variant": "ether_plus"}, "output width 16")])
def test_blocks_that_do_not_divide_a_width_are_refused_at_attach_naming_module_and_shape(fields, side):
    model = MODELS["llama"].build(0)
    with pytest.raises(ConfigError, match=rf"{side} of 'model\.layers\.0\.self_attn\.v_proj'.*\(16, 32\)"):
        dt.attach(model, ETHERConfig(targets=["v_proj"], **fields), name="x")
    assert not dt.list_deltas(model)
    assert not any(type(m).__module__.startswith("deltatune") for m in model.modules())


@pytest.mark.parametrize("fields,field", [({"blocks": 0}, "blocks"), ({"variant": "householder"}, "variant")])
def test_bad_field_values_are_refused_naming_the_field(fields, field):
    with pytest.raises(ConfigError, match=field):
        ETHERConfig(**fields)


# ---------------------------------------------------------------------------------------------
# mixed batches, task vectors, merging


def _ether_model(case_name, deltas):
    case = MODELS[case_name]
    model = case.build(0)
    for i, (name, fields) in enumerate(deltas.items()):
        torch.manual_seed(i)
        dt.attach(model, small_config("ether", case, **fields), name=name)
        randomise(model, name, i + 1)
    return case, model.eval()


@pytest.mark.parametrize("case_name", ["bert", "gpt2"])
def test_each_row_of_a_mixed_batch_equals_the_row_run_alone(case_name):
    case, model = _ether_model(case_name, {"a": {}, "b": {"variant": "ether_plus"}, "c": {"blocks": 2}})
    rows = ["a", None, "b", "c", "b", None]
    assert_rows_equal_alone(case, model, rows, token_batch(len(rows), seed=5))


def _dense_change(model, name, key):
    module = model.get_submodule(key.rsplit(".", 1)[0])
    unit = module.deltas[name]
    h_in, h_out = _explicit(unit)
    weight = module.weight.T if unit.transposed else module.weight
    change = h_out @ weight @ h_in - weight
    return change.T if unit.transposed else change


def test_task_vector_and_linear_merge_are_the_dense_reflection_changes():
    case, model = _ether_model("gpt2", {"a": {}, "b": {"variant": "ether_plus"}})
    vector = dt.TaskVector.from_delta(model, "a")
    changes = {name: {key: _dense_change(model, name, key) for key in vector.keys()} for name in ("a", "b")}
    for key in vector.keys():
        torch.testing.assert_close(vector.dense()[key], changes["a"][key], **TOL)
    base = {key: model.get_parameter(key).detach().clone() for key in vector.keys()}
    dt.merge_deltas(model, ["a", "b"], method="linear", weights=[0.7, 0.3], name="merged")
    reference = case.build(0)
    with torch.no_grad():
        merged_out = case.output(model)
        for key in vector.keys():
            reference.get_parameter(key).copy_(base[key] + 0.7 * changes["a"][key] + 0.3 * changes["b"][key])
        torch.testing.assert_close(merged_out, case.output(reference), **TOL)


# ---------------------------------------------------------------------------------------------
# peft, command line


def test_peft_export_is_refused_with_why_hra_differs(tmp_path):
    from deltatune.interop import export_peft

    spec = dt.get_method("ether")
    assert spec.peft is None and "HRA" in spec.peft_refusal
    model = MODELS["llama"].build(0)
    dt.attach(model, ETHERConfig(targets=["q_proj"]), name="x")
    dt.save(model, tmp_path / "delta")
    with pytest.raises(ConfigError, match="HRA"):
        export_peft(tmp_path / "delta", tmp_path / "peft", MODELS["llama"].build(0))


def test_train_builds_ether_plus_from_flags(tmp_path, tiny_bert, reviews_csv):
    out = train_from_the_command_line(tmp_path, tiny_bert, reviews_csv,
                                      ["--method", "ether", "--variant", "ether_plus", "--blocks", "2"])
    config = saved_config(out)
    assert config["method"] == "ether" and config["variant"] == "ether_plus" and config["blocks"] == 2
