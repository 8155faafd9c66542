"""What a delta means (its label names and task) is written in ``delta.json`` and kept by
every delta derived from it: saved again, compressed, merged, swapped, extracted, imported,
and turned into a task vector and back.

References: the label names given at save time, the model config's ``id2label``, and the
``delta.json`` files written before these fields existed.
"""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
import transformers
from tiny_models import MODELS

import deltatune as dt
from deltatune.algebra import TaskVector
from deltatune.algebra.compress import compress
from deltatune.algebra.extract import extract_lora
from deltatune.interop import export_peft, import_peft
from deltatune.io.artifact import read_meta
from deltatune.swap import replace

BERT, LLAMA = MODELS["bert"], MODELS["llama"]
LABELS = ["negative", "positive", "neutral"]


def _meta(folder) -> dict:
    return json.loads((folder / "delta.json").read_text())


def _delta(tmp_path, name: str, seed: int = 1, labels=None, head: bool = True, model=None):
    """A LoRA (with the classifier head) on the tiny BERT, random, saved under ``tmp_path/name``."""
    model = model if model is not None else BERT.build()
    dt.attach(model, dt.LoRAConfig(r=2, targets=["query"], modules_to_save=["classifier"] if head else []), name=name)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in dt.delta_parameters(model, name):
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return dt.save(model, tmp_path / name, name, labels=labels)


def test_save_records_the_given_labels_and_the_task_from_the_model(tmp_path):
    meta = _meta(_delta(tmp_path, "given", labels=LABELS))
    assert meta["labels"] == LABELS and meta["task"] == "classification"
    llama = LLAMA.build()
    dt.attach(llama, dt.LoRAConfig(r=2), name="lm")
    meta = _meta(dt.save(llama, tmp_path / "lm"))
    assert meta["labels"] is None and meta["task"] == "causal_lm"


def test_save_takes_label_names_from_the_config_only_with_the_head_and_not_the_defaults(tmp_path):
    assert _meta(_delta(tmp_path, "default"))["labels"] is None  # LABEL_0, LABEL_1, LABEL_2
    named = BERT.build()
    named.config.id2label = dict(enumerate(LABELS))
    assert _meta(_delta(tmp_path, "named", model=named))["labels"] == LABELS
    headless = BERT.build()
    headless.config.id2label = dict(enumerate(LABELS))
    assert _meta(_delta(tmp_path, "headless", head=False, model=headless))["labels"] is None


def test_bad_labels_or_task_are_refused(tmp_path):
    model = BERT.build()
    dt.attach(model, dt.LoRAConfig(r=2), name="x")
    with pytest.raises(dt.ConfigError, match="task must be one of classification, causal_lm or None, got 'ner'"):
        dt.save(model, tmp_path / "x", task="ner")
    with pytest.raises(dt.ConfigError, match="labels must be a list of label names"):
        dt.save(model, tmp_path / "x", labels="negative")


def test_old_delta_files_without_labels_read_as_none(tmp_path):
    folder = _delta(tmp_path, "old", labels=LABELS)
    meta = _meta(folder)
    del meta["labels"], meta["task"]
    (folder / "delta.json").write_text(json.dumps(meta))
    read = read_meta(folder)
    assert read["labels"] is None and read["task"] is None
    model = BERT.build()
    dt.load(model, folder)
    assert _meta(dt.save(model, tmp_path / "again"))["labels"] is None


def test_a_loaded_delta_saved_again_keeps_its_labels_on_a_base_without_names(tmp_path):
    folder = _delta(tmp_path, "sentiment", labels=LABELS)
    model = BERT.build()  # id2label: LABEL_0, ...
    dt.load(model, folder)
    assert _meta(dt.save(model, tmp_path / "copy"))["labels"] == LABELS
    dt.delete(model, "sentiment")
    dt.attach(model, dt.LoRAConfig(r=2, modules_to_save=["classifier"]), name="sentiment")  # a new delta, same name
    assert _meta(dt.save(model, tmp_path / "new"))["labels"] is None


