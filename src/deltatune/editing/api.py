"""``deltatune.editing``: write facts into a causal LM as a LoRA delta (ROME for one fact, MEMIT for a batch).

The base is not changed: each edited down projection gets a LoRA whose ``B @ A`` is the
computed ``ΔW`` (rank 1 per layer for ROME, the number of facts for MEMIT; ``alpha = r`` so
the scaling is 1), so the edit can be inspected, stacked, merged and unmerged, saved, served
and removed like any delta.

Example:
    >>> fact = dt.Fact("France", "The capital of {} is", "Rome")
    >>> report = dt.edit(model, tokenizer, fact, method="rome", name="france-rome")
    >>> dt.save(model, "edits/france-rome", provenance=report.provenance())
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..core.inject import attach
from ..core.params import delta_parameters, tensor_key
from ..errors import ConfigError
from ..methods.lora import LoRAConfig
from .facts import Fact
from .memit import memit
from .rome import LayerUpdate, rome
from .sites import default_layers, resolve_layers
from .stats import KeyStatistics
from .value import EditSettings, Value


@dataclass(frozen=True)
class EditReport:
    """What :func:`edit` did: the delta's name, method, facts, per-layer updates and values."""

    name: str
    method: str
    facts: tuple[Fact, ...]
    updates: tuple[LayerUpdate, ...]
    values: tuple[Value, ...]

    @property
    def layers(self) -> list[int]:
        return [u.site.index for u in self.updates]

    def provenance(self) -> dict:
        """What ``delta.json`` records about the edit (``dt.save(..., provenance=...)``)."""
        return {"edit": {"method": self.method, "layers": self.layers, "modules": [u.site.path for u in self.updates],
                         "facts": [f.to_dict() for f in self.facts],
                         "value_probability": [round(v.probability, 6) for v in self.values]}}

    def __str__(self) -> str:
        lines = [f"{self.method} edit {self.name!r}: {len(self.facts)} fact(s) on layer(s) {self.layers}"]
        for u in self.updates:
            lines.append(f"  {u.site.path}: rank {u.rank}, ||ΔW|| {float(torch.linalg.norm(u.delta_weight)):.4g}")
        for fact, value in zip(self.facts, self.values):
            lines.append(f"  {fact.text!r} -> {fact.target!r}: value reached p={value.probability:.3f} "
                         f"in {value.steps} steps")
        return "\n".join(lines)


def _rome(model, tokenizer, facts, layers, stats, settings):
    if len(facts) != 1:
        raise ConfigError(f"ROME edits one fact at a time, got {len(facts)}; use method='memit' (--method memit) "
                          f"for a batch")
    sites = resolve_layers(model, layers, default_layers(model, 1))
    if len(sites) != 1:
        raise ConfigError(f"ROME edits one layer, got layers {[s.index for s in sites]}; pass one (--layers N) or use "
                          f"method='memit' to spread edits over several")
    update, value = rome(model, tokenizer, facts[0], sites[0], stats, settings)
    return [update], [value]


def _memit(model, tokenizer, facts, layers, stats, settings):
    sites = resolve_layers(model, layers, default_layers(model, 5))
    return memit(model, tokenizer, facts, sites, stats, settings)


#: the edit algorithms by name (``--method``)
EDITORS: dict[str, Callable] = {"rome": _rome, "memit": _memit}


def edit(model: nn.Module, tokenizer, facts: Fact | Sequence[Fact], *, method: str = "rome",
         layers: Sequence[int] | None = None, name: str = "edit", stats: KeyStatistics | None = None,
         settings: EditSettings | None = None) -> EditReport:
    """Compute an edit and attach it to ``model`` as LoRA delta ``name`` (active; the base unchanged).

    Args:
        model: a causal LM (its blocks' down projections are found from its structure).
        tokenizer: its tokenizer.
        facts: one :class:`Fact` (ROME) or several (MEMIT).
        method: ``"rome"`` or ``"memit"``.
        layers: block indices to edit; default: ROME one block a fifth of the way in, MEMIT the
            five blocks ending there.
        name: the delta's name.
        stats: where the key statistics come from (default ``KeyStatistics()``: 20,000 tokens
            of the packaged movie-review snippets, cached).
        settings: the value search and MEMIT's λ.

    Returns:
        An :class:`EditReport`; ``report.provenance()`` is what to record when saving.

    Raises:
        ConfigError: a bad fact (no ``{}``, the subject not in the prompt), an unknown method, ROME
            with several facts or layers.
        TargetError: a layer the model does not have.
        EditError: the value search did not converge (nothing attached).
    """
    facts = [facts] if isinstance(facts, Fact) else list(facts)
    if not facts or not all(isinstance(f, Fact) for f in facts):
        raise ConfigError("edit needs one Fact or a non-empty list of Facts")
    if method not in EDITORS:
        raise ConfigError(f"unknown edit method {method!r}; choose one of {', '.join(EDITORS)}")
    updates, values = EDITORS[method](model, tokenizer, facts, layers, stats or KeyStatistics(),
                                      settings or EditSettings())
    attach_updates(model, updates, name)
    return EditReport(name, method, tuple(facts), tuple(updates), tuple(values))


def attach_updates(model: nn.Module, updates: Sequence[LayerUpdate], name: str) -> LoRAConfig:
    """Attach LoRA ``name`` whose ``B @ A`` at each layer is that layer's update (scaling 1)."""
    ranks = {u.site.path: u.rank for u in updates}
    common = max(ranks.values())
    # ROME's updates all have rank 1 and MEMIT's the number of facts; a lower one would be zero-padded
    config = LoRAConfig(r=common, alpha=float(common), targets=tuple("re:" + re.escape(p) for p in ranks))
    attach(model, config, name=name)
    params = dict(delta_parameters(model, name))
    with torch.no_grad():
        for update in updates:
            lora_A, lora_B = params[tensor_key(update.site.path, "lora_A")], params[tensor_key(update.site.path, "lora_B")]
            lora_A.zero_()
            lora_B.zero_()
            lora_A[:update.rank].copy_(update.A)
            lora_B[:, :update.rank].copy_(update.B)
    return config
