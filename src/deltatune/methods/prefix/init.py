"""Prefixes that start as the model's own keys and values of real tokens.

The frozen base runs once over the start tokens (drawn from the vocabulary, or a text's), and
each prefixed attention layer keeps the keys and values it computed for them: after the
model's own projections, rotary embeddings and query/key norms, read where transformers hands
them to the attention function, so every family that calls that function works without code
of its own (encoders and encoder-decoders too, which have no KV cache to read them from). A
prefix made this way attends like more tokens of ordinary text, so the loss at step 0 stays
near the base's, where random prefixes swamp the attention. peft's Cartridges start the same
way from the KV cache of a prefill (``initialize_kv_prefix_from_text``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ...core.inject import using
from ...core.slot import get_state
from ...errors import NotApplicableError
from . import attention


def vocabulary_size(model: nn.Module) -> int:
    """How many token ids the model's input embeddings (or else its config) accept."""
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    if isinstance(embeddings, nn.Embedding):
        return embeddings.num_embeddings
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    if not size:
        raise NotApplicableError(f"prefix tuning's init from tokens needs the vocabulary size of "
                                 f"{type(model).__name__}; pass init='random' or init_token_ids")
    return int(size)


def own_keys_values(model: nn.Module, modules: list[nn.Module], ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each of ``modules``' keys and values, ``(kv_heads, tokens, head_dim)``, as the frozen
    base computes them over the token sequence ``ids`` (no grad, eval mode, no delta active
    but the merged ones, which are part of the weights)."""
    device = next(model.parameters()).device
    ids = ids[None].to(device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = ids
    modes = {module: module.training for module in model.modules()}
    configs = list({id(m.config): m.config for m in modules}.values())
    plain = [c for c in configs if not c._attn_implementation.startswith(attention.IMPL_PREFIX)]
    attention.register()
    try:
        for config in plain:  # through prefix attention, which records
            config._attn_implementation = attention.IMPL_PREFIX + config._attn_implementation
        with attention.recording() as recorded, _base_alone(model), torch.no_grad():
            model.eval()
            model(**inputs)
    finally:
        for config in plain:
            config._attn_implementation = config._attn_implementation.removeprefix(attention.IMPL_PREFIX)
        for module, training in modes.items():
            module.training = training
    missing = [m for m in modules if m not in recorded]
    if missing:
        raise NotApplicableError(f"prefix tuning's init from tokens saw no keys from {type(missing[0]).__name__} when "
                                 f"{type(model).__name__} ran over them; pass init='random'")
    return [recorded[m] for m in modules]


@contextlib.contextmanager
def _base_alone(model: nn.Module) -> Iterator[None]:
    """No delta runs but the merged ones (part of the weights); routing or composition set aside."""
    state = get_state(model)
    if state is None:
        yield
        return
    override = state.override
    state.set_override(None)
    try:
        with using(model, state.merged):
            yield
    finally:
        state.set_override(override)
