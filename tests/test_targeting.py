"""Choosing modules: globs, regexes, types, layer indices, and errors that help."""

from __future__ import annotations

import pytest

import deltatune as dt
from deltatune.core.targeting import layer_index, pattern_matches
from tiny_models import MODELS


@pytest.fixture
def bert():
    return MODELS["bert"].build()


def test_plain_pattern_matches_a_dotted_suffix():
    name = "bert.encoder.layer.0.attention.self.query"
    assert pattern_matches("query", name)
    assert pattern_matches("self.query", name)
    assert pattern_matches("layer.*.attention.self.query", name)
    assert not pattern_matches("uery", name)
    assert not pattern_matches("self", name)


def test_regex_pattern_must_match_the_whole_name():
    name = "bert.encoder.layer.1.attention.self.value"
    assert pattern_matches(r"re:.*layer\.1\..*value", name)
    assert not pattern_matches(r"re:layer\.1", name)


def test_layer_index_is_the_first_number_in_the_name():
    assert layer_index("transformer.h.3.attn.c_attn") == 3
    assert layer_index("bert.encoder.layer.10.output.dense") == 10
    assert layer_index("classifier") is None


def test_glob_targets(bert):
    report = dt.attach(bert, dt.LoRAConfig(r=2, targets=["key"]))
    assert report.modules == [f"bert.encoder.layer.{i}.attention.self.key" for i in range(2)]


def test_regex_targets(bert):
    report = dt.attach(bert, dt.LoRAConfig(r=2, targets=[r"re:.*layer\.0\.attention\.self\.(query|value)"]))
    assert report.modules == ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.value"]


def test_type_targets_with_layer_filter(bert):
    report = dt.attach(bert, dt.LoRAConfig(r=2, target_types=["Linear"], layers=[1], exclude=["intermediate.dense"]))
    assert report.modules and all(".layer.1." in m for m in report.modules)
    assert not any("intermediate" in m for m in report.modules)
    assert len(report.modules) == 5  # query key value attention-output output


def test_default_targets_follow_the_model_structure():
    for name, expected in [("bert", "attention.self.query"), ("gpt2", "attn.c_attn"), ("llama", "self_attn.q_proj"), ("t5", "SelfAttention.q")]:
        report = dt.attach(MODELS[name].build(), dt.LoRAConfig(r=2))
        assert any(m.endswith(expected) for m in report.modules), (name, report.modules)


def test_pattern_matching_nothing_lists_similar_names(bert):
    with pytest.raises(dt.TargetError) as error:
        dt.attach(bert, dt.LoRAConfig(targets=["q_proj"]))
    message = str(error.value)
    assert "'q_proj' matched no module of BertForSequenceClassification" in message
    assert "'query'" in message
    assert not hasattr(bert, "deltas"), "a failed attach must leave the model untouched"


def test_one_bad_pattern_among_good_ones_is_an_error(bert):
    with pytest.raises(dt.TargetError, match="'valeu'"):
        dt.attach(bert, dt.LoRAConfig(targets=["query", "valeu"]))


def test_unknown_type_lists_present_types(bert):
    with pytest.raises(dt.TargetError, match="types present: .*Linear"):
        dt.attach(bert, dt.LoRAConfig(target_types=["Conv2d"]))


def test_unsupported_modules_are_skipped_with_a_reason(bert):
    report = dt.attach(bert, dt.LoRAConfig(r=2, targets=["attention.self", "attention.self.query"]))
    assert report.modules == [f"bert.encoder.layer.{i}.attention.self.query" for i in range(2)]
    assert [why for _, why in report.skipped] == ["BertSelfAttention is not a Linear, Conv1D or Embedding layer"] * 2
    assert "skipped" in str(report)


def test_only_unsupported_matches_is_an_error(bert):
    with pytest.raises(dt.TargetError, match="cannot adapt any"):
        dt.attach(bert, dt.LoRAConfig(targets=["attention.self"]))


def test_plain_model_without_targets_asks_for_them():
    with pytest.raises(dt.TargetError, match="no default targets .* found no such blocks; pass targets="):
        dt.attach(MODELS["mlp"].build(), dt.LoRAConfig())


def test_deltatune_modules_are_never_targets(bert):
    dt.attach(bert, dt.LoRAConfig(r=2, target_types=["Linear"]), name="first")
    report = dt.attach(bert, dt.LoRAConfig(r=2, target_types=["Linear"]), name="second")
    assert not any(".deltas." in m for m in report.modules)


def test_config_validation_names_the_field():
    with pytest.raises(dt.ConfigError, match="rank r must be a positive integer"):
        dt.LoRAConfig(r=0)
    with pytest.raises(dt.ConfigError, match="field 'placement' must be one of 'houlsby', 'pfeiffer', 'parallel', got 'sideways'"):
        dt.AdapterConfig(placement="sideways")
    with pytest.raises(dt.ConfigError, match="unknown field.*'rank'"):
        dt.LoRAConfig.from_dict({"method": "lora", "rank": 4})
    with pytest.raises(dt.ConfigError, match="unknown delta method 'lorax'; available: lora"):
        dt.get_method("lorax")


def test_config_round_trips_through_dict():
    for config in [dt.LoRAConfig(r=3, targets=["q"], use_rslora=True), dt.IA3Config(feedforward=["wo"]),
                   dt.PromptConfig(num_virtual_tokens=4, init_token_ids=[1, 2]), dt.AdapterConfig(placement="parallel")]:
        assert dt.config_from_dict(config.to_dict()) == config
