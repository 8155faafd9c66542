"""VB-LoRA (Li et al., 2024): factors assembled from a shared vector bank, checked against a
naive per-piece reference; the top-k-only file; bad widths refused at attach; mixed batches;
merging; peft parity; the CLI."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

import deltatune as dt
from deltatune.interop import load_peft, save_peft
from deltatune.methods.vblora import VBLoRAConfig, VBLoRALinear, VectorBank
from tiny_models import MODELS
from method_checks import (assert_each_row_equals_it_alone, assert_target_refused_at_attach, edit_adapter_config,
                           last_hidden_states, padded_token_batch, quiet, randomise as _randomise, saved_config,
                           saved_peft_adapter, train_from_the_command_line)

#: (model, targets, whether the targets store their weight (in, out)); widths 32, 64 and 96
CASES = {"bert": (["query", "value", "intermediate.dense"], False), "gpt2": (["c_attn", "mlp.c_proj"], True)}
TOL = {"rtol": 1e-5, "atol": 1e-6}
SIZES = {"r": 3, "num_vectors": 10, "vector_length": 8, "topk": 2}


def _attached(model_name, name="x", seed=3, **fields):
    targets, _ = CASES[model_name]
    model = MODELS[model_name].build(0)
    dt.attach(model, VBLoRAConfig(**{**SIZES, "targets": targets, **fields}), name=name)
    _randomise(model, name, seed)
    return model.eval()


def _units(model, name="x"):
    return {path: module.deltas[name] for path, module in model.named_modules()
            if hasattr(module, "deltas") and name in module.deltas and isinstance(module.deltas[name], VBLoRALinear)}


def _piece(logits, bank, k):
    """One sub-vector, the paper's way: the k largest logits, softmax over them, their bank rows mixed."""
    order = sorted(range(len(logits)), key=lambda i: -float(logits[i]))[:k]
    weights = torch.softmax(torch.stack([logits[i] for i in order]), 0)
    return sum(w * bank[i] for w, i in zip(weights, order))


def _naive_update(unit, bank, k, length):
    """B A built piece by piece: row i of A is its in/L pieces side by side, column j of B its out/L pieces."""
    logits_A, logits_B = unit.vblora_logits_A.detach(), unit.vblora_logits_B.detach()
    r = logits_A.shape[0]
    lora_A = torch.stack([torch.cat([_piece(logits_A[i, p], bank, k) for p in range(logits_A.shape[1])])
                          for i in range(r)])
    lora_B = torch.stack([torch.cat([_piece(logits_B[p, j], bank, k) for p in range(logits_B.shape[0])])
                          for j in range(r)], dim=1)
    assert lora_A.shape == (r, unit.fan_in) and lora_B.shape == (unit.fan_out, r)
    return lora_B @ lora_A


@pytest.mark.parametrize("model_name", sorted(CASES))
def test_update_is_built_from_top_k_mixes_of_bank_vectors(model_name):
    model = _attached(model_name, seed=4)
    bank = model.deltas["x"].vblora_vector_bank.detach()
    generator = torch.Generator().manual_seed(0)
    for path, unit in _units(model).items():
        module = model.get_submodule(path)
        assert unit.transposed == CASES[model_name][1]
        expected = _naive_update(unit, bank, 2, 8)
        torch.testing.assert_close(unit.delta_weight(None), expected, **TOL)
        weight = module.weight.detach().T if unit.transposed else module.weight.detach()
        x = torch.randn(2, 5, unit.fan_in, generator=generator)
        with torch.no_grad():
            torch.testing.assert_close(module(x), F.linear(x, weight + expected, module.bias), **TOL)
        left, right, transposed = unit.low_rank_update()
        assert transposed == unit.transposed and left.shape[1] == 3
        torch.testing.assert_close(left @ right, expected, **TOL)


