"""Prefix tuning: trainable key/value prefixes in every attention layer.

Li & Liang, 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation"
(arXiv:2101.00190). The optional reparameterisation MLP trains the prefixes through a
shared two-layer network; a saved delta holds the prefixes it produced.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...core.config import DeltaConfig, check
from ...core.registry import MethodSpec, Mixing, register_method
from ...core.slot import get_slot
from ...core.targeting import base_modules, pattern_matches
from ...core.unit import DeltaUnit, Placement, Placements
from ...errors import NotApplicableError
from . import attention

_CROSS_ATTENTION = ("EncDecAttention", "crossattention", "cross_attn", "encoder_attn")


@dataclass(frozen=True)
class PrefixConfig(DeltaConfig):
    """Prefix tuning on every self-attention layer of a transformers model.

    Args:
        num_virtual_tokens: prefix length per layer.
        projection_dim: width of the reparameterisation MLP's hidden layer during
            training; ``0`` trains the prefixes directly.
    """

    method = "prefix"

    num_virtual_tokens: int = 20
    projection_dim: int = 0

    def validate(self) -> None:
        check(self.num_virtual_tokens > 0, f"num_virtual_tokens must be positive, got {self.num_virtual_tokens}")
        check(self.projection_dim >= 0, f"projection_dim must be >= 0, got {self.projection_dim}")

    def for_saving(self) -> "PrefixConfig":
        return self.replace(projection_dim=0)


class PrefixTable(DeltaUnit):
    """All layers' prefixes: ``(layers, 2, kv_heads, tokens, head_dim)`` values, stored flat
    as ``(tokens, layers * 2 * kv_heads * head_dim)``, or produced by an MLP from embeddings."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, hidden: int, config: PrefixConfig):
        super().__init__()
        self.shape = (layers, 2, kv_heads, head_dim)
        self.tokens = config.num_virtual_tokens
        width = layers * 2 * kv_heads * head_dim
        if config.projection_dim:
            self.embedding = nn.Parameter(torch.randn(self.tokens, hidden))
            self.mlp_in = nn.Linear(hidden, config.projection_dim)
            self.mlp_out = nn.Linear(config.projection_dim, width)
        else:
            self.prefix = nn.Parameter(torch.randn(self.tokens, width))

    def layer_key_value(self, layer: int, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of one layer, each ``(batch, kv_heads, tokens, head_dim)``."""
        _, _, heads, head_dim = self.shape
        size = 2 * heads * head_dim
        if hasattr(self, "prefix"):
            flat = self.prefix[:, layer * size:(layer + 1) * size]
        else:
            hidden = torch.tanh(self.mlp_in(self.embedding))
            rows = slice(layer * size, (layer + 1) * size)
            flat = F.linear(hidden, self.mlp_out.weight[rows], self.mlp_out.bias[rows])
        kv = flat.view(self.tokens, 2, heads, head_dim).permute(1, 2, 0, 3).to(dtype)
        return kv[0].expand(batch, -1, -1, -1), kv[1].expand(batch, -1, -1, -1)

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        if hasattr(self, "prefix"):
            return {"prefix": self.prefix.detach()}
        with torch.no_grad():
            layers = [torch.cat([k[0], v[0]], 0) for k, v in (self.layer_key_value(i, 1, torch.float32) for i in range(self.shape[0]))]
        # back to the flat (tokens, width) layout used without the MLP
        flat = torch.stack(layers).view(self.shape[0], 2, self.shape[2], self.tokens, self.shape[3])
        return {"prefix": flat.permute(3, 0, 1, 2, 4).reshape(self.tokens, -1).contiguous()}

    def load_saved(self, tensors: dict[str, torch.Tensor]) -> None:
        if not hasattr(self, "prefix"):
            raise NotImplementedError("a saved prefix delta loads without its training MLP (projection_dim=0)")
        super().load_saved(tensors)

    def fingerprint_module(self, module, model):
        return None  # the attention layers it serves carry the base's identity

    def attached(self, module, model):
        for config in _attention_configs(model):
            if not config._attn_implementation.startswith(attention.IMPL_PREFIX):
                config._attn_implementation = attention.IMPL_PREFIX + config._attn_implementation

    def detached(self, module, model):
        slot = get_slot(model)
        if slot is not None and any(isinstance(u, PrefixTable) and u is not self for u in slot.values()):
            return
        for config in _attention_configs(model):
            config._attn_implementation = config._attn_implementation.removeprefix(attention.IMPL_PREFIX)


class PrefixLayer(DeltaUnit):
    """One attention layer's view of a :class:`PrefixTable`; it has no tensors of its own."""

    def __init__(self, table: PrefixTable, layer: int):
        super().__init__()
        self._table = weakref.ref(table)
        self.layer = layer

    def key_value(self, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self._table().layer_key_value(self.layer, batch, dtype)


def _calls_attention_interface(module: nn.Module) -> bool:
    """Whether the module's forward looks its attention function up in transformers'
    ``ALL_ATTENTION_FUNCTIONS`` (where prefix tuning's functions are registered); some
    attention classes (GPT-J, Falcon) compute scores themselves and never would."""
    code = getattr(type(module).forward, "__code__", None)
    return code is not None and "ALL_ATTENTION_FUNCTIONS" in code.co_names


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Self-attention modules that call transformers' attention interface."""
    return [
        (path, module)
        for path, module in base_modules(model)
        if hasattr(module, "layer_idx") and hasattr(module, "is_causal") and hasattr(module, "config")
        and not any(marker in path for marker in _CROSS_ATTENTION)
        and not getattr(module, "is_cross_attention", False)
        and _calls_attention_interface(module)
    ]


def _attention_configs(model: nn.Module) -> list:
    return list({id(m.config): m.config for _, m in attention_modules(model)}.values())


def _dimensions(config) -> tuple[int, int, int]:
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or getattr(config, "d_kv", None) or config.hidden_size // heads
    return kv_heads, head_dim, config.hidden_size


def build(model: nn.Module, config: PrefixConfig) -> Placements:
    found = attention_modules(model)
    if not found:
        raise NotApplicableError(
            f"prefix tuning needs a transformers model whose attention modules use the attention "
            f"interface; {type(model).__name__} has none"
        )
    if config.targets is not None:
        found = [(p, m) for p, m in found if any(pattern_matches(t, p) for t in config.targets)]
    if config.layers is not None:
        found = [(p, m) for p, m in found if m.layer_idx in config.layers]
    implementation = found[0][1].config._attn_implementation.removeprefix(attention.IMPL_PREFIX)
    if implementation not in attention.SUPPORTED:
        raise NotApplicableError(
            f"prefix tuning supports attention implementations {attention.SUPPORTED}, the model uses "
            f"{implementation!r}; load it with attn_implementation='sdpa'"
        )
    if not found:
        raise NotApplicableError(f"targets {config.targets} / layers {config.layers} select no attention layer")
    kv_heads, head_dim, hidden = _dimensions(found[0][1].config)
    table = PrefixTable(len(found), kv_heads, head_dim, hidden, config)
    placements = [Placement("", table, type(model).__name__)]
    placements += [Placement(path, PrefixLayer(table, i), type(module).__name__) for i, (path, module) in enumerate(found)]
    attention.register()
    return Placements(placements)


register_method(MethodSpec(
    "prefix", PrefixConfig, build, mergeable=False, identity_at_init=False,
    summary="trainable key/value prefixes in every attention layer", default_lr=1e-2,
    mixing=Mixing("alone", reason="its prefixes enter inside attention, which runs one set of keys for the whole batch"),
    stack_only="its key/value prefixes act inside attention, not on a module's output",
    peft_refusal="peft's prefix tuning passes the prefix as a key/value cache, which shifts every real token's position "
                 "by num_virtual_tokens (and on T5 reaches the decoder only, cross-attention included); deltatune's "
                 "prefix leaves positions alone, so the same tensors would give different outputs"))
