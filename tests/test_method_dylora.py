"""DyLoRA (arXiv:2210.07558): the truncated update against a naive reference, the rank drawn
per step (deterministic, resumable), a rank chosen at load time equal to the truncated
factors, mixed batches, merging, the peft refusal and the CLI."""

from __future__ import annotations

import json
import random

import pytest
import torch
from tiny_models import MODELS
from method_checks import (assert_linear_merge_equals_dense_reference, assert_peft_export_is_refused, encoded_examples,
                           interrupt_after_step, randomise as _randomise, train_from_the_command_line)

import deltatune as dt
from deltatune.core.inject import after_step
from deltatune.methods.dylora import DyLoRAConfig, DyLoRALinear

BERT, GPT2 = MODELS["bert"], MODELS["gpt2"]


def _units(model, name="x"):
    return {path: slot[name] for path, _, slot in _sites(model) if name in slot}


def _sites(model):
    from deltatune.core.slot import slot_sites

    return slot_sites(model)


# ---------------------------------------------------------------------------------------------
# the maths


@pytest.mark.parametrize("case", [BERT, GPT2], ids=["linear", "conv1d"])
@pytest.mark.parametrize("training", [False, True])
def test_update_is_the_first_b_rows_scaled_alpha_over_b(case, training):
    model = case.build()
    targets = ["query", "value"] if case is BERT else ["c_attn", "mlp.c_proj"]
    dt.attach(model, DyLoRAConfig(r=6, alpha=12.0, eval_rank=5, targets=targets, dropout=0.0), name="x")
    _randomise(model, "x")
    model.train(training)
    for path, unit in _units(model).items():
        unit.train_rank.fill_(2)
        b = 2 if training else 5
        module = model.get_submodule(path)
        A, B = unit.lora_A.detach(), unit.lora_B.detach()
        delta = (12.0 / b) * B[:, :b] @ A[:b]  # (out, in)
        transposed = case is GPT2
        weight = module.weight.detach()
        full = weight + (delta.T if transposed else delta)
        x = torch.randn(2, 5, full.shape[0] if transposed else full.shape[1], generator=torch.Generator().manual_seed(1))
        expected = (x @ full if transposed else x @ full.T) + module.bias.detach()
        with torch.no_grad():
            torch.testing.assert_close(module(x), expected, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# the rank drawn per step


def test_ranks_depend_on_seed_and_step_only():
    config = DyLoRAConfig(r=8, r_min=2, seed=5)
    first = [config.rank_for_step(s) for s in range(200)]
    torch.manual_seed(123)
    random.seed(99)
    assert [config.rank_for_step(s) for s in range(200)] == first
    assert set(first) == set(range(2, 9))  # every rank of the range is drawn
    assert [DyLoRAConfig(r=8, r_min=2, seed=6).rank_for_step(s) for s in range(200)] != first


def test_the_step_hook_sets_the_next_steps_rank():
    model = BERT.build()
    dt.attach(model, DyLoRAConfig(r=8, seed=4, targets=["query"]), name="x")
    config = dt.get_config(model, "x")
    assert all(int(u.train_rank) == config.rank_for_step(0) for u in _units(model).values())
    for step in (1, 2, 7):
        after_step(model, step, 10)
        assert all(int(u.train_rank) == config.rank_for_step(step) for u in _units(model).values())


def test_training_uses_the_drawn_rank_and_resumes_to_the_same_delta(tmp_path, monkeypatch):
    from deltatune.train import loop

    data = encoded_examples(tmp_path, 40)
    settings = loop.Settings(steps=10, batch_size=8, lr=1e-2, save_every=3, progress=False)
    config = DyLoRAConfig(r=6, r_min=1, seed=2, targets=["query", "value"])
    used: list[int] = []
    watched: dict[str, int] = {}
    real_forward = DyLoRALinear.forward_post

    def recording(self, module, args, kwargs, output):
        if self.training and id(self) == watched["unit"]:
            used.append(self.active_rank())
        return real_forward(self, module, args, kwargs, output)

    def run(folder, resume=False):
        model = BERT.build()
        dt.attach(model, config, name="x")
        watched["unit"] = id(next(iter(_units(model).values())))
        loop.train(model, data, settings, checkpoint_dir=folder, resume=resume)
        return {k: p.detach().clone() for k, p in dt.delta_parameters(model, "x")}

    monkeypatch.setattr(DyLoRALinear, "forward_post", recording)
    straight = run(tmp_path / "straight")
    assert used == [config.rank_for_step(s) for s in range(10)]
    interrupt_after_step(monkeypatch, 5, run, tmp_path / "killed")
    assert json.loads((tmp_path / "killed" / "latest.json").read_text())["step"] == 3
    used.clear()
    resumed = run(tmp_path / "killed", resume=True)
    assert used == [config.rank_for_step(s) for s in range(3, 10)]
    for key, value in straight.items():
        assert torch.equal(resumed[key], value), key


# ---------------------------------------------------------------------------------------------
# a rank chosen at load time


def test_a_rank_chosen_at_load_equals_the_truncated_factors(tmp_path):
    model = BERT.build()
    dt.attach(model, DyLoRAConfig(r=8, alpha=16.0, targets=["query", "value"]), name="x")
    _randomise(model, "x")
    dt.save(model, tmp_path / "d")
    full = BERT.output(model.eval())
    loaded = BERT.build()
    dt.load(loaded, tmp_path / "d", overrides={"eval_rank": 3})
    assert dt.get_config(loaded, "x").eval_rank == 3
    reference = BERT.build()
    dt.attach(reference, dt.LoRAConfig(r=3, alpha=16.0, targets=["query", "value"]), name="lora")
    with torch.no_grad():
        for path, unit in _units(model).items():
            lora = reference.get_submodule(path).deltas["lora"]
            lora.lora_A.copy_(unit.lora_A[:3])
            lora.lora_B.copy_(unit.lora_B[:, :3])
    torch.testing.assert_close(BERT.output(loaded), BERT.output(reference.eval()), rtol=0, atol=1e-6)
    assert (BERT.output(loaded) - full).abs().max() > 1e-4  # another rank, other outputs
    dt.save(loaded, tmp_path / "rank3")  # saved again: all rows, the chosen rank recorded
    assert dt.read_meta(tmp_path / "rank3")["config"]["eval_rank"] == 3
    again = BERT.build()
    dt.load(again, tmp_path / "rank3", overrides={"eval_rank": None})
    torch.testing.assert_close(BERT.output(again), full, rtol=0, atol=0)


def test_bad_load_overrides_are_refused_and_leave_the_model_untouched(tmp_path):
    model = BERT.build()
    dt.attach(model, DyLoRAConfig(r=4, targets=["query"]), name="x")
    dt.save(model, tmp_path / "d")
    fresh = BERT.build()
    with pytest.raises(dt.ConfigError, match="eval_rank"):
        dt.load(fresh, tmp_path / "d", overrides={"eval_rank": 5})
    with pytest.raises(dt.ConfigError, match=r"\['rank'\] are not fields of DyLoRAConfig"):
        dt.load(fresh, tmp_path / "d", overrides={"rank": 2})
    with pytest.raises(dt.DeltaFileError, match="shape"):
        dt.load(fresh, tmp_path / "d", overrides={"r": 2})
    assert not dt.list_deltas(fresh)


# ---------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("fields,named", [
    ({"r": 0}, "r must"), ({"r": 4, "r_min": 5}, "r_min"), ({"r_min": 0}, "r_min"), ({"alpha": -1.0}, "alpha"),
    ({"r": 4, "eval_rank": 5}, "eval_rank"), ({"dropout": 1.0}, "dropout"),
])
def test_bad_field_values_fail_at_construction_naming_the_field(fields, named):
    with pytest.raises(dt.ConfigError, match=named):
        DyLoRAConfig(**fields)


