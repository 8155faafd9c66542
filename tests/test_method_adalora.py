"""AdaLoRA (arXiv:2303.10512): the SVD-shaped update against a naive reference, the
orthogonality penalty, the rank allocation step for step against real peft (0.21.2), saving
the kept ranks, resuming, mixed batches, merging, peft files both ways, and the CLI."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from tiny_models import MODELS
from method_checks import (assert_linear_merge_equals_dense_reference, encoded_examples, interrupt_after_step,
                           randomise as _randomise, train_from_the_command_line)

import deltatune as dt
from deltatune.core.inject import after_step, loss_terms
from deltatune.interop import export_peft, import_peft, save_peft
from deltatune.methods.adalora import AdaLoRAConfig, AdaLoRALinear
from deltatune.methods.adalora.allocator import budget_schedule, units_of

BERT, GPT2 = MODELS["bert"], MODELS["gpt2"]
SCHEDULE = {"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 2, "total_step": 10}


def _units(model, name="x"):
    return dict(units_of(model, name))


# ---------------------------------------------------------------------------------------------
# the maths


@pytest.mark.parametrize("case", [BERT, GPT2], ids=["linear", "conv1d"])
def test_update_is_scaled_P_diag_lambda_Q(case):
    model = case.build()
    targets = ["query", "value"] if case is BERT else ["c_attn", "mlp.c_proj"]
    dt.attach(model, AdaLoRAConfig(init_r=3, target_r=2, alpha=6.0, targets=targets), name="x")
    _randomise(model, "x")
    model.eval()
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    for path, unit in _units(model).items():
        module = model.get_submodule(path)
        P, lam, Q = unit.lora_B.detach(), unit.lora_E.detach().view(-1), unit.lora_A.detach()
        delta = 6.0 / 3 * P @ torch.diag(lam) @ Q  # (out, in)
        transposed = case is GPT2
        weight = module.weight.detach()
        full = weight + (delta.T if transposed else delta)
        inputs = x if x.shape[-1] == (full.shape[0] if transposed else full.shape[1]) else torch.randn(2, 5, module.weight.shape[0])
        expected = (inputs @ full if transposed else inputs @ full.T) + module.bias.detach()
        with torch.no_grad():
            torch.testing.assert_close(module(inputs), expected, rtol=1e-4, atol=1e-5)


def test_lambda_starts_at_zero_and_factors_near_orthonormal():
    model = BERT.build()
    dt.attach(model, AdaLoRAConfig(init_r=4, target_r=2, targets=["query"]), name="x")
    for unit in _units(model).values():
        assert torch.equal(unit.lora_E, torch.zeros(4, 1))
        assert (unit.lora_A @ unit.lora_A.T - torch.eye(4)).abs().max() < 1.0


def test_orthogonality_penalty_is_the_mean_frobenius_distance():
    model = BERT.build()
    dt.attach(model, AdaLoRAConfig(init_r=3, target_r=2, orth_reg_weight=0.7, targets=["query", "value"]), name="x")
    _randomise(model, "x")
    norms = []
    for unit in _units(model).values():
        Q, P = unit.lora_A.detach(), unit.lora_B.detach()
        norms += [((Q @ Q.T - torch.eye(3)) ** 2).sum().sqrt(), ((P.T @ P - torch.eye(3)) ** 2).sum().sqrt()]
    expected = 0.7 * sum(norms) / len(norms)
    torch.testing.assert_close(loss_terms(model), expected, rtol=1e-6, atol=1e-6)
    dt.set_trainable(model, [])
    assert loss_terms(model) is None  # a frozen delta adds nothing


# ---------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("fields,named", [
    ({"init_r": 0}, "init_r"), ({"init_r": 4, "target_r": 5}, "target_r"), ({"delta_t": 0}, "delta_t"),
    ({"beta1": 1.0}, "beta1"), ({"orth_reg_weight": -1.0}, "orth_reg_weight"), ({"alpha": 0.0}, "alpha"),
    ({"tinit": 5, "tfinal": 5, "total_step": 10}, "tinit"), ({"rank_pattern": {"a": 99}}, "rank_pattern"),
])
def test_bad_field_values_fail_at_construction_naming_the_field(fields, named):
    with pytest.raises(dt.ConfigError, match=named):
        AdaLoRAConfig(**fields)


def test_modules_it_cannot_adapt_fail_at_attach_and_leave_the_model_untouched():
    model = BERT.build()
    with pytest.raises(dt.TargetError, match="word_embeddings.*Embedding"):
        dt.attach(model, AdaLoRAConfig(targets=["word_embeddings"]), name="x")
    with pytest.raises(dt.TargetError, match="bert.encoder.layer.0.output.dense"):
        dt.attach(model, AdaLoRAConfig(targets=["query"], rank_pattern={"bert.encoder.layer.0.output.dense": 2}), name="x")
    assert not dt.list_deltas(model) and not any(hasattr(m, "deltas") for m in model.modules())


# ---------------------------------------------------------------------------------------------
# the rank allocation against peft's RankAllocator


def _peft_pair(**schedule):
    peft = pytest.importorskip("peft")
    config = {**SCHEDULE, **schedule}
    theirs_config = peft.AdaLoraConfig(init_r=config["init_r"], target_r=config["target_r"], tinit=config["tinit"],
                                       tfinal=config["tfinal"], deltaT=config.get("delta_t", 1),
                                       total_step=config["total_step"], lora_alpha=8, target_modules=["query", "value"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(BERT.build(), theirs_config)
    ours = BERT.build()
    dt.attach(ours, AdaLoRAConfig(**config, alpha=8.0, targets=["query", "value"]), name="x")
    inner = theirs.base_model.model
    with torch.no_grad():
        for path, unit in _units(ours).items():
            layer = inner.get_submodule(path)
            for factor in ("lora_A", "lora_E", "lora_B"):
                getattr(unit, factor).copy_(getattr(layer, factor)["default"])
    return ours, theirs


def _peft_factors(theirs, path):
    layer = theirs.base_model.model.get_submodule(path)
    return {factor: getattr(layer, factor)["default"] for factor in ("lora_A", "lora_E", "lora_B")}


def test_masking_schedule_equals_peft_update_and_allocate_on_fixed_gradients():
    ours, theirs = _peft_pair(delta_t=2)
    generator = torch.Generator().manual_seed(11)
    allocator = theirs.base_model.rankallocator
    units = _units(ours)
    total = SCHEDULE["total_step"]
    masks_seen = set()
    for step in range(1, total + 3):
        with torch.no_grad():
            for path, unit in units.items():
                for factor, param in _peft_factors(theirs, path).items():
                    grad = torch.randn(param.shape, generator=generator)
                    for p in (param, getattr(unit, factor)):
                        p.sub_(0.05 * grad)  # the same "optimizer step" on both sides
                        p.grad = grad.clone()
        theirs.base_model.update_and_allocate(step)
        after_step(ours, step, total)
        initial = sum(u.rank for u in units.values())
        assert budget_schedule(dt.get_config(ours, "x"), step, total, initial, 2 * len(units)) == \
            allocator.budget_schedule(step)
        pattern = theirs.peft_config["default"].rank_pattern
        for path, unit in units.items():
            theirs_factors = _peft_factors(theirs, path)
            for factor, param in theirs_factors.items():
                assert torch.equal(getattr(unit, factor), param), (step, path, factor)
            if pattern:
                assert unit.mask.tolist() == pattern[f"{path}.lora_E.default"], (step, path)
            masks_seen.add((step, tuple(unit.mask.tolist())))
    assert sum(int(u.mask.sum()) for u in units.values()) == 2 * len(units)  # the final budget: target_r per module
    assert len({m for _, m in masks_seen}) > 1


def test_trainable_count_equals_peft():
    ours, theirs = _peft_pair()
    assert dt.count_parameters(ours, trainable_only=True) == theirs.get_nb_trainable_parameters()[0]


def test_training_loss_with_the_penalty_equals_peft():
    ours, theirs = _peft_pair()
    _randomise(ours, "x")
    with torch.no_grad():
        for path, unit in _units(ours).items():
            for factor, param in _peft_factors(theirs, path).items():
                param.copy_(getattr(unit, factor))
    inputs, labels = BERT.inputs(), torch.tensor([0, 2, 1])
    ours.eval(), theirs.eval()
    # peft adds the penalty in AdaLoraModel.forward (a PeftModel without task type skips it)
    theirs_loss = theirs.base_model(**inputs, labels=labels).loss
    ours_loss = ours(**inputs, labels=labels).loss + loss_terms(ours)
    assert loss_terms(ours) > 0.1
    torch.testing.assert_close(ours_loss, theirs_loss, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# saving the kept ranks, resuming


def _allocated(seed=0):
    """A BERT with an AdaLoRA delta whose allocation ended (masks fixed, masked lambda zero)."""
    model = BERT.build()
    dt.attach(model, AdaLoRAConfig(**SCHEDULE, targets=["query", "value"]), name="x")
    _randomise(model, "x", seed=seed + 3)
    generator = torch.Generator().manual_seed(seed)
    for step in range(1, SCHEDULE["total_step"] + 1):
        for _, p in dt.delta_parameters(model, "x"):
            p.grad = torch.randn(p.shape, generator=generator)
        after_step(model, step, SCHEDULE["total_step"])
    return model.eval()


def test_a_saved_delta_records_the_kept_ranks_and_reloads_exactly(tmp_path):
    model = _allocated()
    ranks = {path: int(u.mask.sum()) for path, u in _units(model).items()}
    assert sum(ranks.values()) == 2 * len(ranks) and set(ranks.values()) != {2}  # unequal ranks were allocated
    expected = BERT.output(model)
    dt.save(model, tmp_path / "d")
    meta = dt.read_meta(tmp_path / "d")
    assert meta["config"]["rank_pattern"] == {p: r for p, r in ranks.items() if r != 4}
    assert meta["num_parameters"] == sum(r * (32 + 1 + 32) for r in ranks.values())
    fresh = BERT.build()
    dt.load(fresh, tmp_path / "d")
    # equal up to the summation order of a shorter rank (the dropped triplets' lambda are 0)
    torch.testing.assert_close(BERT.output(fresh.eval()), expected, rtol=0, atol=1e-7)
    assert {p: u.rank for p, u in _units(fresh).items()} == ranks
    # a hot swap of those files into the live, still full-rank delta keeps its outputs
    assert dt.replace(model, "x", tmp_path / "d").in_place
    torch.testing.assert_close(BERT.output(model), expected, rtol=0, atol=0)
    dt.save(fresh, tmp_path / "again")  # saved again: the same files
    assert dt.read_meta(tmp_path / "again")["config"] == meta["config"]


def test_the_training_loop_adds_the_penalty_and_the_allocator_sees_gradients(tmp_path):
    from deltatune.train import loop

    data = encoded_examples(tmp_path, 8)
    model = BERT.build()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    dt.attach(model, AdaLoRAConfig(init_r=4, target_r=2, total_step=10, targets=["query", "value"]), name="x")
    _randomise(model, "x")
    batch = data.collate(list(range(8)))
    with torch.no_grad():
        expected = model(**batch).loss + loss_terms(model)
    result = loop.train(model, data, loop.Settings(steps=1, batch_size=8, lr=1e-3, progress=False))
    assert result["history"].train[0][1] == pytest.approx(expected.item(), abs=1e-5)
    assert all(unit.sensitivity_lora_E.abs().sum() > 0 for unit in _units(model).values())


def test_resuming_from_a_checkpoint_gives_the_uninterrupted_delta(tmp_path, monkeypatch):
    from deltatune.train import loop

    data = encoded_examples(tmp_path, 40)
    settings = loop.Settings(steps=12, batch_size=8, lr=1e-2, save_every=4, progress=False)
    config = AdaLoRAConfig(init_r=4, target_r=2, tinit=1, tfinal=2, targets=["query", "value"], delta_t=2)

    def run(folder, resume=False):
        model = BERT.build()
        dt.attach(model, config, name="x")
        loop.train(model, data, settings, checkpoint_dir=folder, resume=resume)
        return {k: p.detach().clone() for k, p in dt.delta_parameters(model, "x")}, model

    straight, model = run(tmp_path / "straight")
    interrupt_after_step(monkeypatch, 6, run, tmp_path / "killed")
    assert json.loads((tmp_path / "killed" / "latest.json").read_text())["step"] == 4
    resumed, resumed_model = run(tmp_path / "killed", resume=True)
    for key, value in straight.items():
        assert torch.equal(resumed[key], value), key
    for path, unit in _units(model).items():
        assert torch.equal(_units(resumed_model)[path].mask, unit.mask)
        assert torch.equal(_units(resumed_model)[path].sensitivity_lora_A, unit.sensitivity_lora_A)


# ---------------------------------------------------------------------------------------------
# mixed batches, merging


def test_mixed_batch_rows_equal_each_row_alone():
    model = BERT.build()
    dt.attach(model, AdaLoRAConfig(init_r=4, target_r=2, targets=["query", "value"]), name="a")
    dt.attach(model, AdaLoRAConfig(init_r=2, target_r=1, alpha=3.0, targets=["query", "key"]), name="b")
    dt.attach(model, dt.LoRAConfig(r=2, targets=["value"]), name="c")
    for i, name in enumerate("abc"):
        _randomise(model, name, seed=i)
    model.eval()
    inputs = BERT.inputs()
    ids = ["a", "b", None]
    mixed = model(**inputs, delta_ids=ids).logits
    for row, name in enumerate(ids):
        one = {k: v[row:row + 1] for k, v in inputs.items()}
        with dt.using(model, name):
            torch.testing.assert_close(model(**one).logits[0], mixed[row], rtol=1e-5, atol=1e-5)
    mixed = model(**inputs, delta_ids=["c", "a", "b"]).logits
    with dt.using(model, "c"):
        torch.testing.assert_close(model(**{k: v[:1] for k, v in inputs.items()}).logits[0], mixed[0], rtol=1e-5, atol=1e-5)


def test_linear_merge_and_task_vector_equal_the_dense_updates(tmp_path):
    folders = []
    dense = {}
    for seed in (0, 1):
        model = _allocated(seed)
        for path, unit in _units(model).items():
            weight = torch.zeros(32, 32)
            dense[path] = dense.get(path, weight) + 0.5 * unit.delta_weight(weight).detach()
        vector = dt.TaskVector.from_delta(model, "x")
        for path, unit in _units(model).items():
            entry = vector[f"{path}.weight"]
            torch.testing.assert_close(entry.dense() if hasattr(entry, "dense") else entry,
                                       unit.delta_weight(weight).detach(), rtol=1e-5, atol=1e-6)
        dt.save(model, tmp_path / f"d{seed}")
        folders.append(tmp_path / f"d{seed}")
    assert_linear_merge_equals_dense_reference(BERT, folders, [0.5, 0.5], dense)


# ---------------------------------------------------------------------------------------------
# peft files, both ways


def test_export_loads_in_peft_with_equal_outputs(tmp_path):
    peft = pytest.importorskip("peft")
    model = _allocated()
    dt.save(model, tmp_path / "d")
    export_peft(tmp_path / "d", tmp_path / "p", BERT.build())
    config = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["init_r"] == 4 and config["rank_pattern"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(BERT.build(), tmp_path / "p").eval()
    torch.testing.assert_close(BERT.output(theirs), BERT.output(model), rtol=0, atol=1e-6)
    save_peft(model, tmp_path / "live")  # straight from the live (full-rank, masked) delta
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = peft.PeftModel.from_pretrained(BERT.build(), tmp_path / "live").eval()
    torch.testing.assert_close(BERT.output(again), BERT.output(model), rtol=0, atol=1e-6)


def test_export_then_import_gives_back_the_delta(tmp_path):
    pytest.importorskip("peft")
    model = _allocated()
    dt.save(model, tmp_path / "d")
    export_peft(tmp_path / "d", tmp_path / "p", BERT.build())
    import_peft(tmp_path / "p", tmp_path / "back", BERT.build())
    assert dt.read_meta(tmp_path / "back")["config"] == dt.read_meta(tmp_path / "d")["config"]
    again = BERT.build()
    dt.load(again, tmp_path / "back")
    torch.testing.assert_close(BERT.output(again.eval()), BERT.output(model), rtol=0, atol=1e-6)


def test_a_peft_adapter_imports_with_equal_outputs(tmp_path):
    peft = pytest.importorskip("peft")
    _, theirs = _peft_pair()
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, p in theirs.named_parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=generator))
        path = "bert.encoder.layer.1.attention.self.value"  # a module whose allocation masked two triplets
        theirs.base_model.model.get_submodule(path).lora_E["default"][1:3] = 0
    theirs.peft_config["default"].rank_pattern = {f"{path}.lora_E.default": [True, False, False, True]}
    theirs.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path / "p")
    import_peft(tmp_path / "p", tmp_path / "d", BERT.build())
    assert dt.read_meta(tmp_path / "d")["config"]["rank_pattern"] == {path: 2}
    ours = BERT.build()
    dt.load(ours, tmp_path / "d")
    torch.testing.assert_close(BERT.output(ours.eval()), BERT.output(theirs), rtol=0, atol=1e-6)
    assert (BERT.output(ours) - BERT.output(BERT.build())).abs().max() > 1e-4


def test_peft_options_deltatune_lacks_are_refused_by_name(tmp_path):
    peft = pytest.importorskip("peft")
    _, theirs = _peft_pair()
    theirs.peft_config["default"].alpha_pattern = {"query": 4}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path / "p")
    with pytest.raises(dt.ConfigError, match="alpha_pattern"):
        import_peft(tmp_path / "p", tmp_path / "d", BERT.build())
    assert peft  # the real peft wrote the folder


# ---------------------------------------------------------------------------------------------
# the command line


def test_train_from_flags(tmp_path, tiny_bert, reviews_csv):
    out = train_from_the_command_line(tmp_path, tiny_bert, reviews_csv, ["--method", "adalora", "--init-r", "4",
                                      "--target-r", "2", "--tinit", "2", "--tfinal", "3", "--delta-t", "2"], steps=12)
    meta = dt.read_meta(out)
    assert meta["config"]["init_r"] == 4 and meta["config"]["delta_t"] == 2
    ranks = meta["config"]["rank_pattern"] or {}
    sites = [s for s in meta["sites"] if s]
    assert sum(ranks.get(s, 4) for s in sites) == 2 * len(sites)  # the final budget reached
    history = json.loads((out / "history.json").read_text())["train"]
    assert len(history) == 12
