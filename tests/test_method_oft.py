"""OFT (Qiu et al., 2023, arXiv:2306.07280): the maths against explicit block-diagonal
rotations, attach-time refusals, mixed batches, task vectors and merging, COFT and module
dropout, parity with the real peft 0.21.2 both ways, and training from the command line."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from method_checks import (assert_conv1d_export_is_refused, assert_rows_equal_alone, logits, quiet, randomise,
                           saved_config, saved_peft_adapter, token_batch, train_from_the_command_line)
from tiny_models import MODELS, small_config

import deltatune as dt
from deltatune.core.inject import after_step
from deltatune.errors import ConfigError
from deltatune.methods.oft import OFTConfig, OFTLinear

TOL = {"atol": 1e-5, "rtol": 1e-5}


def _reference_rotation(upper: torch.Tensor, size: int, blocks: int, neumann_terms: int | None) -> torch.Tensor:
    """The paper's block-diagonal R computed directly: each block from its skew-symmetric Q by
    an explicit inverse, (I - Q)(I + Q)^-1 (peft's exact form), or the series peft sums."""
    eye = torch.eye(size, dtype=torch.float64)
    matrices = []
    for row in upper.double():
        q = torch.zeros(size, size, dtype=torch.float64)
        k = 0
        for i in range(size):
            for j in range(i + 1, size):
                q[i, j], q[j, i] = row[k], -row[k]
                k += 1
        if neumann_terms is None:
            matrices.append((eye - q) @ torch.linalg.inv(eye + q))
        else:
            last = max(neumann_terms - 1, 3)
            series = eye + sum(2 * torch.linalg.matrix_power(q, p) for p in range(1, last))
            matrices.append(series + torch.linalg.matrix_power(q, last))
    if len(matrices) == 1:
        matrices = matrices * blocks
    return torch.block_diag(*matrices).float()


def _random_unit(fan_in, fan_out, transposed, blocks, **options):
    size = fan_in // blocks
    unit = OFTLinear(fan_in, fan_out, transposed, blocks, size, **options)
    with torch.no_grad():
        unit.skew.normal_(0, 0.2)
    return unit, size


@pytest.mark.parametrize("options", [{}, {"neumann_terms": 5}, {"neumann_terms": 3}, {"block_share": True}])
def test_output_and_merge_equal_the_input_rotated_by_the_block_diagonal_cayley_matrix(options):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    x = torch.randn(2, 3, 12)
    for module, transposed in ((nn.Linear(12, 5), False), (Conv1D(5, 12), True)):
        unit, size = _random_unit(12, 5, transposed, 3, **options)
        rotation = _reference_rotation(unit.skew.detach(), size, 3, options.get("neumann_terms"))
        w = module.weight.T if transposed else module.weight
        expected = (x @ rotation) @ w.T + module.bias  # peft: x' = x R, then the module
        torch.testing.assert_close(unit.forward_post(module, (x,), {}, module(x)), expected, **TOL)
        merged = unit.merge_params(module, dict(module.named_parameters()))["weight"]
        torch.testing.assert_close(merged, (w @ rotation.T).T if transposed else w @ rotation.T, **TOL)


def test_exact_rotation_is_orthogonal_and_the_identity_at_zero():
    unit, size = _random_unit(16, 4, False, 2)
    rotation = unit.rotation().detach()
    torch.testing.assert_close(rotation @ rotation.transpose(-1, -2), torch.eye(size).expand(2, -1, -1), **TOL)
    assert torch.equal(OFTLinear(16, 4, False, 2, 8).rotation(), torch.eye(8).expand(2, -1, -1))


def test_trainable_count_is_one_upper_triangle_per_block():
    model = MODELS["llama"].build(0)
    report = dt.attach(model, OFTConfig(block_size=8, targets=["q_proj", "v_proj"]), name="x")
    assert report.trainable == 4 * (32 // 8) * (8 * 7 // 2)
    shared = MODELS["llama"].build(0)
    assert dt.attach(shared, OFTConfig(r=2, block_share=True, targets=["q_proj"]), name="x").trainable == 2 * 16 * 15 // 2


# ---------------------------------------------------------------------------------------------
# refusals


@pytest.mark.parametrize("fields", [{"r": 5}, {"block_size": 12}, {"block_size": 64}, {"r": 32}])
def test_a_block_layout_that_does_not_fit_is_refused_at_attach_naming_module_and_shape(fields):
    model = MODELS["llama"].build(0)
    with pytest.raises(ConfigError, match=r"model\.layers\.0\.self_attn\.q_proj.*\(32, 32\)"):
        dt.attach(model, OFTConfig(targets=["q_proj"], **fields), name="x")
    assert not dt.list_deltas(model)
    assert not any(type(m).__module__.startswith("deltatune") for m in model.modules())


@pytest.mark.parametrize("fields,field", [({"r": 0}, "r"), ({"block_size": -1}, "block_size"),
                                          ({"r": 2, "block_size": 16}, "block_size"),
                                          ({"num_cayley_neumann_terms": 1}, "num_cayley_neumann_terms"),
                                          ({"eps": 0.0}, "eps"), ({"module_dropout": 1.0}, "module_dropout")])
def test_bad_field_values_are_refused_naming_the_field(fields, field):
    with pytest.raises(ConfigError, match=field):
        OFTConfig(**fields)


# ---------------------------------------------------------------------------------------------
# mixed batches, task vectors, merging


def _oft_model(case_name, names):
    case = MODELS[case_name]
    model = case.build(0)
    for i, (name, fields) in enumerate(names.items()):
        dt.attach(model, small_config("oft", case, **fields), name=name)
        randomise(model, name, i + 1)
    return case, model.eval()


@pytest.mark.parametrize("case_name", ["bert", "gpt2"])
def test_each_row_of_a_mixed_batch_equals_the_row_run_alone(case_name):
    case, model = _oft_model(case_name, {"a": {}, "b": {"use_cayley_neumann": True}, "c": {"block_share": True}})
    rows = ["a", None, "b", "c", "a", None]
    assert_rows_equal_alone(case, model, rows, token_batch(len(rows), seed=5))


def _dense_change(model, name, path):
    """W R^T - W for delta ``name`` at ``path``, from its unit's explicit rotation."""
    module = model.get_submodule(path)
    unit = module.deltas[name]
    rotation = torch.block_diag(*unit.rotation().detach())
    weight = module.weight.T if unit.transposed else module.weight
    change = weight @ rotation.T - weight
    return change.T if unit.transposed else change


def test_task_vector_and_linear_merge_are_the_dense_rotation_changes():
    case, model = _oft_model("gpt2", {"a": {}, "b": {}})
    vector = dt.TaskVector.from_delta(model, "a")
    expected = {}
    for key in vector.keys():
        path = key.rsplit(".", 1)[0]
        expected[key] = _dense_change(model, "a", path)
        torch.testing.assert_close(vector.dense()[key], expected[key], **TOL)
    changes_b = {key: _dense_change(model, "b", key.rsplit(".", 1)[0]) for key in vector.keys()}
    base = {key: model.get_parameter(key).detach().clone() for key in vector.keys()}
    dt.merge_deltas(model, ["a", "b"], method="linear", name="merged")
    with torch.no_grad():
        merged_out = case.output(model)
    reference = case.build(0)
    with torch.no_grad():
        for key in vector.keys():
            reference.get_parameter(key).copy_(base[key] + 0.5 * (expected[key] + changes_b[key]))
        torch.testing.assert_close(merged_out, case.output(reference), **TOL)


# ---------------------------------------------------------------------------------------------
# COFT and module dropout


def test_coft_step_hook_keeps_each_block_on_its_ball_and_the_output_uses_the_projection():
    model = MODELS["llama"].build(0)
    dt.attach(model, OFTConfig(block_size=8, coft=True, eps=1e-2, targets=["q_proj"]), name="x")
    unit = model.get_submodule("model.layers.0.self_attn.q_proj").deltas["x"]
    with torch.no_grad():
        unit.skew.normal_()
    before = unit.rotation().detach().clone()
    after_step(model, 1, 10)
    radius = 1e-2 / 4 ** 0.5
    q = unit.skew.detach()
    full = torch.zeros(4, 8, 8)
    rows, cols = torch.triu_indices(8, 8, 1)
    full[:, rows, cols] = q
    full = full - full.transpose(1, 2)
    assert torch.all(torch.linalg.matrix_norm(full) <= radius * (1 + 1e-5))
    torch.testing.assert_close(unit.rotation().detach(), before, **TOL)  # the forward already projected


def test_module_dropout_sets_a_share_of_blocks_to_the_identity_in_training_only():
    unit, size = _random_unit(16, 4, False, 4, module_dropout=0.5)
    eye = torch.eye(size)
    unit.train()
    x = torch.randn(5, 16)
    rotated = unit.rotate_input(x).reshape(5, 4, size)
    kept = [torch.equal(rotated[:, j], x.reshape(5, 4, size)[:, j]) for j in range(4)]
    assert sum(kept) == 2  # two of the four blocks left the input as it was
    assert sum(torch.equal(block, eye) for block in unit.rotation().detach()) == 0  # merging never drops
    unit.eval()
    assert not any(torch.equal(a, b) for a, b in zip(unit.rotate_input(x).reshape(5, 4, size).unbind(1),
                                                     x.reshape(5, 4, size).unbind(1)))


# ---------------------------------------------------------------------------------------------
# peft 0.21.2


peft = pytest.importorskip("peft")


PEFT_CASES = {
    "exact": ({"block_size": 8}, {"oft_block_size": 8, "use_cayley_neumann": False}),
    "neumann-r": ({"r": 2, "use_cayley_neumann": True, "num_cayley_neumann_terms": 4},
                  {"r": 2, "oft_block_size": 0, "num_cayley_neumann_terms": 4}),
    "coft-shared": ({"block_size": 4, "coft": True, "eps": 1e-2, "block_share": True},
                    {"oft_block_size": 4, "use_cayley_neumann": False, "coft": True, "eps": 1e-2, "block_share": True}),
}
TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.mark.parametrize("case_name", PEFT_CASES)
def test_trainable_count_equals_peft(case_name):
    ours_fields, theirs_fields = PEFT_CASES[case_name]
    report = dt.attach(MODELS["llama"].build(0), OFTConfig(targets=TARGETS, **ours_fields), name="x")
    theirs = quiet(peft.get_peft_model, MODELS["llama"].build(0), peft.OFTConfig(target_modules=TARGETS, **theirs_fields))
    assert report.trainable == theirs.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("case_name", PEFT_CASES)
def test_a_peft_adapter_imports_with_peft_outputs(case_name, tmp_path):
    from deltatune.interop import import_peft

    case = MODELS["llama"]
    theirs = saved_peft_adapter(tmp_path / "peft", case.build(0),
                                peft.OFTConfig(target_modules=TARGETS, **PEFT_CASES[case_name][1]), seed=3, scale=0.2)
    import_peft(tmp_path / "peft", tmp_path / "delta", case.build(0))
    ours = case.build(0)
    dt.load(ours, tmp_path / "delta")
    inputs = case.inputs()
    expected = logits(theirs, inputs)
    assert (expected - logits(case.build(0), inputs)).abs().max() > 1e-3
    torch.testing.assert_close(logits(ours.eval(), inputs), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("case_name", PEFT_CASES)
def test_an_export_loads_in_peft_with_the_same_outputs(case_name, tmp_path):
    from deltatune.interop import export_peft

    case = MODELS["llama"]
    ours = case.build(0)
    dt.attach(ours, OFTConfig(targets=TARGETS, **PEFT_CASES[case_name][0]), name="x")
    randomise(ours, "x", 4, scale=0.2)
    dt.save(ours, tmp_path / "delta")
    export_peft(tmp_path / "delta", tmp_path / "peft", case.build(0))
    theirs = quiet(peft.PeftModel.from_pretrained, case.build(0), tmp_path / "peft").eval()
    inputs = case.inputs()
    torch.testing.assert_close(logits(theirs, inputs), logits(ours.eval(), inputs), rtol=0, atol=1e-5)


def test_peft_options_deltatune_lacks_are_refused_by_name(tmp_path):
    from deltatune.interop import import_peft

    theirs = quiet(peft.get_peft_model, MODELS["llama"].build(0), peft.OFTConfig(target_modules=["q_proj"], bias="all"))
    quiet(theirs.save_pretrained, tmp_path / "peft")
    with pytest.raises(ConfigError, match="option bias='all'"):
        import_peft(tmp_path / "peft", tmp_path / "delta", MODELS["llama"].build(0))


def test_export_of_oft_on_gpt2_conv1d_is_refused_since_peft_has_no_such_layer(tmp_path):
    assert_conv1d_export_is_refused(tmp_path, OFTConfig(block_size=8, targets=["c_attn"]), "Conv1D")


# ---------------------------------------------------------------------------------------------
# command line


def test_train_builds_oft_from_flags(tmp_path, tiny_bert, reviews_csv):
    out = train_from_the_command_line(tmp_path, tiny_bert, reviews_csv,
                                      ["--method", "oft", "--block-size", "8", "--coft", "true"])
    config = saved_config(out)
    assert config["method"] == "oft" and config["block_size"] == 8 and config["coft"] is True
