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
    assert result["delta_tensors"] == 2 * 4 * 2 + 2  # A and B on q, k, v, o of 2 layers; the head's weight and bias
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
    found = {name: (ok, detail) for name, ok, detail in report.targets([row])}
    assert {name: ok for name, (ok, _) in found.items()} == {
        "`tiny` LoRA train step deltatune/peft <= 1.00": False, "`tiny` LoRA train step / frozen floor <= 1.05": False}
    assert "missed by 5.0 points" in found["`tiny` LoRA train step / frozen floor <= 1.05"][1]


def test_interleaved_rounds_alternate_order_and_pair_ratios():
    from deltatune.bench.interleave import interleaved

    calls = []
    timings = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1)
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]  # warm-up round, then alternating order
    assert [len(v) for v in timings.seconds.values()] == [3, 3]
    timings.seconds = {"a": [2.0, 4.0, 9.0], "b": [1.0, 4.0, 3.0]}  # per-round ratios 2, 1, 3
    assert timings.ratio("a", "b") == {"median": 2.0, "min": 1.0, "q1": 1.0, "q3": 3.0, "n": 3}
    assert timings.ms("b")["median"] == 3000.0


def test_interleaved_stops_on_budget_after_the_minimum():
    import time

    from deltatune.bench.interleave import interleaved

    timings = interleaved({"slow": lambda: time.sleep(0.01)}, repeats=50, warmup=0, budget_s=0.001, min_repeats=4)
    assert len(timings.seconds["slow"]) == 4


@pytest.mark.parametrize("method", ["lora", "ia3", "prompt"])
def test_causal_lm_train_step_same_trainable_count_in_both_libraries(method):
    tiny_llama = {**TINY, "model": "tiny-llama", "repeats": 1, "warmup": 0}
    ours = _roundtrip(workers.train_step({**tiny_llama, "lib": "deltatune", "method": method}))
    theirs = _roundtrip(workers.train_step({**tiny_llama, "lib": "peft", "method": method}))
    assert ours["trainable"] == theirs["trainable"] > 0