def test_compressing_keeps_labels_and_fills_them_in_from_an_old_run_folder(tmp_path):
    folder = _delta(tmp_path, "sentiment", labels=LABELS)
    assert _meta(compress(folder, tmp_path / "int8", bits=8).directory)["labels"] == LABELS
    meta = _meta(folder)
    meta["labels"] = meta["task"] = None  # written before delta.json recorded labels
    (folder / "delta.json").write_text(json.dumps(meta))
    (folder / "metrics.json").write_text(json.dumps({"task": "classification", "data": {"labels": LABELS}}))
    compressed = _meta(compress(folder, tmp_path / "old-int8", bits=8).directory)
    assert compressed["labels"] == LABELS and compressed["task"] == "classification"


def test_a_hot_swap_takes_the_labels_of_the_new_files(tmp_path):
    first = _delta(tmp_path, "v1", labels=LABELS)
    second = _delta(tmp_path, "v2", seed=2, labels=["bad", "good", "meh"])
    model = BERT.build()
    dt.load(model, first, "live")
    assert replace(model, "live", second).in_place
    assert _meta(dt.save(model, tmp_path / "after", "live"))["labels"] == ["bad", "good", "meh"]


def test_task_vectors_carry_labels_through_arithmetic_to_a_new_delta(tmp_path):
    a = _delta(tmp_path, "a", labels=LABELS)
    b = _delta(tmp_path, "b", seed=2, labels=LABELS)
    c = _delta(tmp_path, "c", seed=3, labels=["x", "y", "z"])
    model = BERT.build()
    va, vb, vc = (TaskVector.from_folder(model, folder) for folder in (a, b, c))
    assert va.meaning.labels == tuple(LABELS) and va.meaning.task == "classification"
    (0.5 * va + 0.5 * vb).to_delta(model, "mix")
    assert _meta(dt.save(model, tmp_path / "mix", "mix"))["labels"] == LABELS
    (va - vc).to_delta(model, "diff")
    meta = _meta(dt.save(model, tmp_path / "diff", "diff"))
    assert meta["labels"] is None and meta["task"] == "classification"


def test_an_extracted_delta_has_the_fine_tunes_labels(tmp_path):
    base = BERT.build()
    tuned = BERT.build()
    tuned.config.id2label = dict(enumerate(LABELS))
    with torch.no_grad():
        tuned.bert.encoder.layer[0].attention.self.query.weight.add_(0.1)
        tuned.classifier.weight.add_(0.1)
    model, _ = extract_lora(base, tuned, rank=2, modules_to_save=["classifier"])
    meta = _meta(dt.save(model, tmp_path / "extracted"))
    assert meta["labels"] == LABELS and meta["task"] == "classification"


def test_peft_export_and_import_keep_labels_and_a_plain_adapter_has_none(tmp_path):
    folder = _delta(tmp_path, "sentiment", labels=LABELS)
    export_peft(folder, tmp_path / "peft", BERT.build())
    imported = _meta(import_peft(tmp_path / "peft", tmp_path / "back", BERT.build()))
    assert imported["labels"] == LABELS and imported["task"] == "classification"
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    safetensors.torch.save_file(safetensors.torch.load_file(str(weights)), str(weights), metadata={"format": "pt"})
    named = BERT.build()
    named.config.id2label = dict(enumerate(LABELS))  # the folder, not the model, says what the adapter means
    plain = _meta(import_peft(tmp_path / "peft", tmp_path / "plain", named))
    assert plain["labels"] is None and plain["task"] == "classification"
    transformers.BertConfig(num_labels=3, id2label=dict(enumerate(["a", "b", "c"]))).save_pretrained(tmp_path / "peft")
    assert _meta(import_peft(tmp_path / "peft", tmp_path / "config", BERT.build()))["labels"] == ["a", "b", "c"]
