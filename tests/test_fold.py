"""``deltatune fold``: the folded folder loads with transformers alone and computes what the
base with the delta active computes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import safetensors.torch
import torch
import transformers

import deltatune as dt
from deltatune.cli import main

#: runs in a fresh interpreter: loads the folder with transformers only, writes its logits
LOAD_WITHOUT_DELTATUNE = """
import sys, safetensors.torch, torch, transformers
folder, ids_file, out_file = sys.argv[1:]
model = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
ids = safetensors.torch.load_file(ids_file)["ids"]
with torch.no_grad():
    logits = model(input_ids=ids).logits
assert "deltatune" not in sys.modules, "the folded folder must not need deltatune"
safetensors.torch.save_file({"logits": logits, "vocab": torch.tensor([len(tokenizer)])}, out_file)
"""


@pytest.fixture
def classifier_delta(tmp_path, tiny_bert):
    """A LoRA + trained head delta for a classifier on the tiny BERT folder, and its logits."""
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification.from_pretrained(tiny_bert, num_labels=3).eval()
    dt.attach(model, dt.LoRAConfig(r=4, targets=["query", "value", "intermediate.dense"], modules_to_save=["classifier"]))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, param in dt.delta_parameters(model, "default"):
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    dt.save(model, tmp_path / "delta", provenance={"model": str(tiny_bert)})
    ids = torch.randint(5, 28, (3, 7), generator=generator)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        with dt.base_only(model):
            base_logits = model(input_ids=ids).logits
    return tmp_path / "delta", ids, logits, base_logits


def test_folded_folder_loads_without_deltatune_and_gives_the_delta_outputs(tmp_path, classifier_delta, tiny_bert):
    delta, ids, logits, base_logits = classifier_delta
    assert main(["fold", str(delta), "--out", str(tmp_path / "folded")]) == 0
    safetensors.torch.save_file({"ids": ids}, str(tmp_path / "ids.safetensors"))
    subprocess.run([sys.executable, "-c", LOAD_WITHOUT_DELTATUNE, str(tmp_path / "folded"), str(tmp_path / "ids.safetensors"),
                    str(tmp_path / "logits.safetensors")], check=True, capture_output=True, timeout=120)
    loaded = safetensors.torch.load_file(str(tmp_path / "logits.safetensors"))
    torch.testing.assert_close(loaded["logits"], logits, rtol=0, atol=1e-5)
    assert not torch.allclose(loaded["logits"], base_logits, atol=1e-2)  # the delta is really in there
    assert int(loaded["vocab"]) == len(transformers.AutoTokenizer.from_pretrained(tiny_bert))
    config = json.loads((tmp_path / "folded" / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"] and len(config["id2label"]) == 3


def test_fold_takes_the_base_from_the_command_line_when_the_delta_does_not_record_it(tmp_path, classifier_delta,
                                                                                       tiny_bert):
    delta, ids, logits, _ = classifier_delta
    meta = json.loads((delta / "delta.json").read_text())
    del meta["provenance"]["model"]
    (delta / "delta.json").write_text(json.dumps(meta))
    assert main(["fold", str(delta), "--out", str(tmp_path / "a")]) == 2
    assert main(["fold", str(delta), "--out", str(tmp_path / "b"), "--model", str(tiny_bert)]) == 0
    folded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "b").eval()
    with torch.no_grad():
        torch.testing.assert_close(folded(input_ids=ids).logits, logits, rtol=0, atol=1e-5)


def test_fold_refuses_a_non_empty_output_folder(tmp_path, classifier_delta, capsys):
    delta, _, _, _ = classifier_delta
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("keep me")
    assert main(["fold", str(delta), "--out", str(tmp_path / "taken")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "taken" / "notes.txt").read_text() == "keep me"
