"""Every registered method on a quantised frozen base (int8 and 4-bit), on a tiny Llama and BERT.

The contracts of the conformance table, restated for a base whose Linear weights are torchao
tensors: identity at initialisation (against the quantised base), only the delta trains and
the packed base tensors stay bit-identical, a saved delta reloads exactly on a fresh
quantisation of the same base, merging re-quantises ``W + dW`` (checked against folding the
same delta into a float model and quantising that) and unmerging puts back the very same
quantised parameters.
"""

from __future__ import annotations

import re

import pytest
import torch

import deltatune as dt
from deltatune.core.quantized import FORMATS, dense, format_of, packed
from deltatune.models.quantize import quantize_model
from tiny_models import MODELS, small_config

CASES = [(method, model, fmt) for method in dt.method_names() for model in ("llama", "bert") for fmt in FORMATS]


def quantised_base(model_name: str, fmt: str, seed: int = 0):
    model = MODELS[model_name].build(seed)
    quantize_model(model, fmt)
    return model


def attached(method: str, model_name: str, fmt: str):
    case = MODELS[model_name]
    model = quantised_base(model_name, fmt)
    try:
        dt.attach(model, small_config(method, case), name="task")
    except dt.NotApplicableError as error:
        pytest.skip(f"{method} does not apply to {model_name}: {error}")
    return case, model


def packed_snapshot(model) -> dict[str, list[torch.Tensor]]:
    """Every base tensor, quantised ones by their stored parts, copied."""
    return {key: [t.detach().clone() for t in (packed(p) if format_of(p) is not None else [p])]
            for key, p in dt.base_parameters(model)}


def assert_packed_equal(before: dict, model) -> None:
    after = packed_snapshot(model)
    assert before.keys() == after.keys()
    for key, parts in before.items():
        assert all(torch.equal(a, b) for a, b in zip(parts, after[key], strict=True)), f"base tensor {key} changed"


def perturb(model, scale: float = 0.1) -> None:
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, param in dt.delta_parameters(model, "task"):
            param.add_(scale * torch.randn(param.shape, generator=generator))


@pytest.mark.parametrize("method,model_name,fmt", CASES)
def test_identity_training_and_reload_on_a_quantised_base(method, model_name, fmt, tmp_path):
    case = MODELS[model_name]
    with torch.no_grad():
        base_output = case.output(quantised_base(model_name, fmt))
    _, model = attached(method, model_name, fmt)
    assert any(format_of(p) is not None for _, p in dt.base_parameters(model))
    with torch.no_grad():
        output = case.output(model)
    if dt.get_method(method).identity_at_init:
        torch.testing.assert_close(output, base_output, rtol=0, atol=1e-6)
    model.train()
    before = packed_snapshot(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for _, p in dt.delta_parameters(model, "task")}
    assert all(format_of(p) is None and p.dtype == torch.float32 for p in trainable)
    optimizer = torch.optim.Adam(trainable, lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        case.output(model).pow(2).mean().backward()
        optimizer.step()
    assert_packed_equal(before, model)
    model.eval()
    expected = case.output(model)
    dt.save(model, tmp_path / "delta")
    fresh = quantised_base(model_name, fmt)
    dt.load(fresh, tmp_path / "delta")  # the same base quantised the same way: the same fingerprint, no warning
    torch.testing.assert_close(case.output(fresh), expected, rtol=0, atol=0)


@pytest.mark.parametrize("method,model_name,fmt", CASES)
def test_merge_requantises_and_unmerge_restores_the_quantised_tensors(method, model_name, fmt, tmp_path):
    case, model = attached(method, model_name, fmt)
    spec = dt.get_method(method)
    if not spec.mergeable:
        with pytest.raises(dt.MergeError, match=re.escape(f"({spec.merge_refusal}), so it cannot be merged")):
            dt.merge(model)
        return
    perturb(model)
    dt.save(model, tmp_path / "delta")
    originals = dict(dt.base_parameters(model))
    before = packed_snapshot(model)
    unmerged = case.output(model)
    dt.merge(model)
    merged = dict(dt.base_parameters(model))
    changed = [k for k, p in originals.items() if format_of(p) is not None and merged[k] is not p]
    assert sorted(dt.requantization_errors(model)) == sorted(changed)
    # folding the same delta into a fresh copy gives W + dW in float; merging must hold exactly Q(W + dW)
    folded = quantised_base(model_name, fmt)
    dt.load(folded, tmp_path / "delta")
    dt.fold(folded)
    assert not any(format_of(p) is not None for p in folded.parameters())
    torch.testing.assert_close(case.output(folded), unmerged, rtol=1e-4, atol=1e-5)
    floats = dict(folded.named_parameters())
    for key in changed:
        requantised = FORMATS[fmt].make(floats[key].detach())
        assert torch.equal(dense(merged[key]), dense(requantised)), key
    dt.unmerge(model)
    assert all(p is originals[k] for k, p in dt.base_parameters(model))
    assert_packed_equal(before, model)
    torch.testing.assert_close(case.output(model), unmerged, rtol=0, atol=0)
