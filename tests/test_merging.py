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


def _head(folder):
    """The saved head weight of a delta folder, as written."""
    import safetensors.torch

    return safetensors.torch.load_file(str(folder / "delta.safetensors"))["classifier.copy.weight"]


def test_heads_of_one_task_are_averaged_with_the_normalised_merge_weights(tmp_path):
    a, b = _two_loras(tmp_path, head=True)
    for method, weights, shares in [("ties", None, (0.5, 0.5)), ("linear", [3.0, 1.0], (0.75, 0.25)),
                                    ("dare_linear", [1.0, 1.0], (0.5, 0.5))]:
        model = CASE.build()
        report = merge_deltas(model, [a, b], method, weights)
        expected = shares[0] * _head(a) + shares[1] * _head(b)  # by hand, from the files
        torch.testing.assert_close(model.classifier.deltas["merged"].copy.weight, expected, rtol=0, atol=1e-7)
        assert report.heads == f"classifier averaged with weights {shares[0]:.4g}, {shares[1]:.4g}"


def test_heads_are_kept_when_identical_or_chosen_and_averaged_only_with_positive_weights(tmp_path):
    a, b = _two_loras(tmp_path, head=True)
    with pytest.raises(dt.MergeError, match="different values, and heads='identical' keeps only equal ones.*--heads"):
        merge_deltas(CASE.build(), [a, b], "ties", heads="identical")
    model = CASE.build()
    report = merge_deltas(model, [a, b], "ties", heads=1)
    source = _loaded(b)
    merged_head = model.classifier.deltas["merged"].copy
    assert torch.equal(merged_head.weight, source.classifier.deltas["b"].copy.weight)
    assert "classifier from source 1" in report.heads
    kept = merge_deltas(CASE.build(), [a, a], "linear", [1.0, -1.0])
    assert kept.heads.startswith("classifier (identical")
    with pytest.raises(dt.MergeError, match=r"needs positive weights; got \[1.0, -1.0\].*--heads 0"):
        merge_deltas(CASE.build(), [a, b], "linear", [1.0, -1.0])
    dropped = CASE.build()
    merge_deltas(dropped, [a, b], "linear", heads="drop")
    assert not hasattr(dropped.classifier, "deltas")
    with pytest.raises(dt.ConfigError, match="heads=2 names no source"):
        merge_deltas(CASE.build(), [a, b], "linear", heads=2)
    with pytest.raises(dt.ConfigError, match="heads must be 'merge', 'identical', 'drop' or a source index"):
        merge_deltas(CASE.build(), [a, b], "linear", heads="average")


def _other_task(tmp_path, labels):
    """A LoRA with a head of ``len(labels)`` rows on the same tiny BERT body as ``_save``'s."""
    import transformers

    torch.manual_seed(0)
    config = CASE.build().config
    config.num_labels = len(labels)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    dt.attach(model, dt.LoRAConfig(r=2, targets=["query"], modules_to_save=["classifier"]), name="other")
    _perturb(model, "other", 5)
    return dt.save(model, tmp_path / "other", labels=labels)


