"""A transformers attention function that puts prefix keys and values in front.

transformers models call their attention through ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``.
Prefix tuning registers ``deltatune_sdpa`` and ``deltatune_eager``, which prepend the active
prefixes of the calling module (found in its delta slot) to the keys and values, extend the
mask so that every query sees every prefix position, and call the original function.
Token positions are untouched, unlike prefixes passed as a KV cache.

While :func:`recording` runs, the same functions also note each module's keys and values as
the model computed them (after its projections, rotary embeddings and norms): the starting
point of prefixes initialised from real tokens.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

import torch
from torch import nn

from ...core.slot import get_slot

IMPL_PREFIX = "deltatune_"
SUPPORTED = ("sdpa", "eager")

#: attention module -> its keys and values for the first sequence of the batch, while recording
_recorded: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] | None = None


@contextlib.contextmanager
def recording() -> Iterator[dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]]:
    """Collect, for every module that calls a prefix attention function, the keys and values
    (each ``(kv_heads, tokens, head_dim)``) of its first call's first sequence."""
    global _recorded
    outer, _recorded = _recorded, {}
    try:
        yield _recorded
    finally:
        _recorded = outer


def inner_function(module: nn.Module, implementation: str) -> Callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if implementation == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[implementation]


def extend_mask(
    mask: torch.Tensor | None, query: torch.Tensor, key_length: int, prefix_length: int, causal: bool, boolean: bool
) -> torch.Tensor:
    """A mask over ``prefix + keys``: every query may attend to every prefix position.

    ``mask`` is the model's own mask over the keys (boolean "may attend", or additive float),
    or ``None`` for "all allowed, or causal".
    """
    q_length = query.shape[2]
    if mask is None:
        allowed = torch.ones(q_length, key_length, dtype=torch.bool, device=query.device)
        if causal and q_length > 1:
            allowed = torch.tril(allowed, diagonal=key_length - q_length)
        mask = allowed[None, None]
        if not boolean:
            mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(~mask, torch.finfo(query.dtype).min)
    fill = True if mask.dtype == torch.bool else 0.0
    pad = torch.full((*mask.shape[:-1], prefix_length), fill, dtype=mask.dtype, device=mask.device)
    return torch.cat([pad, mask], dim=-1)


def prefix_attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    if _recorded is not None and module not in _recorded:
        _recorded[module] = (key[0].detach().clone(), value[0].detach().clone())
    implementation = module.config._attn_implementation.removeprefix(IMPL_PREFIX)
    inner = inner_function(module, implementation)
    slot = get_slot(module)
    units = [u for u in slot.active_units() if hasattr(u, "key_value")] if slot is not None else []
    if units:
        pairs = [u.key_value(query.shape[0], key.dtype) for u in units]
        causal = kwargs.get("is_causal")
        causal = getattr(module, "is_causal", False) if causal is None else causal
        prefix_keys = torch.cat([k for k, _ in pairs], dim=2)
        attention_mask = extend_mask(
            attention_mask, query, key.shape[2], prefix_keys.shape[2], bool(causal), implementation == "sdpa"
        )
        key = torch.cat([prefix_keys, key], dim=2)
        value = torch.cat([*(v for _, v in pairs), value], dim=2)
        kwargs["is_causal"] = False
        bias = kwargs.get("position_bias")
        if isinstance(bias, torch.Tensor):  # T5's relative position bias: none for prefix positions
            pad = bias.new_zeros((*bias.shape[:-1], prefix_keys.shape[2]))
            kwargs["position_bias"] = torch.cat([pad, bias], dim=-1)
    return inner(module, query, key, value, attention_mask, **kwargs)


def register() -> None:
    """Make ``deltatune_sdpa`` and ``deltatune_eager`` known to transformers (idempotent)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import AttentionInterface

    for implementation in SUPPORTED:
        AttentionInterface.register(IMPL_PREFIX + implementation, prefix_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(IMPL_PREFIX + implementation, ALL_MASK_ATTENTION_FUNCTIONS[implementation])
