"""Composition blocks: each block against a reference computed by hand from separate forward
passes (one delta active at a time), plus Fuse training, serialisation and validation errors.
"""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import MODELS
from torch import nn

import deltatune as dt
from deltatune.errors import ConfigError, DeltaStateError, NotApplicableError

TOL = {"atol": 1e-5, "rtol": 1e-5}


def _randomise(model, name, seed, scale=0.3):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in dt.delta_parameters(model, name):
            p.add_(scale * torch.randn(p.shape, generator=generator))


def _one_layer(**deltas):
    """``nn.Sequential(Linear(8, 8))`` with the given deltas at its only layer, randomised."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8)).eval()
    for i, (name, config) in enumerate(deltas.items()):
        dt.attach(model, config, name=name)
        _randomise(model, name, i + 1)
    return model


def _bert(**deltas):
    case = MODELS["bert"]
    model = case.build()
    for i, (name, config) in enumerate(deltas.items()):
        dt.attach(model, config, name=name)
        _randomise(model, name, i + 1)
    return case, model


def _bert_inputs(rows, seed=7):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (rows, 6), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _with(model, names, *call):
    with torch.no_grad(), dt.using(model, names):
        return model(*call)


X = torch.randn(5, 8, generator=torch.Generator().manual_seed(3))
ADAPTER = dt.AdapterConfig(targets=["0"], bottleneck=4)
IA3_INPUT = dt.IA3Config(targets=["0"], feedforward=["0"])
LORA_ONE = dt.LoRAConfig(targets=["0"], r=2)
BERT_LORA = dt.LoRAConfig(r=2)
BERT_IA3 = dt.IA3Config()  # keys, values, and the feed-forward input
BERT_ADAPTER = dt.AdapterConfig(bottleneck=4)


# --- Parallel and Average -------------------------------------------------------------------


def test_parallel_of_two_adapters_is_the_weighted_sum_of_their_changes():
    model = _one_layer(a=ADAPTER, b=ADAPTER)
    base, out_a, out_b = _with(model, (), X), _with(model, "a", X), _with(model, "b", X)
    with torch.no_grad(), dt.compose(model, dt.Parallel("a", "b", weights=[0.7, -0.4])):
        composed = model(X)
    torch.testing.assert_close(composed, base + 0.7 * (out_a - base) - 0.4 * (out_b - base), **TOL)


def test_parallel_of_input_scalings_combines_the_changed_inputs():
    model = _one_layer(a=IA3_INPUT, b=IA3_INPUT)
    layer = model[0]
    scale_a, scale_b = (layer.deltas[n].ia3_l.detach() for n in "ab")
    mixed_input = X * (1 + 0.5 * (scale_a - 1) + 2.0 * (scale_b - 1))  # by hand, at the input
    expected = torch.nn.functional.linear(mixed_input, layer.weight, layer.bias)
    with torch.no_grad(), dt.compose(model, dt.Parallel("a", "b", weights=[0.5, 2.0])):
        torch.testing.assert_close(model(X), expected, **TOL)


def test_average_is_the_mean_of_the_outputs():
    model = _one_layer(a=ADAPTER, b=LORA_ONE, c=ADAPTER)
    outputs = [_with(model, n, X) for n in "abc"]
    with torch.no_grad(), dt.compose(model, dt.Average("a", "b", "c")):
        composed = model(X)
    torch.testing.assert_close(composed, sum(outputs) / 3, **TOL)


def test_parallel_without_weights_adds_every_change():
    model = _one_layer(a=LORA_ONE, b=ADAPTER)
    base, out_a, out_b = _with(model, (), X), _with(model, "a", X), _with(model, "b", X)
    with torch.no_grad(), dt.compose(model, dt.Parallel("a", "b")):
        torch.testing.assert_close(model(X), out_a + out_b - base, **TOL)


# --- Stack -------------------------------------------------------------------------------


def test_stack_equals_the_same_deltas_active_in_that_order():
    case, model = _bert(lora=BERT_LORA, ia3=BERT_IA3, adapter=BERT_ADAPTER)
    inputs = _bert_inputs(3)
    for order in (("adapter", "lora", "ia3"), ("ia3", "adapter", "lora")):
        with torch.no_grad(), dt.using(model, order):
            expected = case.output(model, inputs)
        with torch.no_grad(), dt.compose(model, dt.Stack(*order)):
            torch.testing.assert_close(case.output(model, inputs), expected, rtol=0, atol=0)


def test_stack_holds_a_prefix_delta_like_the_active_set():
    case, model = _bert(lora=BERT_LORA, prefix=dt.PrefixConfig(num_virtual_tokens=2))
    inputs = _bert_inputs(2)
    with torch.no_grad(), dt.using(model, ["prefix", "lora"]):
        expected = case.output(model, inputs)
    with torch.no_grad(), dt.compose(model, dt.Stack("prefix", "lora")):
        torch.testing.assert_close(case.output(model, inputs), expected, rtol=0, atol=0)


# --- BatchSplit ----------------------------------------------------------------------------


def _rows_alone(case, model, inputs, rows, names):
    part = {k: v[rows] for k, v in inputs.items()}
    with torch.no_grad(), dt.using(model, names):
        return case.output(model, part)


def test_batch_split_of_names_gives_each_row_block_its_delta_alone():
    case, model = _bert(lora=BERT_LORA, ia3=BERT_IA3, adapter=BERT_ADAPTER)
    inputs = _bert_inputs(6)
    with torch.no_grad(), dt.compose(model, dt.BatchSplit("ia3", "lora", "adapter", sizes=[2, 1, 3])):
        split = case.output(model, inputs)
    torch.testing.assert_close(split[0:2], _rows_alone(case, model, inputs, slice(0, 2), "ia3"), **TOL)
    torch.testing.assert_close(split[2:3], _rows_alone(case, model, inputs, slice(2, 3), "lora"), **TOL)
    torch.testing.assert_close(split[3:6], _rows_alone(case, model, inputs, slice(3, 6), "adapter"), **TOL)


def test_nested_batch_split_runs_each_child_on_its_rows():
    case, model = _bert(lora=BERT_LORA, ia3=BERT_IA3, adapter=BERT_ADAPTER)
    inputs = _bert_inputs(5)
    block = dt.BatchSplit(dt.Stack("ia3", "lora"), "adapter", "lora", sizes=[2, 2, 1])
    with torch.no_grad(), dt.compose(model, block):
        split = case.output(model, inputs)
    torch.testing.assert_close(split[0:2], _rows_alone(case, model, inputs, slice(0, 2), ["ia3", "lora"]), **TOL)
    torch.testing.assert_close(split[2:4], _rows_alone(case, model, inputs, slice(2, 4), "adapter"), **TOL)
    torch.testing.assert_close(split[4:5], _rows_alone(case, model, inputs, slice(4, 5), "lora"), **TOL)


def test_batch_split_inside_a_batch_split_and_a_parallel_child():
    model = _one_layer(a=ADAPTER, b=LORA_ONE, c=IA3_INPUT)
    base, out_a, out_b = _with(model, (), X), _with(model, "a", X), _with(model, "b", X)
    out_c = _with(model, "c", X)
    block = dt.BatchSplit(dt.Parallel("a", "b", weights=[0.5, 0.5]), dt.BatchSplit("c", "a", sizes=[1, 1]), sizes=[3, 2])
    with torch.no_grad(), dt.compose(model, block):
        split = model(X)
    torch.testing.assert_close(split[:3], (base + 0.5 * (out_a - base) + 0.5 * (out_b - base))[:3], **TOL)
    torch.testing.assert_close(split[3], out_c[3], **TOL)
    torch.testing.assert_close(split[4], out_a[4], **TOL)


def test_batch_split_sizes_that_miss_the_batch_are_refused_at_run_time():
    _, model = _bert(lora=BERT_LORA, adapter=BERT_ADAPTER)
    block = dt.BatchSplit("lora", "adapter", sizes=[2, 2])
    with dt.compose(model, block), pytest.raises(DeltaStateError, match=r"sizes \[2, 2\] add up to 4 rows.*batch of 3"):
        model(**_bert_inputs(3))


# --- Fuse ------------------------------------------------------------------------------------


def _fused_bert():
    case, model = _bert(a=BERT_ADAPTER, b=BERT_ADAPTER)
    dt.attach(model, dt.FusionConfig(fused=("a", "b")), name="fusion")
    return case, model


def test_fuse_of_one_delta_at_initialisation_equals_that_delta():
    case, model = _bert(a=BERT_ADAPTER)
    dt.attach(model, dt.FusionConfig(fused=("a",)), name="fusion")
    inputs = _bert_inputs(3)
    with torch.no_grad(), dt.using(model, "a"):
        expected = case.output(model, inputs)
    with torch.no_grad(), dt.compose(model, dt.Fuse("a", fusion="fusion")):
        torch.testing.assert_close(case.output(model, inputs), expected, **TOL)


def test_fuse_computes_the_attention_over_the_deltas_outputs_by_hand():
    model = _one_layer(a=ADAPTER, b=LORA_ONE)
    dt.attach(model, dt.FusionConfig(fused=("a", "b"), temperature=2.0), name="f")
    _randomise(model, "f", 9)
    base, out_a, out_b = _with(model, (), X), _with(model, "a", X), _with(model, "b", X)
    fusion = model[0].deltas["f"]
    with torch.no_grad():
        query = base @ fusion.query.weight.T + fusion.query.bias
        scores = torch.stack([(query * (z @ fusion.key.weight.T + fusion.key.bias)).sum(-1) for z in (out_a, out_b)], -1)
        weights = torch.softmax(scores / 2.0, -1)
        values = [z @ fusion.value.weight.T + fusion.value.bias for z in (out_a, out_b)]
        expected = weights[:, :1] * values[0] + weights[:, 1:] * values[1]
        with dt.compose(model, dt.Fuse("b", "a", fusion="f")):  # order does not matter
            torch.testing.assert_close(model(X), expected, **TOL)


def test_fuse_trains_only_the_fusion_parameters():
    _, model = _fused_bert()
    dt.set_trainable(model, "fusion")
    frozen = {n: {k: p.detach().clone() for k, p in dt.delta_parameters(model, n)} for n in ("a", "b")}
    fusion_before = {k: p.detach().clone() for k, p in dt.delta_parameters(model, "fusion")}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for _, p in dt.delta_parameters(model, "fusion")}
    optimizer = torch.optim.Adam(trainable, lr=1e-2)
    model.train()
    inputs, labels = _bert_inputs(4), torch.tensor([0, 1, 2, 1])
    with dt.compose(model, dt.Fuse("a", "b", fusion="fusion")):
        for _ in range(3):
            optimizer.zero_grad()
            model(**inputs, labels=labels).loss.backward()
            for name in ("a", "b"):
                assert all(p.grad is None for _, p in dt.delta_parameters(model, name))
            optimizer.step()
    for name, before in frozen.items():
        for key, param in dt.delta_parameters(model, name):
            assert torch.equal(param, before[key]), f"fused delta {name} tensor {key} changed"
    changed = [k for k, p in dt.delta_parameters(model, "fusion") if not torch.equal(p, fusion_before[k])]
    assert len(changed) == len(fusion_before)


def test_fusion_delta_save_load_round_trip(tmp_path):
    case, model = _fused_bert()
    _randomise(model, "fusion", 5, scale=0.05)
    inputs = _bert_inputs(3)
    block = dt.Fuse("a", "b", fusion="fusion")
    with torch.no_grad(), dt.compose(model, block):
        expected = case.output(model, inputs)
    for name in ("a", "b", "fusion"):
        dt.save(model, tmp_path / name, name)
    assert dt.read_meta(tmp_path / "fusion")["config"]["fused"] == ["a", "b"]
    fresh = case.build()
    for name in ("a", "b", "fusion"):
        dt.load(fresh, tmp_path / name)
    with torch.no_grad(), dt.compose(fresh, block):
        torch.testing.assert_close(case.output(fresh, inputs), expected, rtol=0, atol=0)


def test_fusion_without_its_deltas_cannot_be_attached():
    case = MODELS["bert"]
    with pytest.raises(NotApplicableError, match=r"\['a'\] are missing"):
        dt.attach(case.build(), dt.FusionConfig(fused=("a",)), name="f")


# --- activation ------------------------------------------------------------------------------


def test_compose_restores_the_previous_state_and_set_composition_clears():
    model = _one_layer(a=ADAPTER, b=ADAPTER)
    dt.set_active(model, "a")
    out_a = _with(model, "a", X)
    with dt.compose(model, dt.Parallel("a", "b")) as block:
        assert dt.get_composition(model) == block
    assert dt.get_composition(model) is None
    dt.set_composition(model, "b")  # a lone name is Stack(name); it overrides the active set
    with torch.no_grad():
        torch.testing.assert_close(model(X), _with(model, "b", X), rtol=0, atol=0)
        dt.set_active(model, "a")
        torch.testing.assert_close(model(X), _with(model, "b", X), rtol=0, atol=0)
    dt.set_composition(model, None)
    with torch.no_grad():
        torch.testing.assert_close(model(X), out_a, rtol=0, atol=0)


def test_a_composition_is_checked_again_after_a_delta_is_deleted():
    model = _one_layer(a=ADAPTER, b=ADAPTER)
    dt.set_composition(model, dt.Average("a", "b"))
    dt.delete(model, "b")
    with pytest.raises(DeltaStateError, match="names delta 'b'"):
        model(X)


def test_delta_ids_cannot_be_mixed_with_a_composition():
    _, model = _bert(lora=BERT_LORA, adapter=BERT_ADAPTER)
    with dt.compose(model, dt.Stack("lora")), pytest.raises(DeltaStateError, match="BatchSplit"):
        model(**_bert_inputs(2), delta_ids=["lora", "adapter"])


# --- serialisation -------------------------------------------------------------------------


def test_blocks_round_trip_through_json():
    block = dt.Stack(
        "lang",
        dt.BatchSplit(dt.Parallel("a", dt.Stack("b", "c"), weights=[0.25, 0.75]), dt.Average("a", "c"),
                      dt.Fuse("a", "b", fusion="f"), sizes=[2, 3, 1]),
    )
    text = block.to_json()
    assert json.loads(text)["children"][1] == {
        "block": "batch_split", "sizes": [2, 3, 1], "children": [
            {"block": "parallel", "weights": [0.25, 0.75],
             "children": ["a", {"block": "stack", "children": ["b", "c"]}]},
            {"block": "average", "children": ["a", "c"]},
            {"block": "fuse", "fusion": "f", "children": ["a", "b"]},
        ]}
    again = dt.Block.from_json(text)
    assert again == block and repr(again) == repr(block)
    assert dt.block_from_dict(block.to_dict()).names() == ["lang", "a", "b", "c"]


def test_unknown_serialised_block_kind_is_refused():
    with pytest.raises(ConfigError, match="unknown block kind 'mix'"):
        dt.block_from_dict({"block": "mix", "children": ["a"]})
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['weights'\]"):
        dt.block_from_dict({"block": "stack", "children": ["a"], "weights": [1.0]})


# --- validation ----------------------------------------------------------------------------


def test_unknown_delta_name_is_refused_before_running():
    model = _one_layer(a=ADAPTER)
    with pytest.raises(DeltaStateError, match=r"Stack > Parallel names delta 'typo'.*deltas: 'a'"):
        dt.set_composition(model, dt.Stack(dt.Parallel("a", "typo")))
    assert dt.get_composition(model) is None


@pytest.mark.parametrize("make,message", [
    (lambda: dt.Parallel("a", "b", weights=[1.0]), "2 children but 1 weights"),
    (lambda: dt.Parallel("a", "b", weights=[1.0, float("nan")]), "not a finite number"),
    (lambda: dt.BatchSplit("a", "b", sizes=[1]), r"sizes \[1\]; give one row count per child"),
    (lambda: dt.BatchSplit("a", "b", sizes=[1, -1]), "non-negative integers"),
    (lambda: dt.Fuse(dt.Stack("a", "b"), "c", fusion="f"), "Fuse children must be delta names"),
    (lambda: dt.Stack("a", dt.Parallel("a", "b")), "'a' appears twice on the same rows"),
    (lambda: dt.Stack(), r"Stack\(\) has no children"),
    (lambda: dt.Stack("a", 3), "child 1 is a int"),
])
def test_malformed_blocks_are_refused_when_built(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_batch_split_children_may_repeat_a_delta():
    assert dt.BatchSplit("a", dt.Stack("a", "b"), sizes=[1, 1]).names() == ["a", "b"]


def test_prefix_in_parallel_is_refused_naming_the_method_and_the_block():
    _, model = _bert(lora=BERT_LORA, prefix=dt.PrefixConfig(num_virtual_tokens=2))
    with pytest.raises(NotApplicableError, match=r"'prefix' \(prefix\) cannot take part in Parallel"):
        dt.set_composition(model, dt.Parallel("lora", "prefix"))


def test_prompt_in_batch_split_is_refused():
    _, model = _bert(lora=BERT_LORA, prompt=dt.PromptConfig(num_virtual_tokens=2))
    with pytest.raises(NotApplicableError, match=r"\(prompt\) cannot take part in BatchSplit"):
        dt.set_composition(model, dt.Stack(dt.BatchSplit("lora", "prompt", sizes=[1, 1])))


def test_fuse_must_list_the_deltas_its_fusion_was_made_for():
    _, model = _fused_bert()
    dt.attach(model, BERT_LORA, name="c")
    with pytest.raises(ConfigError, match=r"made for deltas \['a', 'b'\], but Fuse lists \['a', 'c'\]"):
        dt.set_composition(model, dt.Fuse("a", "c", fusion="fusion"))
    with pytest.raises(ConfigError, match="'fusion' is a fusion delta"):
        dt.set_composition(model, dt.Stack("a", "fusion"))
    with pytest.raises(ConfigError, match="names a lora delta"):
        dt.set_composition(model, dt.Fuse("a", fusion="c"))


def test_fuse_refuses_deltas_that_change_inputs():
    model = _one_layer(a=ADAPTER, b=IA3_INPUT)
    dt.attach(model, dt.FusionConfig(fused=("a", "b")), name="f")
    with pytest.raises(NotApplicableError, match=r"'b' \(ia3\) changes the input"):
        dt.set_composition(model, dt.Fuse("a", "b", fusion="f"))
