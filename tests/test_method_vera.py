"""VeRA (Kopiczko et al., 2023): the formula against a naive reference, the shared projections
(saved or drawn from the seed, one pair per delta), mixed batches, merging, peft parity, the CLI."""

from __future__ import annotations

import json
import math

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

import deltatune as dt
from deltatune.algebra import task_vector_of
import deltatune.methods.vera.layer as vera_layer
from deltatune.interop import load_peft, save_peft
from deltatune.methods.vera import VeRAConfig, VeRALinear, VeRAProjections
from tiny_models import MODELS
from method_checks import (assert_each_row_equals_it_alone, assert_target_refused_at_attach, edit_adapter_config,
                           last_hidden_states, padded_token_batch, quiet, randomise as _randomise, saved_config,
                           saved_peft_adapter, train_from_the_command_line)

#: (model, targets, whether the targets store their weight (in, out))
CASES = {"bert": (["query", "value", "intermediate.dense"], False), "gpt2": (["c_attn", "mlp.c_proj"], True)}
TOL = {"rtol": 1e-5, "atol": 1e-5}


def _attached(model_name, name="x", seed=3, **fields):
    targets, _ = CASES[model_name]
    model = MODELS[model_name].build(0)
    dt.attach(model, VeRAConfig(**{"r": 6, "targets": targets, **fields}), name=name)
    _randomise(model, name, seed)
    return model.eval()


def _units(model, name="x"):
    return {path: module.deltas[name] for path, module in model.named_modules()
            if hasattr(module, "deltas") and name in module.deltas and isinstance(module.deltas[name], VeRALinear)}


def _reference_projections(r, max_in, max_out, seed):
    """The paper's frozen random matrices as peft draws them: Kaiming uniform (ReLU gain), A first."""
    generator = torch.Generator().manual_seed(seed)
    vera_A = torch.nn.init.kaiming_uniform_(torch.empty(r, max_in), a=0, generator=generator)
    vera_B = torch.nn.init.kaiming_uniform_(torch.empty(max_out, r), a=0, generator=generator)
    return vera_A, vera_B


@pytest.mark.parametrize("model_name", sorted(CASES))
def test_update_is_diag_b_times_B_times_diag_d_times_A(model_name):
    model = _attached(model_name, seed=4, projection_prng_key=11)
    units = _units(model)
    widths = [(u.fan_in, u.fan_out) for u in units.values()]
    vera_A, vera_B = _reference_projections(6, max(w[0] for w in widths), max(w[1] for w in widths), 11)
    generator = torch.Generator().manual_seed(0)
    for path, unit in units.items():
        module = model.get_submodule(path)
        assert unit.transposed == CASES[model_name][1]
        d, b = unit.vera_lambda_d.detach(), unit.vera_lambda_b.detach()
        expected = torch.diag(b) @ vera_B[:unit.fan_out, :] @ torch.diag(d) @ vera_A[:, :unit.fan_in]
        torch.testing.assert_close(unit.delta_weight(None), expected, **TOL)
        # the running layer: x (W + dW)^T + bias, whatever the module's weight layout
        weight = module.weight.detach().T if unit.transposed else module.weight.detach()
        x = torch.randn(2, 5, unit.fan_in, generator=generator)
        with torch.no_grad():
            torch.testing.assert_close(module(x), F.linear(x, weight + expected, module.bias), **TOL)
        left, right, transposed = unit.low_rank_update()
        assert transposed == unit.transposed
        torch.testing.assert_close(left @ right, expected, **TOL)


def test_new_delta_starts_at_d_initial_and_zero_b_and_shares_one_projection_pair():
    model = MODELS["gpt2"].build(0)
    dt.attach(model, VeRAConfig(r=5, d_initial=0.25, targets=["c_attn", "c_fc"]), name="x")
    units = list(_units(model).values())
    shared = model.deltas["x"]
    assert isinstance(shared, VeRAProjections)
    assert shared.vera_A.shape == (5, 32) and shared.vera_B.shape == (128, 5)  # largest in, largest out
    assert all(u.projections is shared for u in units)
    assert all(torch.equal(u.vera_lambda_d, torch.full((5,), 0.25)) and not u.vera_lambda_b.any() for u in units)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert id(shared.vera_A) not in trainable and id(shared.vera_B) not in trainable


