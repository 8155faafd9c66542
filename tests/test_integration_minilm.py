"""The real packaged MiniLM on the real movie-review snippets: LoRA beats a trained head."""

from __future__ import annotations

import dataclasses

import pytest

from deltatune.train.job import TrainJob, run_train

pytest.importorskip("transformers")


def test_lora_on_minilm_beats_the_head_only_baseline(tmp_path):
    base = TrainJob(model="minilm", data="movie-reviews", limit=1600, steps=60, batch_size=16, max_length=40,
                    seed=0, progress=False)
    head = run_train(dataclasses.replace(base, method="head", out=str(tmp_path / "head")))
    lora = run_train(dataclasses.replace(base, method="lora", out=str(tmp_path / "lora"),
                                         targets=["query", "key", "value", "attention.output.dense"]))
    assert lora["data"]["sizes"] == head["data"]["sizes"] == {"train": 1280, "validation": 160, "test": 160}
    assert lora["percent_trainable"] < 1.0
    print(f"head-only accuracy {head['test']['accuracy']:.3f}, LoRA {lora['test']['accuracy']:.3f}")
    assert lora["test"]["accuracy"] >= head["test"]["accuracy"] + 0.08
