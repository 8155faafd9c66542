"""MEMIT: a batch of edits spread over several down projections (Meng et al., 2023,
"Mass-Editing Memory in a Transformer", arXiv:2210.07229).

For each fact a target hidden state ``z_i`` at the last edited layer ``L`` is found (the
value search of :mod:`.value`, at ``L``'s down projection, whose output adds into the
residual stream). Then, layer by layer from the first, with the earlier layers already
updated: keys ``K_l`` (in × n, each fact's key at the subject's last token), the remaining
gap ``z_i - h_i`` at ``L`` split evenly over the layers left, ``R_l = (Z - H) / (layers left)``,
and

    ΔW_l = R_l K_lᵀ (λ C_l + K_l K_lᵀ)⁻¹,

``C_l = E[k kᵀ]`` the key statistics and ``λ`` ``EditSettings.mom2_weight``. Factors:
``B = R_l`` (out × n), ``A = ((λ C_l + K_l K_lᵀ)⁻¹ K_l)ᵀ`` (n × in), so the delta's rank is the
number of facts. With one fact, ``ΔW = r (C⁻¹k)ᵀ / (λ + kᵀC⁻¹k)`` (Sherman–Morrison): ROME's
update scaled by ``kᵀC⁻¹k / (λ + kᵀC⁻¹k)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .facts import Fact
from .rome import LayerUpdate, solve_psd, subject_key
from .sites import Site, contexts, frozen, mean_at_subject
from .stats import KeyStatistics
from .value import EditSettings, Value, optimise_value


def memit_factors(second_moment: torch.Tensor, keys: torch.Tensor, residuals: torch.Tensor,
                  mom2_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` with ``B @ A = R Kᵀ (λ C + K Kᵀ)⁻¹``; ``keys`` (n, in) and ``residuals`` (n, out) one row a fact."""
    K = keys.to(torch.float64).T
    system = mom2_weight * second_moment.to(torch.float64) + K @ K.T
    return residuals.to(torch.float64).T, solve_psd(system, K, "λ C + K Kᵀ").T


def memit(model: nn.Module, tokenizer, facts: Sequence[Fact], sites: Sequence[Site], stats: KeyStatistics,
          settings: EditSettings, values: Sequence[Value] | None = None) -> tuple[list[LayerUpdate], list[Value]]:
    """MEMIT's updates of ``sites`` (in model order) for ``facts``, and each fact's value at the
    last layer. The model's weights are changed while it runs and restored before it returns.

    ``values``: each fact's value already found at the last layer (ROME's at that layer is the
    same search), else searched here."""
    last = sites[-1]
    moments = stats.second_moments(model, tokenizer, [s.path for s in sites])
    if values is None:
        values = [optimise_value(model, tokenizer, fact, last.path, settings) for fact in facts]
    values = list(values)
    targets = torch.stack([_hidden(model, tokenizer, fact, last) for fact in facts])
    targets = targets + torch.stack([v.delta for v in values])
    updates: list[LayerUpdate] = []
    originals = {s.path: model.get_submodule(s.path).weight.detach().clone() for s in sites}
    try:
        for done, site in enumerate(sites):
            keys = torch.stack([subject_key(model, tokenizer, fact, site) for fact in facts])
            hidden = torch.stack([_hidden(model, tokenizer, fact, last) for fact in facts])
            residuals = (targets - hidden) / (len(sites) - done)
            B, A = memit_factors(moments[site.path], keys, residuals, settings.mom2_weight)
            update = LayerUpdate(site, B, A)
            updates.append(update)
            weight = model.get_submodule(site.path).weight
            with torch.no_grad():
                change = update.delta_weight.to(weight.dtype)
                weight.add_(change.T if site.fan_in_fan_out else change)
    finally:
        with torch.no_grad():
            for path, weight in originals.items():
                model.get_submodule(path).weight.copy_(weight)
    return updates, values


def _hidden(model: nn.Module, tokenizer, fact: Fact, site: Site) -> torch.Tensor:
    """The hidden state after ``site``'s block at the subject's last token, averaged over contexts."""
    with frozen(model):
        return mean_at_subject(model, tokenizer, site.block, contexts(tokenizer, fact.prompt, fact.subject), inputs=False)
