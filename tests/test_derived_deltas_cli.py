"""Every saved delta works with the commands that use one: ``eval``, ``inspect``, ``generate``
and ``serve`` take the dense deltas TIES merges make and compressed deltas, and a served
classifier answers with the label names its delta was trained with.

References: deltas trained with ``deltatune train`` on a tiny CSV whose labels are
``negative`` / ``positive``; the offline API (``dt.load`` + ``dt.using``) for served
probabilities; the same delta with its head's rows swapped for evaluation.
"""

from __future__ import annotations

import csv
import json

import httpx
import pytest
import torch
from conftest import write_reviews
from serve_helpers import reference_probabilities

import deltatune as dt
from deltatune.cli import main
from deltatune.serve import Settings, create_app, engine_from_options
from deltatune.serve.background import running

NAMES = {"pos": "positive", "neg": "negative"}
DATA_FLAGS = ["--text-column", "review", "--label-column", "sentiment", "--max-length", "16", "--no-progress"]


def _named_reviews(path):
    """The tiny sentiment CSV with its labels spelled out (``negative`` / ``positive``)."""
    rows = list(csv.reader(open(write_reviews(path), newline="")))
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows([rows[0], *([text, NAMES[label]] for text, label in rows[1:])])
    return path


@pytest.fixture(scope="module")
def derived(tiny_bert, tmp_path_factory):
    """Two trained sentiment deltas, their TIES merge (dense) and an int8 compression, in a deltas folder."""
    root = tmp_path_factory.mktemp("derived")
    data = _named_reviews(root / "reviews.csv")
    for seed, name in ((0, "a"), (1, "b")):
        assert main(["train", "--model", str(tiny_bert), "--data", str(data), "--method", "lora", "--steps", "12",
                     "--batch-size", "8", "--seed", str(seed), "--out", str(root / name), *DATA_FLAGS]) == 0
    deltas = root / "deltas"
    assert main(["merge", str(root / "a"), str(root / "b"), "--method", "ties", "--out", str(deltas / "merged")]) == 0
    assert main(["compress", str(root / "a"), "--bits", "8", "--out", str(deltas / "compressed")]) == 0
    return {"root": root, "data": data, "deltas": deltas, "model": tiny_bert}


def _eval(capsys, delta, data, *extra) -> dict:
    capsys.readouterr()
    assert main(["eval", "--delta", str(delta), "--data", str(data), *DATA_FLAGS, *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_ties_merge_of_trained_deltas_is_dense_and_keeps_their_label_names(derived):
    meta = json.loads((derived["deltas"] / "merged" / "delta.json").read_text())
    assert meta["method"] == "dense" and meta["modules_to_save"] == ["classifier"]
    assert meta["labels"] == ["negative", "positive"] and meta["task"] == "classification"


def test_eval_accepts_a_dense_merged_delta_and_a_compressed_one(derived, capsys):
    merged = _eval(capsys, derived["deltas"] / "merged", derived["data"])  # the base comes from provenance.model
    assert merged["method"] == "dense" and 0 <= merged["test"]["accuracy"] <= 1
    compressed = _eval(capsys, derived["deltas"] / "compressed", derived["data"])
    assert compressed["method"] == "lora" and 0 <= compressed["test"]["accuracy"] <= 1


def test_eval_maps_the_dataset_onto_the_deltas_label_order(derived, capsys, tmp_path):
    from deltatune.models.load import load_model

    original = _eval(capsys, derived["root"] / "a", derived["data"])
    model = load_model(str(derived["model"]), "classification", 2).model
    dt.load(model, derived["root"] / "a")
    head = model.classifier.deltas["lora"].copy
    with torch.no_grad():  # the same classifier with its outputs in the other order
        head.weight.copy_(head.weight.flip(0))
        head.bias.copy_(head.bias.flip(0))
    dt.save(model, tmp_path / "flipped", labels=["positive", "negative"], provenance={"model": str(derived["model"])})
    flipped = _eval(capsys, tmp_path / "flipped", derived["data"])
    assert flipped["test"] == pytest.approx(original["test"])


def test_eval_refuses_a_dataset_with_labels_the_delta_does_not_know(derived, capsys, tmp_path):
    other = write_reviews(tmp_path / "short.csv")  # labels pos / neg
    assert main(["eval", "--delta", str(derived["deltas"] / "merged"), "--data", str(other), *DATA_FLAGS]) == 2
    error = capsys.readouterr().err
    assert "was trained with labels ['negative', 'positive'], but dataset " in error
    assert "has labels ['neg', 'pos'] (['neg', 'pos'] unknown to the delta); evaluate it on data with the" in error


def test_inspect_shows_a_merged_deltas_method_task_and_labels(derived, capsys):
    capsys.readouterr()
    assert main(["inspect", str(derived["deltas"] / "merged")]) == 0
    text = capsys.readouterr().out
    assert "(dense)" in text and 'means     task classification, labels ["negative", "positive"]' in text


@pytest.fixture(scope="module")
def served(derived):
    engine = engine_from_options(str(derived["model"]), derived["deltas"])
    with running(create_app(engine, Settings(max_wait_ms=5))) as url:
        yield url


@pytest.mark.parametrize("delta", ["merged", "compressed"])
def test_a_served_delta_answers_with_its_original_label_names(derived, served, delta):
    texts = ["good movie", "the plot was very dull"]
    response = httpx.post(f"{served}/v1/classify", json={"delta": delta, "inputs": texts}, timeout=30)
    assert response.status_code == 200, response.text
    for text, result in zip(texts, response.json()["results"]):
        assert list(result["probabilities"]) == ["negative", "positive"]
        assert result["label"] in ("negative", "positive")
        expected = reference_probabilities(derived["model"], derived["deltas"], delta, text)
        assert list(result["probabilities"].values()) == pytest.approx(expected, abs=1e-5)


def test_generate_and_inspect_accept_a_dense_merged_causal_lm_delta(tiny_llama, tmp_path, capsys):
    from deltatune.models.load import load_model

    for seed, name in ((1, "x"), (2, "y")):
        model = load_model(str(tiny_llama), "causal_lm").model
        dt.attach(model, dt.LoRAConfig(r=2, targets=["q_proj", "v_proj"]), name=name)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, param in dt.delta_parameters(model, name):
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
        dt.save(model, tmp_path / name, provenance={"model": str(tiny_llama)})
    merged = tmp_path / "merged"
    assert main(["merge", str(tmp_path / "x"), str(tmp_path / "y"), "--method", "ties", "--out", str(merged)]) == 0
    capsys.readouterr()
    assert main(["generate", "--model", str(tiny_llama), "--delta", str(merged), "--prompt", "good movie",
                 "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "(dense)" in out and "tuned:" in out
    assert main(["inspect", str(merged)]) == 0
    assert "means     task causal_lm, no label names recorded" in capsys.readouterr().out


def test_fold_of_a_merged_delta_writes_its_label_names_into_the_model_config(derived, tmp_path):
    assert main(["fold", str(derived["deltas"] / "merged"), "--out", str(tmp_path / "folded")]) == 0
    config = json.loads((tmp_path / "folded" / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}
