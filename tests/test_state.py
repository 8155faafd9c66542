"""Several named deltas on one model: add, activate, deactivate, delete, base-only runs."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from tiny_models import MODELS

CASE = MODELS["bert"]


def _out(model):
    with torch.no_grad():
        return CASE.output(model)


def _randomise(model, name, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in dt.delta_parameters(model, name):
            p.add_(0.2 * torch.randn(p.shape, generator=generator))


@pytest.fixture
def two_deltas():
    model = CASE.build()
    base = _out(model)
    dt.attach(model, dt.LoRAConfig(r=2), name="a")
    _randomise(model, "a", 1)
    dt.attach(model, dt.IA3Config(), name="b")
    _randomise(model, "b", 2)
    return model, base


def test_attach_activates_only_the_new_delta(two_deltas):
    model, _ = two_deltas
    assert dt.list_deltas(model) == ["a", "b"]
    assert dt.active_deltas(model) == ("b",)


def test_each_delta_changes_the_output_differently(two_deltas):
    model, base = two_deltas
    with dt.using(model, "a"):
        out_a = _out(model)
    with dt.using(model, "b"):
        out_b = _out(model)
    assert not torch.allclose(out_a, base) and not torch.allclose(out_b, base)
    assert not torch.allclose(out_a, out_b)


def test_base_only_runs_the_frozen_base(two_deltas):
    model, base = two_deltas
    dt.set_active(model, ["a", "b"])
    with dt.base_only(model):
        torch.testing.assert_close(_out(model), base, rtol=0, atol=0)
    assert dt.active_deltas(model) == ("a", "b")


def test_stacked_deltas_compose(two_deltas):
    model, base = two_deltas
    dt.set_active(model, ["a", "b"])
    both = _out(model)
    with dt.using(model, "a"):
        only_a = _out(model)
    assert not torch.allclose(both, only_a)
    merged = dt.merge(model)
    assert merged == ("a", "b")
    torch.testing.assert_close(_out(model), both, rtol=1e-5, atol=1e-5)
    dt.unmerge(model)


def test_activate_and_deactivate(two_deltas):
    model, base = two_deltas
    dt.deactivate(model, "b")
    assert dt.active_deltas(model) == ()
    torch.testing.assert_close(_out(model), base, rtol=0, atol=0)
    dt.activate(model, "a")
    dt.activate(model, "b")
    assert dt.active_deltas(model) == ("a", "b")


def test_delete_removes_units_and_last_delete_removes_everything(two_deltas):
    model, base = two_deltas
    dt.delete(model, "b")
    assert dt.list_deltas(model) == ["a"]
    assert not any(k.endswith("ia3_l") for k in model.state_dict())
    dt.delete(model, "a")
    assert dt.list_deltas(model) == []
    assert model.state_dict().keys() == CASE.build().state_dict().keys()
    assert all(p.requires_grad for p in model.parameters()), "original trainable flags come back"
    torch.testing.assert_close(_out(model), base, rtol=0, atol=0)


def test_unknown_names_and_duplicates_are_clear_errors(two_deltas):
    model, _ = two_deltas
    with pytest.raises(dt.DeltaStateError, match="no delta named 'c' on this model; deltas: 'a', 'b'"):
        dt.set_active(model, "c")
    with pytest.raises(dt.DeltaStateError, match="already exists"):
        dt.attach(model, dt.LoRAConfig(r=2), name="a")
    with pytest.raises(dt.DeltaStateError, match="invalid delta name"):
        dt.attach(model, dt.LoRAConfig(r=2), name="bad.name")


def test_merged_delta_cannot_be_switched_off_or_deleted(two_deltas):
    model, _ = two_deltas
    dt.merge(model, "a")
    with pytest.raises(dt.DeltaStateError, match="merged into the base weights"):
        dt.set_active(model, "b")
    with pytest.raises(dt.DeltaStateError, match="unmerge"):
        dt.delete(model, "a")
    dt.unmerge(model)
    dt.delete(model, "a")


def test_merge_refuses_non_finite_results_and_changes_nothing(two_deltas):
    model, _ = two_deltas
    before = {k: p.clone() for k, p in dt.base_parameters(model)}
    with torch.no_grad():
        next(p for k, p in dt.delta_parameters(model, "a") if k.endswith("lora_B"))[0, 0] = float("inf")
    with pytest.raises(dt.MergeError, match="NaN or inf"):
        dt.merge(model, "a")
    for key, value in dt.base_parameters(model):
        assert torch.equal(value, before[key])


def test_set_trainable_picks_one_delta(two_deltas):
    model, _ = two_deltas
    dt.set_trainable(model, "a")
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for _, p in dt.delta_parameters(model, "a")}


def test_new_head_trains_and_travels_with_the_delta(tmp_path):
    model = CASE.build()
    report = dt.attach(model, dt.LoRAConfig(r=2, modules_to_save=["classifier"]), name="sentiment")
    assert [s.path for s in report.sites if s.role == "saved"] == ["classifier"]
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        CASE.output(model).sum().backward()
        optimizer.step()
    trained = _out(model)
    assert torch.equal(model.classifier.weight, CASE.build().classifier.weight), "the base head stays frozen"
    dt.save(model, tmp_path / "d")
    fresh = CASE.build()
    dt.load(fresh, tmp_path / "d")
    torch.testing.assert_close(_out(fresh), trained, rtol=0, atol=0)
    folded = dt.fold(fresh)
    torch.testing.assert_close(_out(folded), trained, rtol=1e-5, atol=1e-5)


def test_two_heads_on_one_base():
    model = CASE.build()
    dt.attach(model, dt.LoRAConfig(r=2, modules_to_save=["classifier"]), name="x")
    dt.attach(model, dt.LoRAConfig(r=2, modules_to_save=["classifier"]), name="y")
    with torch.no_grad():
        model.classifier.deltas["x"].copy.weight.add_(1.0)
    with dt.using(model, "x"):
        out_x = _out(model)
    with dt.using(model, "y"):
        out_y = _out(model)
    assert not torch.allclose(out_x, out_y)


def test_report_prints_a_table():
    model = CASE.build()
    report = dt.attach(model, dt.LoRAConfig(r=2))
    text = str(report)
    assert "bert.encoder.layer.0.attention.self.query" in text
    assert f"trainable {report.trainable:,} of {report.total:,}" in text
    assert report.percent == pytest.approx(100 * report.trainable / report.total)


def test_tied_weights_warn_at_attach_and_refuse_to_merge():
    model = MODELS["gpt2"].build()  # lm_head.weight is transformer.wte.weight
    with pytest.warns(UserWarning, match="transformer.wte.weight is shared with lm_head.weight"):
        dt.attach(model, dt.LoRAConfig(r=2, targets=["wte"]))
    _randomise(model, "default", 3)
    before = {k: p.clone() for k, p in dt.base_parameters(model)}
    with pytest.raises(dt.MergeError, match="tied to lm_head.weight"):
        dt.merge(model)
    with pytest.raises(dt.MergeError, match="tied"):
        dt.fold(model)
    for key, value in dt.base_parameters(model):
        assert torch.equal(value, before[key])


def test_a_delta_attached_to_a_model_in_eval_mode_is_in_eval_mode():
    model = CASE.build()  # eval()
    dt.attach(model, dt.LoRAConfig(r=2, dropout=0.5), name="a")
    _randomise(model, "a", 1)
    assert not any(m.training for m in model.modules())
    with torch.no_grad():
        assert CASE.output(model).equal(CASE.output(model))  # no dropout at inference
    model.train()
    assert all(m.training for m in model.modules())