def test_one_bank_per_delta_trains_with_the_logits():
    model = MODELS["gpt2"].build(0)
    dt.attach(model, VBLoRAConfig(**SIZES, targets=["c_attn"]), name="a")
    dt.attach(model, VBLoRAConfig(**{**SIZES, "num_vectors": 6}, targets=["c_attn"]), name="b")
    a, b = model.deltas["a"], model.deltas["b"]
    assert isinstance(a, VectorBank) and a.vblora_vector_bank.shape == (10, 8) and b.vblora_vector_bank.shape == (6, 8)
    assert all(u._shared[0] is a for u in _units(model, "a").values())
    assert all(u._shared[0] is b for u in _units(model, "b").values())
    dt.set_trainable(model, "a")
    dt.set_active(model, ["a"])
    model.train()
    MODELS["gpt2"].output(model).pow(2).mean().backward()
    assert a.vblora_vector_bank.grad is not None and a.vblora_vector_bank.grad.abs().sum() > 0
    assert b.vblora_vector_bank.grad is None


def test_top_k_only_file_is_peft_layout_loads_for_inference_and_refuses_training(tmp_path):
    model = _attached("gpt2", save_only_topk_weights=True)
    expected = MODELS["gpt2"].output(model)
    dt.save(model, tmp_path / "d")
    stored = safetensors.torch.load_file(str(tmp_path / "d" / "delta.safetensors"))
    key = "transformer.h.0.attn.c_attn.vblora_logits_A"
    assert key not in stored and stored[key + "_topk_indices"].dtype == torch.uint8
    assert stored[key + "_topk_indices"].shape == (3, 4, 2) and stored[key + "_topk_weights"].shape == (3, 4, 1)
    full = _attached("gpt2")
    dt.save(full, tmp_path / "full")
    assert (tmp_path / "d" / "delta.safetensors").stat().st_size < (tmp_path / "full" / "delta.safetensors").stat().st_size
    fresh = MODELS["gpt2"].build(0)
    dt.load(fresh, tmp_path / "d")
    torch.testing.assert_close(MODELS["gpt2"].output(fresh.eval()), expected, **TOL)
    fresh.train()
    with pytest.raises(dt.DeltaStateError, match="save_only_topk_weights"):
        MODELS["gpt2"].output(fresh).sum().backward()


@pytest.mark.parametrize("field,value", [("r", 0), ("num_vectors", 0), ("vector_length", -8), ("topk", 0),
                                         ("dropout", 1.0), ("init_vector_bank_bound", 0.0), ("init_logits_std", -1.0)])
def test_bad_field_values_fail_at_construction_naming_the_field(field, value):
    with pytest.raises(dt.ConfigError, match=field):
        VBLoRAConfig(**{field: value})


def test_topk_above_the_bank_size_is_refused():
    with pytest.raises(dt.ConfigError, match=r"topk \(5\) must be at most num_vectors \(4\)"):
        VBLoRAConfig(num_vectors=4, topk=5)


def test_vector_length_not_dividing_a_width_fails_at_attach_naming_module_and_shape():
    model = MODELS["bert"].build(0)
    config = VBLoRAConfig(**{**SIZES, "vector_length": 12}, targets=["query", "intermediate.dense"])
    assert_target_refused_at_attach(model, config, r"vblora cannot adapt 'bert\.encoder\.layer\.0\.attention\.self\.query' "
                                                   r"\(Linear, in=32, out=32\): vector_length=12 must divide")


@pytest.mark.parametrize("model_name", sorted(CASES))
def test_mixed_batch_rows_equal_each_row_alone(model_name):
    case = MODELS[model_name]
    targets, _ = CASES[model_name]
    model = case.build(0)
    for i, (name, r) in enumerate([("a", 3), ("b", 2), ("c", 4)]):  # ranks differ: padded in the batch
        dt.attach(model, VBLoRAConfig(**{**SIZES, "r": r}, targets=targets if name != "c" else targets[:1]), name=name)
        _randomise(model, name, i + 1)
    model.eval()
    inputs = padded_token_batch(5)
    ids = ["a", None, "b", "c", "a"]
    with torch.no_grad():
        mixed = case.output(model, {**inputs, "delta_ids": ids})
    assert_each_row_equals_it_alone(case, model, ids, inputs, mixed)


