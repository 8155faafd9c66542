"""A quantised frozen base: the formats, quantising a model, merging into it, fingerprints,
task vectors, the command line, and the errors for bad input."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.core.quantized import FORMATS, QuantizedLinear, dense, format_of, packed
from deltatune.core.slot import require_state
from deltatune.models.quantize import quantize_model, stored_bytes
from deltatune.train.job import TrainJob
from method_checks import train_from_the_command_line
from tiny_models import MODELS


def llama(seed: int = 0, fmt: str | None = None):
    model = MODELS["llama"].build(seed)
    if fmt:
        quantize_model(model, fmt)
    return model


def lora(model, name: str = "x", seed: int = 3, scale: float = 0.1):
    dt.attach(model, dt.LoRAConfig(r=4), name=name)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in dt.delta_parameters(model, name):
            p.copy_(scale * torch.randn(p.shape, generator=generator))
    return model


def output(model):
    with torch.no_grad():
        return MODELS["llama"].output(model)


# ---------------------------------------------------------------- the formats

def test_int8_is_symmetric_per_row_by_hand():
    weight = torch.tensor([[1.0, 0.5, -0.25, 0.1], [0.3, -0.6, 0.02, 0.0]])
    # torchao: the scale spreads 255 levels over [-max, max], then codes are clamped to +-127
    scale = weight.abs().amax(dim=1, keepdim=True) / 127.5
    by_hand = torch.clamp(torch.round(weight / scale), -127, 127) * scale
    assert torch.equal(dense(FORMATS["int8"].make(weight)), by_hand)


@pytest.mark.parametrize("fmt,low,high,size", [("int8", 0.004, 0.009, 0.27), ("4bit", 0.07, 0.12, 0.15)])
def test_round_trip_error_and_size_of_a_gaussian_weight(fmt, low, high, size):
    weight = torch.randn(256, 128, generator=torch.Generator().manual_seed(0))
    made = FORMATS[fmt].make(weight)
    error = float((dense(made) - weight).norm() / weight.norm())
    assert low < error < high
    assert stored_bytes(made) / stored_bytes(weight) < size


# ---------------------------------------------------------------- quantising a model

def test_quantize_model_quantises_the_block_linears_only():
    model = llama()
    report = quantize_model(model, "int8")
    block_linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]
    assert report.quantized == block_linears and len(block_linears) == 14 and not report.skipped
    assert all(isinstance(model.get_submodule(n), nn.Linear) for n in block_linears)
    assert all(format_of(model.get_submodule(n).weight).name == "int8" for n in block_linears)
    assert format_of(model.lm_head.weight) is None and format_of(model.model.embed_tokens.weight) is None
    assert report.bytes_after / report.bytes_before < 0.3
    assert "quantised 14 Linear layers to int8" in str(report)


def test_a_model_without_blocks_has_every_linear_quantised_and_unfit_ones_named():
    model = MODELS["mlp"].build()
    report = quantize_model(model, "4bit")
    assert report.quantized == ["fc1", "fc2"]
    assert report.skipped == {"head": "4-bit (NF4) quantises blocks of 64 values and this weight has 48"}
    assert "left in float: head (4-bit (NF4)" in str(report)


def test_tied_linears_stay_float():
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.Linear(16, 8))
    model[2].weight = model[0].weight
    report = quantize_model(model, "int8")
    assert report.quantized == ["3"]
    assert report.skipped == {"0": "its weight is tied to 2.weight", "2": "its weight is tied to 0.weight"}


def test_bad_quantisation_requests_are_named():
    embedding_only = nn.Sequential(nn.Embedding(10, 8), nn.LayerNorm(8))
    with pytest.raises(dt.ConfigError, match=r"Sequential has no Linear layer to quantise to int8; its modules are "
                                             r"Embedding, LayerNorm"):
        quantize_model(embedding_only, "int8")
    narrow = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(dt.ConfigError, match=r"no Linear layer to quantise to 4bit \(0: 4-bit \(NF4\) quantises blocks "
                                             r"of 64 values and this weight has 12\)"):
        quantize_model(narrow, "4bit")
    with pytest.raises(dt.ConfigError, match="unknown quantisation 'int4'; choose one of int8, 4bit"):
        quantize_model(llama(), "int4")
    with pytest.raises(dt.ConfigError, match=r"already has deltas \['x'\]; quantise the base before attaching"):
        quantize_model(lora(llama()), "int8")
    with pytest.raises(dt.ConfigError, match="is already quantised .* holds a int8 weight"):
        quantize_model(llama(fmt="int8"), "4bit")
    with pytest.raises(dt.ConfigError, match="unknown quantisation 'fp8'"):
        TrainJob(quantize="fp8")
    with pytest.raises(dt.ConfigError, match="method 'full' trains the base itself"):
        TrainJob(method="full", quantize="int8")


# ---------------------------------------------------------------- merging

def test_merge_reports_the_requantisation_error_against_the_lora_product():
    model = lora(llama(fmt="int8"), scale=0.05)
    q = model.model.layers[0].self_attn.q_proj
    weight = dense(q.weight)
    a, b = (dict(dt.delta_parameters(model, "x"))[f"model.layers.0.self_attn.q_proj.{t}"] for t in ("lora_A", "lora_B"))
    change = (b @ a * dt.get_config(model, "x").alpha / 4).detach()  # LoRA: dW = (alpha / r) B A
    dt.merge(model)
    rounded = dense(FORMATS["int8"].make(weight + change))
    expected = float((rounded - (weight + change)).norm() / change.norm())
    assert dt.requantization_errors(model)["model.layers.0.self_attn.q_proj.weight"] == pytest.approx(expected, rel=1e-5)
    assert torch.equal(dense(q.weight), rounded)
    dt.unmerge(model)
    assert dt.requantization_errors(model) == {}


def test_a_merge_above_max_error_is_refused_and_changes_nothing():
    model = lora(llama(fmt="4bit"), scale=0.01)
    before = dict(dt.base_parameters(model))
    unmerged = output(model)
    with pytest.raises(dt.MergeError, match=r"merging into the quantised model\.layers\.0\.self_attn\.q_proj\.weight "
                                            r"loses \d.* of the delta's change to re-quantisation .* above "
                                            r"max_error=0\.01\. Keep the delta unmerged"):
        dt.merge(model, max_error=0.01)
    assert all(p is before[k] for k, p in dt.base_parameters(model))
    assert require_state(model).merged == ()
    torch.testing.assert_close(output(model), unmerged, rtol=0, atol=0)
    dt.merge(model, max_error=float("inf"))  # the same merge without a bound goes through


def test_fold_of_a_quantised_base_writes_a_loadable_float_model(tmp_path):
    model = lora(llama(fmt="4bit"))
    unmerged = output(model)
    dt.fold(model)
    assert all(type(m) is not QuantizedLinear for m in model.modules())
    model.save_pretrained(tmp_path / "folded")
    reloaded = type(model).from_pretrained(tmp_path / "folded").eval()
    assert not any(format_of(p) is not None for p in reloaded.parameters())
    torch.testing.assert_close(output(reloaded), unmerged, rtol=1e-4, atol=1e-5)


def test_a_task_vector_added_to_a_quantised_base_is_quantised_again():
    model = llama(fmt="int8")
    key = "model.layers.1.mlp.down_proj.weight"
    old = model.get_parameter(key)
    change = 0.01 * torch.randn(old.shape, generator=torch.Generator().manual_seed(0))
    expected = dense(FORMATS["int8"].make(dense(old) + change))
    dt.TaskVector({key: change}).apply_to(model)
    new = model.get_parameter(key)
    assert new is not old and format_of(new).name == "int8" and torch.equal(dense(new), expected)


# ---------------------------------------------------------------- fingerprints

def _saved(model, folder):
    dt.save(model, folder, "x")
    return json.loads((folder / "delta.json").read_text())["base"]


def test_every_precision_of_a_base_has_its_own_fingerprint_and_one_rounded_fingerprint(tmp_path):
    float_base = _saved(lora(llama()), tmp_path / "float")
    int8_base = _saved(lora(llama(fmt="int8")), tmp_path / "int8")
    bf16_base = _saved(lora(llama().to(torch.bfloat16)), tmp_path / "bf16")
    assert len({float_base["sha256"], int8_base["sha256"], bf16_base["sha256"]}) == 3
    assert float_base["precision"]["formats"] == [] and float_base["precision"]["dtype"] == "float32"
    assert int8_base["precision"]["formats"] == ["int8"] and bf16_base["precision"]["dtype"] == "bfloat16"
    assert float_base["precision"]["rounded_sha256"] == int8_base["precision"]["rounded_sha256"] \
        == bf16_base["precision"]["rounded_sha256"]


def _base(fmt):
    return llama().to(torch.bfloat16) if fmt == "bf16" else llama(fmt=fmt)


@pytest.mark.parametrize("trained,loaded,was,now", [
    (None, "int8", "in float32", "in int8 (int8 weight-only"),
    ("int8", None, "in int8 (int8 weight-only", "in float32"),
    ("int8", "4bit", "in int8 (int8 weight-only", "in 4bit (NF4"),
    (None, "bf16", "in float32", "in bfloat16"),
    ("bf16", "4bit", "in bfloat16", "in 4bit (NF4"),
])
def test_the_same_base_at_another_precision_warns_by_default_and_strict_refuses(tmp_path, trained, loaded, was, now):
    source = lora(_base(trained))
    dt.save(source, tmp_path / "d", "x")
    expected = output(source).float()
    strict = _base(loaded)
    with pytest.raises(dt.FingerprintError, match=f"was trained on the base {re.escape(was)}.*same base "
                                                  f"{re.escape(now)}.*check='strict' asks for"):
        dt.load(strict, tmp_path / "d", check="strict")
    assert not dt.list_deltas(strict)
    target = _base(loaded)
    with pytest.warns(UserWarning, match=f"was trained on the base {re.escape(was)}.*same base {re.escape(now)}"):
        dt.load(target, tmp_path / "d")
    # the delta itself is the same; only the base's rounding differs
    assert (output(target).float() - expected).norm() / expected.norm() < 0.2


def test_a_quantised_copy_of_another_base_is_refused(tmp_path):
    dt.save(lora(llama(fmt="int8")), tmp_path / "d", "x")
    with pytest.raises(dt.FingerprintError, match="was made for another base"):
        dt.load(llama(seed=1, fmt="int8"), tmp_path / "d")
    with pytest.raises(dt.FingerprintError, match="was made for another base"):
        dt.load(llama(seed=1), tmp_path / "d")


def test_the_backward_pass_keeps_no_float_copy_of_a_quantised_weight():
    model = llama(fmt="int8")
    layer = model.model.layers[0].mlp.down_proj
    assert type(layer) is QuantizedLinear
    x = torch.randn(3, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    assert not any(t.shape == layer.weight.shape for t in saved)
    y.pow(2).sum().backward()
    reference = x.detach().requires_grad_(True)
    torch.nn.functional.linear(reference, dense(layer.weight)).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, reference.grad)


def test_packed_parts_are_what_the_fingerprint_reads():
    model = llama(fmt="int8")
    weight = model.model.layers[0].self_attn.q_proj.weight
    codes = packed(weight)[0]
    assert codes.dtype == torch.int8 and codes.shape == weight.shape


# ---------------------------------------------------------------- the command line

def test_train_and_eval_on_a_quantised_base_from_the_command_line(tmp_path, tiny_bert, reviews_csv):
    from deltatune.cli import main

    out = train_from_the_command_line(tmp_path, tiny_bert, reviews_csv, ["--method", "lora", "--quantize", "int8"],
                                      steps=3)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["quantization"]["format"] == "int8" and metrics["quantization"]["layers"] == 12
    assert metrics["quantization"]["weight_bytes_after"] < 0.3 * metrics["quantization"]["weight_bytes_before"]
    meta = json.loads((out / "delta.json").read_text())
    assert meta["base"]["precision"]["formats"] == ["int8"]
    assert main(["eval", "--delta", str(out)]) == 0  # evaluates on the int8 base it was trained on


def test_unmerge_restores_the_int8_codes_where_peft_does_not(tiny_llama):
    """peft (0.21, its torchao LoRA layer) merges by dequantise-add-requantise and unmerges by
    dequantise-subtract-requantise, so a merge + unmerge leaves other int8 codes; ours puts
    the original parameter back."""
    import peft
    import transformers
    from torchao.quantization import Int8WeightOnlyConfig, PerRow

    quantised = transformers.TorchAoConfig(quant_type=Int8WeightOnlyConfig(granularity=PerRow()))
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, quantization_config=quantised)
    theirs = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    layer = theirs.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    codes = packed(layer.weight)[0].clone()
    theirs.merge_adapter()
    theirs.unmerge_adapter()
    assert not torch.equal(packed(layer.weight)[0], codes)  # peft: changed codes

    ours = lora(llama(fmt="int8"))
    weight = ours.model.layers[0].self_attn.q_proj.weight
    codes = packed(weight)[0].clone()
    dt.merge(ours)
    dt.unmerge(ours)
    assert ours.model.layers[0].self_attn.q_proj.weight is weight and torch.equal(packed(weight)[0], codes)


def test_a_server_on_an_int8_base_answers_with_the_int8_trained_delta(tiny_bert, tmp_path):
    from deltatune.serve import DeltaLibrary, engine_from_options, load_base
    from deltatune.serve.engine import Work

    model, tokenizer, _ = load_base(str(tiny_bert), DeltaLibrary(tmp_path), quantize="int8")
    assert format_of(model.bert.encoder.layer[0].attention.self.query.weight).name == "int8"
    dt.attach(model, dt.LoRAConfig(r=4, modules_to_save=["classifier"]), name="sentiment")
    for _, p in dt.delta_parameters(model, "sentiment"):
        torch.nn.init.normal_(p, std=0.2)
    dt.save(model, tmp_path / "sentiment", "sentiment")
    with torch.no_grad():
        expected = model(**tokenizer(["a fine film"], return_tensors="pt")).logits.softmax(-1)[0]
    engine = engine_from_options(str(tiny_bert), tmp_path, quantize="int8")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same int8 base: no precision warning
        (answer,) = engine.classify([Work("sentiment", ["a fine film"])])
    probabilities = answer[0]["probabilities"] if isinstance(answer, list) else answer
    assert sorted(probabilities.values()) == pytest.approx(sorted(expected.tolist()), abs=1e-5)


def test_generate_on_a_quantised_base_from_the_command_line(tiny_llama, tmp_path, capsys):
    from deltatune.cli import main

    model = transformers_causal(tiny_llama)
    quantize_model(model, "4bit")
    lora(model)
    dt.save(model, tmp_path / "d", "x")
    assert main(["generate", "--model", str(tiny_llama), "--delta", str(tmp_path / "d"), "--prompt", "good film",
                 "--max-new-tokens", "3", "--quantize", "4bit"]) == 0
    assert "tuned:" in capsys.readouterr().out


def transformers_causal(folder):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
