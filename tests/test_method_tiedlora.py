"""Tied-LoRA: ``dW_l = (alpha / r) diag(v_l) B diag(u_l) A`` with ``A``, ``B`` shared by a kind.

References are the paper's formula written out with explicit diagonal matrices, on BERT
(``nn.Linear``) and GPT-2 (``Conv1D``, weight stored ``(in, out)``).
"""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

import deltatune as dt
from closed_form import expected_parameters
from deltatune.algebra import LowRankEntry
from deltatune.errors import ConfigError
from deltatune.methods.tiedlora import TiedLoRAConfig
from tiny_models import MODELS
from method_checks import (assert_each_reloads_with_its_output, assert_rows_equal_alone,
                           assert_target_refused_at_attach, attach_randomised, delta_tensors, randomise as _randomise,
                           save_each_alone, saved_config, token_batch, train_from_the_command_line)

BERT, GPT2 = MODELS["bert"], MODELS["gpt2"]
QUERIES = [f"bert.encoder.layer.{i}.attention.self.query" for i in range(2)]


def _naive_delta(tensors: dict, path: str, kind: str, config: TiedLoRAConfig, fan_out: int) -> torch.Tensor:
    """The paper's formula with explicit diagonal matrices, ``(out, in)``."""
    A, B = tensors[f"groups.{kind}.A"], tensors[f"groups.{kind}.B"]
    u = tensors.get(f"{path}.u", torch.ones(config.r))
    v = tensors.get(f"{path}.v", torch.ones(fan_out))
    return config.alpha / config.r * torch.diag(v) @ B @ torch.diag(u) @ A


@pytest.mark.parametrize("case,paths,kind,transposed", [
    (BERT, QUERIES, "q_32x32", False),
    (GPT2, [f"transformer.h.{i}.attn.c_attn" for i in range(2)], "qkv_32x96", True),
])
@pytest.mark.parametrize("trainable", ["ABuv", "ABu", "uv"])
def test_each_layer_changes_by_the_papers_formula(case, paths, kind, transposed, trainable):
    config = TiedLoRAConfig(r=3, alpha=5.0, trainable=trainable, targets=paths)
    base = case.build()
    model = case.build()
    dt.attach(model, config, name="t")
    _randomise(model, "t", seed=1)
    tensors = delta_tensors(model, "t")
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3))
    for path in paths:
        module, plain = model.get_submodule(path), base.get_submodule(path)
        weight = plain.weight.T if transposed else plain.weight
        delta = _naive_delta(tensors, path, kind, config, weight.shape[0])
        with torch.no_grad():
            expected = x @ (weight + delta).T + plain.bias
            torch.testing.assert_close(module(x), expected, rtol=1e-5, atol=1e-5)
    dt.merge(model)
    for path in paths:
        plain = base.get_submodule(path)
        weight = plain.weight.T if transposed else plain.weight
        delta = _naive_delta(tensors, path, kind, config, weight.shape[0])
        merged = model.get_submodule(path).weight
        torch.testing.assert_close(merged.T if transposed else merged, weight + delta, rtol=1e-5, atol=1e-6)


def test_layers_of_a_kind_share_one_pair_and_both_train_it():
    model = BERT.build()
    report = dt.attach(model, TiedLoRAConfig(r=4), name="t")
    tensors = dict(dt.delta_parameters(model, "t"))
    assert {k for k in tensors if k.startswith("groups.")} == {
        "groups.q_32x32.A", "groups.q_32x32.B", "groups.v_32x32.A", "groups.v_32x32.B"}
    units = [model.get_submodule(p).deltas["t"] for p in QUERIES]
    assert units[0]._shared[0] is units[1]._shared[0]
    # shared tensors counted once: 2 kinds x (4*32 + 32*4), 4 modules x (4 + 32)
    assert report.trainable == 2 * 256 + 4 * 36 == dt.count_parameters(model, trainable_only=True)


def test_shared_gradient_is_the_sum_over_layers():
    model = BERT.build()
    dt.attach(model, TiedLoRAConfig(r=4, targets=QUERIES), name="t")
    _randomise(model, "t", seed=2)
    A = dict(dt.delta_parameters(model, "t"))["groups.q_32x32.A"]
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(4))
    parts = []
    for path in QUERIES:
        A.grad = None
        model.get_submodule(path)(x).sum().backward()
        parts.append(A.grad.clone())
    A.grad = None
    (model.get_submodule(QUERIES[0])(x).sum() + model.get_submodule(QUERIES[1])(x).sum()).backward()
    torch.testing.assert_close(A.grad, parts[0] + parts[1])
    assert parts[0].abs().sum() > 0 and not torch.allclose(parts[0], parts[1])


def test_frozen_factors_are_buffers_saved_with_the_delta(tmp_path):
    model = BERT.build()
    report = dt.attach(model, TiedLoRAConfig(r=4, trainable="uv"), name="t")
    names = {k for k, _ in dt.delta_parameters(model, "t")}
    assert not any(k.startswith("groups.") for k in names)  # A and B do not train
    assert report.trainable == 4 * (4 + 32) == expected_parameters("tiedlora", model, dt.get_config(model, "t"),
                                                                    report.modules)
    with torch.no_grad():  # identity at init: v starts at zero when B is a frozen random matrix
        torch.testing.assert_close(BERT.output(model), BERT.output(BERT.build()), rtol=0, atol=1e-6)
    _randomise(model, "t", seed=5)
    expected = BERT.output(model)
    dt.save(model, tmp_path / "d")
    stored = safetensors.torch.load_file(str(tmp_path / "d" / "delta.safetensors"))
    assert {"groups.q_32x32.A", "groups.q_32x32.B"} <= stored.keys()
    fresh = BERT.build()
    torch.manual_seed(99)  # other random draws: the frozen pair must come from the file
    dt.load(fresh, tmp_path / "d")
    torch.testing.assert_close(BERT.output(fresh), expected, rtol=0, atol=0)


