"""The benchmark workers (bench/) on a tiny random BERT: they run and return the expected JSON.

No timing thresholds here: only the shape of the results and the LoRA equivalence guard.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import report, workers  # noqa: E402

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
