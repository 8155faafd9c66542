"""Parity with the real ``peft`` package on identical tiny models and configs.

Every check runs deltatune and peft itself side by side (never a re-implementation of peft):

1. trainable-parameter counts: deltatune's ``AttachReport.trainable`` equals peft's
   ``get_nb_trainable_parameters()`` for the same method, sizes and adapted modules
   (LoRA, DoRA, (IA)3, prompt tuning, prefix tuning on BERT, GPT-2, Llama and T5);
2. outputs: with deltatune's (perturbed, non-zero) tensors copied into peft's parameters,
   LoRA, DoRA and (IA)3 give the same logits and hidden states, unmerged and after each
   library merges, and the same gradients; prompt and prefix tuning give the same outputs;
3. unmerge: deltatune restores the base weights bit for bit, while peft's
   ``merge_adapter(); unmerge_adapter()`` adds and subtracts (or multiplies and divides) the
   delta and leaves round-off, which is recorded.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch

import deltatune as dt
from tiny_models import MODELS

peft = pytest.importorskip("peft")

#: peft's task type per tiny model: the PeftModel subclass a user of that model gets
TASK = {"bert": "SEQ_CLS", "gpt2": "CAUSAL_LM", "llama": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM"}

#: LoRA / DoRA targets: attention and feed-forward Linears, input embeddings (BERT, Llama;
#: both untied here), GPT-2's fused Conv1D layers, Llama's GQA-narrow k/v projections
#: (in 32, out 16) and T5's cross-attention ("q" also matches EncDecAttention.q). DoRA skips
#: the embeddings (deltatune supports DoRA on Linear and Conv1D only); peft is then given
#: exactly the modules deltatune adapted.
LORA_TARGETS = {
    "bert": ["word_embeddings", "query", "value", "intermediate.dense"],
    "gpt2": ["c_attn", "mlp.c_fc"],
    "llama": ["embed_tokens", "q_proj", "k_proj", "v_proj", "down_proj"],
    "t5": ["q", "v", "wi"],
}

#: (IA)3: deltatune's targets and feed-forward patterns, plus an independent regular
#: expression for the feed-forward (input-scaled) modules, used to build peft's
#: ``feedforward_modules`` from the adapted paths.
_BERT_FFN_DOWN = r"re:.*\.layer\.\d+\.output\.dense"
IA3_TARGETS = {
    "bert": (["key", "value", _BERT_FFN_DOWN], [_BERT_FFN_DOWN], r"\.layer\.\d+\.output\.dense$"),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"], r"\.mlp\.c_proj$"),
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"], r"\.mlp\.down_proj$"),
    "t5": (["k", "v", "wo"], ["wo"], r"\.DenseReluDense\.wo$"),
}

R, ALPHA, TOKENS = 4, 8, 3
TOL = 1e-5


def _fan_in_fan_out(model_name: str) -> bool:
    """GPT-2's Conv1D stores its weight (in, out); peft must be told (it would otherwise fix
    the flag itself, with a warning). deltatune detects Conv1D on its own."""
    return model_name == "gpt2"


def _peft_model(model, config):
    """``peft.get_peft_model`` without its informational warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, config)


def _peft_trainable(peft_model) -> tuple[int, int]:
    """(trainable parameters of the delta, trainable parameters of peft's modules_to_save copies).

    For a ``SEQ_CLS`` task peft puts the classifier head in ``modules_to_save`` and counts its
    trainable copy; deltatune adds no head here (its ``modules_to_save`` is empty), so the
    copy is subtracted explicitly (and checked to be exactly BERT's classifier).
    """
    total, _ = peft_model.get_nb_trainable_parameters()
    head = sum(p.numel() for n, p in peft_model.named_parameters() if p.requires_grad and ".modules_to_save." in n)
    return total - head, head


# ---------------------------------------------------------------------------------------------
# 1. trainable-parameter counts


