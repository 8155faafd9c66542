"""Aligner: global prompt tokens shared by every attention layer, each layer with zero-init gates.

The maths is checked against the formula written out here: every layer forms the shared
tokens' keys and values with its own projections, takes a softmax over them alone, gates
the result per head and adds it through its output projection.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import deltatune as dt
from deltatune.errors import ConfigError, MergeError, NotApplicableError
from deltatune.interop import save_peft
from deltatune.methods.aligner import AlignerConfig, AlignerLayer, AlignerTokens
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


def _gated_prompt_attention(q, keys, values, gate, head_dim):
    """``concat_h(g_h softmax(q_h k_h^T / sqrt(d)) v_h)`` for queries ``(b, heads, s, d)``."""
    repeat = q.shape[1] // keys.shape[0]
    keys, values = keys.repeat_interleave(repeat, 0), values.repeat_interleave(repeat, 0)
    weights = torch.softmax(q @ keys.transpose(-1, -2) / math.sqrt(head_dim), dim=-1)
    out = (gate.view(-1, 1, 1) * weights) @ values
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


@pytest.mark.parametrize("gate_per_head", [True, False])
def test_every_llama_layer_attends_to_the_same_global_tokens(gate_per_head):
    model = ARCHITECTURES["llama"].build(seed=0)
    hidden = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    cos, sin = model.model.rotary_emb(hidden, torch.arange(5)[None].expand(2, -1))
    layers = [block.self_attn for block in model.model.layers]
    with torch.no_grad():
        base = [attn(hidden_states=hidden, position_embeddings=(cos, sin), attention_mask=None)[0] for attn in layers]
        dt.attach(model, AlignerConfig(num_tokens=2, gate_per_head=gate_per_head), name="a")
        _randomise(model, "a", 2)
        tokens = model.deltas["a"].prompt
        for attn, before in zip(layers, base):
            gate = attn.deltas["a"].gate
            assert gate.shape == ((4,) if gate_per_head else (1,))
            q = attn.q_proj(hidden).view(2, 5, 4, 8).transpose(1, 2)
            q = q * cos[:, None] + _rotate_half(q) * sin[:, None]
            keys = attn.k_proj(tokens).view(2, 2, 8).transpose(0, 1)
            values = attn.v_proj(tokens).view(2, 2, 8).transpose(0, 1)
            expected = before + _gated_prompt_attention(q, keys, values, gate, 8) @ attn.o_proj.weight.T
            adapted = attn(hidden_states=hidden, position_embeddings=(cos, sin), attention_mask=None)[0]
            torch.testing.assert_close(adapted, expected, **TOL)


def test_gpt2_conv1d_layers_attend_to_the_global_token():
    model = ARCHITECTURES["gpt2"].build(seed=0)
    hidden = torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = [block.attn(hidden)[0] for block in model.transformer.h]
        dt.attach(model, AlignerConfig(), name="a")
        _randomise(model, "a", 3)
        token = model.deltas["a"].prompt
        for block, before in zip(model.transformer.h, base):
            attn = block.attn
            q, _, _ = (hidden @ attn.c_attn.weight + attn.c_attn.bias).split(32, dim=-1)
            _, k, v = (token @ attn.c_attn.weight + attn.c_attn.bias).split(32, dim=-1)
            q = q.view(2, 4, 4, 8).transpose(1, 2)
            keys, values = k.view(1, 4, 8).transpose(0, 1), v.view(1, 4, 8).transpose(0, 1)
            expected = before + _gated_prompt_attention(q, keys, values, attn.deltas["a"].gate, 8) @ attn.c_proj.weight
            torch.testing.assert_close(attn(hidden)[0], expected, **TOL)


def test_tokens_live_once_at_the_model_and_layers_hold_only_gates():
    model = ARCHITECTURES["llama"].build(seed=0)
    report = dt.attach(model, AlignerConfig(num_tokens=3), name="a")
    assert isinstance(model.deltas["a"], AlignerTokens)
    layers = [block.self_attn.deltas["a"] for block in model.model.layers]
    assert all(isinstance(u, AlignerLayer) and [n for n, _ in u.named_parameters()] == ["gate"] for u in layers)
    assert report.trainable == 3 * 32 + 2 * 4


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "t5"])
def test_identity_at_init_then_the_gates_open(arch):
    case = ARCHITECTURES[arch]
    model = case.build(seed=0)
    with torch.no_grad():
        base = case.output(model)
    dt.attach(model, AlignerConfig(), name="a")
    with torch.no_grad():
        torch.testing.assert_close(case.output(model), base, rtol=0, atol=0)
    _randomise(model, "a", 1)
    with torch.no_grad():
        assert not torch.allclose(case.output(model), base, atol=1e-6)


def test_training_moves_gates_first_then_the_shared_tokens():
    case = ARCHITECTURES["llama"]
    model = case.build(seed=0)
    dt.attach(model, AlignerConfig(), name="a")
    optimizer = torch.optim.Adam([p for _, p in dt.delta_parameters(model, "a")], lr=1e-2)
    target = torch.randn(case.output(model).shape, generator=torch.Generator().manual_seed(5))
    losses = []
    for _ in range(3):
        loss = (case.output(model) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        if not losses:
            assert model.deltas["a"].prompt.grad.abs().max() == 0  # closed gates pass no gradient to the tokens
        optimizer.step()
        losses.append(loss.item())
    assert model.deltas["a"].prompt.grad.abs().max() > 0 and losses[-1] < losses[0]


@pytest.mark.parametrize("field,value", [("num_tokens", 0), ("num_tokens", -1)])
def test_bad_field_values_fail_at_construction_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        AlignerConfig(**{field: value})


def test_a_selection_of_no_attention_layer_fails_at_attach_and_leaves_the_model_untouched():
    model = ARCHITECTURES["llama"].build(seed=0)
    with pytest.raises(ConfigError, match=r"aligner: targets None, layers \(5,\) .* leave no attention layer"):
        dt.attach(model, AlignerConfig(layers=(5,)))
    assert not hasattr(model, "deltas") and model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("arch", ["gptj", "bloom"])
def test_models_whose_attention_computes_its_own_scores_are_refused_by_name(arch):
    with pytest.raises(NotApplicableError, match="aligner needs self-attention modules that call"):
        dt.attach(ARCHITECTURES[arch].build(seed=0), AlignerConfig())


def test_a_plain_model_is_refused_by_name():
    with pytest.raises((NotApplicableError, dt.TargetError), match="aligner"):
        dt.attach(MODELS["mlp"].build(), AlignerConfig())


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_mixed_batch_rows_equal_each_row_alone(arch):
    case = ARCHITECTURES[arch]
    model = case.build(seed=0)
    dt.attach(model, AlignerConfig(), name="one")
    dt.attach(model, AlignerConfig(num_tokens=3, gate_per_head=False), name="three")
    dt.attach(model, LlamaAdapterConfig(adapter_len=2), name="llamaadapter")
    dt.attach(model, dt.LoRAConfig(r=2), name="lora")
    for i, name in enumerate(["one", "three", "llamaadapter", "lora"]):
        _randomise(model, name, i + 1)
    rows = ["one", "three", None, "llamaadapter", "lora", "three", "one"]
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


def test_save_and_load_on_a_fresh_base(tmp_path):
    case = ARCHITECTURES["llama"]
    model = case.build(seed=0)
    dt.attach(model, AlignerConfig(num_tokens=2), name="a")
    _randomise(model, "a", 5)
    dt.save(model, tmp_path / "a", "a")
    fresh = case.build(seed=0)
    dt.load(fresh, tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(case.output(fresh), case.output(model), rtol=0, atol=0)


def test_merge_task_vectors_and_peft_export_refuse_it_with_the_reason(tmp_path):
    model = ARCHITECTURES["llama"].build(seed=0)
    dt.attach(model, AlignerConfig(), name="a")
    with pytest.raises(MergeError, match="changes activations, not weights"):
        dt.merge(model)
    with pytest.raises(MergeError, match="changes activations, not weights"):
        dt.TaskVector.from_delta(model, "a")
    with pytest.raises(ConfigError, match="peft has no Aligner"):
        save_peft(model, tmp_path / "peft")


def test_train_from_the_cli_builds_it_from_flags(tmp_path, tiny_bert, reviews_csv):
    from deltatune.cli import main

    code = main(["train", "--model", str(tiny_bert), "--data", str(reviews_csv), "--text-column", "review",
                 "--label-column", "sentiment", "--steps", "4", "--batch-size", "8", "--max-length", "16",
                 "--no-progress", "--out", str(tmp_path / "run"), "--method", "aligner", "--num-tokens", "2"])
    assert code == 0
    saved = json.loads((tmp_path / "run" / "delta.json").read_text())["config"]
    assert (saved["num_tokens"], saved["gate_per_head"]) == (2, True)
