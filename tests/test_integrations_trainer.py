"""transformers Trainer and TRL's SFTTrainer on models with deltatune deltas
(deltatune.integrations): what they save, resuming, per-step hooks, and peft exports loaded
by transformers' own adapter loading."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
import transformers

import deltatune as dt
from deltatune.integrations import STATE_FILE, DeltaTrainer, DeltaTrainerMixin
from deltatune.methods.adalora.allocator import units_of

VOCAB = 100
BASE_FILES = {"model.safetensors", "pytorch_model.bin", "config.json", "generation_config.json"}


def _bert(seed: int = 0) -> transformers.BertForSequenceClassification:
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32, num_labels=2)
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(config)


def _rows(count: int = 32) -> list[dict]:
    """Sequences whose label is whether token 7 occurs in them: learnable in a few steps."""
    generator = torch.Generator().manual_seed(0)
    rows = []
    for i in range(count):
        ids = torch.randint(10, VOCAB, (8,), generator=generator)
        if i % 2:
            ids[i % 8] = 7
        rows.append({"input_ids": ids, "labels": i % 2})
    return rows


def _args(folder: Path, **overrides) -> transformers.TrainingArguments:
    settings = dict(max_steps=6, save_steps=3, per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
                    use_cpu=True, disable_tqdm=True, logging_steps=1, seed=0, save_total_limit=None)
    return transformers.TrainingArguments(str(folder), **{**settings, **overrides})


def _lora(model, name: str = "default"):
    return dt.attach(model, dt.LoRAConfig(r=4, alpha=8, modules_to_save=["classifier"]), name=name)


def _logits(model, rows) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.stack([r["input_ids"] for r in rows])).logits


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


class _StopAt(transformers.TrainerCallback):
    """Ends training after ``step`` optimizer steps, as an interruption would (the checkpoint of
    that step is written first)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


# ---------------------------------------------------------------------------------------------
# what is saved


def test_save_model_writes_a_delta_folder_that_load_reads_on_a_fresh_base(tmp_path):
    model = _bert()
    _lora(model)
    base = {k: v.clone() for k, v in dt.base_parameters(model)}
    trainer = DeltaTrainer(model=model, args=_args(tmp_path / "run", save_strategy="no"), train_dataset=_rows())
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))

    files = {p.name for p in (tmp_path / "final").iterdir()}
    assert {"delta.safetensors", "delta.json"} <= files and not files & BASE_FILES and STATE_FILE not in files
    for key, value in dt.base_parameters(model):
        assert torch.equal(value, base[key]), f"base tensor {key} changed"
    fresh = _bert()
    dt.load(fresh, tmp_path / "final")  # checks the base fingerprint recorded in delta.json
    torch.testing.assert_close(_logits(fresh, _rows(8)), _logits(model, _rows(8)), rtol=0, atol=0)
    assert not torch.equal(_logits(fresh, _rows(8)), _logits(_bert(), _rows(8)))  # the delta trained


def test_a_checkpoint_holds_the_delta_and_trainers_own_state_but_no_base_tensors(tmp_path):
    model = _bert()
    _lora(model)
    DeltaTrainer(model=model, args=_args(tmp_path / "delta"), train_dataset=_rows()).train()
    checkpoint = tmp_path / "delta" / "checkpoint-3"
    files = {p.name for p in checkpoint.iterdir()}
    assert {"delta.safetensors", "delta.json", STATE_FILE, "optimizer.pt", "scheduler.pt", "rng_state.pth",
            "trainer_state.json", "training_args.bin"} <= files
    assert not files & BASE_FILES
    assert dt.read_meta(checkpoint)["base"]["sha256"]  # an ordinary delta folder with the base fingerprint

    plain = _bert()
    _lora(plain)
    transformers.Trainer(model=plain, args=_args(tmp_path / "plain"), train_dataset=_rows()).train()
    ours = sum((checkpoint / name).stat().st_size for name in ("delta.safetensors", STATE_FILE))
    theirs = (tmp_path / "plain" / "checkpoint-3" / "model.safetensors").stat().st_size
    base_bytes = sum(v.numel() * v.element_size() for _, v in dt.base_parameters(model))
    assert theirs > base_bytes > 4 * ours, (ours, theirs, base_bytes)  # plain Trainer writes every base tensor
    assert _folder_bytes(checkpoint) < _folder_bytes(tmp_path / "plain" / "checkpoint-3")