def _attach_for_count(method: str, model_name: str, model):
    """Attach deltatune's delta; return (report, the equivalent peft config)."""
    task = TASK[model_name]
    if method in ("lora", "dora"):
        cls = dt.DoRAConfig if method == "dora" else dt.LoRAConfig
        report = dt.attach(model, cls(r=R, alpha=ALPHA, targets=LORA_TARGETS[model_name]), name="x")
        config = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=report.modules,
                                 use_dora=method == "dora", fan_in_fan_out=_fan_in_fan_out(model_name),
                                 task_type=task)
    elif method == "ia3":
        targets, feedforward, ffn_regex = IA3_TARGETS[model_name]
        report = dt.attach(model, dt.IA3Config(targets=targets, feedforward=feedforward), name="x")
        ffn = [p for p in report.modules if re.search(ffn_regex, p)]
        assert ffn and len(ffn) < len(report.modules)  # both kinds of (IA)3 vector are compared
        config = peft.IA3Config(target_modules=report.modules, feedforward_modules=ffn,
                                fan_in_fan_out=_fan_in_fan_out(model_name), task_type=task)
    elif method == "prompt":
        report = dt.attach(model, dt.PromptConfig(num_virtual_tokens=TOKENS), name="x")
        # For SEQ_2_SEQ_LM peft defaults to num_transformer_submodules=2 and allocates a second,
        # decoder half of the prompt table (doubling its count), which
        # PeftModelForSeq2SeqLM.forward never uses for prompt tuning: only
        # prompts[:, :num_virtual_tokens] goes in front of the encoder input. deltatune prompts
        # the encoder only, so the comparison pins peft to the part it uses: one submodule.
        extra = {"num_transformer_submodules": 1} if task == "SEQ_2_SEQ_LM" else {}
        config = peft.PromptTuningConfig(num_virtual_tokens=TOKENS, task_type=task, **extra)
    elif method == "prefix":
        # Llama here has GQA (4 query heads, 2 key/value heads). peft sizes the prefix as
        # head_dim * num_key_value_heads, like deltatune, so the GQA model is compared as is.
        # T5: peft's prefix reaches the decoder only (one table for its self-attention layers,
        # reused for cross-attention); deltatune's default also prefixes the encoder's
        # self-attention (see test_t5_prefix_default_also_covers_the_encoder), so the
        # comparable deltatune config targets the decoder's layers.
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
    report, config = _attach_for_count(method, model_name, case.build())
    peft_model = _peft_model(case.build(), config)
    delta, head = _peft_trainable(peft_model)
    # peft's only extra is the SEQ_CLS classifier copy (BERT's 32 x 3 + 3), never anything else
    assert head == (32 * 3 + 3 if TASK[model_name] == "SEQ_CLS" else 0)
    if method in ("lora", "dora", "ia3"):
        # the same modules were adapted on both sides, not merely as many parameters
        assert sorted(peft_model.base_model.targeted_module_names) == sorted(report.modules)
    assert report.trainable == delta, f"deltatune {report.trainable} vs peft {delta} ({method} on {model_name})"


def test_t5_prefix_default_also_covers_the_encoder():
    """The T5 difference noted above: deltatune's default T5 prefix (encoder and decoder
    self-attention) has twice the parameters of peft's decoder-only prefix."""
    case = MODELS["t5"]
    report = dt.attach(case.build(), dt.PrefixConfig(num_virtual_tokens=TOKENS), name="x")
    config = peft.PrefixTuningConfig(num_virtual_tokens=TOKENS, task_type="SEQ_2_SEQ_LM")
    delta, _ = _peft_trainable(_peft_model(case.build(), config))
    assert report.trainable == 2 * delta


# ---------------------------------------------------------------------------------------------
# 2. output equivalence


def _dt_config(method: str, model_name: str):
    if method == "ia3":
        targets, feedforward, _ = IA3_TARGETS[model_name]
        return dt.IA3Config(targets=targets, feedforward=feedforward)
    cls = dt.DoRAConfig if method == "dora" else dt.LoRAConfig
    return cls(r=R, alpha=ALPHA, dropout=0.0, targets=LORA_TARGETS[model_name])


