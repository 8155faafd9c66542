"""Hydra: ``y = y0 + s (B_p A_p x + B_s A_s y0)`` with ``y0 = W0 x + b0``.

References are the paper's two branches computed directly (the sequential one on the layer's
output, bias included), on BERT (``nn.Linear``), GPT-2 (``Conv1D``, weight stored
``(in, out)``) and Llama (no bias).
"""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from closed_form import expected_parameters
from deltatune.errors import ConfigError
from deltatune.interop.peft import save_peft
from deltatune.methods.hydra import HydraConfig
from tiny_models import MODELS
from method_checks import (assert_each_reloads_with_its_output, assert_rows_equal_alone,
                           assert_target_refused_at_attach, attach_randomised, delta_tensors, randomise,
                           save_each_alone, saved_config, token_batch, train_from_the_command_line)

BERT, GPT2, LLAMA = MODELS["bert"], MODELS["gpt2"], MODELS["llama"]
FFN_DOWN = {"bert": "bert.encoder.layer.{}.output.dense", "gpt2": "transformer.h.{}.mlp.c_proj",
            "llama": "model.layers.{}.mlp.down_proj"}


def _branches(tensors: dict, path: str):
    return (tensors[f"{path}.parallel_A"], tensors[f"{path}.parallel_B"],
            tensors[f"{path}.sequential_A"], tensors[f"{path}.sequential_B"])


def _naive_output(x, weight, bias, tensors, path, scale):
    """The paper's forward: the frozen layer's output plus a parallel branch on its input and a
    sequential branch on its output."""
    A_p, B_p, A_s, B_s = _branches(tensors, path)
    y0 = x @ weight.T + (bias if bias is not None else 0)
    return y0 + scale * ((x @ A_p.T) @ B_p.T + (y0 @ A_s.T) @ B_s.T)


