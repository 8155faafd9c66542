"""AdaLoRA's rank allocation, run after every optimizer step (``MethodSpec.step_hook``).

Importance of a triplet ``(P_i, lambda_i, Q_i)``: every entry ``w`` of the three factors gets
a sensitivity ``I = |w * grad|``, smoothed as ``I_bar <- beta1 I_bar + (1 - beta1) I``, and an
uncertainty ``U_bar <- beta2 U_bar + (1 - beta2) |I - I_bar|``; an entry scores
``I_bar * U_bar``, and the triplet scores ``score(lambda_i) + mean score of Q's row i + mean
score of P's column i``. The total budget (the number of unmasked ``lambda``) falls from the
initial ranks' sum to ``target_r`` per module on a cubic schedule; every ``delta_t`` steps the
lowest-scoring triplets' ``lambda`` are set to zero (they may grow back and be kept at a later
allocation). After ``total_step - tfinal`` the mask is fixed and re-applied after every step.
This follows peft 0.21.2's ``RankAllocator.update_and_allocate`` step for step.

The state (smoothed scores, mask) lives in the units' buffers, so a checkpoint keeps it; the
budget is a function of the step.
"""

from __future__ import annotations

import torch
from torch import nn

from ...core.slot import get_state, slot_sites
from .config import AdaLoRAConfig
from .layer import FACTORS, AdaLoRALinear, orthogonality_penalty


def units_of(model: nn.Module, name: str) -> list[tuple[str, AdaLoRALinear]]:
    """Delta ``name``'s AdaLoRA units with their module paths, in module order."""
    return [(path, slot[name]) for path, _, slot in slot_sites(model)
            if name in slot and isinstance(slot[name], AdaLoRALinear)]


def budget_schedule(config: AdaLoRAConfig, step: int, total: int, initial: int, target: int) -> tuple[int, bool]:
    """``(budget, allocate)`` after step ``step``: the initial budget until ``tinit``, then the
    cubic decrease to ``target`` by ``total - tfinal`` (allocating every ``delta_t`` steps),
    then ``target``."""
    if step <= config.tinit:
        return initial, False
    if step > total - config.tfinal:
        return target, True
    remaining = 1 - (step - config.tinit) / (total - config.tfinal - config.tinit)
    return int((initial - target) * (remaining ** 3) + target), step % config.delta_t == 0


@torch.no_grad()
def update_importance(unit: AdaLoRALinear, beta1: float, beta2: float) -> None:
    """Fold this step's sensitivities ``|w * grad|`` into the unit's smoothed scores."""
    for name in FACTORS:
        param = getattr(unit, name)
        grad = param.grad if param.grad is not None else torch.zeros_like(param)
        sensitivity = (param * grad).abs()
        smoothed = getattr(unit, f"sensitivity_{name}")
        smoothed.copy_(beta1 * smoothed + (1 - beta1) * sensitivity)
        uncertainty = getattr(unit, f"uncertainty_{name}")
        uncertainty.copy_(beta2 * uncertainty + (1 - beta2) * (sensitivity - smoothed).abs())


def triplet_scores(unit: AdaLoRALinear) -> torch.Tensor:
    """One importance score per triplet ``i`` (shape ``(r,)``)."""
    score = {name: getattr(unit, f"sensitivity_{name}") * getattr(unit, f"uncertainty_{name}") for name in FACTORS}
    vectors = score["lora_A"].mean(dim=1) + score["lora_B"].mean(dim=0)
    return score["lora_E"].view(-1) + vectors


@torch.no_grad()
def mask_to_budget(units: list[AdaLoRALinear], budget: int) -> None:
    """Keep the ``budget`` highest-scoring triplets over all units (ties at the threshold are
    masked too, as in peft) and zero the others' ``lambda``."""
    scores = [triplet_scores(unit) for unit in units]
    total = sum(unit.rank for unit in units)
    if total - budget <= 0:
        for unit in units:
            unit.mask.fill_(True)
        return
    threshold = torch.kthvalue(torch.cat(scores), k=total - budget).values.item()
    for unit, score in zip(units, scores):
        unit.mask.copy_(score > threshold)
        unit.lora_E.masked_fill_(~unit.mask.view(-1, 1), 0.0)


@torch.no_grad()
def apply_mask(units: list[AdaLoRALinear]) -> None:
    for unit in units:
        unit.lora_E.masked_fill_(~unit.mask.view(-1, 1), 0.0)


def allocate(model: nn.Module, name: str, step: int, total: int) -> None:
    """The step hook: update importances, then mask to the step's budget (peft's
    ``update_and_allocate(step)``); the schedule spans ``config.total_step`` or the run's ``total``."""
    config = get_state(model).configs[name]
    units = [unit for _, unit in units_of(model, name)]
    if not units:
        return
    total = config.total_step or total
    final = total - config.tfinal
    if step < final:
        for unit in units:
            update_importance(unit, config.beta1, config.beta2)
    initial = sum(unit.rank for unit in units)
    budget, due = budget_schedule(config, step, total, initial, config.target_r * len(units))
    if step <= final and (due or step == final):
        mask_to_budget(units, budget)
    elif step > final:
        apply_mask(units)


def penalty(model: nn.Module, name: str) -> torch.Tensor | None:
    """The loss term: ``orth_reg_weight`` times the orthogonality penalty of the delta's
    trainable units (``None`` when it is not being trained)."""
    config = get_state(model).configs[name]
    units = [unit for _, unit in units_of(model, name) if unit.lora_A.requires_grad]
    if not units or config.orth_reg_weight == 0:
        return None
    return orthogonality_penalty(units, config.orth_reg_weight)


def kept_ranks(config: AdaLoRAConfig, sites: list) -> AdaLoRAConfig:
    """The config a saved delta records: the ranks its units keep (``rank_pattern``)."""
    ranks = {path: int(unit.mask.sum()) for path, unit in sites if isinstance(unit, AdaLoRALinear)}
    return config.with_ranks(ranks)