def test_linear_merge_of_two_deltas_is_the_weighted_sum_of_their_updates(tmp_path):
    folders = []
    for i in range(2):
        model = _attached("bert", name=f"d{i}", seed=i + 1)
        dt.save(model, tmp_path / f"d{i}")
        bank = model.deltas[f"d{i}"].vblora_vector_bank.detach()
        folders.append((tmp_path / f"d{i}", {p: _naive_update(u, bank, 2, 8) for p, u in _units(model, f"d{i}").items()}))
    target = MODELS["bert"].build(0)
    dt.merge_deltas(target, [f for f, _ in folders], "linear", [0.7, -0.4])
    for path in folders[0][1]:
        expected = 0.7 * folders[0][1][path] - 0.4 * folders[1][1][path]
        module = target.get_submodule(path)
        merged = module.deltas["merged"].merge_params(module, {"weight": module.weight.detach()})["weight"]
        torch.testing.assert_close(merged - module.weight.detach(), expected, rtol=1e-5, atol=1e-6)


def test_cli_trains_vblora_from_flags(tmp_path, tiny_bert, reviews_csv):
    out = train_from_the_command_line(tmp_path, tiny_bert, reviews_csv,
                                      ["--method", "vblora", "--vector-length", "8", "--num-vectors", "16"])
    config = saved_config(out)
    assert config["method"] == "vblora" and config["vector_length"] == 8 and config["num_vectors"] == 16


# ----------------------------------------------------------------------------------------- peft
try:
    import peft
except ImportError:  # pragma: no cover
    peft = None
needs_peft = pytest.mark.skipif(peft is None, reason="peft is not installed")


def _peft_config(model_name, **fields):
    targets, transposed = CASES[model_name]
    return quiet(peft.VBLoRAConfig, **SIZES, target_modules=targets, fan_in_fan_out=transposed, **fields)


@needs_peft
@pytest.mark.parametrize("model_name", sorted(CASES))
def test_trainable_count_equals_peft(model_name):
    ours = MODELS[model_name].build(0)
    report = dt.attach(ours, VBLoRAConfig(**SIZES, targets=CASES[model_name][0]))
    theirs = quiet(peft.get_peft_model, MODELS[model_name].build(0), _peft_config(model_name))
    assert report.trainable == sum(p.numel() for p in theirs.parameters() if p.requires_grad)


@needs_peft
@pytest.mark.parametrize("model_name", sorted(CASES))
@pytest.mark.parametrize("topk_only", [False, True])
def test_peft_adapter_imports_with_equal_outputs(tmp_path, model_name, topk_only):
    theirs = saved_peft_adapter(tmp_path / "peft", MODELS[model_name].build(0),
                                _peft_config(model_name, save_only_topk_weights=topk_only, vblora_dropout=0.05),
                                seed=1, scale=0.3)
    inputs = padded_token_batch(3)
    ours = MODELS[model_name].build(0)
    quiet(load_peft, ours, tmp_path / "peft")
    config = dt.get_config(ours, "default")
    assert (config.r, config.num_vectors, config.vector_length, config.save_only_topk_weights, config.dropout) == \
        (3, 10, 8, topk_only, 0.05)
    assert (last_hidden_states(ours.eval(), inputs) - last_hidden_states(theirs, inputs)).abs().max().item() <= 1e-5
    base = last_hidden_states(MODELS[model_name].build(0), inputs)
    assert (base - last_hidden_states(theirs, inputs)).abs().max().item() > 1e-3


@needs_peft
@pytest.mark.parametrize("model_name", sorted(CASES))
@pytest.mark.parametrize("topk_only", [False, True])
def test_export_loads_in_peft_with_equal_outputs(tmp_path, model_name, topk_only):
    model = _attached(model_name, save_only_topk_weights=topk_only, init_logits_std=0.5)
    save_peft(model, tmp_path / "peft")
    written = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert written["peft_type"] == "VBLORA" and written["save_only_topk_weights"] == topk_only
    assert written["init_logits_std"] == 0.5 and written["vector_length"] == 8
    theirs = quiet(peft.PeftModel.from_pretrained, MODELS[model_name].build(0), tmp_path / "peft").eval()
    inputs = padded_token_batch(3)
    assert (last_hidden_states(model, inputs) - last_hidden_states(theirs, inputs)).abs().max().item() <= 1e-5


@needs_peft
def test_peft_bias_option_is_refused_by_name(tmp_path):
    save_peft(_attached("bert"), tmp_path / "peft")
    edit_adapter_config(tmp_path / "peft", bias="vblora_only")
    with pytest.raises(dt.ConfigError, match=r"option bias='vblora_only' is not supported.*biases"):
        load_peft(MODELS["bert"].build(0), tmp_path / "peft")
