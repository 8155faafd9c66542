"""LLaMA-Adapter: zero-init gated attention to per-layer adaption prompts.

The maths is checked against the formula written out here (queries rotated by hand, a softmax
over the prompt's keys alone, the gate, the output projection), and the peft format against
the real peft package's ``adaption_prompt``.
"""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

import deltatune as dt
from deltatune.errors import ConfigError, MergeError, NotApplicableError
from deltatune.interop import load_peft, save_peft
from deltatune.methods.llamaadapter import LlamaAdapterConfig
from tiny_models import ARCHITECTURES, MODELS

TOL = {"atol": 1e-5, "rtol": 1e-5}


def _randomise(model, name: str, seed: int, scale: float = 0.5) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in dt.delta_parameters(model, name):
            p.add_(scale * torch.randn(p.shape, generator=generator))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _llama_reference(attn, hidden, cos, sin, prompt, gate):
    """What the gated prompt adds to a Llama attention layer's output, written out."""
    batch, length, _ = hidden.shape
    heads, head_dim = attn.config.num_attention_heads, attn.head_dim
    q = attn.q_proj(hidden).view(batch, length, heads, head_dim).transpose(1, 2)
    q = q * cos[:, None] + _rotate_half(q) * sin[:, None]
    keys = attn.k_proj(prompt).view(prompt.shape[0], -1, head_dim).transpose(0, 1)
    values = attn.v_proj(prompt).view(prompt.shape[0], -1, head_dim).transpose(0, 1)
    repeat = heads // keys.shape[0]
    keys, values = keys.repeat_interleave(repeat, 0), values.repeat_interleave(repeat, 0)
    weights = torch.softmax(q @ keys.transpose(-1, -2) / math.sqrt(head_dim), dim=-1)
    heads_out = (gate.view(-1, 1, 1) * weights) @ values
    return heads_out.transpose(1, 2).reshape(batch, length, -1) @ attn.o_proj.weight.T


@pytest.mark.parametrize("gate_per_head", [False, True])
def test_llama_attention_gains_the_gated_prompt_attention(gate_per_head):
    model = ARCHITECTURES["llama"].build(seed=0)
    attn = model.model.layers[1].self_attn
    hidden = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    positions = torch.arange(5)[None].expand(2, -1)
    cos, sin = model.model.rotary_emb(hidden, positions)
    with torch.no_grad():
        base = attn(hidden_states=hidden, position_embeddings=(cos, sin), attention_mask=None)[0]
        dt.attach(model, LlamaAdapterConfig(adapter_len=3, adapter_layers=1, gate_per_head=gate_per_head), name="a")
        _randomise(model, "a", 2)
        unit = model.model.layers[1].self_attn.deltas["a"]
        adapted = attn(hidden_states=hidden, position_embeddings=(cos, sin), attention_mask=None)[0]
        expected = base + _llama_reference(attn, hidden, cos, sin, unit.prompt, unit.gate)
    assert unit.gate.shape == ((4,) if gate_per_head else (1,))
    torch.testing.assert_close(adapted, expected, **TOL)


def test_gpt2_conv1d_fused_projection_gains_the_gated_prompt_attention():
    model = ARCHITECTURES["gpt2"].build(seed=0)
    attn = model.transformer.h[0].attn
    hidden = torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = attn(hidden)[0]
        dt.attach(model, LlamaAdapterConfig(adapter_len=2), name="a")
        _randomise(model, "a", 3)
        unit = attn.deltas["a"]
        adapted = attn(hidden)[0]
        # c_attn and c_proj are Conv1D: weights stored (in, out)
        q, _, _ = (hidden @ attn.c_attn.weight + attn.c_attn.bias).split(32, dim=-1)
        _, k, v = (unit.prompt @ attn.c_attn.weight + attn.c_attn.bias).split(32, dim=-1)
        q = q.view(2, 4, 4, 8).transpose(1, 2)
        k, v = k.view(2, 4, 8).transpose(0, 1), v.view(2, 4, 8).transpose(0, 1)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
        heads_out = (unit.gate * weights @ v).transpose(1, 2).reshape(2, 4, 32)
        expected = base + heads_out @ attn.c_proj.weight
    torch.testing.assert_close(adapted, expected, **TOL)