def test_several_deltas_are_saved_one_folder_each(tmp_path):
    model = _bert()
    _lora(model, "a")
    dt.attach(model, dt.IA3Config(), name="b", activate=False)
    trainer = DeltaTrainer(model=model, args=_args(tmp_path / "run", save_strategy="no", max_steps=2),
                           train_dataset=_rows())
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    assert dt.read_meta(tmp_path / "final" / "a")["method"] == "lora"
    assert dt.read_meta(tmp_path / "final" / "b")["method"] == "ia3"


# ---------------------------------------------------------------------------------------------
# resuming


def _attach(model, method: str) -> None:
    if method == "lora":
        _lora(model)
    else:  # allocations at steps 2 and 4 (tinit=1, delta_t=2): one before and one after the interruption
        dt.attach(model, dt.AdaLoRAConfig(init_r=4, target_r=2, tinit=1, tfinal=2, delta_t=2, targets=["query", "value"],
                                          modules_to_save=["classifier"]))


def _trained(folder: Path, method: str, *, stop_at: int | None = None, resume: str | bool | None = None):
    model = _bert()
    _attach(model, method)
    callbacks = [_StopAt(stop_at)] if stop_at else None
    trainer = DeltaTrainer(model=model, args=_args(folder, max_steps=8, save_steps=4), train_dataset=_rows(),
                           callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    tensors = {}
    for path, _, slot in dt.core.slot.slot_sites(model):
        unit = slot["default"]
        tensors.update({f"{path}.{k}": v.detach().clone() for k, v in [*unit.named_parameters(), *unit.named_buffers()]})
    return model, tensors


@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_a_resumed_run_ends_with_the_uninterrupted_delta(tmp_path, method):
    _, straight = _trained(tmp_path / "straight", method)
    _trained(tmp_path / "killed", method, stop_at=4)
    assert json.loads((tmp_path / "killed" / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 4
    assert not (tmp_path / "killed" / "checkpoint-8").exists()
    resumed_model, resumed = _trained(tmp_path / "killed", method, resume=True)  # the last checkpoint: checkpoint-4
    assert set(resumed) == set(straight)
    for key, value in straight.items():  # parameters, the allocator's masks and statistics: bit for bit
        assert torch.equal(resumed[key], value), key
    if method == "adalora":
        assert any(not bool(unit.mask.all()) for _, unit in units_of(resumed_model, "default"))


def test_load_best_model_at_end_restores_the_best_checkpoints_delta(tmp_path):
    import safetensors.torch

    model = _bert()
    _lora(model)
    args = _args(tmp_path / "run", max_steps=9, eval_strategy="steps", eval_steps=3, load_best_model_at_end=True,
                 metric_for_best_model="loss", greater_is_better=True)  # the worst loss: an earlier checkpoint
    trainer = DeltaTrainer(model=model, args=args, train_dataset=_rows(), eval_dataset=_rows(8))
    trainer.train()
    best = Path(trainer.state.best_model_checkpoint)
    assert best.name != "checkpoint-9"  # so the delta was put back, not just left as trained
    saved = safetensors.torch.load_file(str(best / STATE_FILE))
    for path, _, slot in dt.core.slot.slot_sites(model):
        for key, value in slot["default"].named_parameters():
            assert torch.equal(value.detach(), saved[f"default/{path}.{key}"]), (best.name, path, key)


def test_adalora_allocates_ranks_and_adds_its_penalty_inside_the_trainer(tmp_path):
    model = _bert()
    _attach(model, "adalora")
    trainer = DeltaTrainer(model=model, args=_args(tmp_path / "run", save_strategy="no"), train_dataset=_rows())
    batch = {"input_ids": torch.stack([r["input_ids"] for r in _rows(4)]), "labels": torch.tensor([0, 1, 0, 1])}
    model.train()
    torch.manual_seed(0)
    got = trainer.compute_loss(model, dict(batch))
    torch.manual_seed(0)
    expected = model(**batch).loss + dt.loss_terms(model)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    trainer.train()
    units = dict(units_of(model, "default"))
    ranks = [int(unit.mask.sum()) for unit in units.values()]
    assert sum(ranks) == 2 * len(units) and set(ranks) != {4}  # the budget of target_r=2 per module was allocated
    assert all(unit.sensitivity_lora_E.abs().sum() > 0 for unit in units.values())  # it saw the gradients


def _one_sgd_step(tmp_path, batch: int, accumulation: int) -> dict[str, torch.Tensor]:
    model = _bert()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    dt.attach(model, dt.AdaLoRAConfig(init_r=4, target_r=2, orth_reg_weight=1.0, tinit=5, targets=["query", "value"]))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # factors far from orthogonal: a large penalty
        for _, param in dt.delta_parameters(model, "default"):
            param.add_(0.3 * torch.randn(param.shape, generator=generator))
    args = _args(tmp_path / f"b{batch}", max_steps=1, save_strategy="no", optim="sgd", learning_rate=0.5,
                 per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation, max_grad_norm=0,
                 lr_scheduler_type="constant")
    DeltaTrainer(model=model, args=args, train_dataset=_rows(4)).train()
    return {key: value.detach().clone() for key, value in dt.delta_parameters(model, "default")}


def test_the_penalty_counts_once_per_optimizer_step_under_gradient_accumulation(tmp_path):
    whole, accumulated = _one_sgd_step(tmp_path, 4, 1), _one_sgd_step(tmp_path, 2, 2)
    # batch-size float noise is about 1e-4 here; the penalty added at every micro-batch moves it by 9e-2
    assert max((whole[key] - accumulated[key]).abs().max().item() for key in whole) < 1e-3


# ---------------------------------------------------------------------------------------------
# bad input on resume


def test_resuming_from_a_checkpoint_without_a_delta_names_the_problem_and_fix(tmp_path):
    plain = _bert()
    _lora(plain)
    transformers.Trainer(model=plain, args=_args(tmp_path / "plain", max_steps=3), train_dataset=_rows()).train()
    model = _bert()
    _lora(model)
    trainer = DeltaTrainer(model=model, args=_args(tmp_path / "run"), train_dataset=_rows())
    with pytest.raises(dt.DeltaFileError, match=r"holds no deltatune delta .*resume from a checkpoint-N folder that "
                                                r"DeltaTrainer .* or train from the start"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "plain" / "checkpoint-3"))


def test_resuming_with_a_delta_of_another_base_is_refused(tmp_path):
    model = _bert()
    _lora(model)
    DeltaTrainer(model=model, args=_args(tmp_path / "run", max_steps=3), train_dataset=_rows()).train()
    other = _bert(seed=1)
    _lora(other)
    before = {k: v.clone() for k, v in dt.delta_parameters(other, "default")}
    trainer = DeltaTrainer(model=other, args=_args(tmp_path / "again"), train_dataset=_rows())
    with pytest.raises(dt.FingerprintError, match=r"cannot resume from .*checkpoint-3.*made for another base.*"
                                                  r"build the model from the base it was trained on"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))
    for key, value in dt.delta_parameters(other, "default"):
        assert torch.equal(value, before[key])  # nothing was copied


def test_resuming_needs_the_checkpoints_deltas_attached(tmp_path):
    model = _bert()
    _lora(model)
    DeltaTrainer(model=model, args=_args(tmp_path / "run", max_steps=3), train_dataset=_rows()).train()
    renamed = _bert()
    _lora(renamed, "other")
    with pytest.raises(dt.DeltaStateError, match=r"holds deltas \['default'\] but the model has \['other'\]; attach"):
        DeltaTrainer(model=renamed, args=_args(tmp_path / "a"), train_dataset=_rows()).train(
            resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))
    wider = _bert()
    dt.attach(wider, dt.LoRAConfig(r=8, alpha=8, modules_to_save=["classifier"]))
    with pytest.raises(dt.DeltaFileError, match=r"tensor 'default/.*lora_A' has shape \[4, 32\], the attached delta "
                                                r"has \[8, 32\]; attach it with the config recorded"):
        DeltaTrainer(model=wider, args=_args(tmp_path / "b"), train_dataset=_rows()).train(
            resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))