def test_two_deltas_keep_their_own_projections(tmp_path):
    model = _attached("bert", name="a", seed=1, projection_prng_key=1)
    dt.attach(model, VeRAConfig(r=3, projection_prng_key=2, targets=["query"]), name="b")
    _randomise(model, "b", seed=2)
    model.eval()
    a, b = model.deltas["a"], model.deltas["b"]
    assert a is not b and a.vera_A.shape[0] == 6 and b.vera_A.shape[0] == 3
    assert all(u.projections is b for u in _units(model, "b").values())
    with dt.using(model, "a"):
        only_a = MODELS["bert"].output(model)
    dt.save(model, tmp_path / "b", "b")
    dt.delete(model, "b")
    with dt.using(model, "a"):
        torch.testing.assert_close(MODELS["bert"].output(model), only_a, rtol=0, atol=0)
    fresh = MODELS["bert"].build(0)
    dt.load(fresh, tmp_path / "b")
    assert torch.equal(fresh.deltas["b"].vera_A, b.vera_A)


@pytest.mark.parametrize("save_projection", [True, False])
def test_saved_delta_reproduces_exactly_with_or_without_the_projections(tmp_path, save_projection):
    model = _attached("gpt2", save_projection=save_projection, projection_prng_key=9)
    expected = MODELS["gpt2"].output(model)
    dt.save(model, tmp_path / "d")
    stored = safetensors.torch.load_file(str(tmp_path / "d" / "delta.safetensors"))
    assert ("vera_A" in stored and "vera_B" in stored) == save_projection
    assert json.loads((tmp_path / "d" / "delta.json").read_text())["config"]["projection_prng_key"] == 9
    fresh = MODELS["gpt2"].build(0)
    dt.load(fresh, tmp_path / "d")
    torch.testing.assert_close(MODELS["gpt2"].output(fresh.eval()), expected, rtol=0, atol=0)


@pytest.mark.parametrize("field,value", [("r", 0), ("dropout", 1.0), ("d_initial", math.inf),
                                         ("projection_prng_key", -1)])
def test_bad_field_values_fail_at_construction_naming_the_field(field, value):
    with pytest.raises(dt.ConfigError, match=field):
        VeRAConfig(**{field: value})


def test_a_target_vera_cannot_adapt_fails_at_attach_naming_it_and_leaves_the_model_alone():
    assert_target_refused_at_attach(MODELS["bert"].build(0), VeRAConfig(r=4, targets=["embeddings.LayerNorm"]),
                                    r"vera.*bert\.embeddings\.LayerNorm.*LayerNorm is not a Linear")


@pytest.mark.parametrize("model_name", sorted(CASES))
@pytest.mark.parametrize("shared", [True, False])
def test_mixed_batch_rows_equal_each_row_alone(model_name, shared, monkeypatch):
    case = MODELS[model_name]
    targets, _ = CASES[model_name]
    model = case.build(0)
    names = ["a", "b", "c"]
    for i, name in enumerate(names):  # shared: equal projections (one seed, r, widths): one batched kernel
        r = 6 if shared or i < 2 else 4
        dt.attach(model, VeRAConfig(r=r, targets=targets), name=name)
        _randomise(model, name, i + 1)
    model.eval()
    fallbacks = []
    real = vera_layer.per_delta_post
    monkeypatch.setattr(vera_layer, "per_delta_post", lambda *a: fallbacks.append(1) or real(*a))
    inputs = padded_token_batch(5)
    ids = ["a", None, "b", "c", "a"]
    with torch.no_grad():
        mixed = case.output(model, {**inputs, "delta_ids": ids})
    assert bool(fallbacks) != shared
    assert_each_row_equals_it_alone(case, model, ids, inputs, mixed)


def test_linear_merge_of_two_deltas_is_the_weighted_sum_of_their_updates(tmp_path):
    folders = []
    for i, seed in enumerate((1, 2)):
        model = _attached("bert", name=f"d{i}", seed=seed, projection_prng_key=seed)
        dt.save(model, tmp_path / f"d{i}")
        folders.append((tmp_path / f"d{i}", _units(model, f"d{i}")))
    target = MODELS["bert"].build(0)
    dt.merge_deltas(target, [f for f, _ in folders], "linear", [0.7, -0.4])
    vector = task_vector_of(target, "merged")
    for path in folders[0][1]:
        expected = sum(w * _naive(units[path]) for w, (_, units) in zip((0.7, -0.4), folders))
        module = target.get_submodule(path)
        merged = module.deltas["merged"].merge_params(module, {"weight": module.weight.detach()})["weight"]
        torch.testing.assert_close(merged - module.weight.detach(), expected, **TOL)
        assert f"{path}.weight" in vector.keys()


