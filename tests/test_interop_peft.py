"""peft interop against the real peft package (0.21.2): both directions, on the same tiny bases.

1. export: a deltatune delta with random (non-zero) tensors, exported and loaded with
   ``peft.PeftModel.from_pretrained`` on the same base weights, gives deltatune's outputs;
2. import: a peft model with random adapter tensors, saved with ``save_pretrained`` and
   imported, gives peft's outputs when the delta is loaded with ``deltatune.load``;
3. round trips (deltatune -> peft -> deltatune, peft -> deltatune -> peft) keep tensors and config;
4. what peft or deltatune cannot represent is refused with the option or method named;
5. the ``deltatune export`` / ``deltatune import`` commands on tiny model folders.
"""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import safetensors.torch
import torch
from tiny_models import MODELS

import deltatune as dt
from deltatune.cli import main
from deltatune.interop import export_peft, import_peft, load_peft, save_peft

peft = pytest.importorskip("peft")

TOL = 1e-5
_BERT_FFN_DOWN = r"re:.*\.layer\.\d+\.output\.dense"
RANK_PATTERN = "rank_pattern" in {f.name for f in dataclasses.fields(dt.LoRAConfig)}

#: case -> (tiny model, deltatune config, the equivalent config a peft user would write)
CASES = {
    "lora-bert-linear-embedding": ("bert", lambda: dt.LoRAConfig(r=4, alpha=8, targets=["query", "value", "word_embeddings"]),
                                   lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "word_embeddings"])),
    "lora-llama-gqa-embedding": ("llama", lambda: dt.LoRAConfig(r=4, alpha=8, targets=["q_proj", "k_proj", "v_proj", "down_proj", "embed_tokens"]),
                                 lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "down_proj", "embed_tokens"])),
    "lora-gpt2-conv1d": ("gpt2", lambda: dt.LoRAConfig(r=4, alpha=8, dropout=0.1, init="gaussian", targets=["c_attn", "mlp.c_fc"]),
                         lambda: peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, init_lora_weights="gaussian",
                                                 target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
    "rslora-llama": ("llama", lambda: dt.LoRAConfig(r=4, alpha=8, use_rslora=True, targets=["q_proj", "v_proj"]),
                     lambda: peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"])),
    "dora-llama": ("llama", lambda: dt.DoRAConfig(r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"]),
                   lambda: peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"])),
    "dora-gpt2-conv1d": ("gpt2", lambda: dt.DoRAConfig(r=4, alpha=8, targets=["c_attn", "mlp.c_proj"]),
                         lambda: peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["c_attn", "mlp.c_proj"],
                                                 fan_in_fan_out=True)),
    "ia3-bert-feedforward": ("bert", lambda: dt.IA3Config(targets=["key", "value", _BERT_FFN_DOWN], feedforward=[_BERT_FFN_DOWN]),
                             lambda: peft.IA3Config(target_modules=r".*\.(key|value|layer\.\d+\.output\.dense)",
                                                    feedforward_modules=r".*\.layer\.\d+\.output\.dense")),
    "ia3-gpt2-conv1d": ("gpt2", lambda: dt.IA3Config(targets=["c_attn", "mlp.c_proj"], feedforward=["mlp.c_proj"]),
                        lambda: peft.IA3Config(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"],
                                               fan_in_fan_out=True)),
    "prompt-llama": ("llama", lambda: dt.PromptConfig(num_virtual_tokens=3),
                     lambda: peft.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM")),
    "prompt-t5": ("t5", lambda: dt.PromptConfig(num_virtual_tokens=3),  # peft: two submodules, decoder half unused
                  lambda: peft.PromptTuningConfig(num_virtual_tokens=3, task_type="SEQ_2_SEQ_LM")),
    "prompt-bert-head": ("bert", lambda: dt.PromptConfig(num_virtual_tokens=3, modules_to_save=["classifier"]),
                         lambda: peft.PromptTuningConfig(num_virtual_tokens=3, task_type="SEQ_CLS")),
    "lora-bert-head": ("bert", lambda: dt.LoRAConfig(r=4, alpha=8, targets=["query", "value"], modules_to_save=["classifier"]),
                       lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")),
    "ia3-llama-lm-head": ("llama", lambda: dt.IA3Config(targets=["k_proj", "down_proj"], feedforward=["down_proj"],
                                                        modules_to_save=["lm_head"]),
                          lambda: peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"],
                                                 modules_to_save=["lm_head"])),
    "lora-mlp-plain-torch-head": ("mlp", lambda: dt.LoRAConfig(r=4, alpha=8, targets=["fc1", "fc2"], modules_to_save=["head"]),
                                  lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"], modules_to_save=["head"])),
}
if RANK_PATTERN:
    CASES["lora-llama-rank-pattern"] = (
        "llama", lambda: dt.LoRAConfig(r=4, alpha=8, targets=["q_proj", "v_proj"],
                                       rank_pattern={"model.layers.0.self_attn.q_proj": 2, "model.layers.1.self_attn.v_proj": 6}),
        lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"q_proj": 2}))


def _quiet(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return function(*args, **kwargs)


def _randomise(parameters, scale: float = 0.1) -> None:
    """Move every adapter tensor well away from its start (LoRA's B is zero, (IA)3's l is one)."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in parameters:
            param.add_(scale * torch.randn(param.shape, generator=generator))


def _outputs(model, inputs: dict) -> dict[str, torch.Tensor]:
    """Logits and last hidden states (tiny BERT's logits are ~0.01; its hidden states are O(1))."""
    if "x" in inputs:  # a plain torch model
        with torch.no_grad():
            return {"logits": model(inputs["x"])}
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    if "decoder_hidden_states" in out:
        return {"logits": out.logits, "decoder": out.decoder_hidden_states[-1], "encoder": out.encoder_last_hidden_state}
    return {"logits": out.logits, "hidden": out.hidden_states[-1]}


def _assert_same_outputs(ours: dict, theirs: dict, base: dict | None) -> None:
    assert ours.keys() == theirs.keys()
    for key, value in ours.items():
        torch.testing.assert_close(value, theirs[key], rtol=0, atol=TOL, msg=lambda m, key=key: f"{key}: {m}")
    if base is not None and all(base[k].shape == ours[k].shape for k in ours):  # prompt tuning lengthens outputs
        assert max((ours[k] - base[k]).abs().max().item() for k in ours) > 100 * TOL, "the delta changes nothing"


def _deltatune_delta(case_name: str, folder):
    """A saved deltatune delta of the case with random tensors, and the model it is attached to."""
    model_name, dt_config, _ = CASES[case_name]
    model = MODELS[model_name].build(0)
    dt.attach(model, dt_config(), name="x")
    _randomise([p for _, p in dt.delta_parameters(model, "x")])
    dt.save(model, folder)
    return model.eval()  # the new units start in training mode (LoRA dropout on)


def _peft_adapter(case_name: str, folder):
    """A peft model of the case with random adapter tensors (modules_to_save copies included), saved."""
    model_name, _, peft_config = CASES[case_name]
    theirs = _quiet(peft.get_peft_model, MODELS[model_name].build(0), peft_config()).eval()
    _randomise([p for _, p in theirs.named_parameters() if p.requires_grad])
    _quiet(theirs.save_pretrained, folder)
    return theirs


# ---------------------------------------------------------------------------------------------
# 1-2. outputs equal peft's, in both directions


@pytest.mark.parametrize("case_name", CASES)
def test_export_loads_in_peft_with_the_same_outputs(case_name, tmp_path):
    ours = _deltatune_delta(case_name, tmp_path / "delta")
    case = MODELS[CASES[case_name][0]]
    export_peft(tmp_path / "delta", tmp_path / "peft", case.build(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(case.build(0), tmp_path / "peft").eval()
    complaints = [str(w.message) for w in caught if any(s in str(w.message) for s in ("fan_in_fan_out", "missing", "nexpected"))]
    assert not complaints, complaints  # the files are exactly what peft expects: no key or flag fixed up
    inputs = case.inputs()
    _assert_same_outputs(_outputs(ours, inputs), _outputs(theirs, inputs), _outputs(case.build(0), inputs))


@pytest.mark.parametrize("case_name", CASES)
def test_import_of_a_peft_adapter_gives_peft_outputs(case_name, tmp_path):
    theirs = _peft_adapter(case_name, tmp_path / "peft")
    case = MODELS[CASES[case_name][0]]
    import_peft(tmp_path / "peft", tmp_path / "delta", case.build(0))
    ours = case.build(0)
    dt.load(ours, tmp_path / "delta")  # strict: the recorded fingerprint is this base's
    ours.eval()
    inputs = case.inputs()
    _assert_same_outputs(_outputs(ours, inputs), _outputs(theirs, inputs), _outputs(case.build(0), inputs))


def test_imported_heads_and_scaling_are_what_peft_trained(tmp_path):
    """The trained head is peft's copy, and DoRA/rsLoRA settings come through as deltatune options."""
    theirs = _peft_adapter("lora-bert-head", tmp_path / "peft")
    import_peft(tmp_path / "peft", tmp_path / "delta", MODELS["bert"].build(0))
    meta = dt.read_meta(tmp_path / "delta")
    tensors = safetensors.torch.load_file(tmp_path / "delta" / "delta.safetensors")
    assert meta["modules_to_save"] == ["classifier"] and meta["config"]["r"] == 4 and meta["config"]["alpha"] == 8
    head = theirs.base_model.model.classifier.modules_to_save["default"]
    assert torch.equal(tensors["classifier.copy.weight"], head.weight.detach())
    _peft_adapter("rslora-llama", tmp_path / "rs")
    model = MODELS["llama"].build(0)
    load_peft(model, tmp_path / "rs", name="rs")
    assert dt.get_config(model, "rs").use_rslora and dt.get_config(model, "rs").scaling == 8 / 2


def test_prompt_with_sentence_pair_token_types(tmp_path):
    """Both libraries prepend the prompt with token type 0 on a sequence classifier. For a bare
    encoder (peft's FEATURE_EXTRACTION, also CAUSAL_LM and SEQ_2_SEQ_LM) peft drops
    token_type_ids with a warning, so only inputs with non-zero token types differ there."""
    import transformers

    inputs = MODELS["bert"].inputs()
    pairs = {**inputs, "token_type_ids": (torch.arange(inputs["input_ids"].shape[1]) >= 4).long().expand_as(inputs["input_ids"])}
    _peft_adapter("prompt-bert-head", tmp_path / "cls")
    import_peft(tmp_path / "cls", tmp_path / "cls-delta", MODELS["bert"].build(0))
    ours, theirs = MODELS["bert"].build(0), _quiet(peft.PeftModel.from_pretrained, MODELS["bert"].build(0), tmp_path / "cls")
    dt.load(ours, tmp_path / "cls-delta")
    _assert_same_outputs(_outputs(ours, pairs), _outputs(theirs.eval(), pairs), None)

    def encoder():
        torch.manual_seed(0)
        return transformers.BertModel(MODELS["bert"].build(0).config).eval()

    ours = encoder()
    dt.attach(ours, dt.PromptConfig(num_virtual_tokens=3), name="x")
    _randomise([p for _, p in dt.delta_parameters(ours, "x")])
    save_peft(ours, tmp_path / "encoder")
    theirs = _quiet(peft.PeftModel.from_pretrained, encoder(), tmp_path / "encoder").eval()
    assert json.loads((tmp_path / "encoder" / "adapter_config.json").read_text())["task_type"] == "FEATURE_EXTRACTION"
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).last_hidden_state, theirs(**inputs).last_hidden_state, rtol=0, atol=TOL)
        differ = ours(**pairs).last_hidden_state - _quiet(theirs, **pairs).last_hidden_state
    assert differ.abs().max() > 0.1


# ---------------------------------------------------------------------------------------------
# 3. round trips


def _tensors(folder, name: str) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(folder / name)


@pytest.mark.parametrize("case_name", CASES)
def test_export_then_import_gives_back_the_same_delta(case_name, tmp_path):
    _deltatune_delta(case_name, tmp_path / "delta")
    base = MODELS[CASES[case_name][0]].build(0)
    export_peft(tmp_path / "delta", tmp_path / "peft", base)
    import_peft(tmp_path / "peft", tmp_path / "back", base, name="x")
    before, after = dt.read_meta(tmp_path / "delta"), dt.read_meta(tmp_path / "back")
    for field in ("name", "method", "config", "sites", "modules_to_save", "tensors", "base"):
        assert before[field] == after[field], field
    original, back = _tensors(tmp_path / "delta", "delta.safetensors"), _tensors(tmp_path / "back", "delta.safetensors")
    assert original.keys() == back.keys() and all(torch.equal(original[k], back[k]) for k in original)
    assert dt.list_deltas(base) == []  # the base passed in is left as it was


@pytest.mark.parametrize("case_name", ["lora-llama-gqa-embedding", "lora-gpt2-conv1d", "dora-gpt2-conv1d", "ia3-bert-feedforward",
                                       "prompt-llama", "lora-bert-head"])
def test_peft_adapter_imported_and_exported_again_is_unchanged(case_name, tmp_path):
    _peft_adapter(case_name, tmp_path / "peft")
    base = MODELS[CASES[case_name][0]].build(0)
    import_peft(tmp_path / "peft", tmp_path / "delta", base)
    export_peft(tmp_path / "delta", tmp_path / "again", base)
    theirs, ours = _tensors(tmp_path / "peft", "adapter_model.safetensors"), _tensors(tmp_path / "again", "adapter_model.safetensors")
    # peft also stores a targeted embedding's own (unchanged) weights; deltatune checks them and drops them
    theirs = {k: v for k, v in theirs.items() if ".base_layer." not in k}
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    again = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    for field in ("peft_type", "r", "lora_alpha", "lora_dropout", "init_lora_weights", "use_dora", "use_rslora",
                  "fan_in_fan_out", "num_virtual_tokens", "token_dim"):
        assert peft_config.get(field) == again.get(field), field


# ---------------------------------------------------------------------------------------------
# 4. refusals


@pytest.mark.parametrize("method,config,reason", [
    ("adapter", dt.AdapterConfig(bottleneck=4), "bottleneck-adapter"),
    ("prefix", dt.PrefixConfig(num_virtual_tokens=3), "positions"),
    ("bitfit", dt.BitFitConfig(), "bias-only"),
    ("head", dt.HeadConfig(), "modules_to_save"),
])
def test_export_refuses_methods_peft_cannot_represent(method, config, reason, tmp_path):
    model = MODELS["bert"].build(0)
    dt.attach(model, config, name="x")
    dt.save(model, tmp_path / "delta")
    with pytest.raises(dt.ConfigError, match=rf"cannot export a '{method}' delta to peft: .*{reason}"):
        export_peft(tmp_path / "delta", tmp_path / "peft", MODELS["bert"].build(0))
    assert not (tmp_path / "peft").exists()


def test_export_refuses_a_base_the_delta_was_not_made_for(tmp_path):
    _deltatune_delta("lora-gpt2-conv1d", tmp_path / "delta")
    with pytest.raises(dt.FingerprintError):
        export_peft(tmp_path / "delta", tmp_path / "peft", MODELS["gpt2"].build(seed=1))


@pytest.mark.parametrize("option,value", [
    ("lora_bias", True), ("use_qalora", True), ("layer_replication", [[0, 2]]), ("trainable_token_indices", [1, 2]),
    ("alpha_pattern", {"q_proj": 16}), ("bias", "all"), ("target_parameters", ["mlp.down_proj.weight"]),
    ("init_lora_weights", "pissa"), ("init_lora_weights", "olora"), ("some_future_option", 3),
])
def test_import_refuses_peft_options_it_cannot_represent(option, value, tmp_path):
    _peft_adapter("rslora-llama", tmp_path / "peft")
    config_file = tmp_path / "peft" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), option: value}))
    model = MODELS["llama"].build(0)
    with pytest.raises(dt.ConfigError, match=rf"{option}"):
        load_peft(model, tmp_path / "peft")
    assert dt.list_deltas(model) == []  # nothing attached