def test_resuming_from_a_save_model_folder_says_it_is_not_a_checkpoint(tmp_path):
    model = _bert()
    _lora(model)
    trainer = DeltaTrainer(model=model, args=_args(tmp_path / "run", save_strategy="no", max_steps=1),
                           train_dataset=_rows())
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    with pytest.raises(dt.DeltaFileError, match=r"it is a finished delta \(save_model\), not a training checkpoint"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "final"))


def test_a_model_without_deltas_is_refused_with_the_fix(tmp_path):
    with pytest.raises(dt.DeltaStateError, match=r"has none; call deltatune.attach\(model, config\) before"):
        DeltaTrainer(model=_bert(), args=_args(tmp_path / "run"), train_dataset=_rows())


# ---------------------------------------------------------------------------------------------
# TRL and peft


TEXTS = ["the movie was very good", "the film is a great plot", "why was the movie dull", "yes the actors love a film"]


def _causal_lm(folder: Path):
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    tokenizer.eos_token = "[SEP]"  # the fixture's BERT vocabulary names no end of sequence
    return transformers.AutoModelForCausalLM.from_pretrained(folder), tokenizer


def test_sft_trainer_trains_a_lora_and_saves_a_delta_that_loads_on_a_fresh_base(tmp_path, tiny_llama):
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")

    class DeltaSFTTrainer(DeltaTrainerMixin, trl.SFTTrainer):
        pass

    model, tokenizer = _causal_lm(tiny_llama)
    dt.attach(model, dt.LoRAConfig(r=4, alpha=8))
    base = {k: v.clone() for k, v in dt.base_parameters(model)}
    start = {k: v.clone() for k, v in dt.delta_parameters(model, "default")}
    args = trl.SFTConfig(str(tmp_path / "sft"), max_steps=24, learning_rate=2e-2, per_device_train_batch_size=8,
                         report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=1, save_strategy="no", seed=0,
                         bf16=False)  # SFTConfig defaults to bf16, under which accelerate keeps the forward in autocast
    trainer = DeltaSFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict({"text": TEXTS * 8}),
                              processing_class=tokenizer)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.1, losses
    for key, value in dt.base_parameters(model):
        assert torch.equal(value, base[key]), f"base tensor {key} changed"
    assert all(not torch.equal(value, start[key]) for key, value in dt.delta_parameters(model, "default")
               if key.endswith("lora_B"))
    trainer.save_model(str(tmp_path / "delta"))
    assert not {p.name for p in (tmp_path / "delta").iterdir()} & BASE_FILES

    fresh, _ = _causal_lm(tiny_llama)
    dt.load(fresh, tmp_path / "delta")
    ids = tokenizer(TEXTS, return_tensors="pt", padding=True)
    model.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(**ids).logits, model(**ids).logits, rtol=0, atol=0)


