"""Prefix tuning: trainable key/value prefixes in every attention layer.

Li & Liang, 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation"
(arXiv:2101.00190). Each attention layer attends to ``[P_k; K]`` and ``[P_v; V]``: its own
keys and values behind ``num_virtual_tokens`` trained ones. The optional reparameterisation
MLP trains the prefixes through a shared two-layer network; a saved delta holds the prefixes
it produced. By default the prefixes start as the layer's own keys and values of real tokens
(see :mod:`.init`), so the model starts near the base.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...core.config import DeltaConfig, check
from ...core.registry import MethodSpec, Mixing, register_method
from ...core.slot import get_slot
from ...core.targeting import base_modules, pattern_matches
from ...core.unit import DeltaUnit, Placement, Placements
from ...errors import NotApplicableError
from ..prompt.init import Init, check_init, plain_ids, resolved_init, start_tokens, tokenize
from . import attention
from .init import own_keys_values, vocabulary_size

_CROSS_ATTENTION = ("EncDecAttention", "crossattention", "cross_attn", "encoder_attn")


@dataclass(frozen=True)
class PrefixConfig(DeltaConfig):
    """Prefix tuning on every self-attention layer of a transformers model.

    Args:
        num_virtual_tokens: prefix length per layer.
        projection_dim: width of the reparameterisation MLP's hidden layer during
            training; ``0`` trains the prefixes directly.
        init: where the prefixes start: ``"vocab"``, each layer's own keys and values of
            tokens drawn from the vocabulary (with torch's RNG), computed by the frozen base
            at attach; ``"text"``, the same for ``init_text``'s tokens (or ``init_token_ids``),
            repeated or cut to length; ``"random"``, standard normal vectors (what prefix
            tuning did before; they swamp the attention). Default: ``"text"`` when
            ``init_text`` or ``init_token_ids`` is given, else ``"vocab"``. With the MLP, a
            token start is a fixed offset the MLP's output (zero at first) is added to.
        init_token_ids: the token ids of ``init="text"``; when only ``init_text`` is given,
            the model's own tokenizer (saved with its checkpoint) finds them at attach, and
            the saved delta records them.
        init_text: the text of ``init="text"``; with another ``init`` only a record.
    """

    method = "prefix"

    num_virtual_tokens: int = 20
    projection_dim: int = 0
    init: Init | None = None
    init_text: str | None = None
    init_token_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "init_token_ids", plain_ids(self.init_token_ids))
        object.__setattr__(self, "init", resolved_init(self.init, self.init_text, self.init_token_ids))
        super().__post_init__()

    def validate(self) -> None:
        check(self.num_virtual_tokens > 0, f"num_virtual_tokens must be positive, got {self.num_virtual_tokens}")
        check(self.projection_dim >= 0, f"projection_dim must be >= 0, got {self.projection_dim}")
        check_init(self.init, self.init_text, self.init_token_ids)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PrefixConfig":
        """Also reads files from before ``init`` was a field, whose prefixes started random."""
        if isinstance(data, dict) and "init" not in data:
            data = {**data, "init": "random"}
        return super().from_dict(data)

    def for_saving(self) -> "PrefixConfig":
        return self.replace(projection_dim=0)


class PrefixTable(DeltaUnit):
    """All layers' prefixes: ``(layers, 2, kv_heads, tokens, head_dim)`` values, stored flat
    as ``(tokens, layers * 2 * kv_heads * head_dim)``, or produced by an MLP from embeddings
    (plus the fixed token start ``initial``, when there is one).

    A table started from tokens is filled when it is attached (:meth:`attached` runs the base
    over ``start``), unless saved tensors were loaded into it first: loading never runs the model.
    """

    def __init__(self, layers: int, kv_heads: int, head_dim: int, hidden: int, config: PrefixConfig,
                 start: tuple[torch.Tensor, list[nn.Module]] | None = None):
        super().__init__()
        self.shape = (layers, 2, kv_heads, head_dim)
        self.tokens = config.num_virtual_tokens
        width = layers * 2 * kv_heads * head_dim
        #: the start tokens and the attention modules (in layer order) to read keys and values from
        self._start = start
        if config.projection_dim:
            self.embedding = nn.Parameter(torch.randn(self.tokens, hidden))
            self.mlp_in = nn.Linear(hidden, config.projection_dim)
            self.mlp_out = nn.Linear(config.projection_dim, width)
            self.register_buffer("initial", torch.zeros(self.tokens, width) if start is not None else None)
            if start is not None:  # the MLP learns the change from the tokens' keys and values
                nn.init.zeros_(self.mlp_out.weight)
                nn.init.zeros_(self.mlp_out.bias)
        else:
            self.prefix = nn.Parameter(torch.zeros(self.tokens, width) if start is not None
                                       else torch.randn(self.tokens, width))

    def layer_key_value(self, layer: int, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of one layer, each ``(batch, kv_heads, tokens, head_dim)``."""
        _, _, heads, head_dim = self.shape
        size = 2 * heads * head_dim
        rows = slice(layer * size, (layer + 1) * size)
        if hasattr(self, "prefix"):
            flat = self.prefix[:, rows]
        else:
            hidden = torch.tanh(self.mlp_in(self.embedding))
            flat = F.linear(hidden, self.mlp_out.weight[rows], self.mlp_out.bias[rows])
            if self.initial is not None:
                flat = flat + self.initial[:, rows]
        kv = flat.view(self.tokens, 2, heads, head_dim).permute(1, 2, 0, 3).to(dtype)
        return kv[0].expand(batch, -1, -1, -1), kv[1].expand(batch, -1, -1, -1)

    def start_from_tokens(self, model: nn.Module) -> None:
        """Fill the table with the base's own keys and values of the start tokens."""
        ids, modules = self._start
        pairs = own_keys_values(model, modules, ids)
        # (layers, 2, kv_heads, tokens, head_dim) -> the flat (tokens, width) layout
        stacked = torch.stack([torch.stack([k, v]) for k, v in pairs])
        flat = stacked.permute(3, 0, 1, 2, 4).reshape(self.tokens, -1)
        with torch.no_grad():
            (self.prefix if hasattr(self, "prefix") else self.initial).copy_(flat)
        self._start = None

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
        self._start = None  # its tensors are the saved ones: nothing to compute at attach

    def fingerprint_module(self, module, model):
        return None  # the attention layers it serves carry the base's identity

    def attached(self, module, model):
        for config in _attention_configs(model):
            if not config._attn_implementation.startswith(attention.IMPL_PREFIX):
                config._attn_implementation = attention.IMPL_PREFIX + config._attn_implementation
        if self._start is not None:
            self.start_from_tokens(model)

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
    resolved, start = None, None
    if config.init == "text" and config.init_token_ids is None:
        resolved = config = config.replace(init_token_ids=tokenize(model, config.init_text))
    if config.init != "random":
        ids = start_tokens(config.num_virtual_tokens, vocabulary_size(model), config.init_token_ids)
        start = (ids, [module for _, module in found])
    table = PrefixTable(len(found), kv_heads, head_dim, hidden, config, start)
    placements = [Placement("", table, type(model).__name__)]
    placements += [Placement(path, PrefixLayer(table, i), type(module).__name__) for i, (path, module) in enumerate(found)]
    attention.register()
    return Placements(placements, resolved=resolved)


register_method(MethodSpec(
    "prefix", PrefixConfig, build, size_option="num_virtual_tokens", mergeable=False, identity_at_init=False,
    merge_refusal="its key/value prefixes join the attention softmax of every layer",
    summary="trainable key/value prefixes in every attention layer", default_lr=1e-2,
    mixing=Mixing("alone", reason="its prefixes enter inside attention, which runs one set of keys for the whole batch"),
    stack_only="its key/value prefixes act inside attention, not on a module's output",
    peft_refusal="peft's prefix tuning passes the prefix as a key/value cache, which shifts every real token's position "
                 "by num_virtual_tokens (and on T5 reaches the decoder only, cross-attention included); deltatune's "
                 "prefix leaves positions alone, so the same tensors would give different outputs"))
