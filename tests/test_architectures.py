"""Every registered method on many transformers architectures, with no targets given.

Default targets come from roles found in each model's structure (``deltatune.core.roles``),
so no architecture here is named anywhere in the library. For each (architecture, method):
identity at initialisation, one optimizer step lowers a loss and changes only the delta,
save and load onto a fresh base, and merge == unmerged with an exact unmerge. A method that
cannot apply must refuse with a DeltaError naming itself, and exactly the refusals listed in
``EXPECTED_REFUSALS`` may happen.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.methods.head import find_head
from tiny_models import ARCHITECTURES, HOMEMADE, small_config

#: fusion fuses other deltas, so it cannot be attached alone; full fine-tuning is not a delta
METHODS = [m for m in dt.method_names() if not dt.get_method(m).fuses and not dt.get_method(m).trains_base]
PAIRS = [(arch, method) for arch in ARCHITECTURES for method in METHODS]

_NO_BIAS = ("mpt", "llama", "mistral", "mixtral", "qwen3", "phi3", "gemma", "gemma2", "olmo", "smollm3", "granite",
            "cohere", "t5", "t5-gated")
#: their attention computes scores itself instead of calling transformers' attention interface
_OWN_ATTENTION = ("distilbert", "deberta-v2", "albert", "codegen", "bloom", "mpt", "gptj", "falcon")

#: of those, the ones whose attention never calls the interface (the others call it without the attributes prefix needs)
_OWN_SCORES = ("deberta-v2", "codegen", "bloom", "mpt", "gptj", "falcon")

#: (architecture, method) -> words the refusal must contain (besides the method's name)
EXPECTED_REFUSALS = {
    # transformers 5 keeps Mixtral's experts as fused 3-D tensors, not Linear modules, so there
    # is no feed-forward down projection to scale (ia3) or to put an adapter after (houlsby)
    ("mixtral", "ia3"): "role 'ffn_down'",
    ("mixtral", "adapter"): "role 'ffn_down'",
    ("mixtral", "adapterbias"): "role 'ffn_down'",
    ("mixtral", "hydra"): "role 'ffn_down'",
    ("mixtral", "compacter"): "role 'ffn_down'",
    ("mixtral", "sparseadapter"): "role 'ffn_down'",
    ("mixtral", "hyperadapter"): "role 'ffn_down'",
    **{(arch, "bitfit"): "has a bias" for arch in _NO_BIAS},
    **{(arch, "prefix"): "attention interface" for arch in _OWN_ATTENTION},
    **{(arch, "llamaadapter"): "attention interface" for arch in _OWN_SCORES},
    **{(arch, "aligner"): "attention interface" for arch in _OWN_SCORES},
}

#: pairs that attach but do not work: a bug to fix, not a refusal (strict: a fix makes them fail)
KNOWN_BROKEN: dict[tuple[str, str], str] = {}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, above all on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def _base(arch: str) -> nn.Module:
    return ARCHITECTURES[arch].build(seed=0)


@functools.cache
def _base_output(arch: str) -> torch.Tensor:
    with torch.no_grad():  # both sides without grad: some kernels round differently when autograd records
        return ARCHITECTURES[arch].output(_base(arch))


def _fresh(arch: str) -> nn.Module:
    return copy.deepcopy(_base(arch))


def _base_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in dt.base_parameters(model)}


def _assert_base_unchanged(before: dict[str, torch.Tensor], model: nn.Module) -> None:
    after = dict(dt.base_parameters(model))
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), f"base tensor {key} changed"


def _attach_or_refusal(arch: str, method: str) -> tuple[nn.Module, str | None]:
    model = _fresh(arch)
    if method == "head" and find_head(model) is None:
        pytest.skip(f"{arch} has no classification head")
    try:
        dt.attach(model, small_config(method, ARCHITECTURES[arch]), name="task")
    except dt.DeltaError as error:
        return model, str(error)
    return model, None


def _marked(pairs: list[tuple[str, str]]) -> list:
    return [pytest.param(*pair, marks=pytest.mark.xfail(raises=RuntimeError, strict=True,
                                                                reason=KNOWN_BROKEN[pair]))
            if pair in KNOWN_BROKEN else pair for pair in pairs]


@pytest.mark.parametrize("arch,method", _marked(PAIRS))
def test_method_on_architecture(arch, method, tmp_path):
    case = ARCHITECTURES[arch]
    model, refusal = _attach_or_refusal(arch, method)
    if refusal is not None:
        assert (arch, method) in EXPECTED_REFUSALS, f"{method} unexpectedly refused {arch}: {refusal}"
        assert method in refusal.lower() and EXPECTED_REFUSALS[(arch, method)] in refusal, refusal
        assert not hasattr(model, "deltas"), "a refused attach must leave the model untouched"
        return
    assert (arch, method) not in EXPECTED_REFUSALS, f"{method} now applies to {arch}: drop it from EXPECTED_REFUSALS"
    spec = dt.get_method(method)

    with torch.no_grad():
        output = case.output(model)
    if spec.identity_at_init:
        torch.testing.assert_close(output, _base_output(arch), rtol=0, atol=1e-6)
    assert torch.isfinite(output).all()

    # one optimizer step lowers a loss on the output and changes only the delta
    base = _base_snapshot(model)
    delta = dict(dt.delta_parameters(model, "task"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in delta.values()}
    target = torch.randn(output.shape, generator=torch.Generator().manual_seed(5))
    before = {k: p.detach().clone() for k, p in delta.items()}
    optimizer = torch.optim.Adam(trainable, lr=1e-3)
    output = case.output(model)
    loss = (output - target).pow(2).mean()
    loss.backward()
    assert all(p.grad is None for _, p in dt.base_parameters(model))
    optimizer.step()
    with torch.no_grad():
        trained = case.output(model)
    # compared in float64: a first step that moves only zero-init gates (llamaadapter) changes a tiny
    # encoder's loss by about 1e-7, which a float32 mean near 1 rounds away
    squared = lambda out: (out.detach().double() - target.double()).pow(2).mean()  # noqa: E731
    assert squared(trained) < squared(output)
    _assert_base_unchanged(base, model)
    assert any(not torch.equal(p, before[k]) for k, p in delta.items()), "no delta tensor moved"

    # save, then load onto a fresh copy of the base
    dt.save(model, tmp_path / "delta", "task")
    fresh = _fresh(arch)
    dt.load(fresh, tmp_path / "delta")
    with torch.no_grad():
        torch.testing.assert_close(case.output(fresh), trained, rtol=0, atol=0)

    if not spec.mergeable:
        return
    with torch.no_grad():
        generator = torch.Generator().manual_seed(7)
        for p in delta.values():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
        unmerged = case.output(model)
        dt.merge(model)
        torch.testing.assert_close(case.output(model), unmerged, rtol=1e-5, atol=1e-5)
        dt.unmerge(model)
    _assert_base_unchanged(base, model)


def test_expected_refusals_and_known_bugs_name_known_pairs():
    assert set(EXPECTED_REFUSALS) | set(KNOWN_BROKEN) <= set(PAIRS)
    assert not set(EXPECTED_REFUSALS) & set(KNOWN_BROKEN)


#: where each model keeps its transformer blocks, and its linear layers outside them (written
#: out here, not read by the library)
BLOCKS_AND_HEADS = {
    "bert": (("bert.encoder.layer.",), {"bert.pooler.dense", "classifier"}),
    "gpt2": (("transformer.h.",), {"lm_head"}),
    "llama": (("model.layers.",), {"lm_head"}),
    "t5": (("encoder.block.", "decoder.block."), {"lm_head"}),
    "bart": (("model.encoder.layers.", "model.decoder.layers."), {"lm_head"}),
}


@pytest.mark.parametrize("arch", list(BLOCKS_AND_HEADS))
def test_all_linear_selects_every_block_linear_and_never_the_head(arch):
    blocks, heads = BLOCKS_AND_HEADS[arch]
    model = _fresh(arch)
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]
    report = dt.attach(model, dt.LoRAConfig(r=2, targets="all-linear"))
    expected = [n for n in linear if n.startswith(blocks)]
    assert report.modules == expected
    assert set(linear) - set(expected) == heads
    with torch.no_grad():
        torch.testing.assert_close(ARCHITECTURES[arch].output(model), _base_output(arch), rtol=0, atol=1e-6)


def test_all_linear_composes_with_layers_and_exclude():
    report = dt.attach(_fresh("llama"), dt.LoRAConfig(r=2, targets="all-linear", layers=[1], exclude=["mlp.*"]))
    assert report.modules == [f"model.layers.1.self_attn.{p}_proj" for p in "qkvo"]


def test_all_linear_cannot_be_mixed_with_patterns():
    with pytest.raises(dt.ConfigError, match="'all-linear' alone"):
        dt.LoRAConfig(targets=["all-linear", "lm_head"])


def test_all_linear_on_a_model_without_blocks_asks_for_targets():
    from tiny_models import MODELS

    with pytest.raises(dt.TargetError, match="no transformer blocks|found no such blocks"):
        dt.attach(MODELS["mlp"].build(), dt.LoRAConfig(targets="all-linear"))


def test_a_family_of_unknown_model_type_gets_default_targets():
    import transformers

    class MadeUpConfig(transformers.LlamaConfig):
        model_type = "made-up"

    config = MadeUpConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=37)
    model = transformers.LlamaForCausalLM(config)
    assert model.config.model_type == "made-up"
    report = dt.attach(model, dt.LoRAConfig(r=2))
    assert report.modules == [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qv"]
    report = dt.attach(model, dt.IA3Config(), name="ia3")
    assert report.modules == [f"model.layers.{i}.{p}" for i in range(2)
                              for p in ("self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")]


def test_a_homemade_transformer_gets_default_targets_from_its_shapes():
    model = HOMEMADE.build()
    before = HOMEMADE.output(model).detach()
    # LoRA: queries (the one projection wider than the other two) and values (second by order)
    report = dt.attach(model, dt.LoRAConfig(r=2), name="lora")
    assert report.modules == [f"stages.{i}.mix.{p}" for i in range(2) for p in ("p1", "p2")]
    # Houlsby adapters: after the attention output (the last projection back to the hidden
    # width) and after the feed-forward down projection
    report = dt.attach(model, dt.AdapterConfig(bottleneck=4), name="adapter")
    assert report.modules == [f"stages.{i}.{p}" for i in range(2) for p in ("mix.p3", "contract")]
    config = dt.get_config(model, "lora")
    assert config.targets is None
    report = dt.attach(model, dt.IA3Config(), name="ia3")
    assert dt.get_config(model, "ia3").feedforward == (r"re:stages\.\d+\.contract",)
    dt.set_active(model, ["lora", "adapter", "ia3"])
    torch.testing.assert_close(HOMEMADE.output(model), before, rtol=0, atol=1e-6)
