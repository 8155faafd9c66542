"""Prompt tuning: trainable soft-prompt vectors prepended to the input embeddings.

Lester et al., 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning"
(arXiv:2104.08691).
"""

from __future__ import annotations

import torch
from torch import nn

from ...core.registry import MethodSpec, Mixing, register_method
from ...core.unit import Placement, Placements
from ...errors import NotApplicableError
from .init import start_tokens, tokenize
from .layer import PromptConfig, SoftPrompt, prepend_prompt
from .peft import PromptCodec

__all__ = ["PromptConfig", "SoftPrompt", "prepend_prompt"]


def build(model: nn.Module, config: PromptConfig) -> Placements:
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    if not isinstance(embeddings, nn.Embedding):
        raise NotApplicableError(
            f"prompt tuning needs a model with get_input_embeddings() returning nn.Embedding "
            f"(a transformers model); {type(model).__name__} has none"
        )
    if config.targets is not None or config.target_types:
        raise NotApplicableError("prompt tuning acts on the input embeddings; it takes no targets")
    resolved = None
    if config.init == "text" and config.init_token_ids is None:
        resolved = config.replace(init_token_ids=tokenize(model, config.init_text))
        config = resolved
    weight = embeddings.weight
    with torch.no_grad():
        if config.init == "random":
            init = torch.randn(config.num_virtual_tokens, weight.shape[1])
        else:
            generator = torch.Generator().manual_seed(config.seed)
            ids = start_tokens(config.num_virtual_tokens, embeddings.num_embeddings, config.init_token_ids, generator)
            init = weight[ids.to(weight.device)]
    return Placements([Placement("", SoftPrompt(init), type(model).__name__)], resolved=resolved)


register_method(MethodSpec(
    "prompt", PromptConfig, build, size_option="num_virtual_tokens", mergeable=False, identity_at_init=False,
    merge_refusal="its virtual tokens lengthen the input sequence",
    summary="trainable soft prompt prepended to the input embeddings", default_lr=3e-2,
    mixing=Mixing("batched", group_by=("num_virtual_tokens",), with_base=False,
                  reason="the soft prompt shifts token positions, so only prompts of one length share a batch"),
    targeted=False, stack_only="its soft prompt lengthens the whole input sequence, not a module's output", peft=PromptCodec()))
