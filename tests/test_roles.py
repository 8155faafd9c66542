"""Roles read from a model's structure: which module is the query, the fused projection, the
feed-forward down projection, ... on architectures whose layouts differ."""

from __future__ import annotations

import pytest

import deltatune as dt
from deltatune.core.roles import default_targets, find_roles
from deltatune.core.targeting import pattern_matches
from tiny_models import ARCHITECTURES, MODELS

#: roles in the first block, as paths below it; a role left out must not be found
FIRST_BLOCK = {
    "bert": {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
             "o": "attention.output.dense", "ffn_up": "intermediate.dense", "ffn_down": "output.dense"},
    # registered k, v, q: the names break the tie between three equal shapes
    "gptj": {"q": "attn.q_proj", "k": "attn.k_proj", "v": "attn.v_proj", "o": "attn.out_proj",
             "ffn_up": "mlp.fc_in", "ffn_down": "mlp.fc_out", "ffn_block": "mlp"},
    # GPT-2's Conv1D stores (in, out); c_attn is 3 x hidden wide
    "gpt2": {"qkv": "attn.c_attn", "o": "attn.c_proj", "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj",
             "ffn_block": "mlp"},
    # multi-query: the fused projection is hidden + 2 x head_dim wide
    "falcon": {"qkv": "self_attention.query_key_value", "o": "self_attention.dense",
               "ffn_up": "mlp.dense_h_to_4h", "ffn_down": "mlp.dense_4h_to_h", "ffn_block": "mlp"},
    # o_proj registered before qkv_proj; gate and up fused into one projection twice as wide
    "phi3": {"qkv": "self_attn.qkv_proj", "o": "self_attn.o_proj", "ffn_up": "mlp.gate_up_proj",
             "ffn_down": "mlp.down_proj", "ffn_block": "mlp"},
    "llama": {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
              "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj", "ffn_block": "mlp"},
    # relative position projections also read the hidden width; q, k, v come first
    "deberta-v2": {"q": "attention.self.query_proj", "k": "attention.self.key_proj",
                   "v": "attention.self.value_proj", "o": "attention.output.dense",
                   "ffn_up": "intermediate.dense", "ffn_down": "output.dense"},
    # the router (hidden -> experts) and the shared expert's gate (hidden -> 1) are no up projections
    "qwen2-moe": {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                  "o": "self_attn.o_proj", "ffn_gate": "mlp.shared_expert.gate_proj",
                  "ffn_up": "mlp.shared_expert.up_proj", "ffn_down": "mlp.shared_expert.down_proj",
                  "ffn_block": "mlp.shared_expert"},
    # experts are fused 3-D tensors: no feed-forward role
    "mixtral": {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj"},
    "t5-gated": {"q": "layer.0.SelfAttention.q", "k": "layer.0.SelfAttention.k", "v": "layer.0.SelfAttention.v",
                 "o": "layer.0.SelfAttention.o", "ffn_gate": "layer.1.DenseReluDense.wi_0",
                 "ffn_up": "layer.1.DenseReluDense.wi_1", "ffn_down": "layer.1.DenseReluDense.wo",
                 "ffn_block": "layer.1.DenseReluDense"},
    # fc1 and fc2 sit in the layer itself: no module holds just the feed-forward block
    "bart": {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.out_proj",
             "ffn_up": "fc1", "ffn_down": "fc2"},
}


@pytest.mark.parametrize("arch", list(FIRST_BLOCK))
def test_roles_of_the_first_block(arch):
    found = find_roles(ARCHITECTURES[arch].build())
    first = found.blocks[0]
    in_first = {role: [p[len(first) + 1:] for p in paths if found.block_of[p] == first]
                for role, paths in found.roles.items()}
    assert {role: paths for role, paths in in_first.items() if paths} == {
        role: [path] for role, path in FIRST_BLOCK[arch].items()}
    assert found.hidden == 32


def test_cross_attention_gets_no_role():
    found = find_roles(ARCHITECTURES["t5"].build())
    assert found.blocks == [f"{part}.block.{i}" for part in ("encoder", "decoder") for i in range(2)]
    assert not any("EncDecAttention" in p for paths in found.roles.values() for p in paths)
    assert any("EncDecAttention" in p for p in found.linears)  # all-linear covers it


def test_shared_layers_form_one_block():
    found = find_roles(ARCHITECTURES["albert"].build())
    assert found.blocks == ["albert.encoder.albert_layer_groups.0"]
    assert found.roles["q"] == ["albert.encoder.albert_layer_groups.0.albert_layers.0.attention.query"]


def test_default_patterns_select_exactly_the_role_modules():
    model = ARCHITECTURES["t5"].build()
    patterns = default_targets(model, ["q|qkv", "v", "ffn_down"], "lora")
    assert all(p.startswith("re:") for p in patterns)
    assert len(patterns) == 6  # one per role and stack (encoder, decoder), not one per module
    names = [n for n, _ in model.named_modules()]
    selected = [n for n in names if any(pattern_matches(p, n) for p in patterns)]
    found = find_roles(model)
    assert sorted(selected) == sorted(found.roles["q"] + found.roles["v"] + found.roles["ffn_down"])


def test_q_k_v_fall_back_to_the_fused_projection():
    model = ARCHITECTURES["gpt2"].build()
    assert default_targets(model, ["q|qkv", "v"], "lora") == default_targets(model, ["v"], "lora")


def test_a_missing_role_names_the_method_the_model_and_what_was_looked_for():
    with pytest.raises(dt.TargetError) as error:
        dt.attach(ARCHITECTURES["mixtral"].build(), dt.IA3Config())
    message = str(error.value)
    assert message.startswith("ia3 has no default targets for MixtralForCausalLM")
    assert "feed-forward down projection" in message and "'model.layers'" in message
    assert "pass targets=[...]" in message


def test_a_model_without_blocks_is_told_to_pass_targets():
    with pytest.raises(dt.TargetError, match="lora has no default targets for MLP.*found no such blocks.*pass targets="):
        default_targets(MODELS["mlp"].build(), ["q|qkv", "v"], "lora")
