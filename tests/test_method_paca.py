"""PaCA: k randomly chosen input columns of each weight train.

The reference writes ``D`` out densely: a zero ``(out, in)`` matrix whose column
``columns[j]`` is column ``j`` of the trained block, then ``y = x (W + D)^T + b``.
"""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from tiny_models import MODELS
from method_checks import (assert_a_mixed_batch_trains_every_routed_delta, assert_folded_linear_merge_weight,
                           assert_merge_adds_and_unmerge_restores, assert_output_adds, assert_refused_at_attach,
                           assert_rows_equal_alone, attach_randomised, attached_at, dense_changes_checked,
                           loaded_inactive, randomise as _randomise, token_batch, train_from_the_command_line)

import deltatune as dt
from deltatune.methods.paca import PaCAConfig


def _dense_reference(unit, fan_in: int, fan_out: int) -> torch.Tensor:
    dense = torch.zeros(fan_out, fan_in)
    for j, column in enumerate(unit.columns.tolist()):
        dense[:, column] = unit.partial.detach()[:, j]
    return dense


@pytest.mark.parametrize("case_name,path", [("llama", "model.layers.0.self_attn.v_proj"),  # Linear 32 -> 16
                                            ("gpt2", "transformer.h.0.attn.c_attn")])  # Conv1D 32 -> 96
def test_output_and_merge_change_only_the_chosen_columns(case_name, path):
    attached = attached_at(case_name, path, PaCAConfig(k=5, targets=[f"re:{path}"]))
    unit = attached.unit
    fan_out, fan_in = attached.weight.shape
    columns = unit.columns.tolist()
    assert len(set(columns)) == 5 and columns == sorted(columns) and unit.columns.dtype == torch.int64
    dense = _dense_reference(unit, fan_in, fan_out)
    assert (dense != 0).any(dim=0).nonzero().squeeze(1).tolist() == columns
    x = torch.randn(2, 5, fan_in, generator=torch.Generator().manual_seed(3))
    assert_output_adds(attached, dense, x)
    assert_merge_adds_and_unmerge_restores(attached, dense)


def test_columns_come_from_torchs_rng_and_a_loaded_delta_keeps_its_own(tmp_path):
    case = MODELS["bert"]
    picks = []
    for seed in (0, 0, 1):
        model = case.build()
        torch.manual_seed(seed)
        dt.attach(model, PaCAConfig(k=6, targets=["query"]), name="x")
        picks.append(model.get_submodule("bert.encoder.layer.0.attention.self.query").deltas["x"].columns.clone())
    assert torch.equal(picks[0], picks[1]) and not torch.equal(picks[0], picks[2])
    _randomise(model, "x", 4)
    expected = case.output(model)
    dt.save(model, tmp_path / "d")
    stored = safetensors.torch.load_file(str(tmp_path / "d" / "delta.safetensors"))
    assert stored["bert.encoder.layer.0.attention.self.query.columns"].dtype == torch.int64
    fresh = case.build()
    torch.manual_seed(123)  # another RNG state at load: the saved columns win
    dt.load(fresh, tmp_path / "d")
    assert torch.equal(fresh.get_submodule("bert.encoder.layer.0.attention.self.query").deltas["x"].columns, picks[2])
    torch.testing.assert_close(case.output(fresh), expected, rtol=0, atol=0)
    meta = json.loads((tmp_path / "d" / "delta.json").read_text())
    assert meta["num_parameters"] == sum(p.numel() for _, p in dt.delta_parameters(model, "x"))  # the indices are not counted


def test_a_new_delta_is_zero_and_counts_out_times_k():
    report = dt.attach(MODELS["llama"].build(), PaCAConfig(k=3, targets=["q_proj", "v_proj"]), name="x")
    assert report.trainable == 2 * 3 * (32 + 16)


def test_bad_k_is_refused_at_construction():
    with pytest.raises(dt.ConfigError, match="'k'"):
        PaCAConfig(k=0)


def test_k_above_an_input_width_is_refused_at_attach():
    # down_proj reads the 64-wide intermediate, q_proj the 32-wide hidden state
    assert_refused_at_attach("llama", PaCAConfig(k=40, targets=["down_proj", "q_proj"]),
                             r"'model.layers.0.self_attn.q_proj' \(Linear, in=32, out=32\)", "model.layers.0.mlp.down_proj")


def test_corrupt_column_indices_are_refused_on_load(tmp_path):
    case = MODELS["bert"]
    model = case.build()
    dt.attach(model, PaCAConfig(k=4, targets=["query"]), name="x")
    unit = model.get_submodule("bert.encoder.layer.0.attention.self.query").deltas["x"]
    with pytest.raises(dt.DeltaFileError, match="column indices"):
        unit.load_saved({"columns": torch.tensor([0, 1, 2, 99])})


@pytest.mark.parametrize("case_name", ["llama", "gpt2"])
def test_mixed_batch_rows_equal_each_row_alone(case_name):
    case = MODELS[case_name]
    model = case.build()
    attach_randomised(model, {"k4": PaCAConfig(k=4), "k8": PaCAConfig(k=8),
                              "k2": PaCAConfig(k=2, targets=["re:.*\\.0\\..*(q_proj|c_attn)"]), "lora": dt.LoRAConfig(r=2)})
    rows = ["k4", None, "k8", "k2", "lora", "k4", None, "k8"]
    assert_rows_equal_alone(case, model, rows, token_batch(len(rows), seed=2))
    assert dt.get_method("paca").mixing.mode == "batched"


def test_linear_merging_and_task_vectors_take_the_dense_column_changes(tmp_path):
    case = MODELS["bert"]
    folders = []
    for seed in (1, 2):
        model = case.build()
        torch.manual_seed(seed)
        dt.attach(model, PaCAConfig(k=6, targets=["query"]), name=f"p{seed}")
        _randomise(model, f"p{seed}", seed)
        folders.append(dt.save(model, tmp_path / f"p{seed}"))
    sources = loaded_inactive(case, folders)
    path = "bert.encoder.layer.0.attention.self.query"
    module = sources.get_submodule(path)
    changes = dense_changes_checked(sources, ("p1", "p2"), path, lambda unit: _dense_reference(unit, 32, 32))
    assert_folded_linear_merge_weight(case, folders, [1.0, -0.5], path, module.weight + changes[0] - 0.5 * changes[1])


def test_paca_trains_from_the_command_line(tmp_path, tiny_bert, reviews_csv):
    out = train_from_the_command_line(tmp_path, tiny_bert, reviews_csv, ["--method", "paca", "--k", "4"])
    saved = json.loads((out / "delta.json").read_text())
    assert saved["config"]["method"] == "paca" and saved["config"]["k"] == 4
    assert any(key.endswith(".columns") and info["dtype"] == "int64" for key, info in saved["tensors"].items())


def test_paca_has_no_peft_format():
    assert dt.get_method("paca").peft is None and "partial-connection" in dt.get_method("paca").peft_refusal


def test_a_mixed_batch_trains_every_routed_delta():
    assert_a_mixed_batch_trains_every_routed_delta(PaCAConfig(k=4))
