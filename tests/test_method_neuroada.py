"""NeuroAda: a trainable bypass on each output neuron's k largest-magnitude input weights.

The reference writes ``D`` out densely, one entry at a time (``D[o, indices[o, j]] =
bypass[o, j]``), then ``y = x (W + D)^T + b``; the chosen connections are checked against
the weight's magnitudes directly.
"""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from tiny_models import MODELS
from method_checks import assert_rows_equal_alone, randomise as _randomise

import deltatune as dt
from deltatune.algebra import TaskVector, merge_deltas
from deltatune.cli import main
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
    case = MODELS[case_name]
    model = case.build()
    dt.attach(model, NeuroAdaConfig(k=3, targets=[f"re:{path}"]), name="x")
    _randomise(model, "x", 1)
    module = model.get_submodule(path)
    unit = module.deltas["x"]
    transposed = case_name == "gpt2"
    weight = (module.weight.T if transposed else module.weight).detach().clone()
    fan_out, fan_in = weight.shape
    assert unit.indices.shape == (fan_out, 3) and unit.indices.dtype == torch.int64
    for o in range(fan_out):
        chosen = set(unit.indices[o].tolist())
        assert len(chosen) == 3
        kept = min(weight[o, c].abs() for c in chosen)
        assert all(weight[o, c].abs() <= kept for c in range(fan_in) if c not in chosen)
    dense = _dense_reference(unit, fan_in, fan_out)
    for tokens in (1, 5, 40):  # gathered inputs (tokens * k <= in), then the scattered dW in one product
        x = torch.randn(2, tokens, fan_in, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            torch.testing.assert_close(module(x), F.linear(x, weight + dense, module.bias), rtol=1e-5, atol=1e-5)
    original = module.weight.detach().clone()
    dt.merge(model)
    torch.testing.assert_close(module.weight.detach(), (weight + dense).T if transposed else weight + dense)
    dt.unmerge(model)
    assert torch.equal(module.weight, original)


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
    model = MODELS["llama"].build()
    with pytest.raises(dt.NotApplicableError, match=r"'model.layers.0.self_attn.q_proj' \(Linear, in=32, out=32\)"):
        dt.attach(model, NeuroAdaConfig(k=33, targets=["down_proj", "q_proj"]), name="x")
    assert dt.list_deltas(model) == [] and not hasattr(model.get_submodule("model.layers.0.mlp.down_proj"), "deltas")


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
    configs = {"k4": NeuroAdaConfig(k=4), "k1": NeuroAdaConfig(k=1), "k6": NeuroAdaConfig(k=6, layers=[1]),
               "lora": dt.LoRAConfig(r=2)}
    for seed, (name, config) in enumerate(configs.items()):
        dt.attach(model, config, name=name)
        _randomise(model, name, seed + 1)
    rows = ["k4", None, "k1", "k6", "lora", "k4", None, "k1"]
    inputs = {"input_ids": torch.randint(1, 100, (len(rows), 6), generator=torch.Generator().manual_seed(2))}
    assert_rows_equal_alone(case, model, rows, inputs)
    assert dt.get_method("neuroada").mixing.mode == "batched"


def test_ties_merging_and_task_vectors_take_the_dense_sparse_changes(tmp_path):
    case = MODELS["bert"]
    folders = [None, None]
    for i, k in enumerate((2, 5)):
        model = case.build()
        dt.attach(model, NeuroAdaConfig(k=k, targets=["value"]), name=f"n{k}")
        _randomise(model, f"n{k}", i + 1)
        folders[i] = dt.save(model, tmp_path / f"n{k}")
    sources = case.build()
    for folder in folders:
        dt.load(sources, folder, activate=False)
    path = "bert.encoder.layer.1.attention.self.value"
    module = sources.get_submodule(path)
    changes = []
    for name in ("n2", "n5"):
        dense = _dense_reference(module.deltas[name], 32, 32)
        torch.testing.assert_close(TaskVector.from_delta(sources, name).dense()[f"{path}.weight"], dense)
        changes.append(dense)
    merged = case.build()
    merge_deltas(merged, folders, "linear", [0.5, 0.5])
    dt.fold(merged)
    torch.testing.assert_close(merged.get_submodule(path).weight, module.weight + 0.5 * (changes[0] + changes[1]),
                               rtol=1e-5, atol=1e-6)
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
    args = ["train", "--model", str(tiny_bert), "--data", str(reviews_csv), "--text-column", "review",
            "--label-column", "sentiment", "--steps", "6", "--batch-size", "8", "--max-length", "16", "--no-progress",
            "--method", "neuroada", "--k", "2", "--out", str(tmp_path / "run")]
    assert main(args) == 0
    saved = json.loads((tmp_path / "run" / "delta.json").read_text())
    assert saved["config"]["method"] == "neuroada" and saved["config"]["k"] == 2


def test_neuroada_has_no_peft_format():
    assert dt.get_method("neuroada").peft is None and "bypass" in dt.get_method("neuroada").peft_refusal


def test_a_mixed_batch_trains_every_routed_delta():
    case = MODELS["bert"]
    model = case.build()
    for name in ("a", "b"):
        dt.attach(model, NeuroAdaConfig(k=2), name=name)
        _randomise(model, name, ord(name))
    with dt.route(model, ["a", "b", None]):
        case.output(model, {"input_ids": torch.randint(1, 100, (3, 5))}).sum().backward()
    for name in ("a", "b"):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in dt.delta_parameters(model, name))
