"""The centroid router: inputs go to the delta whose training examples they resemble most.

An input's embedding is the base model's last hidden state, mean-pooled over its tokens
(padding left out), computed with no delta active. A delta's centroid is the mean embedding of
its training examples, stored in the library (:meth:`Library.set_centroid`); an input goes to
the delta with the nearest centroid by cosine similarity.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..core.inject import base_only
from ..errors import LibraryError


@torch.no_grad()
def embed(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``(batch, hidden)``: each row's last hidden state of the base, averaged over its tokens.

    Args:
        model: a transformers model (any head); its deltas are switched off for this pass.
        inputs: tokenised inputs (``input_ids``, ``attention_mask``, ...).
    """
    device = next(model.parameters()).device
    inputs = {key: value.to(device) if torch.is_tensor(value) else value for key, value in inputs.items()}
    with base_only(model):
        outputs = model(**inputs, output_hidden_states=True)
    hidden = outputs.hidden_states[-1].float()
    mask = inputs.get("attention_mask")
    if mask is None:
        return hidden.mean(1)
    mask = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


def embed_texts(model: nn.Module, tokenizer: Any, texts: Sequence[str], *, batch_size: int = 32,
                max_length: int = 128) -> torch.Tensor:
    """:func:`embed` over ``texts`` in batches: ``(len(texts), hidden)``."""
    if not texts:
        raise LibraryError("no texts to embed; a centroid needs at least one training example")
    parts = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt")
        parts.append(embed(model, batch).cpu())
    return torch.cat(parts)


def nearest(embeddings: torch.Tensor, centroids: Mapping[str, torch.Tensor]) -> list[str]:
    """For each row of ``embeddings``, the name of the centroid with the highest cosine similarity.

    Raises:
        LibraryError: no centroids, or a centroid whose width is not the embeddings' (another base).
    """
    if not centroids:
        raise LibraryError("no delta has a centroid to route by; compute them first (deltatune library centroid, or "
                           "Library.set_centroid)")
    names = list(centroids)
    width = embeddings.shape[-1]
    wrong = [n for n in names if centroids[n].numel() != width]
    if wrong:
        raise LibraryError(f"the centroid of {wrong[0]!r} has {centroids[wrong[0]].numel()} values but this base's "
                           f"embeddings have {width}; it was computed on another base: compute it again on this one")
    table = torch.nn.functional.normalize(torch.stack([centroids[n].float() for n in names]), dim=-1)
    rows = torch.nn.functional.normalize(embeddings.float().cpu(), dim=-1)
    return [names[i] for i in (rows @ table.T).argmax(-1).tolist()]
