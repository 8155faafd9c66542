"""Delta files: what is written, and clear errors for every way a file can be wrong."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

import deltatune as dt
from deltatune.io.artifact import META_FILE, TENSORS_FILE, file_sha256
from tiny_models import MODELS

CASE = MODELS["gpt2"]


@pytest.fixture
def saved(tmp_path):
    model = CASE.build()
    dt.attach(model, dt.LoRAConfig(r=2), name="chat")
    with torch.no_grad():
        for _, p in dt.delta_parameters(model, "chat"):
            p.add_(0.1)
    directory = dt.save(model, tmp_path / "chat", metrics={"loss": 1.5})
    return directory


def _rewrite(directory, tensors):
    """Write new tensors and a consistent delta.json, as a buggy tool might."""
    safetensors.torch.save_file(tensors, str(directory / TENSORS_FILE))
    meta = json.loads((directory / META_FILE).read_text())
    meta["tensors"] = {k: {"shape": list(v.shape), "dtype": "float32"} for k, v in tensors.items()}
    meta["tensors_sha256"] = file_sha256(directory / TENSORS_FILE)
    (directory / META_FILE).write_text(json.dumps(meta))


def test_files_hold_only_the_delta_and_describe_it(saved):
    assert sorted(p.name for p in saved.iterdir()) == [META_FILE, TENSORS_FILE]
    meta = dt.read_meta(saved)
    assert meta["method"] == "lora" and meta["config"]["r"] == 2
    assert meta["metrics"] == {"loss": 1.5}
    assert meta["base"]["model_class"] == "GPT2LMHeadModel"
    assert set(meta["base"]["modules"]) == {"transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"}
    tensors = safetensors.torch.load_file(str(saved / TENSORS_FILE))
    assert sorted(tensors) == sorted(meta["tensors"]) == [
        f"transformer.h.{i}.attn.c_attn.{t}" for i in range(2) for t in ("lora_A", "lora_B")
    ]
    assert meta["num_parameters"] == sum(t.numel() for t in tensors.values())


def test_no_temporary_files_are_left(saved):
    assert not [p for p in saved.iterdir() if p.name.startswith(".")]


def test_truncated_file_is_refused(saved):
    data = (saved / TENSORS_FILE).read_bytes()
    (saved / TENSORS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(dt.DeltaFileError, match="truncated, corrupt"):
        dt.load(CASE.build(), saved)


def test_truncated_description_is_refused(saved):
    text = (saved / META_FILE).read_text()
    (saved / META_FILE).write_text(text[: len(text) // 2])
    with pytest.raises(dt.DeltaFileError, match="not valid JSON"):
        dt.load(CASE.build(), saved)


def test_missing_folder_says_what_a_delta_folder_is(tmp_path):
    with pytest.raises(dt.DeltaFileError, match="delta.json not found"):
        dt.load(CASE.build(), tmp_path / "nothing")


def test_wrong_shape_is_refused(saved):
    tensors = safetensors.torch.load_file(str(saved / TENSORS_FILE))
    key = "transformer.h.0.attn.c_attn.lora_A"
    tensors[key] = torch.zeros(3, tensors[key].shape[1])
    _rewrite(saved, tensors)
    model = CASE.build()
    with pytest.raises(dt.DeltaFileError, match=r"lora_A' has shape \[3, 32\], the model needs \[2, 32\]"):
        dt.load(model, saved)
    assert dt.list_deltas(model) == []


def test_missing_and_extra_tensors_are_refused(saved):
    tensors = safetensors.torch.load_file(str(saved / TENSORS_FILE))
    tensors.pop("transformer.h.1.attn.c_attn.lora_B")
    tensors["transformer.h.1.attn.c_attn.lora_C"] = torch.zeros(1)
    _rewrite(saved, tensors)
    with pytest.raises(dt.DeltaFileError, match="missing .*lora_B.*unexpected .*lora_C"):
        dt.load(CASE.build(), saved)


def test_non_finite_values_are_refused(saved):
    tensors = safetensors.torch.load_file(str(saved / TENSORS_FILE))
    tensors["transformer.h.0.attn.c_attn.lora_B"][0, 0] = float("nan")
    _rewrite(saved, tensors)
    with pytest.raises(dt.DeltaFileError, match="NaN or inf"):
        dt.load(CASE.build(), saved)


def test_saving_a_diverged_delta_writes_nothing(tmp_path):
    model = CASE.build()
    dt.attach(model, dt.LoRAConfig(r=2))
    with torch.no_grad():
        next(p for _, p in dt.delta_parameters(model, "default")).fill_(float("inf"))
    with pytest.raises(dt.DeltaFileError, match="not saved"):
        dt.save(model, tmp_path / "d")
    assert not (tmp_path / "d" / TENSORS_FILE).exists()


def test_a_failed_save_keeps_the_previous_files(saved, monkeypatch):
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    model = CASE.build()
    dt.attach(model, dt.LoRAConfig(r=2), name="chat")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError):
        dt.save(model, saved)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before


def test_delta_for_a_model_without_those_modules_is_refused(saved):
    with pytest.raises(dt.FingerprintError, match="has no module 'transformer.h.0.attn.c_attn'"):
        dt.load(MODELS["llama"].build(), saved)


def test_load_under_another_name_and_alongside_others(saved):
    model = CASE.build()
    dt.load(model, saved, name="first")
    dt.load(model, saved, name="second", activate=False)
    assert dt.list_deltas(model) == ["first", "second"]
    assert dt.active_deltas(model) == ("first",)


def test_merged_delta_saves_the_unmerged_fingerprint(tmp_path):
    model = CASE.build()
    dt.attach(model, dt.LoRAConfig(r=2))
    with torch.no_grad():
        for _, p in dt.delta_parameters(model, "default"):
            p.add_(0.1)
    dt.merge(model)
    dt.save(model, tmp_path / "d")
    dt.load(CASE.build(), tmp_path / "d")  # the fresh base matches: no FingerprintError


def test_inspect_command_prints_the_description(saved, capsys):
    from deltatune.cli import main

    assert main(["inspect", str(saved)]) == 0
    assert '"method": "lora"' in capsys.readouterr().out
    assert main(["inspect", str(saved / "missing")]) == 2
    assert "delta.json not found" in capsys.readouterr().err


def test_fingerprint_samples_stay_in_range_for_huge_tensors():
    from deltatune.io.fingerprint import tensor_digest

    big = torch.zeros(2**24 + 3)
    assert tensor_digest("x", big) != tensor_digest("x", torch.ones(2**24 + 3))