@pytest.mark.parametrize("case_name,transposed", [("bert", False), ("gpt2", True), ("llama", False)])
def test_output_merge_and_unmerge_follow_the_papers_formula(case_name, transposed):
    case = MODELS[case_name]
    config = HydraConfig(r_parallel=2, r_sequential=3, scale=0.7)
    base, model = case.build(), case.build()
    report = dt.attach(model, config, name="h")
    paths = [FFN_DOWN[case_name].format(i) for i in range(2)]
    assert sorted(report.modules) == paths  # default targets: the feed-forward output projections
    randomise(model, "h", seed=1)
    tensors = delta_tensors(model, "h")
    for path in paths:
        module, plain = model.get_submodule(path), base.get_submodule(path)
        weight = plain.weight.T if transposed else plain.weight
        x = torch.randn(2, 5, weight.shape[1], generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            expected = _naive_output(x, weight, plain.bias, tensors, path, config.scale)
            torch.testing.assert_close(module(x), expected, rtol=1e-5, atol=1e-5)
    originals = {p: {k: t.detach().clone() for k, t in model.get_submodule(p).named_parameters(recurse=False)}
                 for p in paths}
    with torch.no_grad():
        unmerged = case.output(model)
    dt.merge(model)
    for path in paths:
        module, plain = model.get_submodule(path), base.get_submodule(path)
        A_p, B_p, A_s, B_s = _branches(tensors, path)
        W0 = plain.weight.T if transposed else plain.weight
        expected = W0 + config.scale * (B_p @ A_p + B_s @ A_s @ W0)
        torch.testing.assert_close(module.weight.T if transposed else module.weight, expected, rtol=1e-5, atol=1e-5)
        if plain.bias is not None:
            torch.testing.assert_close(module.bias, plain.bias + config.scale * B_s @ A_s @ plain.bias,
                                       rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(case.output(model), unmerged, rtol=1e-5, atol=1e-5)
    dt.unmerge(model)
    for path in paths:
        for key, value in model.get_submodule(path).named_parameters(recurse=False):
            assert torch.equal(value, originals[path][key])


def test_fold_leaves_a_plain_model_with_the_deltas_outputs():
    model = GPT2.build()
    dt.attach(model, HydraConfig(), name="h")
    randomise(model, "h", seed=4)
    with torch.no_grad():
        expected = GPT2.output(model)
    dt.fold(model)
    assert dt.list_deltas(model) == []
    with torch.no_grad():
        torch.testing.assert_close(GPT2.output(model), expected, rtol=1e-5, atol=1e-5)


def test_a_new_delta_changes_nothing_and_counts_both_branches():
    model = BERT.build()
    config = HydraConfig(r_parallel=2, r_sequential=5)
    report = dt.attach(model, config, name="h")
    with torch.no_grad():
        torch.testing.assert_close(BERT.output(model), BERT.output(BERT.build()), rtol=0, atol=0)
    module = model.get_submodule(FFN_DOWN["bert"].format(0))
    fan_in, fan_out = module.in_features, module.out_features
    assert report.trainable == 2 * (2 * (fan_in + fan_out) + 5 * 2 * fan_out) == expected_parameters(
        "hydra", model, dt.get_config(model, "h"), report.modules)


def test_task_vectors_and_a_linear_merge_of_two_deltas_equal_the_hand_computed_sum():
    model = BERT.build()
    configs = {"a": HydraConfig(), "b": HydraConfig(r_parallel=2, r_sequential=2, scale=0.5)}
    attach_randomised(model, configs)
    changes = {}
    for name, config in configs.items():
        tensors = delta_tensors(model, name)
        vector = dt.TaskVector.from_delta(model, name).dense()
        for i in range(2):
            path = FFN_DOWN["bert"].format(i)
            plain = model.get_submodule(path)
            A_p, B_p, A_s, B_s = _branches(tensors, path)
            weight = config.scale * (B_p @ A_p + B_s @ A_s @ plain.weight)
            bias = config.scale * B_s @ A_s @ plain.bias
            torch.testing.assert_close(vector[f"{path}.weight"], weight, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(vector[f"{path}.bias"], bias, rtol=1e-5, atol=1e-6)
            changes[name, path] = weight.detach(), bias.detach()
    dt.merge_deltas(model, ["a", "b"], "linear", [1.0, 0.5], name="sum")
    merged = dt.TaskVector.from_delta(model, "sum").dense()
    reference = BERT.build()
    with torch.no_grad():
        for i in range(2):
            path = FFN_DOWN["bert"].format(i)
            for j, key in enumerate(("weight", "bias")):
                total = changes["a", path][j] + 0.5 * changes["b", path][j]
                torch.testing.assert_close(merged[f"{path}.{key}"], total, rtol=1e-5, atol=1e-6)
                getattr(reference.get_submodule(path), key).add_(total)
        with dt.using(model, "sum"):
            torch.testing.assert_close(BERT.output(model), BERT.output(reference), rtol=1e-5, atol=1e-5)


def test_saved_deltas_reload_on_a_fresh_base_with_their_outputs(tmp_path):
    model = GPT2.build()
    attach_randomised(model, {"a": HydraConfig(), "b": HydraConfig(r_parallel=1, r_sequential=2, scale=2.0)})
    outputs = save_each_alone(GPT2, model, ("a", "b"), tmp_path)
    assert not torch.allclose(outputs["a"], outputs["b"])
    assert_each_reloads_with_its_output(GPT2, tmp_path, outputs)


def test_a_module_it_cannot_adapt_is_refused_at_attach_naming_it_and_its_shape():
    assert_target_refused_at_attach(BERT.build(), HydraConfig(targets=["re:bert\\.embeddings\\.LayerNorm"]),
                                    r"bert\.embeddings\.LayerNorm.*LayerNorm with weight \[32\]", name="h")


@pytest.mark.parametrize("fields,field", [
    ({"r_parallel": 0}, "r_parallel"), ({"r_sequential": -2}, "r_sequential"), ({"scale": 0.0}, "scale"),
    ({"scale": float("nan")}, "scale"), ({"r_parallel": "4"}, "r_parallel"),
])
def test_bad_fields_are_refused_naming_the_field(fields, field):
    with pytest.raises(ConfigError, match=field):
        HydraConfig(**fields)


def test_peft_export_is_refused_with_the_reason(tmp_path):
    model = BERT.build()
    dt.attach(model, HydraConfig(), name="h")
    with pytest.raises(ConfigError, match="peft has no Hydra"):
        save_peft(model, tmp_path / "p", name="h")


@pytest.mark.parametrize("case", [BERT, GPT2, LLAMA], ids=lambda c: c.name)
def test_rows_of_several_deltas_in_one_batch_equal_each_row_alone(case):
    model = case.build()
    attach_randomised(model, {"a": HydraConfig(), "b": HydraConfig(r_parallel=2, r_sequential=1, scale=0.5),
                              "c": HydraConfig(r_parallel=6, r_sequential=3)})
    rows = ["a", None, "b", "c", "a", None]
    assert_rows_equal_alone(case, model, rows, token_batch(len(rows), seed=7, attention_mask=True))


def test_mixed_batch_gradients_equal_each_delta_on_its_rows():
    model = BERT.build()
    attach_randomised(model, {"a": HydraConfig(), "b": HydraConfig(r_parallel=2, r_sequential=2)})
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
    assert mixed.keys() == separate.keys() and len(mixed) == 2 * 2 * 4
    for key in mixed:
        torch.testing.assert_close(mixed[key], separate[key], rtol=1e-5, atol=1e-5)


def test_trains_from_the_command_line(tmp_path, tiny_bert, reviews_csv):
    out = train_from_the_command_line(tmp_path, tiny_bert, reviews_csv,
                                      ["--method", "hydra", "--r-parallel", "2", "--r-sequential", "3"], steps=6)
    config = saved_config(out)
    assert config["method"] == "hydra" and config["r_parallel"] == 2 and config["r_sequential"] == 3
