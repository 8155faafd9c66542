"""Parity with the real ``peft`` package on identical tiny models and configs.

Three kinds of check, each run against peft itself (never against a re-implementation):

1. trainable-parameter counts: deltatune's ``AttachReport.trainable`` equals peft's
   ``get_nb_trainable_parameters()`` for the same method, sizes and adapted modules;
2. outputs: LoRA, DoRA and (IA)3 with the same (perturbed, non-zero) tensors give the same
   logits in both libraries, unmerged and after each library merges;
3. unmerge: deltatune restores the base weights bit for bit; peft's ``unmerge_adapter``
   subtracts (or divides) the delta back out, and its round-off is recorded.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch

import deltatune as dt
from tiny_models import MODELS

peft = pytest.importorskip("peft")

# peft's task type per tiny model (the PeftModel subclass a user of that model gets).
TASK = {"bert": "SEQ_CLS", "gpt2": "CAUSAL_LM", "llama": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM"}

# LoRA / DoRA targets: attention and feed-forward layers, GPT-2's fused Conv1D, Llama's
# GQA-narrow k/v projections (out 16, in 32) and T5's cross-attention ("q" also matches
# EncDecAttention.q).
LORA_TARGETS = {
    "bert": ["query", "value", "intermediate.dense"],
    "gpt2": ["c_attn", "mlp.c_fc"],
    "llama": ["q_proj", "k_proj", "v_proj", "down_proj"],
    "t5": ["q", "v", "wi"],
}

# (IA)3: deltatune targets and feed-forward patterns, and an independent regular expression
# for the feed-forward (input-scaled) modules that is used to build peft's
# ``feedforward_modules`` from the adapted module paths.
_BERT_FFN_DOWN = r"re:.*\.layer\.\d+\.output\.dense"
IA3_TARGETS = {
    "bert": ([ "key", "value", _BERT_FFN_DOWN], [_BERT_FFN_DOWN], r"\.layer\.\d+\.output\.dense$"),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"], r"\.mlp\.c_proj$"),
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"], r"\.mlp\.down_proj$"),
    "t5": (["k", "v", "wo"], ["wo"], r"\.DenseReluDense\.wo$"),
}

R, ALPHA, TOKENS = 4, 8, 3


def _quiet_peft_model(model, config):
    """``peft.get_peft_model`` without its informational warnings (fan_in_fan_out for Conv1D...)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, config)


def _peft_trainable(peft_model) -> tuple[int, int]:
    """(trainable parameters of the delta, trainable parameters of peft's modules_to_save copies).

    peft adds the classifier head of a ``SEQ_CLS`` model to ``modules_to_save`` and counts
    its trainable copy; deltatune adds no head (its ``modules_to_save`` is empty here), so the
    copy is subtracted explicitly.
    """
    total, _ = peft_model.get_nb_trainable_parameters()
    head = sum(
        p.numel() for n, p in peft_model.named_parameters() if p.requires_grad and ".modules_to_save." in n
    )
    return total - head, head


# ---------------------------------------------------------------------------------------------
# 1. trainable-parameter counts


def _count_configs(method: str, model_name: str, model):
    """Build the deltatune config, attach it, and return (report, the equivalent peft config)."""
    task = TASK[model_name]
    if method in ("lora", "dora"):
        cls = dt.DoRAConfig if method == "dora" else dt.LoRAConfig
        report = dt.attach(model, cls(r=R, alpha=ALPHA, targets=LORA_TARGETS[model_name]), name="x")
        config = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=report.modules,
                                 use_dora=method == "dora", task_type=task)
    elif method == "ia3":
        targets, feedforward, ffn_regex = IA3_TARGETS[model_name]
        report = dt.attach(model, dt.IA3Config(targets=targets, feedforward=feedforward), name="x")
        ffn = [p for p in report.modules if re.search(ffn_regex, p)]
        assert ffn and len(ffn) < len(report.modules)
        config = peft.IA3Config(target_modules=report.modules, feedforward_modules=ffn, task_type=task)
    elif method == "prompt":
        report = dt.attach(model, dt.PromptConfig(num_virtual_tokens=TOKENS), name="x")
        # For SEQ_2_SEQ_LM peft defaults to num_transformer_submodules=2 and allocates a second,
        # decoder half of the prompt table; PeftModelForSeq2SeqLM.forward never uses it for
        # prompt tuning (only ``prompts[:, :num_virtual_tokens]`` goes in front of the encoder
        # input). deltatune, like peft's effective behaviour, prompts the encoder only, so
        # the comparison pins the used part: one submodule.
        extra = {"num_transformer_submodules": 1} if task == "SEQ_2_SEQ_LM" else {}
        config = peft.PromptTuningConfig(num_virtual_tokens=TOKENS, task_type=task, **extra)
    elif method == "prefix":
        # Llama here has GQA (4 query heads, 2 key/value heads): peft sizes the prefix with
        # head_dim * num_key_value_heads, as deltatune does, so no MHA variant is needed.
        # T5: peft's prefix reaches the decoder only (one table for its self-attention layers,
        # reused for cross-attention), while deltatune's default also prefixes the encoder's
        # self-attention; the comparable deltatune config targets the decoder's layers.
        targets = [r"re:decoder\..*"] if model_name == "t5" else None
        report = dt.attach(model, dt.PrefixConfig(num_virtual_tokens=TOKENS, targets=targets), name="x")
        config = peft.PrefixTuningConfig(num_virtual_tokens=TOKENS, prefix_projection=False, task_type=task)
    else:  # pragma: no cover
        raise AssertionError(method)
    return report, config