def test_two_deltas_have_their_own_shared_tensors(tmp_path):
    model = BERT.build()
    dt.attach(model, TiedLoRAConfig(r=4), name="a")
    dt.attach(model, TiedLoRAConfig(r=2), name="b")
    a, b = dict(dt.delta_parameters(model, "a")), dict(dt.delta_parameters(model, "b"))
    assert not {id(p) for p in a.values()} & {id(p) for p in b.values()}
    assert a["groups.q_32x32.A"].shape == (4, 32) and b["groups.q_32x32.A"].shape == (2, 32)
    _randomise(model, "a", 1)
    _randomise(model, "b", 2)
    outputs = save_each_alone(BERT, model, ("a", "b"), tmp_path)
    assert not torch.allclose(outputs["a"], outputs["b"])
    assert_each_reloads_with_its_output(BERT, tmp_path, outputs)


def test_a_module_it_cannot_adapt_is_refused_at_attach_naming_it():
    assert_target_refused_at_attach(BERT.build(), TiedLoRAConfig(targets=["re:bert\\.embeddings\\.LayerNorm"]),
                                    r"bert\.embeddings\.LayerNorm.*LayerNorm with weight \[32\]", name="t")


@pytest.mark.parametrize("fields,field", [
    ({"r": 0}, "r"), ({"alpha": 0.0}, "alpha"), ({"trainable": "ABx"}, "trainable"),
    ({"trainable": "AAu"}, "trainable"), ({"trainable": ""}, "trainable"), ({"trainable": "Au"}, "trainable"),
])
def test_bad_fields_are_refused_naming_the_field(fields, field):
    with pytest.raises(ConfigError, match=field):
        TiedLoRAConfig(**fields)


def test_rows_of_several_deltas_in_one_batch_equal_each_row_alone():
    for case in (BERT, GPT2):
        model = case.build()
        attach_randomised(model, {"a": TiedLoRAConfig(r=4), "b": TiedLoRAConfig(r=2, alpha=3.0, trainable="ABu"),
                                  "c": TiedLoRAConfig(r=3, trainable="uv")})
        rows = ["a", None, "b", "c", "a", None]
        assert_rows_equal_alone(case, model, rows, token_batch(len(rows), seed=7, attention_mask=True))


def test_mixed_batch_gradients_equal_each_delta_on_its_rows():
    model = BERT.build()
    dt.attach(model, TiedLoRAConfig(r=4), name="a")
    dt.attach(model, TiedLoRAConfig(r=2), name="b")
    _randomise(model, "a", 1)
    _randomise(model, "b", 2)
    rows = ["a", "b", None, "a"]
    inputs = {"input_ids": torch.randint(1, 100, (4, 5), generator=torch.Generator().manual_seed(3))}
    with dt.route(model, rows):
        BERT.output(model, inputs).sum().backward()
    mixed = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    for name in ("a", "b"):
        picked = [i for i, n in enumerate(rows) if n == name]
        with dt.using(model, name):
            BERT.output(model, {"input_ids": inputs["input_ids"][picked]}).sum().backward()
    separate = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert mixed.keys() == separate.keys() and len(mixed) > 0
    for key in mixed:
        torch.testing.assert_close(mixed[key], separate[key], rtol=1e-5, atol=1e-5)


def test_task_vector_is_low_rank_and_merging_two_deltas_sums_the_formula():
    model = GPT2.build()
    paths = [f"transformer.h.{i}.attn.c_attn" for i in range(2)]
    configs = {"a": TiedLoRAConfig(r=4, alpha=8.0), "b": TiedLoRAConfig(r=2, alpha=2.0, trainable="ABu")}
    for i, (name, config) in enumerate(configs.items()):
        dt.attach(model, config, name=name)
        _randomise(model, name, i + 1)
    naive = {name: {p: _naive_delta(delta_tensors(model, name), p, "qkv_32x96", configs[name], 96) for p in paths}
             for name in configs}
    vector = dt.TaskVector.from_delta(model, "a")
    assert all(isinstance(vector[f"{p}.weight"], LowRankEntry) for p in paths)
    for p in paths:  # Conv1D: the change to the stored (in, out) weight is dW^T
        torch.testing.assert_close(vector.dense()[f"{p}.weight"], naive["a"][p].T, rtol=1e-5, atol=1e-6)
    dt.merge_deltas(model, ["a", "b"], "linear", [1.0, 0.5], name="sum")
    merged = dt.TaskVector.from_delta(model, "sum").dense()
    for p in paths:
        torch.testing.assert_close(merged[f"{p}.weight"], (naive["a"][p] + 0.5 * naive["b"][p]).T,
                                   rtol=1e-5, atol=1e-6)


def test_trains_from_the_command_line(tmp_path, tiny_bert, reviews_csv):
    out = train_from_the_command_line(tmp_path, tiny_bert, reviews_csv,
                                      ["--method", "tiedlora", "--r", "2", "--trainable", "ABu"], steps=12)
    config = saved_config(out)
    assert config["method"] == "tiedlora" and config["r"] == 2 and config["trainable"] == "ABu"