def test_a_delta_on_the_lm_head_is_refused_under_trls_fused_head(tmp_path, tiny_llama):
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")

    class DeltaSFTTrainer(DeltaTrainerMixin, trl.SFTTrainer):
        pass

    model, tokenizer = _causal_lm(tiny_llama)
    dt.attach(model, dt.LoRAConfig(r=4, targets=["q_proj", "lm_head"]), name="head")
    args = trl.SFTConfig(str(tmp_path / "sft"), max_steps=1, report_to=[], use_cpu=True, bf16=False)
    with pytest.raises(dt.ConfigError, match=r"deltas \['head'\] adapt the LM head .* fused LM head .* leave the head "
                                             r"out of targets and modules_to_save"):
        DeltaSFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict({"text": TEXTS}),
                        processing_class=tokenizer)


def test_a_peft_export_loads_through_transformers_load_adapter(tmp_path, tiny_llama):
    pytest.importorskip("peft")
    from deltatune.interop import export_peft

    model, tokenizer = _causal_lm(tiny_llama)
    dt.attach(model, dt.LoRAConfig(r=4, alpha=8, targets="all-linear"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained-looking delta: B away from its zero start
        for _, param in dt.delta_parameters(model, "default"):
            param.add_(0.2 * torch.randn(param.shape, generator=generator))
    dt.save(model, tmp_path / "delta")
    export_peft(tmp_path / "delta", tmp_path / "peft", transformers.AutoModelForCausalLM.from_pretrained(tiny_llama))

    plain = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama)
    plain.load_adapter(str(tmp_path / "peft"))
    ids = tokenizer(TEXTS, return_tensors="pt", padding=True)
    model.eval(), plain.eval()
    with torch.no_grad():
        expected, got = model(**ids).logits, plain(**ids).logits
        with dt.base_only(model):
            assert not torch.allclose(model(**ids).logits, expected, atol=1e-3)  # the adapter changes the outputs
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_the_readme_trainer_snippet_runs(tmp_path):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"## transformers Trainer and TRL\n.*?```python\n(.*?)```", readme, re.S).group(1)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(block, "README Trainer snippet", "exec"), {})
    finally:
        os.chdir(cwd)
    assert dt.read_meta(tmp_path / "runs" / "trainer" / "delta")["method"] == "lora"
    assert (tmp_path / "runs" / "trainer" / "checkpoint-20" / STATE_FILE).is_file()