COUNT_CASES = [(method, model) for method in ("lora", "dora", "ia3", "prompt", "prefix")
               for model in ("bert", "gpt2", "llama", "t5")]


@pytest.mark.parametrize("method,model_name", COUNT_CASES)
def test_trainable_count_equals_peft(method, model_name):
    case = MODELS[model_name]
    report, config = _count_configs(method, model_name, case.build())
    peft_model = _quiet_peft_model(case.build(), config)
    delta, head = _peft_trainable(peft_model)
    # peft's only extra is the SEQ_CLS classifier copy (BERT's 32 x 3 + 3), never anything else
    assert head == (32 * 3 + 3 if TASK[model_name] == "SEQ_CLS" else 0)
    if method in ("lora", "dora", "ia3"):
        # the same modules were adapted on both sides, not merely the same number of parameters
        assert sorted(peft_model.base_model.targeted_module_names) == sorted(report.modules)
    assert report.trainable == delta, f"deltatune {report.trainable} vs peft {delta} ({method} on {model_name})"


def test_t5_prefix_default_also_covers_the_encoder():
    """Documents the T5 difference noted above: deltatune's default T5 prefix (encoder and
    decoder self-attention) has twice the parameters of peft's decoder-only prefix."""
    case = MODELS["t5"]
    report = dt.attach(case.build(), dt.PrefixConfig(num_virtual_tokens=TOKENS), name="x")
    config = peft.PrefixTuningConfig(num_virtual_tokens=TOKENS, task_type="SEQ_2_SEQ_LM")
    delta, _ = _peft_trainable(_quiet_peft_model(case.build(), config))
    assert report.trainable == 2 * delta


# ---------------------------------------------------------------------------------------------
# 2. output equivalence (LoRA, DoRA, (IA)3)


def _dt_config(method: str, model_name: str):
    if method == "ia3":
        targets, feedforward, _ = IA3_TARGETS[model_name]
        return dt.IA3Config(targets=targets, feedforward=feedforward)
    cls = dt.DoRAConfig if method == "dora" else dt.LoRAConfig
    return cls(r=R, alpha=ALPHA, dropout=0.0, targets=LORA_TARGETS[model_name])


def _peft_config(method: str, model_name: str, modules: list[str]):
    if method == "ia3":
        ffn_regex = IA3_TARGETS[model_name][2]
        return peft.IA3Config(target_modules=modules, feedforward_modules=[p for p in modules if re.search(ffn_regex, p)])
    # no task_type: a plain PeftModel, so no classifier copy muddies the comparison
    return peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=modules, use_dora=method == "dora")


