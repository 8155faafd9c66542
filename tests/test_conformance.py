"""The conformance table: every registered method x every tiny model.

A method added to the registry is picked up here automatically; it must then pass every
contract below (and give a closed-form parameter count in ``closed_form.py``).
"""

from __future__ import annotations

import re

import pytest
import torch

import deltatune as dt
from closed_form import expected_parameters
from tiny_models import MODELS, small_config

PAIRS = [(method, model) for method in dt.method_names() for model in MODELS]


def _attached(method: str, model_name: str, seed: int = 0):
    case = MODELS[model_name]
    model = case.build(seed)
    try:
        report = dt.attach(model, small_config(method, case), name="task")
    except dt.NotApplicableError as error:
        pytest.skip(f"{method} does not apply to {model_name}: {error}")
    return case, model, report


def _perturb(model, name: str = "task", scale: float = 0.1) -> None:
    """Move every delta tensor away from its (often zero or one) initial value."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, param in dt.delta_parameters(model, name):
            param.add_(scale * torch.randn(param.shape, generator=generator))


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in dt.base_parameters(model)}


def _assert_bit_identical(before: dict, model) -> None:
    after = dict(dt.base_parameters(model))
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), f"base tensor {key} changed"


@pytest.mark.parametrize("method,model_name", PAIRS)
def test_output_at_initialisation(method, model_name):
    case = MODELS[model_name]
    # no_grad on both sides: some kernels round differently when autograd records (T5)
    with torch.no_grad():
        base_output = case.output(case.build())
    _, model, _ = _attached(method, model_name)
    with torch.no_grad():
        output = case.output(model)
    if dt.get_method(method).identity_at_init:
        torch.testing.assert_close(output, base_output, rtol=0, atol=1e-6)
    else:
        assert output.shape[0] == base_output.shape[0]
        assert torch.isfinite(output).all()


@pytest.mark.parametrize("method,model_name", PAIRS)
def test_training_changes_only_the_delta(method, model_name):
    case, model, _ = _attached(method, model_name)
    model.train()
    before_base = _snapshot(model)
    before_delta = {k: p.detach().clone() for k, p in dt.delta_parameters(model, "task")}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for _, p in dt.delta_parameters(model, "task")}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        case.output(model).pow(2).mean().backward()
        optimizer.step()
    _assert_bit_identical(before_base, model)
    for key, param in dt.delta_parameters(model, "task"):
        assert not torch.equal(param, before_delta[key]), f"delta tensor {key} never received a gradient"


@pytest.mark.parametrize("method,model_name", PAIRS)
def test_save_load_roundtrip_on_fresh_base(method, model_name, tmp_path):
    case, model, _ = _attached(method, model_name)
    _perturb(model)
    expected = case.output(model)
    dt.save(model, tmp_path / "delta")
    fresh = case.build()
    report = dt.load(fresh, tmp_path / "delta")
    assert report.name == "task" and dt.active_deltas(fresh) == ("task",)
    torch.testing.assert_close(case.output(fresh), expected, rtol=0, atol=0)


@pytest.mark.parametrize("method,model_name", PAIRS)
def test_load_on_another_base_fails_with_fingerprint_error(method, model_name, tmp_path):
    case, model, _ = _attached(method, model_name)
    dt.save(model, tmp_path / "delta")
    other = case.build(seed=1)
    with pytest.raises(dt.FingerprintError, match="another base"):
        dt.load(other, tmp_path / "delta")
    assert not dt.list_deltas(other) and not hasattr(other, "deltas")
    with pytest.warns(UserWarning, match="another base"):
        dt.load(other, tmp_path / "delta", check="warn")


@pytest.mark.parametrize("method,model_name", PAIRS)
def test_merge_equals_unmerged_and_unmerge_restores_base(method, model_name):
    case, model, _ = _attached(method, model_name)
    spec = dt.get_method(method)
    if not spec.mergeable:  # refused with the method's own reason, which every such method declares
        assert spec.merge_refusal, f"{method} is not mergeable but declares no merge_refusal saying why"
        with pytest.raises(dt.MergeError, match=re.escape(f"({spec.merge_refusal}), so it cannot be merged")):
            dt.merge(model)
        return
    _perturb(model)
    base = _snapshot(model)
    unmerged = case.output(model)
    dt.merge(model)
    torch.testing.assert_close(case.output(model), unmerged, rtol=1e-5, atol=1e-5)
    dt.unmerge(model)
    _assert_bit_identical(base, model)
    torch.testing.assert_close(case.output(model), unmerged, rtol=0, atol=0)


@pytest.mark.parametrize("method,model_name", PAIRS)
def test_fold_leaves_a_plain_model(method, model_name):
    case, model, _ = _attached(method, model_name)
    if not dt.get_method(method).mergeable:
        pytest.skip(f"{method} cannot be merged")
    _perturb(model)
    unmerged = case.output(model)
    reference = case.build()
    folded = dt.fold(model)
    assert folded is model
    assert folded.state_dict().keys() == reference.state_dict().keys()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in folded.modules())
    assert not any(type(m).__module__.startswith("deltatune") for m in folded.modules())
    torch.testing.assert_close(case.output(folded), unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method,model_name", PAIRS)
def test_trainable_count_matches_closed_form(method, model_name):
    case, model, report = _attached(method, model_name)
    config = dt.get_config(model, "task")
    saved = sum(p.numel() for s in report.sites if s.role == "saved" for _, p in dt.base_parameters(model.get_submodule(s.path)))
    assert report.trainable == expected_parameters(method, model, config, report.modules) + saved
    assert report.trainable == dt.count_parameters(model, trainable_only=True)
    assert report.total == dt.count_parameters(case.build()) + report.trainable
