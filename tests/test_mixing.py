"""Mixed batches: each row runs through its own delta (or the base), in one forward pass.

Reference: the same row run alone with its delta active (``using``), or with the base alone.
"""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.errors import DeltaStateError, NotApplicableError
from tiny_models import MODELS, small_config

TOL = {"atol": 1e-5, "rtol": 1e-5}
#: one delta per method (and two LoRA ranks), all attached to one base
DELTAS = {
    "lora4": ("lora", {"r": 4}),
    "lora2": ("lora", {"r": 2, "alpha": 3.0}),
    "dora": ("dora", {"r": 3}),
    "ia3": ("ia3", {}),
    "adapter": ("adapter", {}),
    "parallel": ("adapter", {"placement": "parallel", "bottleneck": 5}),
}


def _randomise(model, name, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in dt.delta_parameters(model, name):
            p.add_(0.3 * torch.randn(p.shape, generator=generator))


def _inputs(case, rows, seed=7):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (rows, 6), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if case.name == "t5":
        inputs["decoder_input_ids"] = torch.randint(1, 100, (rows, 3), generator=generator)
    return inputs


def _model(case_name, deltas):
    case = MODELS[case_name]
    model = case.build()
    for i, name in enumerate(deltas):
        method, fields = DELTAS[name]
        dt.attach(model, small_config(method, case, **fields), name=name)
        _randomise(model, name, i + 1)
    return case, model


def _alone(case, model, inputs, row, name):
    one = {k: v[row:row + 1] for k, v in inputs.items()}
    with dt.using(model, name):
        return case.output(model, one)[0]


@pytest.mark.parametrize("case_name", ["bert", "gpt2", "llama", "t5"])
def test_each_row_equals_that_row_run_alone_with_its_delta(case_name):
    names = list(DELTAS)
    case, model = _model(case_name, names)
    rows = [*names, None, names[0], None, names[3]]  # every method, base rows, repeats
    inputs = _inputs(case, len(rows))
    with torch.no_grad(), dt.route(model, rows):
        mixed = case.output(model, inputs)
    with torch.no_grad():
        for i, name in enumerate(rows):
            torch.testing.assert_close(mixed[i], _alone(case, model, inputs, i, name and (name,) or ()), **TOL,
                                       msg=lambda m, i=i, name=name: f"row {i} ({name}): {m}")


def test_delta_ids_keyword_and_integer_ids_route_like_names():
    case, model = _model("bert", ["lora4", "ia3", "adapter"])
    inputs = _inputs(case, 4)
    with torch.no_grad():
        with dt.route(model, ["adapter", None, "lora4", "ia3"]):
            expected = case.output(model, inputs)
        by_keyword = model(**inputs, delta_ids=torch.tensor([2, -1, 0, 1])).logits
        by_names = model(**inputs, delta_ids=["adapter", None, "lora4", "ia3"]).logits
    torch.testing.assert_close(by_keyword, expected, rtol=0, atol=0)
    torch.testing.assert_close(by_names, expected, rtol=0, atol=0)
    assert dt.get_routing(model) is None  # the keyword routes that call only


def test_a_batch_all_on_one_delta_equals_the_active_delta_bit_for_bit():
    case, model = _model("llama", ["lora4", "dora"])
    inputs = _inputs(case, 3)
    with torch.no_grad():
        with dt.using(model, "dora"):
            expected = case.output(model, inputs)
        with dt.route(model, ["dora"] * 3):
            routed = case.output(model, inputs)
    torch.testing.assert_close(routed, expected, rtol=0, atol=0)


def test_rows_routed_to_the_base_equal_the_base_model():
    case, model = _model("gpt2", ["lora4", "ia3"])
    inputs = _inputs(case, 3)
    with torch.no_grad():
        with dt.base_only(model):
            base = case.output(model, inputs)
        with dt.route(model, [None, None, None]):
            routed = case.output(model, inputs)
    torch.testing.assert_close(routed, base, rtol=0, atol=0)


def test_lora_rows_get_gradients_only_from_their_own_rows():
    case, model = _model("bert", ["lora4", "lora2"])
    inputs = _inputs(case, 4)
    with dt.route(model, ["lora4", "lora4", None, None]):
        case.output(model, inputs).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in dt.delta_parameters(model, "lora4"))
    assert all(p.grad is None or p.grad.abs().sum() == 0 for _, p in dt.delta_parameters(model, "lora2"))


