"""Text generation for causal-LM deltas: one chat-formatted prompt in, the answer out."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import DeltaError
from ..data.chat import chat_prompt


@torch.no_grad()
def generate_text(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 48, temperature: float = 0.0,
                  seed: int | None = None) -> str:
    """The model's answer to ``prompt``, formatted as in training (:func:`chat_prompt`).

    ``temperature`` 0 decodes greedily; above 0 it samples (seeded with ``seed`` when given).
    Only the new tokens are decoded, without special tokens. Restores the model's mode.
    """
    if max_new_tokens < 1:
        raise DeltaError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise DeltaError(f"temperature must be 0 (greedy) or positive, got {temperature}")
    device = next(model.parameters()).device
    ids = tokenizer(chat_prompt(tokenizer, prompt), add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
    if seed is not None:
        torch.manual_seed(seed)
    options = {"do_sample": True, "temperature": float(temperature), "top_k": 0, "top_p": 1.0} if temperature > 0 else \
        {"do_sample": False, "temperature": None, "top_k": None, "top_p": None}
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else getattr(model.config, "eos_token_id", None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    was_training = model.training
    model.eval()
    try:
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             eos_token_id=eos, pad_token_id=pad, **options)
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
