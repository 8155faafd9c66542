"""Prompt and prefix tuning on real transformers architectures: masks, labels, causality."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import deltatune as dt
from tiny_models import MODELS


def _rows_consistent(case, model, config_label):
    """A padded row's valid positions equal the same row run alone without padding."""
    inputs = case.inputs()
    with torch.no_grad():
        batch = model(**inputs).logits
        ids = inputs["input_ids"][1:2, :5]
        alone = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    offset = batch.shape[1] - inputs["input_ids"].shape[1]  # prompt tuning adds virtual positions
    if case.name == "bert":
        torch.testing.assert_close(batch[1], alone[0], rtol=1e-5, atol=1e-5, msg=config_label)
    else:
        torch.testing.assert_close(batch[1, offset:offset + 5], alone[0, offset:], rtol=1e-5, atol=1e-5, msg=config_label)


@pytest.mark.parametrize("model_name", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("config", [dt.PrefixConfig(num_virtual_tokens=3), dt.PromptConfig(num_virtual_tokens=3)],
                         ids=["prefix", "prompt"])
def test_padding_does_not_leak_into_valid_positions(model_name, config):
    case = MODELS[model_name]
    model = case.build()
    dt.attach(model, config)
    _rows_consistent(case, model, f"{config.method} on {model_name}")


@pytest.mark.parametrize("model_name", ["gpt2", "llama"])
def test_prefix_keeps_causal_models_causal(model_name):
    case = MODELS[model_name]
    model = case.build()
    dt.attach(model, dt.PrefixConfig(num_virtual_tokens=3))
    ids = case.inputs()["input_ids"]
    changed = ids.clone()
    changed[:, 4:] = (changed[:, 4:] + 1) % 100
    with torch.no_grad():
        a = model(input_ids=ids).logits
        b = model(input_ids=changed).logits
    torch.testing.assert_close(a[:, :4], b[:, :4], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 4:], b[:, 4:])


@pytest.mark.parametrize("model_name", ["bert", "gpt2", "llama", "t5"])
def test_prefix_agrees_between_sdpa_and_eager_attention(model_name):
    case = MODELS[model_name]
    outputs = {}
    for implementation in ("sdpa", "eager"):
        model = case.build()
        model.config._attn_implementation = implementation
        dt.attach(model, dt.PrefixConfig(num_virtual_tokens=3))
        with torch.no_grad():
            outputs[implementation] = case.output(model)
    torch.testing.assert_close(outputs["sdpa"], outputs["eager"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model_name", ["gpt2", "llama"])
def test_prefix_generation_with_cache_equals_full_recompute(model_name):
    case = MODELS[model_name]
    model = case.build()
    dt.attach(model, dt.PrefixConfig(num_virtual_tokens=3))
    with torch.no_grad():
        for _, p in dt.delta_parameters(model, "default"):
            p.mul_(3.0)
    prompt = case.inputs()["input_ids"][:1, :4]
    with torch.no_grad():
        generated = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5,
                                   do_sample=False, pad_token_id=0)
        ids = prompt
        for _ in range(5):
            next_id = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
    assert torch.equal(generated, ids)


def test_prefix_changes_the_output_and_its_mlp_trains():
    case = MODELS["gpt2"]
    model = case.build()
    with torch.no_grad():
        base = case.output(model)
    dt.attach(model, dt.PrefixConfig(num_virtual_tokens=3, projection_dim=8))
    with torch.no_grad():
        assert not torch.allclose(case.output(model), base)
    names = [k for k, _ in dt.delta_parameters(model, "default")]
    assert names == ["embedding", "mlp_in.weight", "mlp_in.bias", "mlp_out.weight", "mlp_out.bias"]


def test_prefix_trained_with_mlp_saves_plain_prefixes(tmp_path):
    case = MODELS["llama"]
    model = case.build()
    dt.attach(model, dt.PrefixConfig(num_virtual_tokens=3, projection_dim=8))
    with torch.no_grad():
        expected = case.output(model)
    dt.save(model, tmp_path / "p")
    meta = dt.read_meta(tmp_path / "p")
    assert meta["config"]["projection_dim"] == 0 and list(meta["tensors"]) == ["prefix"]
    fresh = case.build()
    dt.load(fresh, tmp_path / "p")
    with torch.no_grad():
        torch.testing.assert_close(case.output(fresh), expected, rtol=1e-5, atol=1e-6)


def test_removing_the_last_prefix_restores_the_attention_implementation():
    model = MODELS["llama"].build()
    dt.attach(model, dt.PrefixConfig(num_virtual_tokens=2), name="a")
    dt.attach(model, dt.PrefixConfig(num_virtual_tokens=2), name="b")
    assert model.config._attn_implementation == "deltatune_sdpa"
    dt.delete(model, "a")
    assert model.config._attn_implementation == "deltatune_sdpa"
    dt.delete(model, "b")
    assert model.config._attn_implementation == "sdpa"


def test_prompt_extends_labels_so_the_loss_covers_only_real_tokens():
    case = MODELS["gpt2"]
    model = case.build()
    dt.attach(model, dt.PromptConfig(num_virtual_tokens=3))
    ids = case.inputs()["input_ids"]
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
        # labels are -100 at the 3 virtual positions, so the last virtual position predicts the
        # first real token and every real token is predicted once
        manual = F.cross_entropy(out.logits[:, 2:-1].reshape(-1, 100), ids.reshape(-1))
    assert out.logits.shape[1] == ids.shape[1] + 3
    torch.testing.assert_close(out.loss, manual)


def test_prompt_starts_from_the_embeddings_of_given_tokens():
    model = MODELS["bert"].build()
    dt.attach(model, dt.PromptConfig(num_virtual_tokens=5, init_token_ids=[7, 8]))
    prompt = dict(dt.delta_parameters(model, "default"))["prompt"]
    table = model.get_input_embeddings().weight
    torch.testing.assert_close(prompt, table[[7, 8, 7, 8, 7]])


def test_prompt_from_text_uses_the_tokenizer():
    class Tokenizer:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [len(word) for word in text.split()]}

    config = dt.PromptConfig.from_text("classify this review", Tokenizer(), num_virtual_tokens=4)
    assert config.init_token_ids == (8, 4, 6) and config.init_text == "classify this review"


def test_prompt_and_prefix_refuse_plain_models_clearly():
    for config in (dt.PromptConfig(), dt.PrefixConfig()):
        with pytest.raises(dt.NotApplicableError, match="transformers model"):
            dt.attach(MODELS["mlp"].build(), config)
