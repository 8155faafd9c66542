"""Where gated prompts attach: self-attention modules found from the model's structure, and
an attention function that hands their queries to the gated-prompt units.

The gated prompts need each layer's queries as the model's own attention sees them (after
rotary embeddings and any query norm). transformers models call their attention through
``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``; while gated prompts are attached,
the implementation is ``gated_prompt_<original>``, a function that records the query on the
calling module and calls the original one unchanged. The units read it in ``forward_post``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ...core.roles import find_roles
from ...core.shapes import linear_shape

IMPL_PREFIX = "gated_prompt_"
SUPPORTED = ("sdpa", "eager")
#: the attribute (in the module's ``__dict__``, not a buffer) holding ``(query, scaling, value)`` of its last call
QUERY_ATTR = "_deltatune_gated_query"


@dataclass(frozen=True)
class AttentionSite:
    """One self-attention module and its projections, as names relative to it.

    ``key`` and ``value`` are the key and value projections; with a fused projection both name
    it and ``fused`` is set (its output is ``[queries | keys | values]``). ``output`` is the
    output projection when it lies inside the module (the module then returns projected
    states), else ``None`` (the module returns the heads' concatenation, projected later).
    """

    path: str
    key: str
    value: str
    output: str | None
    fused: bool


def _calls_attention_interface(module: nn.Module) -> bool:
    """Whether the module's forward looks its attention function up in transformers'
    ``ALL_ATTENTION_FUNCTIONS``; some attention classes (GPT-J, Falcon, BLOOM) compute the
    scores themselves, and their queries cannot be read."""
    code = getattr(type(module).forward, "__code__", None)
    return code is not None and "ALL_ATTENTION_FUNCTIONS" in code.co_names


def attention_sites(model: nn.Module) -> tuple[list[AttentionSite], list[tuple[str, str]]]:
    """The self-attention modules of every transformer block, in model order, and the
    attention modules skipped with the reason.

    The key and value projections come from :func:`deltatune.core.roles.find_roles` (roles
    ``k``, ``v`` or the fused ``qkv``); their common parent is the attention module.
    """
    found = find_roles(model)
    roles = found.roles
    keys = roles.get("k") or roles.get("qkv") or []
    values = {found.block_of[p]: p for p in roles.get("v", [])}
    outputs = {found.block_of[p]: p for p in roles.get("o", [])}
    sites, skipped = [], []
    for key in keys:
        block = found.block_of[key]
        fused = key not in roles.get("k", [])
        value = key if fused else values.get(block)
        path = key.rpartition(".")[0]
        if value is None or value.rpartition(".")[0] != path:
            skipped.append((path, "its key and value projections do not sit in one attention module"))
            continue
        module = model.get_submodule(path)
        if not _calls_attention_interface(module):
            skipped.append((path, f"{type(module).__name__} computes its scores itself instead of calling "
                                  f"transformers' attention interface"))
            continue
        if linear_shape(model.get_submodule(key)) is None:
            skipped.append((path, "its key projection is not a Linear or Conv1D layer"))
            continue
        output = outputs.get(block)
        inside = output is not None and output.startswith(path + ".")
        relative = lambda p: p[len(path) + 1:]  # noqa: E731
        sites.append(AttentionSite(path, relative(key), relative(value), relative(output) if inside else None, fused))
    return sites, skipped


def implementation_of(module: nn.Module) -> str | None:
    config = getattr(module, "config", None)
    return getattr(config, "_attn_implementation", None)


def _inner(module: nn.Module, implementation: str) -> Callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if implementation == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[implementation]


def recording_attention(module: nn.Module, query: torch.Tensor, key, value, attention_mask, **kwargs):
    """The original attention function, after recording ``(query, scaling, value)`` on ``module``."""
    scaling = kwargs.get("scaling")
    if scaling is None:
        scaling = getattr(module, "scaling", None) or query.shape[-1] ** -0.5
    module.__dict__[QUERY_ATTR] = (query, float(scaling), value)
    implementation = module.config._attn_implementation.removeprefix(IMPL_PREFIX)
    return _inner(module, implementation)(module, query, key, value, attention_mask, **kwargs)


def register() -> None:
    """Make ``gated_prompt_sdpa`` and ``gated_prompt_eager`` known to transformers (idempotent)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import AttentionInterface

    for implementation in SUPPORTED:
        AttentionInterface.register(IMPL_PREFIX + implementation, recording_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(IMPL_PREFIX + implementation, ALL_MASK_ATTENTION_FUNCTIONS[implementation])


def switch_on(module: nn.Module) -> None:
    config = module.config
    if not config._attn_implementation.startswith(IMPL_PREFIX):
        config._attn_implementation = IMPL_PREFIX + config._attn_implementation


def switch_off(module: nn.Module) -> None:
    module.config._attn_implementation = module.config._attn_implementation.removeprefix(IMPL_PREFIX)
    module.__dict__.pop(QUERY_ATTR, None)


def recorded_query(module: nn.Module) -> tuple[torch.Tensor, float, torch.Tensor]:
    """``(query (batch, heads, tokens, head_dim), scaling, value (batch, kv_heads, keys, head_dim))``
    of the module's call in progress."""
    try:
        return module.__dict__[QUERY_ATTR]
    except KeyError:
        raise RuntimeError(
            f"{type(module).__name__} ran without passing its queries through the gated-prompt attention "
            f"function (attention implementation {implementation_of(module)!r}); re-attach the delta"
        ) from None
