"""Aggregating client deltas into the global delta (FedAvg weighted by example counts).

Per adapted module the unit decides how:

- a unit whose update is a low-rank product and that can take one back
  (:meth:`~deltatune.core.unit.DeltaUnit.load_low_rank`: LoRA) gets the *weighted sum of the
  clients' updates*, ``sum_i w_i B_i A_i``, re-factored by SVD into its own rank. Averaging
  ``A`` and ``B`` separately, as plain FedAvg on a LoRA's parameters does, gives
  ``(sum w_i B_i)(sum w_i A_i)``, which is not the average update (Sun et al., 2024,
  arXiv:2403.12313): the report shows that error next to ours;
- every other unit gets the weighted mean of each parameter (FedAvg's definition; the average
  update itself for a method linear in its parameters: (IA)3, BitFit, LoRA-XS, a head).

``w_i = n_i / sum n`` with ``n_i`` the client's training examples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..algebra.lowrank import low_rank
from ..core.params import tensor_key
from ..core.slot import slot_sites
from ..errors import ConfigError
from .wire import load_values


@dataclass(frozen=True)
class ModuleAggregate:
    """How one adapted module's delta was aggregated.

    Attributes:
        path: the module.
        rule: ``"sum of updates, re-factored"`` or ``"parameter mean"``.
        rank: the re-factored rank (low-rank rule only).
        error: ``||U - sum_i w_i U_i|| / ||sum_i w_i U_i||`` for the global update ``U``
            against the exact weighted sum of the clients' updates ``U_i`` (None: the unit
            states no low-rank update, so there is no update to compare).
        naive_error: the same error for the parameter mean (what plain FedAvg would give).
    """

    path: str
    rule: str
    rank: int | None
    error: float | None
    naive_error: float | None


def check_weights(counts: list[int | float]) -> list[float]:
    """Example counts -> FedAvg weights summing to 1.

    Raises:
        ConfigError: no clients, or a count that is not a positive finite number.
    """
    if not counts:
        raise ConfigError("nothing to aggregate: no client updates were accepted")
    bad = [c for c in counts if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c <= 0]
    if bad:
        raise ConfigError(f"example counts must be positive numbers, got {bad[0]!r}")
    total = float(sum(counts))
    return [c / total for c in counts]


def aggregate(model: nn.Module, name: str, updates: list[dict[str, torch.Tensor]],
              counts: list[int | float]) -> list[ModuleAggregate]:
    """Write the aggregate of ``updates`` (each client's delta values, by portable name, as
    :func:`~deltatune.federated.wire.delta_values` gives them) into delta ``name`` on ``model``.

    Returns one :class:`ModuleAggregate` per adapted module.
    """
    weights = check_weights(counts)
    mean = {key: sum(w * update[key].double() for w, update in zip(weights, updates)).float() for key in updates[0]}
    load_values(model, name, mean)  # the parameter mean everywhere; low-rank units are overwritten below
    report = []
    for path, _, slot in slot_sites(model):
        if name not in slot:
            continue
        unit = slot[name]
        keys = {tensor_key(path, param): param for param, p in unit.named_parameters() if p.requires_grad}
        if not keys:
            continue
        report.append(_aggregate_unit(unit, path, keys, updates, weights, mean))
    return report


def _load(unit: nn.Module, keys: dict[str, str], values: dict[str, torch.Tensor]) -> None:
    params = dict(unit.named_parameters())
    with torch.no_grad():
        for key, param in keys.items():
            params[param].copy_(values[key])


def _update(unit: nn.Module) -> torch.Tensor | None:
    factors = unit.low_rank_update()
    return None if factors is None else (factors[0].double() @ factors[1].double())


def _aggregate_unit(unit, path: str, keys: dict[str, str], updates, weights: list[float], mean) -> ModuleAggregate:
    _load(unit, keys, mean)
    naive = _update(unit)
    if naive is None:  # not a low-rank update: the parameter mean stands
        return ModuleAggregate(path, "parameter mean", None, None, None)
    exact = torch.zeros_like(naive)
    for weight, update in zip(weights, updates):
        _load(unit, keys, update)
        exact += weight * _update(unit)
    rank = unit.low_rank_update()[1].shape[0]
    factored = low_rank(exact, rank=rank)
    if unit.load_low_rank(factored.B.float(), factored.A.float()):
        return ModuleAggregate(path, "sum of updates, re-factored", factored.rank, _error(_update(unit), exact),
                               _error(naive, exact))
    _load(unit, keys, mean)  # the unit cannot take factors back: keep the parameter mean
    return ModuleAggregate(path, "parameter mean", None, _error(naive, exact), _error(naive, exact))


def _error(update: torch.Tensor, exact: torch.Tensor) -> float:
    norm = float(exact.norm())
    return float((update - exact).norm()) / norm if norm else float(update.norm())


def summary(report: list[ModuleAggregate]) -> dict:
    """The report in a few numbers (for logs and ``federated.json``)."""
    errors = [m.error for m in report if m.error is not None]
    naive = [m.naive_error for m in report if m.naive_error is not None]
    rules: dict[str, int] = {}
    for module in report:
        rules[module.rule] = rules.get(module.rule, 0) + 1
    return {"modules": rules, "max_error": max(errors) if errors else None,
            "mean_error": sum(errors) / len(errors) if errors else None,
            "naive_mean_error": sum(naive) / len(naive) if naive else None}
