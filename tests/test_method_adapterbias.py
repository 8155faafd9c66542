"""AdapterBias: ``y = W x + b + (w . x + c) v`` at the feed-forward output projection.

References are the paper's formula computed directly (a per-token scalar times the vector),
on BERT (``nn.Linear``), GPT-2 (``Conv1D``, weight stored ``(in, out)``) and Llama (no bias).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import deltatune as dt
from closed_form import expected_parameters
from deltatune.algebra import LowRankEntry
from deltatune.errors import ConfigError
from deltatune.methods.adapterbias import AdapterBiasConfig
from tiny_models import MODELS
from method_checks import (assert_each_reloads_with_its_output, assert_rows_equal_alone,
                           assert_target_refused_at_attach, attach_randomised, delta_tensors, randomise,
                           save_each_alone, saved_config, token_batch, train_from_the_command_line)

BERT, GPT2, LLAMA = MODELS["bert"], MODELS["gpt2"], MODELS["llama"]
FFN_DOWN = {"bert": "bert.encoder.layer.{}.output.dense", "gpt2": "transformer.h.{}.mlp.c_proj",
            "llama": "model.layers.{}.mlp.down_proj"}


def _naive_output(x, weight, bias, tensors, path):
    """The paper's formula: ``x W^T + b + alpha(x) v`` with ``alpha(x) = sum_i w_i x_i + c``, per token."""
    w, v = tensors[f"{path}.alpha.weight"], tensors[f"{path}.vector"]
    c = tensors.get(f"{path}.alpha.bias", torch.zeros(1))
    alpha = (x * w).sum(-1, keepdim=True) + c  # one scalar per token
    base = x @ weight.T + (bias if bias is not None else 0)
    return base + alpha * v