def _perturb(model, name: str = "x", scale: float = 0.1) -> None:
    """Move every delta tensor away from its initial value (LoRA's B is zero, (IA)3's l is one)."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, param in dt.delta_parameters(model, name):
            param.add_(scale * torch.randn(param.shape, generator=generator))


# peft parameter name (without the "base_model.model." prefix) -> deltatune key
_PEFT_NAME = re.compile(
    r"^(?P<path>.+)\.(?:(?P<lora>lora_A|lora_B)\.default\.weight|lora_magnitude_vector\.default\.weight|ia3_l\.default)$"
)


def _dt_key(peft_name: str) -> str:
    name = peft_name.removeprefix("base_model.model.")
    match = _PEFT_NAME.match(name)
    assert match, f"unexpected peft parameter {peft_name}"
    if match["lora"]:
        return f"{match['path']}.{match['lora']}"
    tensor = "magnitude" if "lora_magnitude_vector" in name else "ia3_l"
    return f"{match['path']}.{tensor}"


def _copy_into_peft(dt_model, peft_model, method: str) -> None:
    """Give peft's delta the deltatune delta's values; every tensor is mapped exactly once."""
    ours = dict(dt.delta_parameters(dt_model, "x"))
    theirs = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    mapped = {_dt_key(n): p for n, p in theirs.items()}
    assert mapped.keys() == ours.keys()
    with torch.no_grad():
        for key, target in mapped.items():
            source = ours[key]
            if method == "ia3":
                # peft keeps (out, 1) for output scaling and (1, in) for input scaling
                assert target.numel() == source.numel() and 1 in target.shape
                target.copy_(source.reshape(target.shape))
            else:
                # same layout on both sides, GPT-2 Conv1D included: A (r, in), B (out, r)
                assert target.shape == source.shape, key
                target.copy_(source)


def _pair(method: str, model_name: str):
    case = MODELS[model_name]
    ours = case.build(0)
    report = dt.attach(ours, _dt_config(method, model_name), name="x")
    _perturb(ours)
    theirs = _quiet_peft_model(case.build(0), _peft_config(method, model_name, report.modules)).eval()
    _copy_into_peft(ours, theirs, method)
    return case, ours, theirs, report


OUTPUT_CASES = [(method, model) for method in ("lora", "dora", "ia3") for model in ("bert", "gpt2", "llama")]


def _outputs(model, inputs: dict) -> dict[str, torch.Tensor]:
    """Logits and the last hidden state. BERT's classification logits are ~0.01 at this size,
    so the O(1) hidden state is what makes a 1e-5 tolerance meaningful there."""
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    return {"logits": out.logits, "hidden": out.hidden_states[-1]}


def _assert_outputs_close(ours: dict, theirs: dict, what: str) -> None:
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-5, msg=lambda m: f"{what} {key}: {m}")


@pytest.mark.parametrize("method,model_name", OUTPUT_CASES)
def test_outputs_equal_peft_unmerged_and_merged(method, model_name):
    case, ours, theirs, report = _pair(method, model_name)
    inputs = case.inputs()
    base = _outputs(case.build(0), inputs)
    ours_out = _outputs(ours, inputs)
    theirs_out = _outputs(theirs, inputs)
    # the deltas really move the outputs (far beyond the tolerance), so agreement is not
    # agreement with the base by accident
    assert (ours_out["hidden"] - base["hidden"]).abs().max() > 1e-3
    _assert_outputs_close(ours_out, theirs_out, "unmerged")

    dt.merge(ours)
    theirs_merged = theirs.merge_and_unload()
    ours_merged_out = _outputs(ours, inputs)
    _assert_outputs_close(ours_merged_out, _outputs(theirs_merged, inputs), "merged")
    _assert_outputs_close(ours_merged_out, ours_out, "deltatune merged vs unmerged")
    # and the merged weights themselves agree, module by module
    for path in report.modules:
        mine, other = ours.get_submodule(path), theirs_merged.get_submodule(path)
        torch.testing.assert_close(mine.weight, other.weight, rtol=0, atol=1e-6)
        if getattr(mine, "bias", None) is not None:
            torch.testing.assert_close(mine.bias, other.bias, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# 3. unmerge: exact in deltatune, round-off in peft


def _max_abs_error(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    assert before.keys() == after.keys()
    return max((before[k] - after[k]).abs().max().item() for k in before)


@pytest.mark.parametrize("method,model_name", OUTPUT_CASES)
def test_unmerge_restores_base_bit_for_bit_unlike_peft(method, model_name, record_property):
    case, ours, theirs, _ = _pair(method, model_name)
    ours_before = {k: p.detach().clone() for k, p in dt.base_parameters(ours)}
    dt.merge(ours)
    assert _max_abs_error(ours_before, dict(dt.base_parameters(ours))) > 0  # merging changed weights
    dt.unmerge(ours)
    ours_after = dict(dt.base_parameters(ours))
    for key, value in ours_before.items():
        assert torch.equal(value, ours_after[key]), f"deltatune unmerge changed {key}"

    base = theirs.get_base_model()
    base_names = [n for n, _ in case.build(0).named_parameters()]
    theirs_before = {n: base.get_parameter(_peft_base_name(base, n)).detach().clone() for n in base_names}
    theirs.merge_adapter()
    theirs.unmerge_adapter()
    theirs_after = {n: base.get_parameter(_peft_base_name(base, n)).detach() for n in base_names}
    error = _max_abs_error(theirs_before, theirs_after)
    record_property("peft_unmerge_max_abs_error", error)
    print(f"peft unmerge max abs error ({method}, {model_name}): {error:.3e}")


def _peft_base_name(base, name: str) -> str:
    """peft moves an adapted module's weight under ``<module>.base_layer``."""
    module_path, _, tensor = name.rpartition(".")
    module = base.get_submodule(module_path)
    return f"{module_path}.base_layer.{tensor}" if hasattr(module, "base_layer") else name