def test_gradients_equal_those_of_each_delta_run_on_its_rows():
    case, model = _model("llama", ["lora4", "lora2", "ia3"])
    inputs = _inputs(case, 5)
    rows = ["lora2", "lora4", "ia3", "lora4", None]
    with dt.route(model, rows):
        case.output(model, inputs).sum().backward()
    mixed = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    for name in ("lora4", "lora2", "ia3"):
        picked = [i for i, n in enumerate(rows) if n == name]
        with dt.using(model, name):
            case.output(model, {k: v[picked] for k, v in inputs.items()}).sum().backward()
    separate = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert mixed.keys() == separate.keys() and len(mixed) > 0
    for key in mixed:
        torch.testing.assert_close(mixed[key], separate[key], **TOL, msg=lambda m, key=key: f"{key}: {m}")


def test_the_stacked_weights_are_cached_without_grad_and_follow_weight_updates():
    case, model = _model("bert", ["lora4", "lora2"])
    inputs = _inputs(case, 2)
    rows = ["lora4", "lora2"]
    with torch.no_grad(), dt.route(model, rows):
        first = case.output(model, inputs)
        assert case.output(model, inputs).equal(first)
        _randomise(model, "lora2", 99)  # in place, as an optimizer step or a hot swap would
        changed = case.output(model, inputs)
    with torch.no_grad():
        torch.testing.assert_close(changed[1], _alone(case, model, inputs, 1, "lora2"), **TOL)
    assert not changed[1].equal(first[1])


def test_unknown_delta_name_is_refused_with_the_known_ones():
    _, model = _model("bert", ["lora4"])
    with pytest.raises(DeltaStateError, match=r"no delta named 'nope'.*'lora4'"):
        with dt.route(model, ["lora4", "nope"]):
            pass


def test_integer_id_out_of_range_is_refused():
    case, model = _model("bert", ["lora4", "ia3"])
    with pytest.raises(DeltaStateError, match=r"delta id 2 is out of range.*-1 is the base"):
        model(**_inputs(case, 2), delta_ids=torch.tensor([0, 2]))
    assert dt.get_routing(model) is None


def test_wrong_number_of_ids_is_refused():
    case, model = _model("bert", ["lora4", "ia3"])
    with pytest.raises(DeltaStateError, match=r"delta_ids gives 3 rows but input_ids has a batch of 2"):
        model(**_inputs(case, 2), delta_ids=["lora4", "ia3", None])
    with pytest.raises(DeltaStateError, match=r"3 rows .* shape \(2,"):
        with dt.route(model, ["lora4", "ia3", None]):
            case.output(model, _inputs(case, 2))


def test_merged_delta_cannot_be_mixed():
    _, model = _model("bert", ["lora4", "lora2"])
    dt.set_active(model, "lora4")
    dt.merge(model)
    with pytest.raises(DeltaStateError, match="merged into the base weights; unmerge"):
        with dt.route(model, ["lora4", "lora2"]):
            pass


def test_prefix_tuning_says_it_cannot_mix():
    case = MODELS["bert"]
    model = case.build()
    dt.attach(model, small_config("prefix", case), name="p")
    dt.attach(model, small_config("lora", case), name="l")
    with pytest.raises(NotApplicableError, match="cannot take part in a batch that mixes deltas"):
        model(**_inputs(case, 2), delta_ids=["p", "l"])
    # a batch all on one delta is an ordinary batch and works
    with torch.no_grad():
        routed = model(**_inputs(case, 2), delta_ids=["p", "p"]).logits
        with dt.using(model, "p"):
            torch.testing.assert_close(routed, case.output(model, _inputs(case, 2)), rtol=0, atol=0)


@pytest.mark.parametrize("case_name", ["bert", "llama"])
def test_prompt_rows_with_different_prompts_equal_each_run_alone(case_name):
    case = MODELS[case_name]
    model = case.build()
    for i, name in enumerate(("p1", "p2", "p3")):
        dt.attach(model, small_config("prompt", case, seed=i), name=name)
        _randomise(model, name, i + 1)
    rows = ["p2", "p1", "p3", "p2"]
    inputs = _inputs(case, len(rows))
    with torch.no_grad():
        mixed = model(**inputs, delta_ids=rows).logits
        for i, name in enumerate(rows):
            torch.testing.assert_close(mixed[i], _alone(case, model, inputs, i, name), **TOL)


def test_prompt_rows_cannot_share_a_batch_with_base_rows_or_other_lengths():
    case = MODELS["bert"]
    model = case.build()
    dt.attach(model, small_config("prompt", case), name="p")
    dt.attach(model, small_config("prompt", case, num_virtual_tokens=2), name="short")
    with pytest.raises(NotApplicableError, match="cannot share a batch with rows of the base"):
        model(**_inputs(case, 2), delta_ids=["p", None])
    with pytest.raises(NotApplicableError, match=r"different lengths \[2, 3\]"):
        model(**_inputs(case, 2), delta_ids=["p", "short"])
