"""SparseAdapter (He et al., 2022): masked projections against a naive masked adapter on Linear
and GPT-2 Conv1D, the Large-Sparse width and the kept count, masks fixed through training and
saved with the delta, the pruning criteria, refusals, mixed batches, merging refused, the CLI."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

import deltatune as dt
from deltatune.methods.sparseadapter import SparseAdapterConfig, SparseBottleneck
from method_checks import (assert_each_row_equals_it_alone, assert_merging_is_refused_as_not_a_weight_change,
                           assert_peft_export_is_refused,
                           assert_target_refused_at_attach, padded_token_batch, randomise, saved_config,
                           train_from_the_command_line)
from tiny_models import MODELS

SITES = {"bert": ("bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.1.output.dense"),
         "gpt2": ("transformer.h.0.attn.c_proj", "transformer.h.1.mlp.c_proj")}
TOL = {"rtol": 1e-5, "atol": 1e-5}


def _units(model, name="x") -> dict[str, SparseBottleneck]:
    return {path: m.deltas[name] for path, m in model.named_modules()
            if hasattr(m, "deltas") and name in m.deltas and isinstance(m.deltas[name], SparseBottleneck)}


def _attached(model_name="bert", name="x", seed=1, **fields):
    model = MODELS[model_name].build(0)
    dt.attach(model, SparseAdapterConfig(**{"bottleneck": 8, "sparsity": 0.6, **fields}), name=name)
    randomise(model, name, seed)
    return model.eval()


def _naive_weight(projection):
    """The dense weight: zeros, with the stored values written at the stored positions one by one."""
    rows, cols = projection.shape
    dense = torch.zeros(rows, cols)
    for position, value in zip(projection.positions.tolist(), projection.values.detach().tolist()):
        dense[position // cols, position % cols] = value
    return dense


@pytest.mark.parametrize("model_name", sorted(SITES))
def test_output_adds_a_bottleneck_of_masked_projections(model_name):
    model = _attached(model_name, non_linearity="tanh", scaling=0.5)
    for path in SITES[model_name]:
        module = model.get_submodule(path)
        unit = module.deltas["x"]
        weight = module.weight.T if model_name == "gpt2" else module.weight  # Conv1D stores (in, out)
        inputs = torch.randn(2, 5, weight.shape[1], generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            y = F.linear(inputs, weight, module.bias)
            hidden = torch.tanh(y @ _naive_weight(unit.down).T + unit.down_b)
            expected = y + 0.5 * (hidden @ _naive_weight(unit.up).T + unit.up_b)
            torch.testing.assert_close(module(inputs), expected, **TOL)


def test_parallel_placement_reads_the_blocks_input():
    model = _attached("llama", placement="parallel")
    mlp = model.get_submodule("model.layers.0.mlp")
    unit = mlp.deltas["x"]
    x = torch.randn(1, 3, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), dt.base_only(model):
        y = mlp(x)
    with torch.no_grad():
        expected = y + torch.relu(x @ _naive_weight(unit.down).T + unit.down_b) @ _naive_weight(unit.up).T + unit.up_b
        torch.testing.assert_close(mlp(x), expected, **TOL)


@pytest.mark.parametrize("sparsity,large_sparse,width", [(0.6, True, 20), (0.6, False, 8), (0.4, True, 13), (0.0, True, 8)])
def test_large_sparse_widens_the_bottleneck_and_keeps_the_dense_budget(sparsity, large_sparse, width):
    model = MODELS["bert"].build(0)
    report = dt.attach(model, SparseAdapterConfig(bottleneck=8, sparsity=sparsity, large_sparse=large_sparse), name="x")
    for unit in _units(model).values():
        down, up = unit.down_weight(), unit.up_weight()
        assert down.shape == (width, 32) and up.shape == (32, width)
        assert unit.down.values.numel() == 32 * width - round(sparsity * 32 * width)
        assert unit.down.positions.unique().numel() == unit.down.values.numel()
    kept = sum(u.down.values.numel() + u.up.values.numel() for u in _units(model).values())
    assert report.trainable == kept + 4 * (width + 32)  # the biases stay dense
    if large_sparse:  # about the dense adapter's 2 * 8 * 32 weights per site
        assert abs(kept / 4 - 2 * 8 * 32) <= 2 * 32 * 0.5 + 2


def test_pruned_weights_stay_exactly_zero_through_training():
    case = MODELS["bert"]
    model = _attached(sparsity=0.7)
    model.train()
    masks = {path: (_naive_weight(u.down) != 0, _naive_weight(u.up) != 0) for path, u in _units(model).items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for _ in range(4):
        optimizer.zero_grad()
        case.output(model).pow(2).mean().backward()
        optimizer.step()
    for path, unit in _units(model).items():
        down_mask, up_mask = masks[path]
        with torch.no_grad():
            assert torch.count_nonzero(unit.down_weight()[~down_mask]) == 0
            assert torch.count_nonzero(unit.up_weight()[~up_mask]) == 0
            assert torch.count_nonzero(unit.up_weight()) > 0  # the kept entries did train


def test_a_new_sparse_adapter_is_the_identity_with_a_zero_up_projection():
    model = MODELS["bert"].build(0)
    dt.attach(model, SparseAdapterConfig(bottleneck=8), name="x")
    for unit in _units(model).values():
        assert torch.count_nonzero(unit.up_weight()) == 0 and torch.count_nonzero(unit.down_weight()) > 0


def test_magnitude_matches_a_replayed_draw():
    model = MODELS["bert"].build(0)
    path = SITES["bert"][0]
    torch.manual_seed(11)
    dt.attach(model, SparseAdapterConfig(bottleneck=8, sparsity=0.5, large_sparse=False, criterion="magnitude",
                                         targets=[path]), name="x")
    unit = model.get_submodule(path).deltas["x"]
    torch.manual_seed(11)
    dense = torch.nn.init.normal_(torch.empty(8, 32), std=0.02)  # the unit's first draw
    threshold = dense.abs().flatten().sort(descending=True).values[127]
    expected = (dense.abs() >= threshold).flatten().nonzero().flatten()
    assert torch.equal(unit.down.positions, expected)
    torch.testing.assert_close(unit.down.values.detach(), dense.flatten()[expected])


def test_random_masks_follow_torchs_generator():
    def positions(seed):
        model = MODELS["bert"].build(0)
        torch.manual_seed(seed)
        dt.attach(model, SparseAdapterConfig(bottleneck=8), name="x")
        return [u.down.positions.clone() for u in _units(model).values()]

    first, again, other = positions(1), positions(1), positions(2)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_masks_are_saved_with_the_delta_and_reload_exactly(tmp_path):
    case = MODELS["gpt2"]
    model = _attached("gpt2", criterion="magnitude")
    expected = case.output(model)
    dt.save(model, tmp_path / "d")
    tensors = safetensors.torch.load_file(tmp_path / "d" / "delta.safetensors")
    assert any(k.endswith("down.positions") for k in tensors)
    torch.manual_seed(123)  # a different draw at load: the saved masks win
    fresh = case.build(0)
    dt.load(fresh, tmp_path / "d")
    torch.testing.assert_close(case.output(fresh), expected, rtol=0, atol=0)
    for path, unit in _units(model).items():
        assert torch.equal(_units(fresh)[path].down.positions, unit.down.positions)


def test_corrupt_positions_are_refused_at_load(tmp_path):
    model = _attached()
    dt.save(model, tmp_path / "d")
    file = tmp_path / "d" / "delta.safetensors"
    tensors = safetensors.torch.load_file(file)
    key = next(k for k in tensors if k.endswith("up.positions"))
    tensors[key] = torch.zeros_like(tensors[key])  # every kept entry at one place
    safetensors.torch.save_file(tensors, file)
    with pytest.raises(dt.DeltaFileError):
        dt.load(MODELS["bert"].build(0), tmp_path / "d", check="off")


def test_a_target_without_a_linear_layer_fails_at_attach_naming_it():
    assert_target_refused_at_attach(MODELS["bert"].build(0), SparseAdapterConfig(targets=["embeddings.LayerNorm"]),
                                    r"sparseadapter.*bert\.embeddings\.LayerNorm.*LayerNorm has no linear layer")


@pytest.mark.parametrize("field,value", [("bottleneck", 0), ("sparsity", 1.0), ("sparsity", -0.1),
                                         ("criterion", "snip"), ("placement", "both"), ("non_linearity", "softmax")])
def test_bad_field_values_fail_at_construction_naming_the_field(field, value):
    with pytest.raises(dt.ConfigError, match=field):
        SparseAdapterConfig(**{field: value})


@pytest.mark.parametrize("model_name", sorted(SITES))
def test_mixed_batch_rows_equal_each_row_alone(model_name):
    case = MODELS[model_name]
    model = case.build(0)
    for i, (name, fields) in enumerate({"a": {}, "b": {"sparsity": 0.3, "criterion": "magnitude"},
                                        "c": {"placement": "pfeiffer", "large_sparse": False}}.items()):
        dt.attach(model, SparseAdapterConfig(**{"bottleneck": 8, "sparsity": 0.6, **fields}), name=name)
        randomise(model, name, i + 1)
    dt.attach(model, dt.AdapterConfig(bottleneck=8), name="plain")
    randomise(model, "plain", 9)
    model.eval()
    inputs = padded_token_batch(6)
    ids = ["a", None, "b", "c", "plain", "a"]
    with torch.no_grad():
        mixed = case.output(model, {**inputs, "delta_ids": ids})
    assert_each_row_equals_it_alone(case, model, ids, inputs, mixed)


def test_merging_and_task_vectors_refuse_it_as_not_a_weight_change(tmp_path):
    assert_merging_is_refused_as_not_a_weight_change(tmp_path, _attached(), "sparseadapter", MODELS["bert"].build(0))


def test_peft_export_is_refused_with_the_reason(tmp_path):
    assert_peft_export_is_refused(tmp_path, _attached(), "peft has no SparseAdapter")


def test_cli_trains_sparseadapter_from_flags(tmp_path, tiny_bert, reviews_csv):
    out = train_from_the_command_line(tmp_path, tiny_bert, reviews_csv,
                                      ["--method", "sparseadapter", "--sparsity", "0.5", "--criterion", "magnitude",
                                       "--bottleneck", "4"])
    config = saved_config(out)
    assert config["method"] == "sparseadapter" and config["sparsity"] == 0.5 and config["criterion"] == "magnitude"


def test_it_composes_in_a_stack_and_a_batch_split_like_the_active_set():
    case = MODELS["bert"]
    model = case.build(0)
    for i, (name, config) in enumerate({"a": SparseAdapterConfig(bottleneck=8, sparsity=0.6), "b": SparseAdapterConfig(bottleneck=8, sparsity=0.6),
                                        "lora": dt.LoRAConfig(r=2)}.items()):
        dt.attach(model, config, name=name)
        randomise(model, name, i + 1)
    inputs = padded_token_batch(4)
    with torch.no_grad():
        with dt.using(model, ["a", "lora"]):
            expected = case.output(model, inputs)
        with dt.compose(model, dt.Stack("a", "lora")):
            torch.testing.assert_close(case.output(model, inputs), expected, rtol=0, atol=0)
        with dt.compose(model, dt.BatchSplit("a", "b", sizes=[1, 3])):
            split = case.output(model, inputs)
        for rows, name in ((slice(0, 1), "a"), (slice(1, 4), "b")):
            with dt.using(model, name):
                torch.testing.assert_close(split[rows], case.output(model, {k: v[rows] for k, v in inputs.items()}),
                                           **TOL)
