"""Aligner: a few global prompt tokens shared by every attention layer, through zero-init gates.

Zhou Ziheng, Yingnian Wu, Song-Chun Zhu, Demetri Terzopoulos, 2023, "Aligner: One Global Token
is Worth Millions of Parameters When Aligning Large Language Models" (arXiv:2312.05503).

LLaMA-Adapter's zero-init gated attention (:mod:`deltatune.methods.llamaadapter`) with one
prompt ``P`` (``num_tokens x hidden``) for the whole model instead of one per layer: every
self-attention layer ``l`` forms the prompt's keys and values with its own projections
(``K_l = P W_k^l``, ``V_l = P W_v^l``, no position encoding), attends to them with a softmax
of their own, and adds ``W_o^l · concat_h(g_{l,h} · softmax(Q_h K_{l,h}^T / sqrt(d)) V_{l,h})``
with gates ``g`` that start at zero (one per head by default, or one per layer). One token
on a 32-layer, 32-head, 4096-wide model is 4,096 + 1,024 parameters (the paper's "about 5,000").
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

from ...core.config import DeltaConfig, check
from ...core.registry import MethodSpec, Mixing, register_method
from ...core.unit import DeltaUnit, Placement, Placements
from ...errors import NotApplicableError
from ..llamaadapter import GatedPrompt, gated_sites, hidden_width
from ..llamaadapter.attention import AttentionSite

__all__ = ["AlignerConfig", "AlignerTokens", "AlignerLayer"]


@dataclass(frozen=True)
class AlignerConfig(DeltaConfig):
    """Aligner on every self-attention layer of a transformers model.

    Args:
        num_tokens: global prompt tokens shared by all layers (the paper's headline uses 1).
        gate_per_head: one zero-init gate per head and layer; ``False``: one per layer.
    """

    method = "aligner"

    num_tokens: int = 1
    gate_per_head: bool = True

    def validate(self) -> None:
        check(self.num_tokens > 0, f"num_tokens must be a positive number of global tokens, got {self.num_tokens}")


class AlignerTokens(DeltaUnit):
    """The global prompt tokens, ``(num_tokens, hidden)``, held once at the model itself."""

    def __init__(self, num_tokens: int, hidden: int):
        super().__init__()
        self.prompt = nn.Parameter(torch.randn(num_tokens, hidden))

    def fingerprint_module(self, module, model):
        return None  # the attention layers that use the tokens carry the base's identity


class AlignerLayer(GatedPrompt):
    """One attention layer's gate over the shared :class:`AlignerTokens`; it holds only the gate."""

    def __init__(self, site: AttentionSite, heads: int, gate_per_head: bool, tokens: AlignerTokens):
        super().__init__(site, heads, gate_per_head)
        self._tokens = weakref.ref(tokens)  # not a child: the tokens are saved once, at path ""

    def tokens(self) -> torch.Tensor:
        return self._tokens().prompt


def build(model: nn.Module, config: AlignerConfig) -> Placements:
    sites, skipped = gated_sites(model, config, config.method, None)
    widths = {hidden_width(module, site) for site, module, _ in sites}
    if len(widths) != 1:
        raise NotApplicableError(f"aligner shares its tokens across layers, but the attention layers of "
                                 f"{type(model).__name__} read widths {sorted(widths)}")
    table = AlignerTokens(config.num_tokens, widths.pop())
    placements = [Placement("", table, type(model).__name__)]
    placements += [Placement(site.path, AlignerLayer(site, heads, config.gate_per_head, table), type(module).__name__)
                   for site, module, heads in sites]
    return Placements(placements, skipped)


register_method(MethodSpec(
    "aligner", AlignerConfig, build, size_option="num_tokens", mergeable=False, identity_at_init=True,
    merge_refusal="its shared prompt tokens enter every layer's attention through a gated separate softmax",
    summary="a few global prompt tokens every attention layer attends to through zero-init gates (Aligner)",
    default_lr=1e-2,
    mixing=Mixing("per_delta", reason="each delta's prompt attention runs on its own rows (token counts may differ)"),
    peft_refusal="peft has no Aligner (its adaption prompt keeps one prompt per layer; a shared prompt has no "
                 "peft layout)"))
