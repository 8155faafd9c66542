"""Several deltas trained in one step on mixed batches.

Reference: each delta trained alone by ``loop.train`` on exactly its own rows (same seed,
same initial tensors, dropout off), and gradients taken of one task's loss alone.
"""

from __future__ import annotations

import csv
import json
import random

import pytest
import torch
import transformers
from conftest import write_reviews

import deltatune as dt
from deltatune.cli import main
from deltatune.errors import ConfigError
from deltatune.io.artifact import head_rows
from deltatune.train.batches import Encoded
from deltatune.train.job import TrainJob
from deltatune.train.loop import Settings, train
from deltatune.train.multi import Task, check_jobs, mixed_batch, task_losses, train_tasks

STEPS = 4
CONFIGS = {
    "sentiment": dt.LoRAConfig(r=4, targets=["query", "value"], modules_to_save=["classifier"]),
    "topic": dt.AdapterConfig(bottleneck=6, modules_to_save=["classifier"]),
}
ROWS_PER_STEP = {"sentiment": 3, "topic": 5}


def _base() -> torch.nn.Module:
    config = transformers.BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32, num_labels=2,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


def _data(seed: int, size: int = 13) -> Encoded:
    rng = random.Random(seed)
    ids = [[2] + [rng.randrange(5, 60) for _ in range(rng.randrange(3, 9))] for _ in range(size)]
    return Encoded(ids, [rng.randrange(2) for _ in range(size)], "classification", 0)


def _tasks() -> list[Task]:
    return [Task(name, _data(seed), ROWS_PER_STEP[name]) for seed, name in enumerate(CONFIGS)]


def _with_deltas(names) -> torch.nn.Module:
    """The base with the named deltas, their tensors moved off their (partly zero) initial values."""
    model = _base()
    generator = torch.Generator().manual_seed(5)
    for name in names:
        dt.attach(model, CONFIGS[name], name=name, activate=False)
        with torch.no_grad():
            for _, p in dt.delta_parameters(model, name):
                p.add_(0.2 * torch.randn(p.shape, generator=generator))
    return model


def _tensors(model, name) -> dict[str, torch.Tensor]:
    return {key: p.detach().clone() for key, p in dt.delta_parameters(model, name)}


def _settings(**changes) -> Settings:
    return Settings(**{"steps": STEPS, "lr": 1e-2, "seed": 3, "progress": False, **changes})


def test_training_deltas_together_equals_training_each_alone_on_its_rows():
    tasks = _tasks()
    together = _with_deltas(CONFIGS)
    initial = {name: _tensors(together, name) for name in CONFIGS}
    train_tasks(together, tasks, _settings())
    for task in tasks:
        alone = _base()
        dt.attach(alone, CONFIGS[task.name], name=task.name)
        with torch.no_grad():
            for key, p in dt.delta_parameters(alone, task.name):
                p.copy_(initial[task.name][key])
        train(alone, task.train, _settings(batch_size=task.rows_per_step))
        expected, got = _tensors(alone, task.name), _tensors(together, task.name)
        assert expected.keys() == got.keys()
        for key in expected:
            assert not torch.equal(got[key], initial[task.name][key]), f"{task.name} {key} did not train"
            # The mixed batch runs LoRA/adapters through gathered bmm kernels, the lone run through
            # plain Linear calls: float32 rounding (~1e-7 relative) differs, and AdamW normalises
            # each update to ~lr, so after 4 steps at lr 1e-2 the deltas agree to well within 1e-5.
            torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-5,
                                       msg=lambda m, key=key, name=task.name: f"{name} {key}: {m}")


def test_a_delta_gets_no_gradient_from_another_tasks_rows():
    tasks = _tasks()
    model = _with_deltas(CONFIGS)
    batch, names, spans = mixed_batch([(tasks[0], [0, 1, 2]), (tasks[1], [3, 4, 5, 6])])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], delta_ids=names).logits
    losses = task_losses(logits, batch["labels"], spans, "classification")
    sentiment = [p for _, p in dt.delta_parameters(model, "sentiment")]
    topic = [p for _, p in dt.delta_parameters(model, "topic")]
    from_topic_rows = torch.autograd.grad(losses["topic"], sentiment, allow_unused=True, retain_graph=True)
    assert all(g is None or not g.any() for g in from_topic_rows)
    from_sentiment_rows = torch.autograd.grad(losses["sentiment"], topic, allow_unused=True, retain_graph=True)
    assert all(g is None or not g.any() for g in from_sentiment_rows)
    own = torch.autograd.grad(losses["sentiment"], sentiment)
    assert all(g.any() for g in own)


def test_a_task_without_rows_in_the_batch_gets_zero_gradient():
    tasks = _tasks()
    model = _with_deltas(CONFIGS)
    batch, names, spans = mixed_batch([(tasks[0], [0, 1, 2]), (tasks[1], [])])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], delta_ids=names).logits
    losses = task_losses(logits, batch["labels"], spans, "classification")
    assert set(losses) == {"sentiment"}
    sum(losses.values()).backward()
    assert all(p.grad is None or not p.grad.any() for _, p in dt.delta_parameters(model, "topic"))
    assert all(p.grad is not None and p.grad.any() for _, p in dt.delta_parameters(model, "sentiment"))


