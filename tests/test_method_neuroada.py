"""NeuroAda: a trainable bypass on each output neuron's k largest-magnitude input weights.

The reference writes ``D`` out densely, one entry at a time (``D[o, indices[o, j]] =
bypass[o, j]``), then ``y = x (W + D)^T + b``; the chosen connections are checked against
the weight's magnitudes directly.
"""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
from tiny_models import MODELS
from method_checks import (assert_a_mixed_batch_trains_every_routed_delta, assert_folded_linear_merge_weight,
                           assert_merge_adds_and_unmerge_restores, assert_output_adds, assert_refused_at_attach,
                           assert_rows_equal_alone, attach_randomised, attached_at, dense_changes_checked,
                           loaded_inactive, randomise as _randomise, saved_config, token_batch,
                           train_from_the_command_line)

import deltatune as dt
from deltatune.algebra import TaskVector, merge_deltas
from deltatune.methods.neuroada import NeuroAdaConfig


def _dense_reference(unit, fan_in: int, fan_out: int) -> torch.Tensor:
    dense = torch.zeros(fan_out, fan_in)
    for o in range(fan_out):
        for j, column in enumerate(unit.indices[o].tolist()):
            dense[o, column] += unit.bypass.detach()[o, j]
    return dense


@pytest.mark.parametrize("case_name,path", [("llama", "model.layers.0.self_attn.v_proj"),  # Linear 32 -> 16
                                            ("gpt2", "transformer.h.0.attn.c_attn")])  # Conv1D 32 -> 96
def test_bypass_sits_on_each_neurons_largest_weights_and_merges_there(case_name, path):
    attached = attached_at(case_name, path, NeuroAdaConfig(k=3, targets=[f"re:{path}"]))
    unit, weight = attached.unit, attached.weight
    fan_out, fan_in = weight.shape
    assert unit.indices.shape == (fan_out, 3) and unit.indices.dtype == torch.int64
    for o in range(fan_out):
        chosen = set(unit.indices[o].tolist())
        assert len(chosen) == 3
        kept = min(weight[o, c].abs() for c in chosen)
        assert all(weight[o, c].abs() <= kept for c in range(fan_in) if c not in chosen)
    dense = _dense_reference(unit, fan_in, fan_out)
    for tokens in (1, 5, 40):  # gathered inputs (tokens * k <= in), then the scattered dW in one product
        assert_output_adds(attached, dense, torch.randn(2, tokens, fan_in, generator=torch.Generator().manual_seed(3)))
    assert_merge_adds_and_unmerge_restores(attached, dense)


def test_saved_indices_load_onto_a_fresh_base_with_identical_outputs(tmp_path):
    case = MODELS["llama"]
    model = case.build()
    dt.attach(model, NeuroAdaConfig(k=4), name="x")
    _randomise(model, "x", 2)
    expected = case.output(model)
    dt.save(model, tmp_path / "d")
    stored = safetensors.torch.load_file(str(tmp_path / "d" / "delta.safetensors"))
    key = "model.layers.0.self_attn.q_proj.indices"
    assert stored[key].dtype == torch.int64 and stored[key].shape == (32, 4)
    fresh = case.build()
    dt.load(fresh, tmp_path / "d")
    assert torch.equal(fresh.get_submodule("model.layers.0.self_attn.q_proj").deltas["x"].indices, stored[key])
    torch.testing.assert_close(case.output(fresh), expected, rtol=0, atol=0)


def test_a_new_delta_is_zero_and_counts_out_times_k():
    report = dt.attach(MODELS["llama"].build(), NeuroAdaConfig(k=2, targets=["q_proj", "v_proj"]), name="x")
    assert report.trainable == 2 * 2 * (32 + 16)


def test_bad_k_is_refused_at_construction():
    with pytest.raises(dt.ConfigError, match="'k'"):
        NeuroAdaConfig(k=-1)


def test_k_above_an_input_width_is_refused_at_attach():
    assert_refused_at_attach("llama", NeuroAdaConfig(k=33, targets=["down_proj", "q_proj"]),
                             r"'model.layers.0.self_attn.q_proj' \(Linear, in=32, out=32\)", "model.layers.0.mlp.down_proj")


def test_corrupt_indices_are_refused_on_load():
    model = MODELS["bert"].build()
    dt.attach(model, NeuroAdaConfig(k=2, targets=["query"]), name="x")
    unit = model.get_submodule("bert.encoder.layer.0.attention.self.query").deltas["x"]
    with pytest.raises(dt.DeltaFileError, match="connection indices"):
        unit.load_saved({"indices": torch.full((32, 2), -1)})


@pytest.mark.parametrize("case_name", ["llama", "gpt2"])
def test_mixed_batch_rows_equal_each_row_alone(case_name):
    case = MODELS[case_name]
    model = case.build()
    attach_randomised(model, {"k4": NeuroAdaConfig(k=4), "k1": NeuroAdaConfig(k=1), "k6": NeuroAdaConfig(k=6, layers=[1]),
                              "lora": dt.LoRAConfig(r=2)})
    rows = ["k4", None, "k1", "k6", "lora", "k4", None, "k1"]
    assert_rows_equal_alone(case, model, rows, token_batch(len(rows), seed=2))
    assert dt.get_method("neuroada").mixing.mode == "batched"


def test_ties_merging_and_task_vectors_take_the_dense_sparse_changes(tmp_path):
    case = MODELS["bert"]
    folders = [None, None]
    for i, k in enumerate((2, 5)):
        model = case.build()
        dt.attach(model, NeuroAdaConfig(k=k, targets=["value"]), name=f"n{k}")
        _randomise(model, f"n{k}", i + 1)
        folders[i] = dt.save(model, tmp_path / f"n{k}")
    sources = loaded_inactive(case, folders)
    path = "bert.encoder.layer.1.attention.self.value"
    module = sources.get_submodule(path)
    changes = dense_changes_checked(sources, ("n2", "n5"), path, lambda unit: _dense_reference(unit, 32, 32))
    assert_folded_linear_merge_weight(case, folders, [0.5, 0.5], path, module.weight + 0.5 * (changes[0] + changes[1]))
    ties = case.build()
    assert merge_deltas(ties, folders, "ties", density=1.0).result == "dense"
    # density 1 keeps every value; TIES averages the values that agree with the elected sign
    change = TaskVector.from_delta(ties, "merged").dense()[f"{path}.weight"]
    agree = (changes[0] * changes[1] > 0)
    alone = (changes[0] == 0) ^ (changes[1] == 0)
    torch.testing.assert_close(change[agree], (changes[0] + changes[1])[agree] / 2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(change[alone], (changes[0] + changes[1])[alone], rtol=1e-5, atol=1e-6)
    assert torch.all(change[(changes[0] == 0) & (changes[1] == 0)] == 0)


def test_neuroada_trains_from_the_command_line(tmp_path, tiny_bert, reviews_csv):
    out = train_from_the_command_line(tmp_path, tiny_bert, reviews_csv, ["--method", "neuroada", "--k", "2"])
    config = saved_config(out)
    assert config["method"] == "neuroada" and config["k"] == 2


def test_neuroada_has_no_peft_format():
    assert dt.get_method("neuroada").peft is None and "bypass" in dt.get_method("neuroada").peft_refusal


def test_a_mixed_batch_trains_every_routed_delta():
    assert_a_mixed_batch_trains_every_routed_delta(NeuroAdaConfig(k=2))