@pytest.mark.parametrize("peft_config", [lambda: peft.LoHaConfig(r=2, target_modules=["q_proj"]),
                                         lambda: peft.PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM")])
def test_import_refuses_other_peft_methods(peft_config, tmp_path):
    theirs = _quiet(peft.get_peft_model, MODELS["llama"].build(0), peft_config())
    _quiet(theirs.save_pretrained, tmp_path / "peft")
    with pytest.raises(dt.ConfigError, match=r"imports peft LORA, PROMPT_TUNING, IA3(, \w+)* adapters only"):
        load_peft(MODELS["llama"].build(0), tmp_path / "peft")


def test_import_refuses_dora_on_an_embedding(tmp_path):
    theirs = _quiet(peft.get_peft_model, MODELS["llama"].build(0),
                    peft.LoraConfig(r=2, use_dora=True, target_modules=["embed_tokens", "q_proj"]))
    _quiet(theirs.save_pretrained, tmp_path / "peft")
    with pytest.raises(dt.ConfigError, match="model.embed_tokens.*DoRA supports Linear and Conv1D"):
        load_peft(MODELS["llama"].build(0), tmp_path / "peft")


class _ScaledEmbedding(torch.nn.Embedding):
    """An embedding that multiplies its output by ``embed_scale`` (as Gemma 3's does)."""

    def __init__(self) -> None:
        super().__init__(10, 4)
        self.register_buffer("embed_scale", torch.tensor(2.0), persistent=False)

    def forward(self, ids):
        return super().forward(ids) * self.embed_scale


def test_lora_on_a_scaled_embedding_is_refused_both_ways(tmp_path):
    """peft scales the LoRA term with the embedding; deltatune adds it after: they differ."""
    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(_ScaledEmbedding(), torch.nn.Linear(4, 2))

    ours = model()
    dt.attach(ours, dt.LoRAConfig(r=2, targets=["0"]), name="x")
    with pytest.raises(dt.ConfigError, match="scaled embedding '0'"):
        save_peft(ours, tmp_path / "out")
    _quiet(_quiet(peft.get_peft_model, model(), peft.LoraConfig(r=2, target_modules=["0"])).save_pretrained, tmp_path / "peft")
    with pytest.raises(dt.ConfigError, match="scaled embedding '0'"):
        load_peft(model(), tmp_path / "peft")


def test_prompt_on_a_classifier_without_trained_head_exports_the_base_head(tmp_path):
    """peft's sequence-classification model always loads a head from the file; the export
    writes the base's own, unchanged, so peft computes what deltatune does."""
    case = MODELS["bert"]
    ours = case.build(0)
    dt.attach(ours, dt.PromptConfig(num_virtual_tokens=3), name="x")
    _randomise([p for _, p in dt.delta_parameters(ours, "x")])
    save_peft(ours, tmp_path / "peft")
    written = _tensors(tmp_path / "peft", "adapter_model.safetensors")
    assert torch.equal(written["base_model.classifier.weight"], case.build(0).classifier.weight.detach())
    theirs = _quiet(peft.PeftModel.from_pretrained, case.build(0), tmp_path / "peft").eval()
    inputs = case.inputs()
    _assert_same_outputs(_outputs(ours, inputs), _outputs(theirs, inputs), None)


def test_import_refuses_a_changed_copy_of_base_weights_and_pickle_files(tmp_path):
    _peft_adapter("lora-llama-gqa-embedding", tmp_path / "peft")
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    tensors = safetensors.torch.load_file(weights)
    tensors["base_model.model.model.embed_tokens.base_layer.weight"] += 1.0
    safetensors.torch.save_file(tensors, weights)
    with pytest.raises(dt.DeltaFileError, match="model.embed_tokens.weight, which differs from this base's"):
        load_peft(MODELS["llama"].build(0), tmp_path / "peft")
    weights.rename(tmp_path / "peft" / "adapter_model.bin")
    with pytest.raises(dt.DeltaFileError, match="reads no pickle"):
        load_peft(MODELS["llama"].build(0), tmp_path / "peft")


# ---------------------------------------------------------------------------------------------
# 5. the command line, on tiny model folders


def _llama_from(folder):
    import transformers

    return transformers.LlamaForCausalLM.from_pretrained(folder).eval()


def _folder_inputs() -> dict[str, torch.Tensor]:
    """Token ids within the tiny folders' 28-word vocabulary, one row padded."""
    ids = torch.randint(5, 28, (3, 7), generator=torch.Generator().manual_seed(123))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_cli_export_and_import_round_trip(tmp_path, tiny_llama):
    ours = _llama_from(tiny_llama)
    dt.attach(ours, dt.LoRAConfig(r=4, alpha=8, targets=["q_proj", "v_proj", "embed_tokens"]), name="x")
    _randomise([p for _, p in dt.delta_parameters(ours, "x")])
    dt.save(ours, tmp_path / "delta", provenance={"model": str(tiny_llama)})  # as `deltatune train` records it
    assert main(["export", str(tmp_path / "delta"), "--format", "peft", "--out", str(tmp_path / "peft")]) == 0
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_llama.resolve())
    theirs = _quiet(peft.PeftModel.from_pretrained, _llama_from(tiny_llama), tmp_path / "peft").eval()
    inputs = _folder_inputs()
    _assert_same_outputs(_outputs(ours, inputs), _outputs(theirs, inputs), _outputs(_llama_from(tiny_llama), inputs))
    # no --model: the base comes from the adapter's base_model_name_or_path
    assert main(["import", str(tmp_path / "peft"), "--format", "peft", "--out", str(tmp_path / "back"), "--name", "x"]) == 0
    original, back = _tensors(tmp_path / "delta", "delta.safetensors"), _tensors(tmp_path / "back", "delta.safetensors")
    assert original.keys() == back.keys() and all(torch.equal(original[k], back[k]) for k in original)
    assert dt.read_meta(tmp_path / "back")["config"] == dt.read_meta(tmp_path / "delta")["config"]


def test_cli_sequence_classifier_with_head_finds_class_and_labels(tmp_path, tiny_bert):
    import transformers

    def classifier():
        torch.manual_seed(0)
        return transformers.BertForSequenceClassification.from_pretrained(tiny_bert, num_labels=3).eval()

    ours = classifier()
    dt.attach(ours, dt.LoRAConfig(r=4, targets=["query", "value"], modules_to_save=["classifier"]), name="x")
    _randomise([p for _, p in dt.delta_parameters(ours, "x")])
    dt.save(ours, tmp_path / "delta", provenance={"model": str(tiny_bert)})
    assert main(["export", str(tmp_path / "delta"), "--format", "peft", "--out", str(tmp_path / "peft")]) == 0
    assert main(["import", str(tmp_path / "peft"), "--format", "peft", "--out", str(tmp_path / "back"),
                 "--model", str(tiny_bert)]) == 0
    fresh = classifier()
    dt.load(fresh, tmp_path / "back")
    inputs = _folder_inputs()
    _assert_same_outputs(_outputs(ours, inputs), _outputs(fresh, inputs), _outputs(classifier(), inputs))


def test_cli_errors_name_the_problem(tmp_path, tiny_llama, capsys):
    model = _llama_from(tiny_llama)
    dt.attach(model, dt.PrefixConfig(num_virtual_tokens=2), name="x")
    dt.save(model, tmp_path / "prefix", provenance={"model": str(tiny_llama)})
    assert main(["export", str(tmp_path / "prefix"), "--format", "peft", "--out", str(tmp_path / "out")]) == 2
    assert "cannot export a 'prefix' delta to peft" in capsys.readouterr().err
    _peft_adapter("prompt-llama", tmp_path / "peft")  # saved from a model built from a config: no base recorded
    assert main(["import", str(tmp_path / "peft"), "--format", "peft", "--out", str(tmp_path / "d")]) == 2
    assert "pass --model" in capsys.readouterr().err