def test_the_step_loss_is_the_sum_of_each_tasks_mean_loss():
    tasks = _tasks()
    model = _with_deltas(CONFIGS)
    batch, names, spans = mixed_batch([(tasks[0], [0, 1]), (tasks[1], [2, 3, 4])])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], delta_ids=names).logits
        losses = task_losses(logits, batch["labels"], spans, "classification")
        for task, rows in ((tasks[0], [0, 1]), (tasks[1], [2, 3, 4])):
            with dt.using(model, task.name):
                alone = model(**task.train.collate(rows)).loss  # transformers' own mean loss
            torch.testing.assert_close(losses[task.name], alone, rtol=1e-5, atol=1e-6)


def test_shared_settings_that_differ_are_refused_naming_the_option():
    jobs = {"a": TrainJob(method="lora", steps=5, lr=1e-3), "b": TrainJob(method="ia3", steps=7, lr=1e-3)}
    with pytest.raises(ConfigError, match=r"tasks disagree on steps: \{'a': 5, 'b': 7\}.*--steps"):
        check_jobs(jobs)
    jobs = {"a": TrainJob(method="lora", steps=5), "b": TrainJob(method="ia3", steps=5)}
    with pytest.raises(ConfigError, match=r"different default learning rates.*pass --lr"):
        check_jobs(jobs)


def _yaml(path, model, data, method):
    path.write_text(f"model: {model}\ndata: {data}\ntext_column: review\nlabel_column: sentiment\nmethod: {method}\n"
                    f"steps: 6\nbatch_size: 4\nmax_length: 16\n")
    return path


def _three_label_csv(path):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["review", "sentiment"])
        for i in range(60):
            writer.writerow([f"the movie was {['good', 'bad', 'dull'][i % 3]} {i % 7}", ["pos", "neg", "meh"][i % 3]])
    return path


def test_tasks_of_different_label_counts_train_together_and_each_keeps_its_own_head(tmp_path, tiny_bert, capsys):
    a = _yaml(tmp_path / "two.yaml", tiny_bert, write_reviews(tmp_path / "a.csv"), "lora")
    b = _yaml(tmp_path / "three.yaml", tiny_bert, _three_label_csv(tmp_path / "b.csv"), "lora")
    out = tmp_path / "out"
    assert main(["train", "--multi", str(a), str(b), "--out", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "metrics.json").read_text())
    for name, labels in (("two", ["neg", "pos"]), ("three", ["meh", "neg", "pos"])):
        meta = dt.read_meta(out / name)
        assert meta["labels"] == labels
        assert head_rows(meta) == len(labels)  # the shared 3-wide head narrowed to the task's labels
        capsys.readouterr()
        assert main(["eval", "--delta", str(out / name), "--no-progress"]) == 0  # a fresh base of its own width
        evaluated = json.loads(capsys.readouterr().out)["test"]
        assert evaluated == pytest.approx(summary["tasks"][name]["test"], abs=1e-6)


def test_cli_trains_two_deltas_and_each_evaluates_as_recorded(tmp_path, tiny_bert, capsys):
    a = _yaml(tmp_path / "reviews.yaml", tiny_bert, write_reviews(tmp_path / "a.csv", seed=0), "lora")
    b = _yaml(tmp_path / "more_reviews.yaml", tiny_bert, write_reviews(tmp_path / "b.csv", rows=80, seed=1), "ia3")
    out = tmp_path / "out"
    assert main(["train", "--multi", str(a), str(b), "--out", str(out), "--lr", "0.01", "--no-progress"]) == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert set(summary["tasks"]) == {"reviews", "more_reviews"} and summary["steps"] == 6
    for name, method in (("reviews", "lora"), ("more_reviews", "ia3")):
        folder = out / name
        assert {"delta.safetensors", "delta.json", "metrics.json", "config.yaml"} <= {p.name for p in folder.iterdir()}
        recorded = json.loads((folder / "metrics.json").read_text())
        assert recorded["method"] == method and set(recorded["test"]) == {"accuracy", "macro_f1", "loss"}
        assert dt.read_meta(folder)["name"] == name
        capsys.readouterr()
        assert main(["eval", "--delta", str(folder), "--no-progress"]) == 0  # a fresh base + dt.load
        evaluated = json.loads(capsys.readouterr().out)["test"]
        assert evaluated == pytest.approx(recorded["test"], abs=1e-6)


def test_narrowing_a_nested_head_keeps_its_first_outputs():
    from tiny_models import ARCHITECTURES

    from deltatune.train.multi import narrow_heads

    case = ARCHITECTURES["roberta"]  # classifier = dense (32 -> 32) then out_proj (32 -> 3)
    model = case.build()
    dt.attach(model, dt.LoRAConfig(r=2, modules_to_save=["classifier"]), name="task")
    with torch.no_grad():
        before = case.output(model)
        narrow_heads(model, "task", width=3, rows=2)
        torch.testing.assert_close(case.output(model), before[:, :2], rtol=0, atol=0)