def _peft_config(method: str, model_name: str, modules: list[str]):
    # no task_type: a plain PeftModel, so no classifier copy is involved
    if method == "ia3":
        ffn = [p for p in modules if re.search(IA3_TARGETS[model_name][2], p)]
        return peft.IA3Config(target_modules=modules, feedforward_modules=ffn, fan_in_fan_out=_fan_in_fan_out(model_name))
    return peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=modules,
                           use_dora=method == "dora", fan_in_fan_out=_fan_in_fan_out(model_name))


def _perturb(model, name: str = "x", scale: float = 0.1) -> None:
    """Move every delta tensor away from its initial value (LoRA's B is zero, (IA)3's l is one)."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, param in dt.delta_parameters(model, name):
            param.add_(scale * torch.randn(param.shape, generator=generator))


#: peft parameter name (after "base_model.model.") -> (module path, deltatune tensor name)
_PEFT_NAMES = [
    (re.compile(r"^(.+)\.lora_(A|B)\.default\.weight$"), "lora_{}"),             # Linear / Conv1D
    (re.compile(r"^(.+)\.lora_embedding_(A|B)\.default$"), "lora_{}"),           # Embedding
    (re.compile(r"^(.+)\.lora_magnitude_vector\.default\.(weight)$"), "magnitude"),
    (re.compile(r"^(.+)\.ia3_l\.(default)$"), "ia3_l"),
]


def _dt_key(peft_name: str) -> str:
    name = peft_name.removeprefix("base_model.model.")
    for pattern, tensor in _PEFT_NAMES:
        match = pattern.match(name)
        if match:
            return f"{match[1]}.{tensor.format(match[2])}"
    raise AssertionError(f"unexpected peft parameter {peft_name}")


def _copy_into_peft(dt_model, peft_model, method: str) -> None:
    """Give peft's delta the deltatune delta's values; every tensor is mapped exactly once."""
    ours = dict(dt.delta_parameters(dt_model, "x"))
    theirs = {_dt_key(n): p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert theirs.keys() == ours.keys()
    with torch.no_grad():
        for key, target in theirs.items():
            source = ours[key]
            if method == "ia3":
                # peft keeps (out, 1) for output scaling and (1, in) for input scaling
                assert target.numel() == source.numel() and 1 in target.shape, key
                target.copy_(source.reshape(target.shape))
            else:
                # the same layout on both sides, GPT-2 Conv1D included: A (r, in), B (out, r);
                # for embeddings A (r, vocabulary), B (dim, r)
                assert target.shape == source.shape, key
                target.copy_(source)


def _pair(method: str, model_name: str):
    """Two identical models (same seed), one with deltatune's delta, one with peft's, sharing values."""
    case = MODELS[model_name]
    ours = case.build(0)
    report = dt.attach(ours, _dt_config(method, model_name), name="x")
    _perturb(ours)
    theirs = _peft_model(case.build(0), _peft_config(method, model_name, report.modules)).eval()
    _copy_into_peft(ours, theirs, method)
    return case, ours, theirs, report


def _outputs(model, inputs: dict, grad: bool = False) -> dict[str, torch.Tensor]:
    """Logits and last hidden states. BERT's classification logits are ~0.01 at this size, so
    the O(1) hidden states are what makes the 1e-5 tolerance meaningful there."""
    with torch.set_grad_enabled(grad):
        out = model(**inputs, output_hidden_states=True)
    if "decoder_hidden_states" in out:
        return {"logits": out.logits, "decoder": out.decoder_hidden_states[-1], "encoder": out.encoder_last_hidden_state}
    return {"logits": out.logits, "hidden": out.hidden_states[-1]}


def _assert_outputs_close(ours: dict, theirs: dict, what: str) -> None:
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=TOL, msg=lambda m: f"{what}, {key}: {m}")


def _assert_moved(ours: dict, base: dict) -> None:
    """The delta really changes the outputs, far beyond the tolerance, so agreeing with peft
    is not agreeing with the base model by accident."""
    assert max((ours[k] - base[k]).abs().max().item() for k in ours if k != "logits") > 100 * TOL


OUTPUT_CASES = [(method, model) for method in ("lora", "dora", "ia3") for model in ("bert", "gpt2", "llama")]


@pytest.mark.parametrize("method,model_name", OUTPUT_CASES)
def test_outputs_equal_peft_unmerged_and_merged(method, model_name):
    case, ours, theirs, report = _pair(method, model_name)
    inputs = case.inputs()
    ours_out = _outputs(ours, inputs)
    _assert_moved(ours_out, _outputs(case.build(0), inputs))
    _assert_outputs_close(ours_out, _outputs(theirs, inputs), "unmerged")

    dt.merge(ours)
    theirs_merged = theirs.merge_and_unload()
    ours_merged_out = _outputs(ours, inputs)
    _assert_outputs_close(ours_merged_out, _outputs(theirs_merged, inputs), "merged")
    _assert_outputs_close(ours_merged_out, ours_out, "deltatune merged vs unmerged")
    # and the merged weights themselves agree, module by module
    for path in report.modules:
        mine, other = ours.get_submodule(path), theirs_merged.get_submodule(path)
        torch.testing.assert_close(mine.weight, other.weight, rtol=0, atol=1e-6, msg=lambda m: f"{path}.weight: {m}")
        if getattr(mine, "bias", None) is not None:
            torch.testing.assert_close(mine.bias, other.bias, rtol=0, atol=1e-6, msg=lambda m: f"{path}.bias: {m}")


@pytest.mark.parametrize("method,model_name", OUTPUT_CASES)
def test_gradients_equal_peft(method, model_name):
    """The same loss gives the delta tensors the same gradients (eval mode: no dropout, so
    both forwards are deterministic; DoRA's weight norm is detached in both libraries)."""
    case, ours, theirs, _ = _pair(method, model_name)
    inputs = case.inputs()
    for model in (ours, theirs):
        out = _outputs(model, inputs, grad=True)
        sum(v.pow(2).mean() for v in out.values()).backward()
    ours_grads = {k: p.grad for k, p in dt.delta_parameters(ours, "x")}
    for name, param in theirs.named_parameters():
        if param.requires_grad:
            key = _dt_key(name)
            assert ours_grads[key] is not None and ours_grads[key].abs().max() > 0, key
            torch.testing.assert_close(ours_grads[key].reshape(param.shape), param.grad, rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"grad of {key}: {m}")


def _prompt_learning_pair(method: str, model_name: str):
    """deltatune's prompt or prefix delta and peft's, with deltatune's table copied into peft's."""
    case = MODELS[model_name]
    ours = case.build(0)
    task = TASK[model_name]
    if method == "prompt":
        dt.attach(ours, dt.PromptConfig(num_virtual_tokens=TOKENS), name="x")
        extra = {"num_transformer_submodules": 1} if task == "SEQ_2_SEQ_LM" else {}
        config = peft.PromptTuningConfig(num_virtual_tokens=TOKENS, task_type=task, **extra)
    else:
        dt.attach(ours, dt.PrefixConfig(num_virtual_tokens=TOKENS), name="x")
        config = peft.PrefixTuningConfig(num_virtual_tokens=TOKENS, prefix_projection=False, task_type=task)
    _perturb(ours)
    theirs = _peft_model(case.build(0), config).eval()
    (table,) = [p for n, p in theirs.named_parameters() if p.requires_grad and ".modules_to_save." not in n]
    (source,) = [p for _, p in dt.delta_parameters(ours, "x")]
    # prompt: (tokens, hidden) on both sides. prefix: (tokens, layers * 2 * kv_heads * head_dim)
    # on both sides, laid out layer, then key/value, then head, then head_dim in both.
    assert table.shape == source.shape
    with torch.no_grad():
        table.copy_(source)
    return case, ours, theirs


@pytest.mark.parametrize("model_name", ["bert", "gpt2", "llama", "t5"])
def test_prompt_tuning_outputs_equal_peft(model_name):
    case, ours, theirs = _prompt_learning_pair("prompt", model_name)
    inputs = case.inputs()
    ours_out = _outputs(ours, inputs)
    _assert_outputs_close(ours_out, _outputs(theirs, inputs), "prompt tuning")


@pytest.mark.parametrize("model_name", ["bert", "gpt2", "llama"])
def test_prefix_tuning_outputs_equal_peft_with_positions_aligned(model_name):
    """peft passes the prefix as a KV cache, so its tokens take positions
    ``num_virtual_tokens ...`` (it adds num_virtual_tokens to explicit position_ids too);
    deltatune leaves token positions alone. Giving deltatune the shifted positions makes the
    two computations the same (prefix keys get no position encoding in either), which the
    padded batch row also exercises. T5 is left out: peft's prefix goes to the decoder's
    self- and cross-attention, deltatune's to self-attention only."""
    case, ours, theirs = _prompt_learning_pair("prefix", model_name)
    inputs = case.inputs()
    positions = torch.arange(inputs["input_ids"].shape[1]).expand(inputs["input_ids"].shape[0], -1)
    shifted = {**inputs, "position_ids": positions + TOKENS}
    ours_out = _outputs(ours, shifted)
    _assert_moved(ours_out, _outputs(case.build(0), shifted))
    _assert_outputs_close(ours_out, _outputs(theirs, {**inputs, "position_ids": positions}), "prefix tuning")


# ---------------------------------------------------------------------------------------------
# 3. unmerge: exact in deltatune, round-off in peft


def _max_abs_error(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    assert before.keys() == after.keys()
    return max((before[k] - after[k]).abs().max().item() for k in before)


def _peft_base_name(base, name: str) -> str:
    """peft moves an adapted module's own parameters under ``<module>.base_layer``."""
    module_path, _, tensor = name.rpartition(".")
    module = base.get_submodule(module_path)
    return f"{module_path}.base_layer.{tensor}" if hasattr(module, "base_layer") else name


@pytest.mark.parametrize("method,model_name", OUTPUT_CASES)
def test_unmerge_restores_base_bit_for_bit_unlike_peft(method, model_name, record_property):
    case, ours, theirs, _ = _pair(method, model_name)
    ours_before = {k: p.detach().clone() for k, p in dt.base_parameters(ours)}
    dt.merge(ours)
    assert _max_abs_error(ours_before, dict(dt.base_parameters(ours))) > 0  # merging did change weights
    dt.unmerge(ours)
    ours_after = dict(dt.base_parameters(ours))
    assert ours_after.keys() == ours_before.keys()
    for key, value in ours_before.items():
        assert torch.equal(value, ours_after[key]), f"deltatune unmerge did not restore {key} exactly"

    base = theirs.get_base_model()
    names = [n for n, _ in case.build(0).named_parameters()]
    theirs_before = {n: base.get_parameter(_peft_base_name(base, n)).detach().clone() for n in names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft: "Unmerge result can be inaccurate for (IA)^3."
        theirs.merge_adapter()
        theirs.unmerge_adapter()
    theirs_after = {n: base.get_parameter(_peft_base_name(base, n)).detach() for n in names}
    error = _max_abs_error(theirs_before, theirs_after)
    changed = sum(int((theirs_before[n] != theirs_after[n]).sum()) for n in names)
    record_property("peft_unmerge_max_abs_error", error)
    record_property("peft_unmerge_elements_changed", changed)
    print(f"peft unmerge ({method}, {model_name}): max abs error {error:.3e}, {changed} elements not restored")
    # Only a sanity bound is asserted about peft: its unmerge is approximately right. (Its
    # error is not asserted to be non-zero, though on this setup it was, deterministically:
    # the same values with 1, 4 and 16 threads and over repeated runs, e.g. 6.0e-08 over
    # 7136 elements for LoRA on BERT and 3.7e-09 for (IA)3, which divides by l + 1e-8.)
    assert error < 1e-6