@pytest.mark.parametrize("arch,layout", [("gpt2", "blocks"), ("gpt-bigcode", "blocks"), ("phi3", "blocks"),
                                         ("gpt-neox", "heads")])
def test_a_fused_projections_layout_is_read_from_the_values_the_model_computed(arch, layout):
    case = ARCHITECTURES[arch]
    model = case.build(seed=0)
    dt.attach(model, LlamaAdapterConfig(adapter_len=2), name="a")
    with torch.no_grad():
        case.output(model)
    units = [m.deltas["a"] for _, m in model.named_modules() if hasattr(m, "deltas") and "a" in m.deltas]
    assert units and {u.layout for u in units} == {layout}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_identity_at_init_and_trains(arch):
    case = ARCHITECTURES[arch]
    model = case.build(seed=0)
    with torch.no_grad():
        base = case.output(model)
    dt.attach(model, LlamaAdapterConfig(adapter_len=4), name="a")
    with torch.no_grad():
        torch.testing.assert_close(case.output(model), base, rtol=0, atol=0)
    _randomise(model, "a", 1)
    with torch.no_grad():
        assert not torch.allclose(case.output(model), base, atol=1e-6)


def test_adapter_layers_keeps_the_top_layers_of_each_stack():
    model = ARCHITECTURES["t5"].build(seed=0)
    report = dt.attach(model, LlamaAdapterConfig(adapter_len=2, adapter_layers=1))
    assert report.modules == ["encoder.block.1.layer.0.SelfAttention", "decoder.block.1.layer.0.SelfAttention"]


def test_parameter_count_is_prompts_and_gates_of_the_adapted_layers():
    model = ARCHITECTURES["llama"].build(seed=0)
    report = dt.attach(model, LlamaAdapterConfig(adapter_len=5, adapter_layers=2, gate_per_head=True))
    assert report.trainable == 2 * (5 * 32 + 4)


def test_too_many_adapter_layers_fail_at_attach_and_leave_the_model_untouched():
    model = ARCHITECTURES["llama"].build(seed=0)
    with pytest.raises(ConfigError, match=r"adapter_layers=3 is more than the 2 attention layers of model\.layers "
                                          r"\(model\.layers\.0\.self_attn \.\.\. model\.layers\.1\.self_attn\)"):
        dt.attach(model, LlamaAdapterConfig(adapter_layers=3))
    assert not hasattr(model, "deltas") and dt.list_deltas(model) == []
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("field,value", [("adapter_len", 0), ("adapter_layers", 0), ("adapter_len", -2)])
def test_bad_field_values_fail_at_construction_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        LlamaAdapterConfig(**{field: value})


@pytest.mark.parametrize("arch", ["gptj", "falcon"])
def test_models_whose_attention_computes_its_own_scores_are_refused_by_name(arch):
    model = ARCHITECTURES[arch].build(seed=0)
    with pytest.raises(NotApplicableError, match="llamaadapter needs self-attention modules that call"):
        dt.attach(model, LlamaAdapterConfig())
    assert not hasattr(model, "deltas")


def test_target_types_are_refused_with_what_selects_layers():
    with pytest.raises(ConfigError, match=r"target_types \['Linear'\] does not apply.*'model.layers.0.self_attn'"):
        dt.attach(ARCHITECTURES["llama"].build(seed=0), LlamaAdapterConfig(target_types=("Linear",)))


def test_targets_select_attention_modules():
    report = dt.attach(ARCHITECTURES["llama"].build(seed=0), LlamaAdapterConfig(targets=("model.layers.0.self_attn",)))
    assert report.modules == ["model.layers.0.self_attn"]


def test_a_plain_model_is_refused_by_name():
    with pytest.raises((NotApplicableError, dt.TargetError), match="llamaadapter"):
        dt.attach(MODELS["mlp"].build(), LlamaAdapterConfig())


def test_prefix_tuning_cannot_share_the_model():
    model = ARCHITECTURES["llama"].build(seed=0)
    dt.attach(model, LlamaAdapterConfig(adapter_len=2), name="a")
    with pytest.raises(NotApplicableError, match="prefix tuning supports attention implementations"):
        dt.attach(model, dt.get_method("prefix").config_class(num_virtual_tokens=2), name="p")
    dt.delete(model, "a")
    assert model.config._attn_implementation == "sdpa"


