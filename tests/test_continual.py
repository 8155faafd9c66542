"""Continual learning: per-task deltas keep earlier tasks exact; sequential full fine-tuning does not."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from conftest import write_reviews

import deltatune as dt
from deltatune.data.datasets import load_dataset
from deltatune.errors import ConfigError, DeltaStateError
from deltatune.models.load import load_model
from deltatune.train.batches import encode
from deltatune.train.loop import Settings, train
from deltatune.train.metrics import evaluate
from deltatune.train.sequence import Task, deltas_in_sequence, full_in_sequence, task_labels_only, train_delta

SETTINGS = Settings(steps=8, batch_size=8, lr=1e-2, seed=0, progress=False)
FULL_SETTINGS = Settings(steps=8, batch_size=8, lr=1e-3, seed=0, progress=False)


def _flipped_reviews(path: Path, seed: int) -> Path:
    """A review CSV whose labels are the opposite of what its words say (a task that conflicts)."""
    source = write_reviews(path.with_name(f"source-{path.name}"), rows=60, seed=seed)
    with open(source, newline="") as handle:
        rows = list(csv.reader(handle))
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(rows[0])
        writer.writerows([text, {"pos": "neg", "neg": "pos"}[label]] for text, label in rows[1:])
    return path


@pytest.fixture
def task_files(tmp_path) -> list[Path]:
    return [write_reviews(tmp_path / "first.csv", rows=60, seed=1), _flipped_reviews(tmp_path / "second.csv", seed=2),
            write_reviews(tmp_path / "third.csv", rows=60, seed=3)]


def _model_and_tasks(folder: Path, files: list[Path]):
    splits = [load_dataset(str(f), 0, text_column="review", label_column="sentiment") for f in files]
    torch.manual_seed(0)
    loaded = load_model(str(folder), "classification", 2, splits[0].labels)
    tasks = [Task(f.stem, encode(s.train, loaded.tokenizer, s.task, 16, s.labels),
                  encode(s.test, loaded.tokenizer, s.task, 16, s.labels)) for f, s in zip(files, splits)]
    return loaded.model, tasks


def _logits(model, task: Task) -> torch.Tensor:
    batch = task.test.collate(list(range(len(task.test))))
    batch.pop("labels")
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def _lora() -> dt.LoRAConfig:
    return dt.LoRAConfig(r=4, alpha=8, modules_to_save=("classifier",))


def test_a_later_delta_leaves_an_earlier_delta_outputs_bit_identical(tiny_bert, task_files):
    model, (first, second, _) = _model_and_tasks(tiny_bert, task_files)
    dt.attach(model, _lora(), name="first")
    train_delta(model, "first", first.train, SETTINGS)
    with dt.using(model, "first"):
        before = _logits(model, first)
    dt.attach(model, _lora(), name="second")
    with dt.using(model, "second"):
        untrained_second = _logits(model, second)
    train_delta(model, "second", second.train, SETTINGS)
    with dt.using(model, "second"):
        assert not torch.allclose(_logits(model, second), untrained_second)  # the later task did train
    with dt.using(model, "first"):
        assert torch.equal(_logits(model, first), before)


def test_deltas_trained_in_sequence_equal_deltas_trained_alone_on_a_fresh_base(tiny_bert, task_files):
    model, tasks = _model_and_tasks(tiny_bert, task_files)
    deltas_in_sequence(model, tasks, _lora(), SETTINGS)
    for index, task in enumerate(tasks):
        alone, alone_tasks = _model_and_tasks(tiny_bert, task_files)
        torch.manual_seed(SETTINGS.seed)
        dt.attach(alone, _lora(), name=task.name)
        train_delta(alone, task.name, alone_tasks[index].train, SETTINGS)
        in_sequence = dict(dt.delta_parameters(model, task.name))
        reference = dict(dt.delta_parameters(alone, task.name))
        assert in_sequence.keys() == reference.keys()
        assert all(torch.equal(in_sequence[key], reference[key]) for key in reference), task.name


def test_per_task_deltas_keep_every_earlier_task_metrics_exactly(tiny_bert, task_files):
    model, tasks = _model_and_tasks(tiny_bert, task_files)
    result = deltas_in_sequence(model, tasks, _lora(), SETTINGS)
    assert [sorted(stage) for stage in result.after] == [["first"], ["first", "second"], ["first", "second", "third"]]
    for index, task in enumerate(tasks):
        assert result.changed_after_training(task.name) == []
        assert all(result.after[later][task.name] == result.after[index][task.name] for later in range(index, 3))
        with dt.using(model, task.name):  # the recorded metrics are the task's own delta on its test split
            assert result.after[-1][task.name] == evaluate(model, task.test)
    delta_size = sum(p.numel() for _, p in dt.delta_parameters(model, "first"))
    assert result.trainable_parameters == [delta_size] * 3
    assert result.accuracy_matrix()[0][1:] == [None, None]


def test_sequential_full_fine_tuning_changes_earlier_task_outputs(tiny_bert, task_files):
    model, tasks = _model_and_tasks(tiny_bert, task_files)
    result = full_in_sequence(model, tasks, FULL_SETTINGS)
    assert result.changed_after_training("first") == ["second", "third"]
    assert result.after[1]["first"]["loss"] != result.after[0]["first"]["loss"]
    assert result.trainable_parameters == [dt.count_parameters(model)] * 3
    # the model keeps the last task's head: its recorded metrics are the model's own
    assert result.after[-1]["third"] == evaluate(model, tasks[-1].test)


def test_the_first_full_fine_tuning_stage_equals_plain_fine_tuning_on_that_task(tiny_bert, task_files):
    model, tasks = _model_and_tasks(tiny_bert, task_files)
    result = full_in_sequence(model, tasks[:2], FULL_SETTINGS)
    reference, reference_tasks = _model_and_tasks(tiny_bert, task_files)
    reference.requires_grad_(True)
    train(reference, reference_tasks[0].train, FULL_SETTINGS)
    assert result.after[0]["first"] == evaluate(reference, reference_tasks[0].test)
    assert result.after[1]["first"] != result.after[0]["first"]


def test_a_task_with_fewer_labels_than_the_head_is_scored_over_its_own_classes(tiny_bert, task_files):
    splits = load_dataset(str(task_files[0]), 0, text_column="review", label_column="sentiment")
    torch.manual_seed(0)
    loaded = load_model(str(tiny_bert), "classification", 3)  # a head wider than the task's 2 labels
    test = encode(splits.test, loaded.tokenizer, splits.task, 16, splits.labels)
    batch = test.collate(list(range(len(test))))
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = loaded.model.eval()(**batch).logits
    reference = (logits[:, :2].argmax(-1) == labels).float().mean().item()
    reference_loss = torch.nn.functional.cross_entropy(logits[:, :2], labels).item()
    with task_labels_only(loaded.model, 2):
        scored = evaluate(loaded.model, test)
    assert scored["accuracy"] == pytest.approx(reference, abs=1e-12)
    assert scored["loss"] == pytest.approx(reference_loss, rel=1e-6)
    with torch.no_grad():
        assert loaded.model(**batch).logits.shape[-1] == 3  # the cut ends with the block


def test_bad_sequences_are_refused_with_clear_errors(tiny_bert, task_files):
    model, tasks = _model_and_tasks(tiny_bert, task_files)
    with pytest.raises(ConfigError, match="more than once"):
        deltas_in_sequence(model, [tasks[0], tasks[0]], _lora(), SETTINGS)
    with pytest.raises(ConfigError, match="no tasks"):
        full_in_sequence(model, [], FULL_SETTINGS)
    with pytest.raises(ConfigError, match="no module 'head'"):
        full_in_sequence(model, tasks, FULL_SETTINGS, head="head")
    dt.attach(model, _lora(), name="first")
    with pytest.raises(DeltaStateError, match="plain model"):
        full_in_sequence(model, tasks, FULL_SETTINGS)
    with pytest.raises(DeltaStateError, match="already"):
        deltas_in_sequence(model, tasks, _lora(), SETTINGS)
