"""Merging N deltas on a model, from folders and names, and ``deltatune merge`` on the command line.

References: the sources run together as deltas (``set_active([a, b])``), the weight changes
each unit reports (``delta_weight`` / ``dt.merge``), and the pure merge functions on those.
"""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import MODELS

import deltatune as dt
from deltatune.algebra import (
    LowRankEntry,
    TaskVector,
    combine,
    merge_deltas,
    merge_task_vectors,
)
from deltatune.cli import main

CASE = MODELS["bert"]
QUERY = "bert.encoder.layer.0.attention.self.query"


def _perturb(model, name: str, seed: int, scale: float = 0.1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in dt.delta_parameters(model, name):
            param.add_(scale * torch.randn(param.shape, generator=generator))


def _save(tmp_path, folder: str, config, seed: int, base_seed: int = 0, metrics=None):
    """A delta with random (non-zero) tensors on the tiny BERT, saved; returns its folder."""
    model = CASE.build(base_seed)
    dt.attach(model, config, name=folder)
    _perturb(model, folder, seed)
    return dt.save(model, tmp_path / folder, metrics=metrics)


def _two_loras(tmp_path, head: bool = False):
    heads = ["classifier"] if head else []
    a = _save(tmp_path, "a", dt.LoRAConfig(r=4, alpha=8.0, targets=["query", "value"], modules_to_save=heads), seed=1)
    b = _save(tmp_path, "b", dt.LoRAConfig(r=2, alpha=4.0, use_rslora=True, targets=["query", "key"],
                                           modules_to_save=heads), seed=2)
    return a, b


def _loaded(*folders):
    """A fresh base with these deltas loaded, all active (stacked in order)."""
    model = CASE.build()
    for folder in folders:
        dt.load(model, folder, activate=False)
    dt.set_active(model, dt.list_deltas(model))
    return model


def test_merging_one_delta_with_weight_one_returns_it(tmp_path):
    a, _ = _two_loras(tmp_path)
    expected = CASE.output(_loaded(a))
    for method, options in [("linear", {}), ("ties", {"density": 1.0}), ("magnitude_prune", {"density": 1.0}),
                            ("dare_linear", {"density": 1.0}), ("svd", {"rank": 4})]:
        model = CASE.build()
        report = merge_deltas(model, [a], method, [1.0], **options)
        assert dt.active_deltas(model) == ("merged",) and dt.list_deltas(model) == ["merged"]
        torch.testing.assert_close(CASE.output(model), expected, rtol=1e-5, atol=1e-5, msg=method)
        if method in ("linear", "svd"):
            assert report.result == "lora" and dt.get_config(model, "merged").r == 4


def test_cat_equals_running_both_loras_together(tmp_path):
    a, b = _two_loras(tmp_path)
    both = _loaded(a, b)
    assert dt.active_deltas(both) == ("a", "b")
    expected = CASE.output(both)
    model = CASE.build()
    report = merge_deltas(model, [a, b], "cat")
    assert report.result == "lora" and report.weights == (1.0, 1.0)
    assert {layer.key: layer.rank for layer in report.layers}[f"{QUERY}.weight"] == 6  # ranks 4 + 2
    torch.testing.assert_close(CASE.output(model), expected, rtol=1e-5, atol=1e-6)


def test_linear_is_the_exact_weighted_sum_of_the_updates(tmp_path):
    a, b = _two_loras(tmp_path)
    sources = _loaded(a, b)
    model = CASE.build()
    merge_deltas(model, [a, b], "linear", [0.3, -0.5])
    ranks = {QUERY: 6, "bert.encoder.layer.1.attention.self.key": 2, "bert.encoder.layer.0.attention.self.value": 4}
    for path, rank in ranks.items():  # query: both (4 + 2), key: b only, value: a only
        units = sources.get_submodule(path).deltas
        expected = sum(w * units[n].delta_weight() for w, n in [(0.3, "a"), (-0.5, "b")] if n in units)
        merged = model.get_submodule(path).deltas["merged"]
        assert merged.lora_A.shape[0] == rank and merged.scaling == 6 / rank  # alpha = 6, the largest rank
        torch.testing.assert_close(merged.delta_weight(), expected, rtol=1e-5, atol=1e-7)
    config = dt.get_config(model, "merged")
    assert config.r == 6 and all(config.rank_pattern[p] == r for p, r in ranks.items() if r != 6)
    assert sorted(config.rank_pattern.values()) == [2, 2, 4, 4]  # keys and values of both layers


def test_svd_at_full_rank_equals_linear(tmp_path):
    a, b = _two_loras(tmp_path)
    linear, svd = CASE.build(), CASE.build()
    merge_deltas(linear, [a, b], "linear")
    report = merge_deltas(svd, [a, b], "svd", rank=6)
    assert all(layer.energy_kept == pytest.approx(1.0) for layer in report.layers)
    torch.testing.assert_close(CASE.output(svd), CASE.output(linear), rtol=1e-4, atol=1e-5)
    small = merge_deltas(CASE.build(), [a, b], "svd", rank=1)
    assert all(layer.rank == 1 and layer.energy_kept < 1.0 for layer in small.layers)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare_linear", "magnitude_prune"])
def test_elementwise_methods_apply_the_pure_functions_per_parameter(tmp_path, method):
    a, b = _two_loras(tmp_path)
    sources = _loaded(a, b)
    model = CASE.build()
    report = merge_deltas(model, [a, b], method, density=0.3, seed=5)
    assert report.result == "dense"
    functions = {"ties": lambda d, w, key: combine.ties(d, w, 0.3),
                 "magnitude_prune": lambda d, w, key: combine.magnitude_prune(d, w, 0.3),
                 "dare_ties": lambda d, w, key: combine.dare_ties(d, w, 0.3, combine.generator_for(5, key)),
                 "dare_linear": lambda d, w, key: combine.dare_linear(d, w, 0.3, combine.generator_for(5, key))}
    for path in (QUERY, "bert.encoder.layer.1.attention.self.value"):
        units = sources.get_submodule(path).deltas
        deltas = [units[n].delta_weight() if n in units else torch.zeros(32, 32) for n in ("a", "b")]
        expected = functions[method](deltas, list(report.weights), f"{path}.weight")
        merged = model.get_submodule(path).deltas["merged"].weight_delta
        torch.testing.assert_close(merged, expected, rtol=1e-6, atol=1e-7)


def test_dare_is_reproducible_for_a_seed(tmp_path):
    a, b = _two_loras(tmp_path)
    vectors = []
    for seed in (0, 0, 1):
        model = CASE.build()
        merge_deltas(model, [a, b], "dare_ties", seed=seed)
        vectors.append(TaskVector.from_delta(model, "merged").dense())
    assert all(torch.equal(vectors[0][k], vectors[1][k]) for k in vectors[0])
    assert not all(torch.equal(vectors[0][k], vectors[2][k]) for k in vectors[0])


def test_deltas_of_different_methods_merge_as_dense_changes(tmp_path):
    a, _ = _two_loras(tmp_path)
    ia3 = _save(tmp_path, "ia3", dt.IA3Config(), seed=3)
    sources = _loaded(a, ia3)
    expected = {}
    for name in ("a", "ia3"):
        expected[name] = TaskVector.from_delta(sources, name)
    reference = CASE.build()
    (0.5 * expected["a"] + 0.5 * expected["ia3"]).apply_to(reference)
    model = CASE.build()
    report = merge_deltas(model, [a, ia3], "linear")
    assert report.result == "dense"
    torch.testing.assert_close(CASE.output(model), CASE.output(reference), rtol=1e-5, atol=1e-5)
    with pytest.raises(dt.MergeError, match="cat concatenates LoRA ranks.*ia3' is ia3"):
        merge_deltas(CASE.build(), [a, ia3], "cat")


def test_sources_already_on_the_model_are_kept(tmp_path):
    a, b = _two_loras(tmp_path)
    model = _loaded(a)
    merge_deltas(model, ["a", b], "linear", [1.0, 1.0], name="sum")
    assert dt.list_deltas(model) == ["a", "sum"] and dt.active_deltas(model) == ("sum",)


def test_heads_are_kept_only_when_identical_or_chosen(tmp_path):
    a, b = _two_loras(tmp_path, head=True)
    with pytest.raises(dt.MergeError, match="carry different trained modules .*heads=<index>"):
        merge_deltas(CASE.build(), [a, b], "ties")
    model = CASE.build()
    report = merge_deltas(model, [a, b], "ties", heads=1)
    source = _loaded(b)
    merged_head = model.classifier.deltas["merged"].copy
    assert torch.equal(merged_head.weight, source.classifier.deltas["b"].copy.weight)
    assert "classifier from source 1" in report.heads
    kept = merge_deltas(CASE.build(), [a, a], "linear")
    assert kept.heads.startswith("classifier (identical")
    dropped = CASE.build()
    merge_deltas(dropped, [a, b], "linear", heads="drop")
    assert not hasattr(dropped.classifier, "deltas")
    with pytest.raises(dt.ConfigError, match="heads=2 names no source"):
        merge_deltas(CASE.build(), [a, b], "linear", heads=2)


def test_metrics_weights_come_from_each_delta_json(tmp_path):
    a = _save(tmp_path, "a", dt.LoRAConfig(r=2), seed=1, metrics={"test": {"loss": 0.2}, "steps": 100})
    b = _save(tmp_path, "b", dt.LoRAConfig(r=2), seed=2, metrics={"test": {"loss": 0.7}, "steps": 50})
    report = merge_deltas(CASE.build(), [a, b], "metrics", penalty=2.0)
    assert report.weights == pytest.approx((0.731059, 0.268941), abs=1e-6)  # exp(-2 * loss), normalised
    assert report.result == "lora"
    by_steps = merge_deltas(CASE.build(), [a, b], "metrics", metric="steps", penalty=0.0)
    assert by_steps.weights == pytest.approx((0.5, 0.5))
    c = _save(tmp_path, "c", dt.LoRAConfig(r=2), seed=3)
    with pytest.raises(dt.MergeError, match="needs the metric 'test.loss' of every source"):
        merge_deltas(CASE.build(), [a, c], "metrics")


def test_deltas_for_different_bases_fail_with_the_fingerprint_error(tmp_path):
    a, _ = _two_loras(tmp_path)
    other = _save(tmp_path, "other", dt.LoRAConfig(r=2), seed=3, base_seed=1)
    model = CASE.build()
    with pytest.raises(dt.FingerprintError, match="another base"):
        merge_deltas(model, [a, other], "linear")
    assert not dt.list_deltas(model)  # the source loaded before the failure is removed again


def test_bad_requests_get_clear_errors(tmp_path):
    a, b = _two_loras(tmp_path)
    model = CASE.build()
    cases = [
        ({"method": "average"}, dt.ConfigError, "unknown merge method 'average'; available: linear, cat"),
        ({"weights": [1.0]}, dt.ConfigError, "got 1 weights for 2 deltas"),
        ({"weights": [1.0, float("nan")]}, dt.ConfigError, "finite"),
        ({"method": "svd"}, dt.ConfigError, "pass rank=r"),
        ({"method": "ties", "density": 0.0}, dt.ConfigError, "density"),
        ({"rank": 0}, dt.ConfigError, "rank must be a positive integer"),
    ]
    for options, error, message in cases:
        with pytest.raises(error, match=message):
            merge_deltas(model, [a, b], **options)
    with pytest.raises(dt.MergeError, match="neither a delta folder .* nor a delta on this model"):
        merge_deltas(model, [a, tmp_path / "missing"])
    assert not dt.list_deltas(model)
    prefix = _save(tmp_path, "prefix", dt.PrefixConfig(num_virtual_tokens=2), seed=4)
    with pytest.raises(dt.MergeError, match="changes activations, not weights"):
        merge_deltas(model, [a, prefix])


def test_a_merged_delta_saves_and_loads_on_a_fresh_base(tmp_path):
    a, b = _two_loras(tmp_path)
    for method in ("linear", "ties"):
        model = CASE.build()
        merge_deltas(model, [a, b], method)
        expected = CASE.output(model)
        dt.save(model, tmp_path / f"merged-{method}", "merged")
        fresh = CASE.build()
        dt.load(fresh, tmp_path / f"merged-{method}")
        torch.testing.assert_close(CASE.output(fresh), expected, rtol=0, atol=0)


def test_merge_task_vectors_keeps_missing_entries_as_zero():
    a = TaskVector({"w": LowRankEntry(torch.ones(3, 1), torch.ones(1, 2))})
    b = TaskVector({"v": torch.ones(2)})
    merged = merge_task_vectors([a, b], "ties", density=1.0)
    torch.testing.assert_close(merged["w"], torch.ones(3, 2))
    torch.testing.assert_close(merged["v"], torch.ones(2))
    with pytest.raises(dt.MergeError, match="every entry must be low rank"):
        merge_task_vectors([a, b], "cat")


# -- command line ------------------------------------------------------------------------------

def _cli_deltas(tmp_path, tiny_bert):
    import transformers

    folders = []
    for seed, name in [(1, "movies"), (2, "spam")]:
        torch.manual_seed(seed)
        model = transformers.BertForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
        dt.attach(model, dt.LoRAConfig(r=2, targets=["query", "value"], modules_to_save=["classifier"]), name="lora")
        _perturb(model, "lora", seed)
        folders.append(dt.save(model, tmp_path / name, metrics={"test": {"loss": 0.3 * seed}},
                               provenance={"model": str(tiny_bert)}))
    return folders


def _fresh_classifier(tiny_bert):
    import transformers

    torch.manual_seed(9)
    return transformers.BertForSequenceClassification.from_pretrained(tiny_bert, num_labels=2).eval()


def test_cli_merge_round_trip(tmp_path, tiny_bert, capsys):
    movies, spam = _cli_deltas(tmp_path, tiny_bert)
    out = tmp_path / "merged"
    assert main(["merge", str(movies), str(spam), "--method", "ties", "--density", "0.4", "--heads", "0",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "merged 2 deltas with ties (density 0.4)" in printed and f"wrote {out}/" in printed
    meta = json.loads((out / "delta.json").read_text())
    assert meta["method"] == "dense" and meta["provenance"]["model"] == str(tiny_bert)
    assert meta["provenance"]["merge"]["sources"] == [str(movies), str(spam)]
    reference = _fresh_classifier(tiny_bert)
    merge_deltas(reference, [movies, spam], "ties", density=0.4, heads=0)
    loaded = _fresh_classifier(tiny_bert)
    dt.load(loaded, out)
    ids = torch.randint(5, 20, (2, 6), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loaded(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=0)


def test_cli_merge_metrics_and_lora_result(tmp_path, tiny_bert, capsys):
    movies, spam = _cli_deltas(tmp_path, tiny_bert)
    out = tmp_path / "weighted"
    assert main(["merge", str(movies), str(spam), "--method", "metrics", "--penalty", "1", "--heads", "drop",
                 "--model", str(tiny_bert), "--out", str(out)]) == 0
    weights = json.loads(capsys.readouterr().out.strip().splitlines()[-2])["weights"]
    assert weights == pytest.approx(combine.metrics_weights([0.3, 0.6], 1.0))
    meta = json.loads((out / "delta.json").read_text())
    assert meta["method"] == "lora" and meta["config"]["r"] == 4 and meta["modules_to_save"] == []


def test_cli_merge_errors_exit_with_code_2(tmp_path, tiny_bert, capsys):
    movies, spam = _cli_deltas(tmp_path, tiny_bert)
    assert main(["merge", str(movies), str(spam), "--method", "average", "--out", str(tmp_path / "x")]) == 2
    assert "unknown merge method 'average'" in capsys.readouterr().err
    assert main(["merge", str(movies), str(spam), "--out", str(tmp_path / "x")]) == 2
    assert "carry different trained modules" in capsys.readouterr().err
    other = _save(tmp_path, "other", dt.LoRAConfig(r=2), seed=3)  # made for a different BERT
    assert main(["merge", str(movies), str(other), "--heads", "0", "--out", str(tmp_path / "x")]) == 2
    assert "another base" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