def test_modules_it_cannot_adapt_fail_at_attach_and_leave_the_model_untouched():
    model = BERT.build()
    with pytest.raises(dt.TargetError, match="word_embeddings.*Embedding"):
        dt.attach(model, DyLoRAConfig(targets=["word_embeddings"]), name="x")
    assert not dt.list_deltas(model) and not any(hasattr(m, "deltas") for m in model.modules())


# ---------------------------------------------------------------------------------------------
# mixed batches, merging, peft


def test_mixed_batch_rows_equal_each_row_alone():
    model = BERT.build()
    dt.attach(model, DyLoRAConfig(r=6, eval_rank=4, targets=["query", "value"]), name="a")
    dt.attach(model, DyLoRAConfig(r=3, alpha=5.0, targets=["query", "key"]), name="b")
    dt.attach(model, dt.LoRAConfig(r=2, targets=["value"]), name="c")
    for i, name in enumerate("abc"):
        _randomise(model, name, seed=i)
    model.eval()
    inputs = BERT.inputs()
    for ids in (["a", "b", None], ["c", "a", "b"]):
        mixed = model(**inputs, delta_ids=ids).logits
        for row, name in enumerate(ids):
            one = {k: v[row:row + 1] for k, v in inputs.items()}
            with dt.using(model, name):
                torch.testing.assert_close(model(**one).logits[0], mixed[row], rtol=1e-5, atol=1e-5)


def test_linear_merge_and_task_vector_equal_the_dense_updates(tmp_path):
    folders, dense = [], {}
    for seed in (0, 1):
        model = BERT.build()
        dt.attach(model, DyLoRAConfig(r=4, eval_rank=3, targets=["query", "value"]), name="x")
        _randomise(model, "x", seed=seed)
        vector = dt.TaskVector.from_delta(model, "x")
        for path, unit in _units(model).items():
            update = (16.0 / 3) * unit.lora_B.detach()[:, :3] @ unit.lora_A.detach()[:3]
            torch.testing.assert_close(vector[f"{path}.weight"].dense(), update, rtol=1e-5, atol=1e-6)
            dense[path] = dense.get(path, 0) + 0.5 * update
        dt.save(model, tmp_path / f"d{seed}")
        folders.append(tmp_path / f"d{seed}")
    assert_linear_merge_equals_dense_reference(BERT, folders, [0.5, 0.5], dense)


def test_peft_export_is_refused_with_the_reason(tmp_path):
    model = BERT.build()
    dt.attach(model, DyLoRAConfig(r=4, targets=["query"]), name="x")
    assert_peft_export_is_refused(tmp_path, model, "peft has no DyLoRA adapter")


def test_train_from_flags(tmp_path, tiny_bert, reviews_csv):
    out = train_from_the_command_line(tmp_path, tiny_bert, reviews_csv, ["--method", "dylora", "--r", "4", "--r-min", "2",
                                      "--dylora-seed", "3"], steps=12)
    config = dt.read_meta(out)["config"]
    assert (config["r"], config["r_min"], config["seed"], config["eval_rank"]) == (4, 2, 3, None)