# ---------------------------------------------------------------------------------------------
# activation checkpointing


def _routed_sgd_steps(tmp_path, checkpointing: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Two SGD steps over rows routed to delta "a" while "b" is active (``delta_ids`` in the
    batch); the deltas before and after."""
    model = _bert()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for name in ("a", "b"):
        dt.attach(model, dt.LoRAConfig(r=4, alpha=8, targets=["query", "value"]), name=name)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name in ("a", "b"):
            for _, param in dt.delta_parameters(model, name):
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    dt.set_trainable(model, ["a", "b"])
    dt.set_active(model, "b")

    def deltas() -> dict[str, torch.Tensor]:
        return {f"{n}.{k}": p.detach().clone() for n in ("a", "b") for k, p in dt.delta_parameters(model, n)}

    before = deltas()
    rows = [{**row, "delta_ids": 0} for row in _rows(8)]
    args = _args(tmp_path / str(checkpointing), max_steps=2, save_strategy="no", optim="sgd", learning_rate=0.5,
                 lr_scheduler_type="constant", max_grad_norm=0, activation_checkpointing=checkpointing,
                 remove_unused_columns=False)  # keep delta_ids, which the model's forward signature does not name
    DeltaTrainer(model=model, args=args, train_dataset=rows).train()
    return before, deltas()


def test_activation_checkpointing_keeps_a_routed_batchs_deltas_in_the_recompute(tmp_path):
    """Trainer's switch turns on deltatune's checkpointing: the recompute runs the rows through
    "a", as their forward did (Trainer's own would run them through the active "b")."""
    before, plain = _routed_sgd_steps(tmp_path, False)
    _, checkpointed = _routed_sgd_steps(tmp_path, True)
    assert any(not torch.equal(plain[k], before[k]) for k in plain if k.startswith("a."))  # the rows trained "a"
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=0, atol=0, msg=key)
