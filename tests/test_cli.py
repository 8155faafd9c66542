"""The command line end to end on a tiny random model and a tiny CSV."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from deltatune.cli import main


def _train(tmp_path, model, data, *extra, out="run"):
    args = ["train", "--model", str(model), "--data", str(data), "--text-column", "review", "--label-column",
            "sentiment", "--steps", "12", "--batch-size", "8", "--max-length", "16", "--no-progress",
            "--out", str(tmp_path / out), *extra]
    return main(args)


def test_train_writes_delta_metrics_config_and_plot(tmp_path, tiny_bert, reviews_csv):
    assert _train(tmp_path, tiny_bert, reviews_csv, "--method", "lora", "--eval-every", "6") == 0
    out = tmp_path / "run"
    assert {p.name for p in out.iterdir()} >= {"delta.safetensors", "delta.json", "metrics.json", "config.yaml", "loss.png"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"]["sizes"] == {"train": 96, "validation": 12, "test": 12}
    assert metrics["data"]["seed"] == 0 and metrics["seed"] == 0
    assert set(metrics["test"]) == {"accuracy", "macro_f1", "loss"}
    assert 0 < metrics["percent_trainable"] < 100 and metrics["trainable_parameters"] > 0
    for key in ("train_seconds", "tokens_per_second", "peak_memory_mb", "delta_bytes"):
        assert metrics[key] > 0
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_training_is_deterministic_with_a_seed(tmp_path, tiny_bert, reviews_csv):
    for out in ("a", "b"):
        assert _train(tmp_path, tiny_bert, reviews_csv, "--method", "lora", out=out) == 0
    a = safetensors.torch.load_file(str(tmp_path / "a" / "delta.safetensors"))
    b = safetensors.torch.load_file(str(tmp_path / "b" / "delta.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["dora", "adapter", "prefix", "prompt", "ia3", "bitfit", "head", "full"])
def test_every_method_trains_from_the_command_line(tmp_path, tiny_bert, reviews_csv, method):
    assert _train(tmp_path, tiny_bert, reviews_csv, "--method", method) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["method"] == method and 0 <= metrics["test"]["accuracy"] <= 1


def test_eval_reproduces_the_recorded_test_metrics(tmp_path, tiny_bert, reviews_csv, capsys):
    assert _train(tmp_path, tiny_bert, reviews_csv, "--method", "ia3") == 0
    recorded = json.loads((tmp_path / "run" / "metrics.json").read_text())["test"]
    capsys.readouterr()
    assert main(["eval", "--delta", str(tmp_path / "run"), "--no-progress"]) == 0
    evaluated = json.loads(capsys.readouterr().out)["test"]
    assert evaluated == pytest.approx(recorded)


def test_yaml_config_equals_flags(tmp_path, tiny_bert, reviews_csv):
    config = tmp_path / "job.yaml"
    config.write_text(f"model: {tiny_bert}\ndata: {reviews_csv}\ntext_column: review\nlabel_column: sentiment\n"
                      f"method: bitfit\nsteps: 12\nbatch_size: 8\nmax_length: 16\nprogress: false\nout: {tmp_path / 'yaml'}\n")
    assert main(["train", "--config", str(config)]) == 0
    assert _train(tmp_path, tiny_bert, reviews_csv, "--method", "bitfit", out="flags") == 0
    a = safetensors.torch.load_file(str(tmp_path / "yaml" / "delta.safetensors"))
    b = safetensors.torch.load_file(str(tmp_path / "flags" / "delta.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def _error(capsys) -> str:
    return capsys.readouterr().err


def test_bad_names_list_the_valid_ones(tmp_path, tiny_bert, reviews_csv, capsys):
    assert main(["train", "--model", "gpt5", "--data", str(reviews_csv), "--out", str(tmp_path / "x")]) == 2
    assert "unknown model 'gpt5'; use one of minilm, smollm2" in _error(capsys)
    assert main(["train", "--data", "imdb", "--out", str(tmp_path / "x")]) == 2
    assert "unknown dataset 'imdb'; use one of movie-reviews, sms-spam, trec, chatterbot" in _error(capsys)
    assert main(["train", "--method", "lorax", "--out", str(tmp_path / "x")]) == 2
    assert "unknown delta method 'lorax'; available: lora, dora" in _error(capsys)


def test_missing_column_names_the_columns_that_exist(tmp_path, tiny_bert, reviews_csv, capsys):
    assert main(["train", "--model", str(tiny_bert), "--data", str(reviews_csv), "--out", str(tmp_path / "x")]) == 2
    assert "has no column 'text'; its columns are ['review', 'sentiment']" in _error(capsys)


def test_empty_dataset(tmp_path, tiny_bert, capsys):
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    assert main(["train", "--model", str(tiny_bert), "--data", str(empty), "--out", str(tmp_path / "x")]) == 2
    assert "is empty" in _error(capsys)


def test_label_seen_only_in_test(tmp_path, tiny_bert, capsys):
    from deltatune.data.datasets import DataError, Example, split

    examples = [Example(f"text {i}", "a" if i % 2 else "b") for i in range(40)] + [Example("rare text", "c")]
    errors = []
    for seed in range(20):  # the lone 'c' lands outside training for some seeds
        try:
            assert "c" in split("x", "classification", examples, seed).labels
        except DataError as error:
            errors.append(str(error))
    assert errors, "no seed put the rare label outside training"
    assert all("label(s) ['c'] of dataset 'x' appear only in the validation/test split" in e for e in errors)


def test_max_length_too_small(tmp_path, tiny_bert, reviews_csv, capsys):
    assert _train(tmp_path, tiny_bert, reviews_csv, "--max-length", "4") == 2
    assert "max_length 4 is too small" in _error(capsys)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_bert, reviews_csv, capsys):
    code = _train(tmp_path, tiny_bert, reviews_csv, "--method", "full", "--lr", "1e30", "--steps", "40",
                  "--save-every", "1")
    assert code == 2
    message = _error(capsys)
    assert "loss became nan" in message.lower() and "last good checkpoint" in message
    latest = json.loads((tmp_path / "run" / "checkpoint" / "latest.json").read_text())
    tensors = safetensors.torch.load_file(str(tmp_path / "run" / "checkpoint" / latest["file"]))
    assert all(torch.isfinite(t).all() for k, t in tensors.items() if k.startswith("param/"))
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_inspect_shows_method_size_fingerprint_and_metrics(tmp_path, tiny_bert, reviews_csv, capsys):
    assert _train(tmp_path, tiny_bert, reviews_csv, "--method", "lora") == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "run")]) == 0
    text = capsys.readouterr().out
    for part in ("(lora)", "parameters", "bytes", "fingerprint", "metrics"):
        assert part in text


def test_a_flag_shared_by_methods_with_different_meanings_explains_each():
    from deltatune.cli.train import method_flags

    _, methods, text = method_flags()["--init"]
    assert {"lora", "prompt", "prefix"} <= set(methods)
    assert "lora, dora: " in text and "prompt: " in text and "prefix: " in text and "kaiming" in text and "vocab" in text
    _, methods, text = method_flags()["--use-rslora"]  # one meaning: said once, unlabelled
    assert methods == ["lora", "dora"] and text.startswith("rank-stabilised")


def test_a_method_that_cannot_apply_to_the_model_exits_with_status_3(tmp_path, tiny_llama, reviews_csv, capsys):
    assert _train(tmp_path, tiny_llama, reviews_csv, "--method", "bitfit") == 3  # a Llama has no biases
    assert "deltatune: error: no module of LlamaForSequenceClassification has a bias" in capsys.readouterr().err
    assert not (tmp_path / "run" / "delta.safetensors").exists()
