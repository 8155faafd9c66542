"""The benchmark workers (deltatune.bench) on tiny random BERT and Llama models: they run and
return the expected JSON, and `deltatune bench --tiny` writes the results files.

No timing thresholds here: only the shape of the results and the LoRA equivalence guard.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("peft")

from deltatune.bench import report, workers
from deltatune.cli import main

TINY = {"model": "tiny", "batch": 4, "seq": 16, "repeats": 3, "warmup": 1}


def _roundtrip(result: dict) -> dict:
    return json.loads(json.dumps(result))  # what the runner parses from the worker's stdout


def test_equivalence_worker_matches_peft():
    result = _roundtrip(workers.equivalence({**TINY, "steps": 5}))
    assert result["kind"] == "equivalence" and result["steps"] == 5
    assert result["copied_tensors"] == 2 * 2 * len(workers.LORA_TARGETS)  # A and B, 2 layers
    assert len(result["deltatune_losses"]) == len(result["peft_losses"]) == 5
    assert result["max_rel_diff"] <= 1e-4


@pytest.mark.parametrize("lib,method", [("deltatune", "lora"), ("peft", "lora"), ("none", "floor")])
def test_train_step_worker_shape(lib, method):
    result = _roundtrip(workers.train_step({**TINY, "lib": lib, "method": method}))
    assert result["kind"] == "train_step" and result["lib"] == lib and result["method"] == method
    assert set(result["step_ms"]) == {"median", "min", "q1", "q3", "n"} and result["step_ms"]["n"] == 3
    assert result["step_ms"]["median"] > 0 and result["peak_rss_mib"] > 0
    assert (result["trainable"] == 0) == (method == "floor")


def test_train_step_same_trainable_count_in_both_libraries():
    ours = workers.train_step({**TINY, "lib": "deltatune", "method": "ia3", "repeats": 1, "warmup": 0})
    theirs = workers.train_step({**TINY, "lib": "peft", "method": "ia3", "repeats": 1, "warmup": 0})
    assert ours["trainable"] == theirs["trainable"]


def test_report_lists_missed_targets():
    row = {"model": "tiny", "method": "lora", "metric": "train_step", "deltatune": 11.0, "peft": 10.0,
           "ratio": 1.1, "unit": "ms", "floor": 10.0, "floor_ratio": 1.1, "peft_floor_ratio": 1.0}
    met = {name: ok for name, ok, _ in report.targets([row])}
    assert met == {"LoRA train step deltatune/peft <= 1.00": False, "LoRA train step <= 1.05 x frozen floor": False}


@pytest.mark.parametrize("method", ["lora", "ia3", "prompt"])
def test_causal_lm_train_step_same_trainable_count_in_both_libraries(method):
    tiny_llama = {**TINY, "model": "tiny-llama", "repeats": 1, "warmup": 0}
    ours = _roundtrip(workers.train_step({**tiny_llama, "lib": "deltatune", "method": method}))
    theirs = _roundtrip(workers.train_step({**tiny_llama, "lib": "peft", "method": method}))
    assert ours["trainable"] == theirs["trainable"] > 0


def test_bench_command_writes_results(tmp_path):
    # each measurement is a fresh process (~5 s to import torch, transformers and peft): keep this small
    assert main(["bench", "--models", "tiny-llama", "--methods", "lora", "--repeats", "1", "--warmup", "0",
                 "--only", "train", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert list(data["settings"]["models"]) == ["tiny-llama"]
    train = [r for r in data["rows"] if r["metric"] == "train_step"]
    assert [(r["model"], r["method"]) for r in train] == [("tiny-llama", m) for m in ("floor", "full", "lora")]
    assert all(r["deltatune"] > 0 and r["floor"] > 0 for r in train)
    assert all(r["peft"] > 0 for r in train if r["method"] not in ("floor", "full"))
    assert "## tiny-llama" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "results.png").stat().st_size > 0


@pytest.mark.parametrize("lib", ["base", "deltatune", "split", "peft"])
def test_mixed_batch_worker_times_every_case(lib):
    from deltatune.bench.mixed import mixed

    result = _roundtrip(mixed({**TINY, "lib": lib, "cases": [[4, 1], [4, 4]], "repeats": 2}))
    assert result["kind"] == "mixed" and list(result["cases"]) == ["4x1", "4x4"]
    assert all(c["n"] == 2 and c["median"] > 0 for c in result["cases"].values())


def test_mixed_batch_rows_and_targets():
    from deltatune.bench.run import mixed_rows

    raw = {lib: {"cases": {"32x16": {"median": ms}, "64x64": {"median": 2 * ms}}}
           for lib, ms in (("base", 10.0), ("deltatune", 11.0), ("peft", 15.0), ("split", 40.0))}
    rows = mixed_rows("tiny", raw)
    assert rows[0]["base_ratio"] == pytest.approx(1.1) and rows[0]["ratio"] == pytest.approx(11 / 15)
    assert rows[1]["split_ratio"] == pytest.approx(11 / 40)
    met = {name: ok for name, ok, _ in report.targets(rows)}
    assert met == {"mixed batch of 32 rows over 16 deltas within 1.20 x the base alone": True,
                   "mixed batch of 64 rows over 64 deltas within 1.30 x the base alone": True}


def test_swap_worker_reports_each_switching_cost():
    from deltatune.bench.run import swap_rows
    from deltatune.bench.swap import swap_costs

    raw = _roundtrip(swap_costs("tiny", repeats=2, threads=1))
    rows = swap_rows("tiny", raw)
    assert [r["metric"] for r in rows][:3] == ["switch_set_active", "switch_replace_in_place", "delta_load_from_disk"]
    assert all(r["deltatune"] > 0 and r["unit"] == "ms" for r in rows)
    assert raw["cache_stats"]["misses"] >= 2 and raw["cache_stats"]["hits"] >= 2