def _naive(unit):
    vera_A, vera_B = unit.projections.vera_A, unit.projections.vera_B
    d, b = unit.vera_lambda_d.detach(), unit.vera_lambda_b.detach()
    return torch.diag(b) @ vera_B[:unit.fan_out] @ torch.diag(d) @ vera_A[:, :unit.fan_in]


def test_cli_trains_vera_from_flags(tmp_path, tiny_bert, reviews_csv):
    out = train_from_the_command_line(tmp_path, tiny_bert, reviews_csv,
                                      ["--method", "vera", "--r", "16", "--d-initial", "0.2"])
    config = saved_config(out)
    assert config["method"] == "vera" and config["r"] == 16 and config["d_initial"] == 0.2


# ----------------------------------------------------------------------------------------- peft
try:
    import peft
except ImportError:  # pragma: no cover
    peft = None
needs_peft = pytest.mark.skipif(peft is None, reason="peft is not installed")


@needs_peft
@pytest.mark.parametrize("model_name", sorted(CASES))
def test_trainable_count_equals_peft(model_name):
    targets, transposed = CASES[model_name]
    ours = MODELS[model_name].build(0)
    report = dt.attach(ours, VeRAConfig(r=6, targets=targets))
    theirs = quiet(peft.get_peft_model, MODELS[model_name].build(0),
                    peft.VeraConfig(r=6, target_modules=targets, fan_in_fan_out=transposed))
    assert report.trainable == sum(p.numel() for p in theirs.parameters() if p.requires_grad)


@needs_peft
@pytest.mark.parametrize("model_name", sorted(CASES))
@pytest.mark.parametrize("save_projection", [True, False])
def test_peft_adapter_imports_with_equal_outputs(tmp_path, model_name, save_projection):
    targets, transposed = CASES[model_name]
    peft_config = quiet(peft.VeraConfig, r=6, target_modules=targets, fan_in_fan_out=transposed, projection_prng_key=5,
                        save_projection=save_projection, d_initial=0.2)
    theirs = saved_peft_adapter(tmp_path / "peft", MODELS[model_name].build(0), peft_config, seed=1, scale=0.3)
    inputs = padded_token_batch(3)
    ours = MODELS[model_name].build(0)
    quiet(load_peft, ours, tmp_path / "peft")
    config = dt.get_config(ours, "default")
    assert (config.r, config.projection_prng_key, config.save_projection, config.d_initial) == (6, 5, save_projection, 0.2)
    difference = (last_hidden_states(ours.eval(), inputs) - last_hidden_states(theirs, inputs)).abs().max().item()
    assert difference <= 1e-5
    base_difference = (last_hidden_states(MODELS[model_name].build(0), inputs)
                       - last_hidden_states(theirs, inputs)).abs().max().item()
    assert base_difference > 1e-3


@needs_peft
@pytest.mark.parametrize("model_name", sorted(CASES))
def test_export_loads_in_peft_with_equal_outputs(tmp_path, model_name):
    model = _attached(model_name, projection_prng_key=8, dropout=0.1)
    save_peft(model, tmp_path / "peft")
    written = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert written["peft_type"] == "VERA" and written["vera_dropout"] == 0.1 and written["projection_prng_key"] == 8
    theirs = quiet(peft.PeftModel.from_pretrained, MODELS[model_name].build(0), tmp_path / "peft").eval()
    inputs = padded_token_batch(3)
    assert (last_hidden_states(model, inputs) - last_hidden_states(theirs, inputs)).abs().max().item() <= 1e-5


@needs_peft
def test_peft_bias_option_is_refused_by_name(tmp_path):
    model = _attached("bert")
    save_peft(model, tmp_path / "peft")
    edit_adapter_config(tmp_path / "peft", bias="vera_only")
    with pytest.raises(dt.ConfigError, match=r"option bias='vera_only' is not supported.*biases"):
        load_peft(MODELS["bert"].build(0), tmp_path / "peft")
