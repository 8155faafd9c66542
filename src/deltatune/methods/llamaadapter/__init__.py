"""LLaMA-Adapter: learned adaption prompts in the top attention layers, through zero-init gates.

Renrui Zhang, Jiaming Han, Chris Liu, Peng Gao, Aojun Zhou et al., 2023, "LLaMA-Adapter: Efficient Fine-tuning of
Language Models with Zero-init Attention" (arXiv:2303.16199).

Each of the top ``adapter_layers`` self-attention layers ``l`` gets its own prompt ``P_l``
(``adapter_len x hidden``) and gate ``g_l`` (zero at the start); the layer's output gains
``W_o · concat_h(g_l · softmax(Q_h K_h^T / sqrt(d)) V_h)`` with ``K = P_l W_k``, ``V = P_l W_v``
(the layer's own projections; no position encoding on the prompt), a softmax over the prompt
alone. The formula and how it is found in a model are in :mod:`.layer` and :mod:`.attention`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from torch import nn

from ...core.config import DeltaConfig, check
from ...core.registry import MethodSpec, Mixing, register_method
from ...core.shapes import linear_shape
from ...core.targeting import layer_index, pattern_matches
from ...core.unit import Placement, Placements
from ...errors import ConfigError, NotApplicableError
from . import attention
from .attention import AttentionSite
from .layer import NOT_A_WEIGHT_CHANGE, AdaptionPrompt, GatedPrompt
from .peft import AdaptionPromptCodec

__all__ = ["LlamaAdapterConfig", "AdaptionPrompt", "GatedPrompt", "gated_sites", "hidden_width"]


@dataclass(frozen=True)
class LlamaAdapterConfig(DeltaConfig):
    """LLaMA-Adapter on the self-attention layers of a transformers model.

    Args:
        adapter_len: prompt tokens per adapted layer (the paper uses 10).
        adapter_layers: adapt only the top this many attention layers of each block stack
            (the paper: 30 of LLaMA-7B's 32); ``None`` adapts every layer.
        gate_per_head: one zero-init gate per attention head instead of one per layer
            (peft's adaption prompt has one per layer).
    """

    method = "llamaadapter"

    adapter_len: int = 10
    adapter_layers: int | None = None
    gate_per_head: bool = False

    def validate(self) -> None:
        check(self.adapter_len > 0, f"adapter_len must be a positive number of prompt tokens, got {self.adapter_len}")
        check(self.adapter_layers is None or self.adapter_layers > 0,
              f"adapter_layers must be a positive number of layers (or None for all), got {self.adapter_layers}")


def _heads(module: nn.Module, method: str, path: str) -> int:
    config = module.config
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "num_heads", None)
    if not heads:
        raise NotApplicableError(f"{method} needs the number of attention heads of {path}, and its config states none")
    return int(heads)


def gated_sites(model: nn.Module, config: DeltaConfig, method: str, top_layers: int | None
                ) -> tuple[list[tuple[AttentionSite, nn.Module, int]], list[tuple[str, str]]]:
    """The self-attention layers a gated-prompt method adapts, ``(site, module, heads)`` each, and
    the attention modules it cannot adapt with the reason.

    ``targets`` (patterns on attention module paths), ``layers`` and ``exclude`` filter them;
    then only the top ``top_layers`` of each block stack are kept.

    Raises:
        NotApplicableError: no attention module takes its queries through transformers'
            attention interface, or its attention implementation is not sdpa or eager.
        ConfigError: ``top_layers`` exceeds the layers of a stack.
    """
    sites, skipped = attention.attention_sites(model)
    if not sites:
        why = "; ".join(f"{p}: {reason}" for p, reason in skipped[:2]) or "it has no transformer blocks with attention"
        raise NotApplicableError(
            f"{method} needs self-attention modules that call transformers' attention interface (to read their "
            f"queries); {type(model).__name__} has none ({why})")
    if config.target_types:
        raise ConfigError(f"{method} adapts self-attention modules, found from the model's structure; target_types "
                          f"{list(config.target_types)} does not apply: select layers with targets (attention module "
                          f"paths such as {sites[0].path!r}), layers or exclude")
    if config.targets is not None:
        sites = [s for s in sites if any(pattern_matches(t, s.path) for t in config.targets)]
    if config.layers is not None:
        sites = [s for s in sites if layer_index(s.path) in set(config.layers)]
    sites = [s for s in sites if not any(pattern_matches(p, s.path) for p in config.exclude)]
    if not sites:
        raise ConfigError(f"{method}: targets {config.targets}, layers {config.layers} and exclude "
                          f"{list(config.exclude)} leave no attention layer of {type(model).__name__}")
    if top_layers is not None:
        stacks: dict[str, list[AttentionSite]] = defaultdict(list)
        for site in sites:
            stacks[_stack_of(site.path)].append(site)
        for stack, members in stacks.items():
            if top_layers > len(members):
                raise ConfigError(
                    f"adapter_layers={top_layers} is more than the {len(members)} attention layers of "
                    f"{stack or type(model).__name__} ({members[0].path} ... {members[-1].path}); use at most "
                    f"{len(members)}")
        sites = [s for members in stacks.values() for s in members[-top_layers:]]
    out = []
    for site in sites:
        module = model.get_submodule(site.path)
        implementation = (attention.implementation_of(module) or "").removeprefix(attention.IMPL_PREFIX)
        if implementation not in attention.SUPPORTED:
            raise NotApplicableError(
                f"{method} supports the attention implementations {attention.SUPPORTED}; {site.path} uses "
                f"{implementation!r} (another delta that replaces the attention function, such as prefix tuning, "
                f"cannot share the model); load the model with attn_implementation='sdpa'")
        out.append((site, module, _heads(module, method, site.path)))
    attention.register()
    return out, skipped


def _stack_of(path: str) -> str:
    """The block stack of an attention path: the name up to the block's index (``model.layers``)."""
    parts = path.split(".")
    index = next((i for i, p in enumerate(parts) if p.isdigit()), len(parts))
    return ".".join(parts[:index])


def hidden_width(module: nn.Module, site: AttentionSite) -> int:
    """The width of the tokens the attention layer projects (its key projection's input)."""
    return linear_shape(module.get_submodule(site.key))[0]


def build(model: nn.Module, config: LlamaAdapterConfig) -> Placements:
    sites, skipped = gated_sites(model, config, config.method, config.adapter_layers)
    placements = [
        Placement(site.path, AdaptionPrompt(site, heads, hidden_width(module, site), config.adapter_len,
                                            config.gate_per_head), type(module).__name__)
        for site, module, heads in sites]
    return Placements(placements, skipped)


register_method(MethodSpec(
    "llamaadapter", LlamaAdapterConfig, build, size_option="adapter_len", mergeable=False, identity_at_init=True,
    merge_refusal=NOT_A_WEIGHT_CHANGE,
    summary="learned adaption prompts in the top attention layers through zero-init gates (LLaMA-Adapter)",
    default_lr=1e-2,
    mixing=Mixing("per_delta", reason="each delta's prompt attention runs on its own rows (prompt lengths may differ)"),
    peft=AdaptionPromptCodec()))