def test_two_active_deltas_add_their_prompt_attentions():
    case = ARCHITECTURES["llama"]
    model = case.build(seed=0)
    dt.attach(model, LlamaAdapterConfig(adapter_len=2), name="a")
    dt.attach(model, LlamaAdapterConfig(adapter_len=3, adapter_layers=1), name="b")
    _randomise(model, "a", 1)
    _randomise(model, "b", 2)
    with torch.no_grad():
        both = [case.output(model)]
        dt.set_active(model, ["a", "b"])
        both.append(case.output(model))
    assert dt.active_deltas(model) == ("a", "b") and not torch.allclose(both[0], both[1])
    dt.delete(model, "b")
    assert model.config._attn_implementation == "gated_prompt_sdpa"  # "a" still needs the queries
    dt.delete(model, "a")
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_mixed_batch_rows_equal_each_row_alone(arch):
    case = ARCHITECTURES[arch]
    model = case.build(seed=0)
    dt.attach(model, LlamaAdapterConfig(adapter_len=2), name="a")
    dt.attach(model, LlamaAdapterConfig(adapter_len=4, adapter_layers=1, gate_per_head=True), name="b")
    dt.attach(model, dt.LoRAConfig(r=2), name="lora")
    for i, name in enumerate(["a", "b", "lora"]):
        _randomise(model, name, i + 1)
    rows = ["a", "b", None, "lora", "b", "a"]
    generator = torch.Generator().manual_seed(4)
    inputs = {"input_ids": torch.randint(1, 100, (len(rows), 6), generator=generator)}
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs["attention_mask"][1, 4:] = 0
    with torch.no_grad():
        with dt.route(model, rows):
            mixed = case.output(model, inputs)
        for i, name in enumerate(rows):
            one = {k: v[i:i + 1] for k, v in inputs.items()}
            with dt.using(model, (name,) if name else ()):
                torch.testing.assert_close(mixed[i], case.output(model, one)[0], **TOL)


@pytest.mark.parametrize("arch", ["llama", "gpt-neox"])
def test_a_bfloat16_model_runs_with_float32_prompts_and_gates(arch):
    case = ARCHITECTURES[arch]
    model = case.build(seed=0).to(torch.bfloat16)
    dt.attach(model, LlamaAdapterConfig(adapter_len=2), name="a")
    _randomise(model, "a", 1)
    with torch.no_grad():
        output = case.output(model)
    assert output.dtype == torch.bfloat16 and torch.isfinite(output).all()
    assert {p.dtype for _, p in dt.delta_parameters(model, "a")} == {torch.float32}