@pytest.mark.parametrize("case_name,transposed", [("bert", False), ("gpt2", True), ("llama", False)])
def test_output_merge_and_unmerge_follow_the_papers_formula(case_name, transposed):
    case = MODELS[case_name]
    base, model = case.build(), case.build()
    report = dt.attach(model, AdapterBiasConfig(), name="ab")
    paths = [FFN_DOWN[case_name].format(i) for i in range(2)]
    assert sorted(report.modules) == paths  # default targets: the feed-forward output projections
    randomise(model, "ab", seed=1)
    tensors = delta_tensors(model, "ab")
    assert (f"{paths[0]}.alpha.bias" in tensors) == (case_name != "llama")  # Llama's down_proj has no bias
    for path in paths:
        module, plain = model.get_submodule(path), base.get_submodule(path)
        weight = plain.weight.T if transposed else plain.weight
        x = torch.randn(2, 5, weight.shape[1], generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            expected = _naive_output(x, weight, plain.bias, tensors, path)
            torch.testing.assert_close(module(x), expected, rtol=1e-5, atol=1e-5)
    originals = {p: {k: t.detach().clone() for k, t in model.get_submodule(p).named_parameters(recurse=False)}
                 for p in paths}
    with torch.no_grad():
        unmerged = case.output(model)
    dt.merge(model)
    for path in paths:
        module, plain = model.get_submodule(path), base.get_submodule(path)
        w, v = tensors[f"{path}.alpha.weight"], tensors[f"{path}.vector"]
        weight = (plain.weight.T if transposed else plain.weight) + torch.outer(v, w)
        torch.testing.assert_close(module.weight.T if transposed else module.weight, weight, rtol=1e-5, atol=1e-6)
        if plain.bias is not None:
            torch.testing.assert_close(module.bias, plain.bias + tensors[f"{path}.alpha.bias"] * v)
    with torch.no_grad():
        torch.testing.assert_close(case.output(model), unmerged, rtol=1e-5, atol=1e-5)
    dt.unmerge(model)
    for path in paths:
        for key, value in model.get_submodule(path).named_parameters(recurse=False):
            assert torch.equal(value, originals[path][key])


def test_a_new_delta_changes_nothing_and_only_the_vector_and_alpha_train():
    model = BERT.build()
    report = dt.attach(model, AdapterBiasConfig(), name="ab")
    with torch.no_grad():
        torch.testing.assert_close(BERT.output(model), BERT.output(BERT.build()), rtol=0, atol=0)
    names = {k.rsplit(".", 1)[1] for k, _ in dt.delta_parameters(model, "ab")}
    assert names == {"vector", "weight", "bias"}
    module = model.get_submodule(FFN_DOWN["bert"].format(0))
    assert report.trainable == 2 * (module.in_features + module.out_features + 1) == expected_parameters(
        "adapterbias", model, dt.get_config(model, "ab"), report.modules)


def test_without_alpha_bias_the_change_is_rank_one_and_the_bias_is_untouched():
    model = GPT2.build()
    dt.attach(model, AdapterBiasConfig(alpha_bias=False), name="ab")
    randomise(model, "ab", seed=2)
    tensors = delta_tensors(model, "ab")
    vector = dt.TaskVector.from_delta(model, "ab")
    path = FFN_DOWN["gpt2"].format(0)
    assert isinstance(vector[f"{path}.weight"], LowRankEntry) and f"{path}.bias" not in vector
    change = torch.outer(tensors[f"{path}.vector"], tensors[f"{path}.alpha.weight"])
    torch.testing.assert_close(vector.dense()[f"{path}.weight"], change.T)  # Conv1D stores (in, out)


def test_task_vectors_and_a_linear_merge_of_two_deltas_equal_the_hand_computed_sum(tmp_path):
    model = BERT.build()
    attach_randomised(model, {"a": AdapterBiasConfig(), "b": AdapterBiasConfig()})
    changes = {}
    for name in ("a", "b"):
        tensors = delta_tensors(model, name)
        vector = dt.TaskVector.from_delta(model, name).dense()
        for i in range(2):
            path = FFN_DOWN["bert"].format(i)
            v = tensors[f"{path}.vector"]
            weight, bias = torch.outer(v, tensors[f"{path}.alpha.weight"]), tensors[f"{path}.alpha.bias"] * v
            torch.testing.assert_close(vector[f"{path}.weight"], weight)
            torch.testing.assert_close(vector[f"{path}.bias"], bias)
            changes[name, path] = weight, bias
    dt.merge_deltas(model, ["a", "b"], "linear", [1.0, 0.5], name="sum")
    merged = dt.TaskVector.from_delta(model, "sum").dense()
    for i in range(2):
        path = FFN_DOWN["bert"].format(i)
        for j, key in enumerate(("weight", "bias")):
            torch.testing.assert_close(merged[f"{path}.{key}"], changes["a", path][j] + 0.5 * changes["b", path][j],
                                       rtol=1e-5, atol=1e-6)
    reference = BERT.build()
    with torch.no_grad():
        for i in range(2):
            path = FFN_DOWN["bert"].format(i)
            reference.get_submodule(path).weight.add_(merged[f"{path}.weight"])
            reference.get_submodule(path).bias.add_(merged[f"{path}.bias"])
        with dt.using(model, "sum"):
            torch.testing.assert_close(BERT.output(model), BERT.output(reference), rtol=1e-5, atol=1e-5)


def test_a_shared_alpha_is_one_map_per_input_width_and_both_layers_train_it(tmp_path):
    model = BERT.build()
    report = dt.attach(model, AdapterBiasConfig(share_alpha=True), name="ab")
    tensors = dict(dt.delta_parameters(model, "ab"))
    module = model.get_submodule(FFN_DOWN["bert"].format(0))
    fan_in, fan_out = module.in_features, module.out_features
    assert {k for k in tensors if k.startswith("maps.")} == {f"maps.in{fan_in}.weight", f"maps.in{fan_in}.bias"}
    assert report.trainable == fan_in + 1 + 2 * fan_out == expected_parameters(
        "adapterbias", model, dt.get_config(model, "ab"), report.modules)
    randomise(model, "ab", seed=2)
    all_tensors = delta_tensors(model, "ab")
    w, c = all_tensors[f"maps.in{fan_in}.weight"], all_tensors[f"maps.in{fan_in}.bias"]
    for i in range(2):  # each layer: its own v, the shared w and c
        path = FFN_DOWN["bert"].format(i)
        plain = BERT.build().get_submodule(path)
        x = torch.randn(3, fan_in, generator=torch.Generator().manual_seed(i))
        with torch.no_grad():
            expected = F.linear(x, plain.weight, plain.bias) + ((x * w).sum(-1, keepdim=True) + c) * all_tensors[
                f"{path}.vector"]
            torch.testing.assert_close(model.get_submodule(path)(x), expected, rtol=1e-5, atol=1e-5)
    weight = tensors[f"maps.in{fan_in}.weight"]
    x = torch.randn(3, fan_in, generator=torch.Generator().manual_seed(4))
    parts = []
    for i in range(2):
        weight.grad = None
        model.get_submodule(FFN_DOWN["bert"].format(i))(x).sum().backward()
        parts.append(weight.grad.clone())
    weight.grad = None
    sum(model.get_submodule(FFN_DOWN["bert"].format(i))(x).sum() for i in range(2)).backward()
    torch.testing.assert_close(weight.grad, parts[0] + parts[1])
    outputs = save_each_alone(BERT, model, ("ab",), tmp_path)
    assert_each_reloads_with_its_output(BERT, tmp_path, outputs)


def test_saved_deltas_reload_on_a_fresh_base_with_their_outputs(tmp_path):
    model = GPT2.build()
    attach_randomised(model, {"a": AdapterBiasConfig(), "b": AdapterBiasConfig(alpha_bias=False)})
    outputs = save_each_alone(GPT2, model, ("a", "b"), tmp_path)
    assert not torch.allclose(outputs["a"], outputs["b"])
    assert_each_reloads_with_its_output(GPT2, tmp_path, outputs)


def test_a_module_it_cannot_adapt_is_refused_at_attach_naming_it_and_its_shape():
    assert_target_refused_at_attach(BERT.build(), AdapterBiasConfig(targets=["re:bert\\.embeddings\\.LayerNorm"]),
                                    r"bert\.embeddings\.LayerNorm.*LayerNorm with weight \[32\]", name="ab")


@pytest.mark.parametrize("fields,field", [({"alpha_bias": "yes"}, "alpha_bias"), ({"targets": 3.5}, "targets")])
def test_bad_fields_are_refused_naming_the_field(fields, field):
    with pytest.raises(ConfigError, match=field):
        AdapterBiasConfig(**fields)


@pytest.mark.parametrize("case", [BERT, GPT2, LLAMA], ids=lambda c: c.name)
def test_rows_of_several_deltas_in_one_batch_equal_each_row_alone(case):
    model = case.build()
    attach_randomised(model, {"a": AdapterBiasConfig(), "b": AdapterBiasConfig(alpha_bias=False),
                              "c": AdapterBiasConfig(share_alpha=True)})
    rows = ["a", None, "b", "c", "a", None]
    assert_rows_equal_alone(case, model, rows, token_batch(len(rows), seed=7, attention_mask=True))


def test_mixed_batch_gradients_equal_each_delta_on_its_rows():
    model = BERT.build()
    attach_randomised(model, {"a": AdapterBiasConfig(), "b": AdapterBiasConfig(alpha_bias=False, share_alpha=True)})
    rows = ["a", "b", None, "a"]
    ids = torch.randint(1, 100, (4, 5), generator=torch.Generator().manual_seed(3))
    with dt.route(model, rows):
        BERT.output(model, {"input_ids": ids}).sum().backward()
    mixed = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    for name in ("a", "b"):
        picked = [i for i, n in enumerate(rows) if n == name]
        with dt.using(model, name):
            BERT.output(model, {"input_ids": ids[picked]}).sum().backward()
    separate = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert mixed.keys() == separate.keys() and len(mixed) == 2 * 3 + 2 + 1  # "a": v, w, c per module; "b": v each, one w
    for key in mixed:
        torch.testing.assert_close(mixed[key], separate[key], rtol=1e-5, atol=1e-5)


def test_trains_from_the_command_line(tmp_path, tiny_bert, reviews_csv):
    flags = ["--method", "adapterbias", "--alpha-bias", "false", "--share-alpha", "true"]
    out = train_from_the_command_line(tmp_path, tiny_bert, reviews_csv, flags, steps=6)
    config = saved_config(out)
    assert config["method"] == "adapterbias" and config["alpha_bias"] is False and config["share_alpha"] is True
