"""MSPLoRA: ``dW_l = s_g B_g A_g + s_m B_m A_m + s_l B_l A_l`` (global, group of layers, layer).

References are the three LoRA products written out per module, with the group found by hand
from the module's layer number, on BERT (``nn.Linear``) and GPT-2 (``Conv1D``).
"""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from closed_form import expected_parameters
from deltatune.algebra import LowRankEntry
from deltatune.errors import ConfigError
from deltatune.methods.msplora import MSPLoRAConfig
from deltatune.methods.tiedlora import TiedLoRAConfig
from tiny_models import MODELS
from method_checks import (assert_each_reloads_with_its_output, assert_rows_equal_alone,
                           assert_target_refused_at_attach, attach_randomised, delta_tensors, randomise as _randomise,
                           save_each_alone, saved_config, token_batch, train_from_the_command_line)

BERT, GPT2 = MODELS["bert"], MODELS["gpt2"]
BERT_PATHS = [f"bert.encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "value")]
GPT2_PATHS = [f"transformer.h.{i}.attn.c_attn" for i in range(2)]


def _layer(path: str) -> int:
    return int(next(part for part in path.split(".") if part.isdigit()))


def _naive_delta(tensors: dict, path: str, kind: str, config: MSPLoRAConfig) -> torch.Tensor:
    """Three LoRA products summed, ``(out, in)``: the kind's, its group's, the module's."""
    group = _layer(path) // config.group_size
    glob = config.alpha / config.r_global * tensors[f"groups.{kind}.B"] @ tensors[f"groups.{kind}.A"]
    mid = config.alpha / config.r_group * tensors[f"groups.{kind}_group{group}.B"] @ tensors[f"groups.{kind}_group{group}.A"]
    own = config.alpha / config.r_layer * tensors[f"{path}.B"] @ tensors[f"{path}.A"]
    return glob + mid + own


def _kind(path: str) -> str:
    return {"query": "q_32x32", "value": "v_32x32", "c_attn": "qkv_32x96"}[path.rsplit(".", 1)[1]]


@pytest.mark.parametrize("case,paths,transposed", [(BERT, BERT_PATHS, False), (GPT2, GPT2_PATHS, True)])
@pytest.mark.parametrize("group_size", [1, 2])
def test_each_module_changes_by_the_sum_of_three_scales(case, paths, transposed, group_size):
    config = MSPLoRAConfig(r_global=4, r_group=3, r_layer=2, group_size=group_size, alpha=6.0, targets=paths)
    base, model = case.build(), case.build()
    dt.attach(model, config, name="m")
    _randomise(model, "m", seed=1)
    tensors = delta_tensors(model, "m")
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3))
    deltas = {}
    for path in paths:
        plain = base.get_submodule(path)
        weight = plain.weight.T if transposed else plain.weight
        deltas[path] = _naive_delta(tensors, path, _kind(path), config)
        with torch.no_grad():
            torch.testing.assert_close(model.get_submodule(path)(x), x @ (weight + deltas[path]).T + plain.bias,
                                       rtol=1e-5, atol=1e-5)
    dt.merge(model)
    for path in paths:
        plain, merged = base.get_submodule(path), model.get_submodule(path).weight
        weight = plain.weight.T if transposed else plain.weight
        torch.testing.assert_close(merged.T if transposed else merged, weight + deltas[path], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("group_size,groups", [(1, 2), (2, 1), (5, 1)])
def test_global_pair_is_shared_by_a_kind_and_group_pairs_by_consecutive_layers(group_size, groups):
    model = BERT.build()
    config = MSPLoRAConfig(r_global=4, r_group=2, r_layer=1, group_size=group_size)
    report = dt.attach(model, config, name="m")
    shared = {k for k, _ in dt.delta_parameters(model, "m") if k.startswith("groups.")}
    assert {k.split(".")[1] for k in shared} == {"q_32x32", "v_32x32"} | {
        f"{kind}_group{g}" for kind in ("q_32x32", "v_32x32") for g in range(groups)}
    queries = [model.get_submodule(f"bert.encoder.layer.{i}.attention.self.query").deltas["m"] for i in range(2)]
    assert queries[0]._shared[0] is queries[1]._shared[0]
    assert (queries[0]._shared[1] is queries[1]._shared[1]) == (groups == 1)
    # by hand: 2 kinds x 4 x 64 (global) + 2 kinds x groups x 2 x 64 (group) + 4 modules x 1 x 64 (own)
    expected = 2 * 4 * 64 + 2 * groups * 2 * 64 + 4 * 64
    assert report.trainable == expected == expected_parameters("msplora", model, config, report.modules)
    assert report.trainable == dt.count_parameters(model, trainable_only=True)


def test_every_b_starts_at_zero_and_every_scale_trains():
    model = BERT.build()
    dt.attach(model, MSPLoRAConfig(r_global=4, r_group=2, r_layer=1), name="m")
    params = dict(dt.delta_parameters(model, "m"))
    assert all(torch.count_nonzero(p) == 0 for k, p in params.items() if k.endswith("B"))
    model.train()
    optimizer = torch.optim.SGD(params.values(), lr=0.1)
    BERT.output(model).pow(2).mean().backward()
    optimizer.step()
    assert all(torch.count_nonzero(p) > 0 for k, p in params.items() if k.endswith("B"))


def test_two_deltas_have_their_own_shared_tensors(tmp_path):
    model = BERT.build()
    dt.attach(model, MSPLoRAConfig(), name="a")
    dt.attach(model, MSPLoRAConfig(r_global=2, r_group=2, r_layer=2, group_size=1), name="b")
    a, b = dict(dt.delta_parameters(model, "a")), dict(dt.delta_parameters(model, "b"))
    assert not {id(p) for p in a.values()} & {id(p) for p in b.values()}
    _randomise(model, "a", 1)
    _randomise(model, "b", 2)
    outputs = save_each_alone(BERT, model, ("a", "b"), tmp_path)
    assert_each_reloads_with_its_output(BERT, tmp_path, outputs)


def test_a_module_it_cannot_adapt_is_refused_at_attach_naming_it():
    assert_target_refused_at_attach(GPT2.build(), MSPLoRAConfig(targets=["re:transformer\\.ln_f"]),
                                    r"transformer\.ln_f.*LayerNorm with weight \[32\]", name="m")


@pytest.mark.parametrize("fields,field", [
    ({"r_global": 0}, "r_global"), ({"r_layer": -1}, "r_layer"), ({"group_size": 0}, "group_size"),
    ({"alpha": 0.0}, "alpha"), ({"r_global": 2, "r_group": 4}, "r_group"), ({"r_layer": 8}, "r_layer"),
])
def test_bad_fields_are_refused_naming_the_field(fields, field):
    with pytest.raises(ConfigError, match=field):
        MSPLoRAConfig(**fields)


@pytest.mark.parametrize("case", [BERT, GPT2], ids=["bert", "gpt2"])
def test_rows_of_several_deltas_in_one_batch_equal_each_row_alone(case):
    model = case.build()
    attach_randomised(model, {"a": MSPLoRAConfig(),
                              "b": MSPLoRAConfig(r_global=3, r_group=2, r_layer=2, group_size=1, alpha=3.0),
                              "tied": TiedLoRAConfig(r=2)})
    rows = ["a", None, "b", "tied", "a", "b"]
    assert_rows_equal_alone(case, model, rows, token_batch(len(rows), seed=7))


def test_task_vector_is_low_rank_and_merging_two_deltas_sums_the_formula():
    model = BERT.build()
    configs = {"a": MSPLoRAConfig(alpha=8.0), "b": MSPLoRAConfig(r_global=2, r_group=2, r_layer=1, group_size=1)}
    for i, (name, config) in enumerate(configs.items()):
        dt.attach(model, config, name=name)
        _randomise(model, name, i + 1)
    naive = {name: {p: _naive_delta(delta_tensors(model, name), p, _kind(p), configs[name]) for p in BERT_PATHS}
             for name in configs}
    vector = dt.TaskVector.from_delta(model, "a")
    assert set(vector.keys()) == {f"{p}.weight" for p in BERT_PATHS}
    assert all(isinstance(vector[f"{p}.weight"], LowRankEntry) for p in BERT_PATHS)
    dt.merge_deltas(model, ["a", "b"], "linear", [1.0, -2.0], name="mix")
    merged = dt.TaskVector.from_delta(model, "mix").dense()
    for p in BERT_PATHS:
        torch.testing.assert_close(vector.dense()[f"{p}.weight"], naive["a"][p], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(merged[f"{p}.weight"], naive["a"][p] - 2.0 * naive["b"][p], rtol=1e-5, atol=1e-6)


def test_trains_from_the_command_line(tmp_path, tiny_bert, reviews_csv):
    out = train_from_the_command_line(tmp_path, tiny_bert, reviews_csv, ["--method", "msplora", "--r-global", "4",
                                      "--r-group", "2", "--r-layer", "1", "--group-size", "1"], steps=12)
    config = saved_config(out)
    assert (config["method"], config["r_global"], config["r_group"], config["r_layer"], config["group_size"]) == (
        "msplora", 4, 2, 1, 1)
