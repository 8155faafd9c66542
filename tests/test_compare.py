"""The compare table and chart written by ``deltatune demo --compare``."""

from __future__ import annotations

from deltatune.cli.compare import plot, table
from deltatune.train.job import TrainJob


def _row(method, accuracy, trainable):
    return {"method": method, "test": {"accuracy": accuracy, "macro_f1": accuracy - 0.01}, "trainable_parameters": trainable,
            "percent_trainable": trainable / 1e5, "delta_bytes": trainable * 4, "train_seconds": 12.3, "peak_memory_mb": 900.0,
            "data": {"sizes": {"train": 8, "validation": 1, "test": 1}}}


def test_table_has_one_row_per_method_with_every_column(tmp_path):
    rows = [_row("head", 0.61, 770), _row("lora", 0.83, 148_000)]
    text = table(rows, TrainJob(steps=250))
    assert "| method | accuracy | macro-F1 | trainable params | % trainable | delta file | train time | peak memory |" in text
    assert "| lora | 0.8300 | 0.8200 | 148,000 | 1.480% | 578 KiB | 12 s | 900 MiB |" in text
    assert "250 steps of batch 32" in text
    plot(rows, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