def test_bench_command_writes_results(tmp_path):
    # each worker is a fresh process (~5 s to import torch, transformers and peft): keep this small
    assert main(["bench", "--models", "tiny-llama", "--methods", "lora", "--repeats", "1", "--warmup", "0",
                 "--only", "train,decode", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert list(data["settings"]["models"]) == ["tiny-llama"]
    train = [r for r in data["rows"] if r["metric"] == "train_step"]
    assert [(r["model"], r["method"]) for r in train] == [("tiny-llama", m) for m in ("floor", "full", "lora")]
    assert all(r["deltatune"] > 0 for r in train)
    lora = train[-1]
    assert lora["peft"] > 0 and lora["floor_ratio"] > 0 and lora["ratio"] > 0 and len(lora["spread"]) == 2
    decode = [r["metric"] for r in data["rows"] if r["metric"].startswith("decode_")]
    assert decode == ["decode_1x1", "decode_8x4"]
    text = (tmp_path / "results.md").read_text()
    assert "## tiny-llama" in text and "greedy decode, 8 prompts over 4 deltas / base" in text
    assert (tmp_path / "results.png").stat().st_size > 0


def test_mixed_batch_worker_interleaves_every_case():
    from deltatune.bench.mixed import mixed

    result = _roundtrip(mixed({**TINY, "cases": [[4, 1], [4, 4]], "repeats": 2}))
    assert result["kind"] == "mixed" and list(result["cases"]) == ["4x1", "4x4"]
    for case in result["cases"].values():
        assert set(case["ms"]) == {"base", "deltatune", "split", "peft"}
        assert all(t["n"] == 2 and t["median"] > 0 for t in case["ms"].values())
        assert case["ratios"]["deltatune_over_base"]["median"] > 0


def test_mixed_train_worker_compares_one_step_with_one_after_another():
    from deltatune.bench.ratios import mixed_train

    result = _roundtrip(mixed_train({**TINY, "repeats": 2, "deltas": 2}))
    assert result["deltas"] == 2 and set(result["ms"]) == {"one_step", "one_after_another"}
    assert result["ratio"]["n"] == 2 and result["ratio"]["median"] > 0


def test_mixed_batch_rows_and_targets():
    from deltatune.bench.run import mixed_rows

    def case(ours, theirs):
        ratios = {"deltatune_over_base": {"median": ours, "q1": ours, "q3": ours, "n": 15},
                  "peft_over_base": {"median": theirs, "q1": theirs, "q3": theirs, "n": 15},
                  "deltatune_over_split": {"median": 0.5, "q1": 0.5, "q3": 0.5, "n": 15}}
        return {"ms": {k: {"median": 10.0} for k in ("base", "deltatune", "peft", "split")}, "ratios": ratios}

    rows = mixed_rows("tiny", {"cases": {"32x16": case(1.1, 1.5), "64x64": case(1.3, 2.0)}})
    assert rows[0]["deltatune"] == pytest.approx(1.1) and rows[0]["ratio"] == pytest.approx(1.1 / 1.5)
    assert rows[1]["split_ratio"] == pytest.approx(0.5)
    met = {name: ok for name, ok, _ in report.targets(rows)}
    assert met == {"`tiny` mixed batch, 32 rows over 16 deltas / base alone <= 1.15": True,
                   "`tiny` mixed batch, 64 rows over 64 deltas / base alone <= 1.20": False}


def test_swap_worker_reports_each_switching_cost():
    from deltatune.bench.run import swap_rows
    from deltatune.bench.swap import swap_costs

    raw = _roundtrip(swap_costs("tiny", repeats=2, threads=1))
    rows = swap_rows("tiny", raw)
    assert [r["metric"] for r in rows][:3] == ["switch_set_active", "switch_replace_in_place", "delta_load_from_disk"]
    assert all(r["deltatune"] > 0 and r["unit"] == "ms" for r in rows)
    assert raw["cache_stats"]["misses"] >= 2 and raw["cache_stats"]["hits"] >= 2


def test_every_registered_method_can_be_benchmarked_with_its_defaults():
    from deltatune.bench import cases

    assert set(cases.CASES) <= set(cases.default_methods())
    assert "full" not in cases.benchmarkable() and "head" not in cases.benchmarkable()
    # a method not in CASES runs at its default targets with the bench sizes its config has
    import dataclasses

    import deltatune as dt

    for method in ("adapter", "bitfit"):
        fields = {f.name for f in dataclasses.fields(dt.get_method(method).config_class)}
        assert method in cases.benchmarkable()
        assert cases.case(method) == {"method": method, **{k: v for k, v in cases.SIZES.items() if k in fields}}


def test_train_step_of_a_method_outside_the_issue_cases():
    result = _roundtrip(workers.train_step({**TINY, "lib": "deltatune", "method": "adapter", "repeats": 1, "warmup": 0}))
    assert result["method"] == "adapter" and result["trainable"] > 0


def test_a_peft_codec_that_refuses_the_model_leaves_a_reason_not_a_crash():
    # llamaadapter has a peft codec, but peft's adaption prompt only computes Llama and Mistral:
    # on a BERT the peft row is dropped with the codec's reason and deltatune's row still runs
    from deltatune.bench import ratios

    refused = _roundtrip(workers.train_step({**TINY, "lib": "peft", "method": "llamaadapter"}))
    assert "llama" in refused["refused"] and "bert" in refused["refused"] and "step_ms" not in refused
    result = _roundtrip(ratios.train_ratios({**TINY, "methods": ["llamaadapter", "road"], "repeats": 2, "warmup": 0}))
    assert "deltatune:llamaadapter" in result["ms"] and "peft:llamaadapter" not in result["ms"]
    assert result["no_peft"]["llamaadapter"] == refused["refused"]
    # road's bench groups (64) do not divide the tiny model's width (32): neither library has a row, the reason is kept
    assert not any(key.endswith(":road") for key in result["ms"]) and "road" not in result["ratios"]
    assert "group_size=64" in result["not_applicable"]["road"]
    alone = _roundtrip(workers.train_step({**TINY, "lib": "deltatune", "method": "road"}))
    assert alone["refused"] == result["not_applicable"]["road"]


def test_precision_rows_and_targets():
    from deltatune.bench.run import PRECISION_RUNS, precision_rows

    rss = {"fp32": 1000.0, "bf16": 700.0, "autocast": 1100.0, "int8": 580.0, "4bit": 500.0, "fp32-gc": 700.0,
           "int8-gc": 400.0, "4bit-gc": 460.0}
    loss = {"fp32": 2.0, "bf16": 2.01, "autocast": 2.02, "int8": 2.03, "4bit": 2.1, "fp32-gc": 2.0, "int8-gc": 2.03,
            "4bit-gc": 2.1}
    runs = {f"{lib}:{v}": {"peak_rss_mib": rss[v] + (50 if lib == "peft" else 0), "test_loss": loss[v], "steps": 30}
            for v, libs in PRECISION_RUNS for lib in libs}
    step = {"bf16": 4.0, "autocast": 3.0, "int8": 1.1, "4bit": 1.3}
    ratios = {"train_over_fp32": {v: {"median": s, "q1": s, "q3": s, "n": 15} for v, s in step.items()},
              "decode_tokens_per_s": {v: 10.0 for v in rss}}
    rows = {r["metric"]: r for r in precision_rows("smollm2", {"runs": runs, "ratios": ratios})}
    assert rows["precision_int8"]["rss_over_fp32"] == pytest.approx(0.58)
    assert rows["precision_int8"]["ratio"] == pytest.approx(580 / 630)
    assert rows["precision_4bit"]["loss_vs_fp32"] == pytest.approx(0.05)
    assert rows["precision_bf16"]["peft"] is None and rows["precision_fp32"]["step_over_fp32"] is None
    met = {name: ok for name, ok, _ in report.targets(list(rows.values()))}
    assert met == {
        "`smollm2` int8 base: peak RSS of training / float32's <= 0.60": True,
        "`smollm2` 4-bit base: peak RSS of training / float32's <= 0.45": False,
        "`smollm2` int8 base, gradient checkpointing: peak RSS of training / float32's <= 0.60": True,
        "`smollm2` 4-bit base, gradient checkpointing: peak RSS of training / float32's <= 0.45": False,
        "`smollm2` int8 base: test loss after the same steps, relative to float32's <= 0.02": True,
        "`smollm2` 4-bit base: test loss after the same steps, relative to float32's <= 0.04": False,
        "`smollm2` bf16 base: train step / float32's (1.4x faster) <= 0.71": False,
    }
    assert "| int8 | 580 | 0.580 | 630 | 2.0300 | +1.50% |" in "\n".join(report._precision_section("smollm2", list(rows.values())))
    # a variant without a fresh process (--fresh-variants) keeps its timed columns and shows no memory or loss
    del runs["deltatune:bf16"]
    rows = {r["metric"]: r for r in precision_rows("smollm2", {"runs": runs, "ratios": ratios})}
    assert rows["precision_bf16"]["deltatune"] is None and rows["precision_bf16"]["loss_vs_fp32"] is None
    assert rows["precision_bf16"]["step_over_fp32"] == 4.0
    assert "| bf16 | - | - | - | - | - | - | 4.000 [4.00, 4.00] |" in "\n".join(
        report._precision_section("smollm2", list(rows.values())))


def test_precision_fresh_from_reuses_saved_runs(tmp_path, monkeypatch):
    """``--fresh-from``: the saved fresh-process rows are reused and only the interleaved ratios run."""
    from deltatune.bench import run as bench_run

    saved = {"deltatune:fp32": {"peak_rss_mib": 1000.0, "test_loss": 2.0, "steps": 10}}
    (tmp_path / "fresh.json").write_text(json.dumps({"note": "earlier", "runs": saved}))
    calls = []
    monkeypatch.setattr(bench_run, "run_worker", lambda kind, args, timeout=None: calls.append(kind) or {"kind": kind})
    raw = bench_run.precision_raw("smollm2", 3, 1, 10, None, tmp_path / "fresh.json")
    assert calls == ["precision_ratios"] and raw["runs"] == saved
    calls.clear()
    bench_run.precision_raw("smollm2", 3, 1, 10, ["int8"])
    assert calls == ["precision_run", "precision_run", "precision_ratios"]  # int8: deltatune and peft