def test_heads_of_different_tasks_are_refused_saying_what_differs(tmp_path):
    heads = dt.LoRAConfig(r=2, targets=["query"], modules_to_save=["classifier"])
    a = _save(tmp_path, "a", heads, seed=1)
    dt.save(_loaded(a), a, "a", labels=["negative", "positive", "neutral"])
    b = _save(tmp_path, "b", heads, seed=2)
    dt.save(_loaded(b), b, "b", labels=["ham", "spam", "other"])
    with pytest.raises(dt.MergeError) as error:
        merge_deltas(CASE.build(), [a, b], "ties")
    assert str(error.value).startswith(
        f"heads differ: {str(a)!r} has classifier.weight (3, 32) with labels ['negative', 'positive', 'neutral'], "
        f"{str(b)!r} has classifier.weight (3, 32) with labels ['ham', 'spam', 'other']; a merged delta carries one "
        f"head. choose with --heads: an index keeps that source's head (e.g. --heads 0")
    trec = _other_task(tmp_path, ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM", "X"])
    model = CASE.build()
    with pytest.raises(dt.MergeError, match=(
            rf"heads differ: {str(a)!r} has classifier.weight \(3, 32\), classifier.bias \(3,\) with labels "
            rf"\['negative', 'positive', 'neutral'\], {str(trec)!r} has classifier.weight \(7, 32\), classifier.bias "
            rf"\(7,\) with labels \['ABBR', 'DESC', 'ENTY', 'HUM', 'LOC', 'NUM', ...\]; .*'drop' keeps none")):
        merge_deltas(model, [a, trec], "ties")
    assert not dt.list_deltas(model)  # refused before anything was loaded
    report = merge_deltas(model, [a, trec], "ties", heads=0)  # the 7-label delta merges for its body alone
    assert report.heads.startswith("classifier from source 0") and report.labels == ("negative", "positive", "neutral")
    assert torch.equal(model.classifier.deltas["merged"].copy.weight, _head(a))
    dropped = merge_deltas(CASE.build(), [a, trec], "linear", heads="drop")
    assert dropped.heads == "dropped" and dropped.labels is None


def test_the_merged_delta_means_what_its_sources_agree_on(tmp_path):
    a, b = _two_loras(tmp_path, head=True)
    for folder in (a, b):
        dt.save(_loaded(folder), folder, folder.name, labels=["neg", "pos", "mid"])
    model = CASE.build()
    report = merge_deltas(model, [a, b], "ties")
    assert report.labels == ("neg", "pos", "mid") and report.task == "classification" and report.warning is None
    meta = json.loads((dt.save(model, tmp_path / "merged", "merged") / "delta.json").read_text())
    assert meta["labels"] == ["neg", "pos", "mid"] and meta["task"] == "classification"
    plain = dt.LoRAConfig(r=2, targets=["query"])
    c = _save(tmp_path, "c", plain, seed=3)
    dt.save(_loaded(c), c, "c", labels=["neg", "pos", "mid"])
    d = _save(tmp_path, "d", plain, seed=4)
    dt.save(_loaded(d), d, "d", labels=["ham", "spam", "other"])
    model = CASE.build()
    report = merge_deltas(model, [c, d], "linear")
    assert report.labels is None and report.task == "classification"
    assert report.warning.startswith(f"label names differ: {str(c)!r} has labels ['neg', 'pos', 'mid'], {str(d)!r} "
                                     f"has labels ['ham', 'spam', 'other']; the merged delta records no label names")
    assert json.loads((dt.save(model, tmp_path / "m2", "merged") / "delta.json").read_text())["labels"] is None


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


def test_cli_merge_averages_the_heads_of_one_task_by_default(tmp_path, tiny_bert, capsys):
    movies, spam = _cli_deltas(tmp_path, tiny_bert)
    out = tmp_path / "merged"
    assert main(["merge", str(movies), str(spam), "--method", "ties", "--out", str(out)]) == 0
    assert "heads: classifier averaged with weights 0.5, 0.5" in capsys.readouterr().out
    torch.testing.assert_close(_head(out), 0.5 * _head(movies) + 0.5 * _head(spam), rtol=0, atol=1e-7)
    meta = json.loads((out / "delta.json").read_text())
    assert meta["method"] == "dense" and meta["task"] == "classification" and meta["labels"] is None


def _cli_task_delta(tmp_path, tiny_bert, name: str, labels: list[str], head: bool = True):
    import transformers

    torch.manual_seed(3)
    model = transformers.BertForSequenceClassification.from_pretrained(tiny_bert, num_labels=len(labels))
    saved = ["classifier"] if head else []
    dt.attach(model, dt.LoRAConfig(r=2, targets=["query"], modules_to_save=saved), name="lora")
    _perturb(model, "lora", 7)
    return dt.save(model, tmp_path / name, provenance={"model": str(tiny_bert)}, labels=labels)


def test_cli_merge_of_different_tasks_says_what_differs_and_how_to_choose(tmp_path, tiny_bert, capsys):
    movies, _ = _cli_deltas(tmp_path, tiny_bert)
    trec = _cli_task_delta(tmp_path, tiny_bert, "trec", ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"])
    assert main(["merge", str(movies), str(trec), "--method", "ties", "--out", str(tmp_path / "x")]) == 2
    error = capsys.readouterr().err
    assert (f"heads differ: {str(movies)!r} has classifier.weight (2, 32), classifier.bias (2,) with no label names, "
            f"{str(trec)!r} has classifier.weight (6, 32), classifier.bias (6,) with labels ['ABBR', 'DESC', 'ENTY', "
            f"'HUM', 'LOC', 'NUM']; a merged delta carries one head. choose with --heads") in error
    assert not (tmp_path / "x").exists()
    assert main(["merge", str(movies), str(trec), "--method", "ties", "--heads", "1", "--out", str(tmp_path / "x")]) == 0
    meta = json.loads((tmp_path / "x" / "delta.json").read_text())
    assert meta["labels"] == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    assert meta["tensors"]["classifier.copy.weight"]["shape"] == [6, 32]
    with pytest.raises(SystemExit):
        main(["merge", str(movies), str(trec), "--heads", "average", "--out", str(tmp_path / "y")])
    assert "--heads takes merge, identical, drop or a source index" in capsys.readouterr().err


def test_cli_merge_warns_when_the_sources_disagree_on_label_names(tmp_path, tiny_bert, capsys):
    sentiment = _cli_task_delta(tmp_path, tiny_bert, "sentiment", ["negative", "positive"], head=False)
    spam = _cli_task_delta(tmp_path, tiny_bert, "spam", ["ham", "spam"], head=False)
    assert main(["merge", str(sentiment), str(spam), "--out", str(tmp_path / "x")]) == 0
    error = capsys.readouterr().err
    assert (f"deltatune: warning: label names differ: {str(sentiment)!r} has labels ['negative', 'positive'], "
            f"{str(spam)!r} has labels ['ham', 'spam']; the merged delta records no label names") in error
    assert json.loads((tmp_path / "x" / "delta.json").read_text())["labels"] is None


def test_cli_merge_errors_exit_with_code_2(tmp_path, tiny_bert, capsys):
    movies, spam = _cli_deltas(tmp_path, tiny_bert)
    assert main(["merge", str(movies), str(spam), "--method", "average", "--out", str(tmp_path / "x")]) == 2
    assert "unknown merge method 'average'" in capsys.readouterr().err
    assert main(["merge", str(movies), str(spam), "--heads", "identical", "--out", str(tmp_path / "x")]) == 2
    assert "heads differ" in capsys.readouterr().err
    other = _save(tmp_path, "other", dt.LoRAConfig(r=2), seed=3)  # made for a different BERT
    assert main(["merge", str(movies), str(other), "--heads", "0", "--out", str(tmp_path / "x")]) == 2
    assert "another base" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
