"""The ``MethodSpec.stats`` hook: a method's statistics, collected by ``delta_stats`` and
written by the training job to ``metrics.json`` under the delta's name."""

from __future__ import annotations

import dataclasses
import json

from method_checks import train_from_the_command_line
from tiny_models import MODELS

import deltatune as dt
from deltatune.core import registry
from deltatune.core.inject import delta_stats


def _with_stats(monkeypatch, method: str, stats) -> None:
    spec = registry.get_method(method)
    monkeypatch.setitem(registry._METHODS, method, dataclasses.replace(spec, stats=stats))


def test_delta_stats_collects_each_reporting_delta_by_name(monkeypatch):
    model = MODELS["bert"].build()
    dt.attach(model, dt.LoRAConfig(r=2, targets=["query"]), name="a")
    dt.attach(model, dt.IA3Config(targets=["value"]), name="b")
    assert delta_stats(model) == {}  # neither method reports statistics
    _with_stats(monkeypatch, "lora", lambda m, name: {"sites": len(dt.get_config(m, name).targets)})
    assert delta_stats(model) == {"a": {"sites": 1}}
    assert delta_stats(MODELS["bert"].build()) == {}  # a model without deltas


def test_the_training_job_writes_the_statistics_to_metrics_json(monkeypatch, tmp_path, tiny_bert, reviews_csv):
    _with_stats(monkeypatch, "lora", lambda m, name: {"name": name})
    out = train_from_the_command_line(tmp_path, tiny_bert, reviews_csv, ["--method", "lora"], steps=2)
    assert json.loads((out / "metrics.json").read_text())["delta_stats"] == {"lora": {"name": "lora"}}


def test_without_statistics_metrics_json_has_no_entry(tmp_path, tiny_bert, reviews_csv):
    out = train_from_the_command_line(tmp_path, tiny_bert, reviews_csv, ["--method", "lora"], steps=2)
    assert "delta_stats" not in json.loads((out / "metrics.json").read_text())