def test_generation_with_a_kv_cache_equals_full_recompute():
    model = ARCHITECTURES["llama"].build(seed=0).eval()
    dt.attach(model, LlamaAdapterConfig(adapter_len=3))
    _randomise(model, "default", 1)
    prompt = torch.randint(1, 100, (2, 4), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        generated = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
        logits = model(generated).logits
    assert torch.equal(logits[:, 3:-1].argmax(-1), generated[:, 4:])


def test_merge_and_task_vectors_refuse_it_with_the_reason():
    model = ARCHITECTURES["llama"].build(seed=0)
    dt.attach(model, LlamaAdapterConfig(adapter_len=2), name="a")
    with pytest.raises(MergeError, match="changes activations, not weights"):
        dt.merge(model)
    with pytest.raises(MergeError, match="changes activations, not weights"):
        dt.TaskVector.from_delta(model, "a")
    assert not dt.get_method("llamaadapter").mergeable


def test_save_and_load_on_a_fresh_base(tmp_path):
    case = ARCHITECTURES["llama"]
    model = case.build(seed=0)
    dt.attach(model, LlamaAdapterConfig(adapter_len=3, adapter_layers=1, gate_per_head=True), name="a")
    _randomise(model, "a", 5)
    dt.save(model, tmp_path / "a", "a")
    fresh = case.build(seed=0)
    dt.load(fresh, tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(case.output(fresh), case.output(model), rtol=0, atol=0)


# ----- peft's adaption_prompt ------------------------------------------------------------------

peft = pytest.importorskip("peft")


def _peft_model(model, **fields):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, peft.AdaptionPromptConfig(task_type="CAUSAL_LM", **fields))


def _inputs():
    ids = torch.randint(1, 100, (2, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_trainable_count_equals_peft(arch):
    ours = ARCHITECTURES[arch].build(seed=0)
    report = dt.attach(ours, LlamaAdapterConfig(adapter_len=5, adapter_layers=2))
    theirs = _peft_model(ARCHITECTURES[arch].build(seed=0), adapter_len=5, adapter_layers=2)
    assert report.trainable == sum(p.numel() for p in theirs.parameters() if p.requires_grad)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_a_peft_adapter_imports_with_peft_outputs(arch, tmp_path):
    theirs = _peft_model(ARCHITECTURES[arch].build(seed=0), adapter_len=3, adapter_layers=1)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    theirs.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        expected = theirs(**_inputs()).logits
    ours = ARCHITECTURES[arch].build(seed=0)
    report = load_peft(ours, tmp_path / "peft")
    assert report.modules == ["model.layers.1.self_attn"]
    with torch.no_grad():
        got = ours(**_inputs()).logits
    assert (got - expected).abs().max() < 1e-5
    with torch.no_grad(), dt.base_only(ours):
        base = ours(**_inputs()).logits
    assert not torch.allclose(got, base, atol=1e-3)


def test_an_export_loads_in_peft_with_the_same_outputs(tmp_path):
    ours = ARCHITECTURES["llama"].build(seed=0)
    dt.attach(ours, LlamaAdapterConfig(adapter_len=4, adapter_layers=2), name="a")
    _randomise(ours, "a", 8)
    save_peft(ours, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["adapter_len"], config["adapter_layers"], config["target_modules"]) == \
        ("ADAPTION_PROMPT", 4, 2, "self_attn")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(ARCHITECTURES["llama"].build(seed=0), tmp_path / "peft").eval()
    with torch.no_grad():
        assert (ours(**_inputs()).logits - theirs(**_inputs()).logits).abs().max() < 1e-5


def test_an_unknown_peft_option_is_refused_by_name(tmp_path):
    theirs = _peft_model(ARCHITECTURES["llama"].build(seed=0), adapter_len=2, adapter_layers=1)
    theirs.save_pretrained(tmp_path / "peft")
    path = tmp_path / "peft" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "adapter_gating": "tanh"}))
    with pytest.raises(ConfigError, match="option adapter_gating='tanh' is not supported"):
        load_peft(ARCHITECTURES["llama"].build(seed=0), tmp_path / "peft")


@pytest.mark.parametrize("arch,config,reason", [
    ("llama", LlamaAdapterConfig(adapter_len=2, gate_per_head=True), "gate_per_head=True has no peft"),
    ("gpt2", LlamaAdapterConfig(adapter_len=2), "supports model types"),
    ("qwen2", LlamaAdapterConfig(adapter_len=2), "supports model types"),
    ("llama", LlamaAdapterConfig(adapter_len=2, layers=(0,)), "adapts the top adapter_layers modules"),
])
def test_export_refuses_what_peft_computes_differently(arch, config, reason, tmp_path):
    model = ARCHITECTURES[arch].build(seed=0)
    dt.attach(model, config)
    with pytest.raises(ConfigError, match=reason):
        save_peft(model, tmp_path / "peft")


def test_train_from_the_cli_builds_it_from_flags(tmp_path, tiny_bert, reviews_csv):
    from deltatune.cli import main

    code = main(["train", "--model", str(tiny_bert), "--data", str(reviews_csv), "--text-column", "review",
                 "--label-column", "sentiment", "--steps", "4", "--batch-size", "8", "--max-length", "16",
                 "--no-progress", "--out", str(tmp_path / "run"), "--method", "llamaadapter", "--adapter-len", "2",
                 "--adapter-layers", "1", "--gate-per-head", "true"])
    assert code == 0
    saved = json.loads((tmp_path / "run" / "delta.json").read_text())["config"]
    assert (saved["adapter_len"], saved["adapter_layers"], saved["gate_per_head"]) == (2, 1, True)
