"""Mixture of LoRA experts with a token-level top-k router.

Gao, Chen, Rao, Sun, Liu, Peng, Zhang, Guo, Yang and Subrahmanian, 2024, "Higher Layers Need
More LoRA Experts" (MoLA, arXiv:2402.08562): LoRA experts per layer with a top-k router, and
more experts in higher layers. Zhu, Wichers, Lin, Wang, Qu, Chen, Liu, Gao, Xie, Ye, Chen,
Luo, Zhang, Rastogi, Liu, Meng and Wang, 2023, "SiRA: Sparse Mixture of Low Rank Adaptation"
(arXiv:2311.09179): top-k routing with a capacity limit per expert.

At each adapted linear layer, ``E`` experts ``(A_e, B_e)`` of rank ``r`` and a router ``R``
``(E x in)``; for a token ``x`` with router probabilities ``p = softmax(R x)`` and its ``k`` most
probable experts ``K(x)``:

    y = W x + b + (alpha / r) * sum_{e in K(x)} (p_e / sum_{j in K(x)} p_j) * B_e A_e x

``B_e`` starts at zero, so a new delta leaves the model unchanged. Training adds
``aux_loss_coef`` times the load-balancing loss ``E * sum_e f_e * P_e`` (averaged over layers;
:func:`.layer.balancing_loss`) through the method's loss term, and records each layer's expert
load, which training jobs write to ``metrics.json`` (``delta_stats``). With ``capacity_factor``
an expert takes at most ``ceil(capacity_factor * tokens * k / E)`` tokens per forward pass
(:func:`.layer.capacity_keep`).

The router makes the update depend on the input: it is no weight change, so it cannot be merged.
In a batch that mixes deltas per row, each delta runs on its own rows (the per-delta fallback):
without a capacity limit every token's routing is its own, so a row equals that row run alone;
the capacity limit and the balancing statistics count the tokens of that delta's rows only, as
if those rows were a batch of their own.
"""

from __future__ import annotations

import torch
from torch import nn

from ...core.build import per_linear
from ...core.registry import MethodSpec, Mixing, register_method
from ...core.roles import find_roles
from ...core.slot import get_state, slot_sites
from ...core.unit import Placements
from ...errors import TargetError
from .config import MoLoRAConfig
from .layer import MoLoRALinear

__all__ = ["MoLoRAConfig", "MoLoRALinear"]

DEFAULT_ROLES = ["q|qkv", "v"]


def units_of(model: nn.Module, name: str) -> list[tuple[str, MoLoRALinear]]:
    """Delta ``name``'s units with their module paths, in module order."""
    return [(path, slot[name]) for path, _, slot in slot_sites(model)
            if name in slot and isinstance(slot[name], MoLoRALinear)]


def depth_positions(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Module path -> (its block's position in its stack, the stack's number of blocks), for
    every Linear / Conv1D inside a transformer block."""
    found = find_roles(model)
    stacks: dict[str, list[str]] = {}
    for block in found.blocks:
        stacks.setdefault(block.rpartition(".")[0], []).append(block)
    where = {block: (i, len(blocks)) for blocks in stacks.values() for i, block in enumerate(blocks)}
    return {path: where[block] for path, block in found.block_of.items()}


def build(model: nn.Module, config: MoLoRAConfig) -> Placements:
    depth = depth_positions(model) if config.experts_per_layer is not None else {}

    def make(path: str, module: nn.Module, fan_in: int, fan_out: int, transposed: bool):
        if config.experts_per_layer is None:
            return MoLoRALinear(fan_in, fan_out, config.num_experts, config, transposed)
        if path not in depth:
            raise TargetError(
                f"molora experts_per_layer={list(config.experts_per_layer)} sets experts by depth, but {path} "
                f"({type(module).__name__}, in {fan_in}, out {fan_out}) is not inside a transformer block of "
                f"{type(model).__name__}; leave it out of targets or use num_experts instead")
        return MoLoRALinear(fan_in, fan_out, config.experts_at(*depth[path]), config, transposed)

    return per_linear(model, config, DEFAULT_ROLES, make)


def balancing_term(model: nn.Module, name: str) -> torch.Tensor | None:
    """``aux_loss_coef`` times the mean load-balancing loss of the delta's trainable units over
    their last training forward pass; each pass's loss is taken once (``None`` when there is none)."""
    config = get_state(model).configs[name]
    units = [unit for _, unit in units_of(model, name) if unit.aux_loss is not None]
    losses = [unit.aux_loss for unit in units if unit.router.requires_grad]
    for unit in units:
        unit.aux_loss = None
    if not losses or config.aux_loss_coef == 0:
        return None
    device = losses[0].device
    return config.aux_loss_coef * torch.stack([loss.to(device) for loss in losses]).mean()


def expert_load(model: nn.Module, name: str) -> dict:
    """The delta's router statistics for ``metrics.json``: per adapted layer, the tokens routed
    while training and each expert's load (:meth:`MoLoRALinear.load`)."""
    config = get_state(model).configs[name]
    return {"top_k": config.top_k, "layers": {path: unit.load() for path, unit in units_of(model, name)}}


register_method(MethodSpec(
    "molora", MoLoRAConfig, build, size_option="r", mergeable=False, identity_at_init=True,
    merge_refusal="its router picks experts per token from the input, so no single weight change equals it",
    summary="mixture of LoRA experts per layer, chosen per token by a top-k router (not mergeable: "
            "input-dependent)",
    default_lr=5e-3,
    mixing=Mixing("per_delta", reason="each delta routes its own rows' tokens; capacity and balancing statistics "
                                      "count that delta's rows only"),
    loss_term=balancing_term, stats=expert_load,
    peft_refusal="peft has no mixture of LoRA experts with a token-level top-k router (X-LoRA mixes whole "
                 "trained adapters with a dense classifier; MoE-PEFT's format is not peft's)",
))
