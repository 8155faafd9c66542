"""DyLoRA (Valipour, Rezagholizadeh, Kobyzev and Ghodsi, 2022, "DyLoRA: Parameter Efficient
Tuning of Pre-trained Models using Dynamic Search-Free Low-Rank Adaptation", arXiv:2210.07558).

LoRA factors ``A`` ``(r x in)`` and ``B`` ``(out x r)`` trained for a range of ranks: at every
training step a rank ``b`` is drawn uniformly from ``[r_min, r]`` (from the config's seed and
the step number, so runs and resumed runs draw the same ranks) and the update is

    dW_b = (alpha / b) * B[:, :b] A[:b, :]

so the leading rows learn to carry the most. Outside training the delta uses ``eval_rank``
(``r`` by default), which a load can change: ``dt.load(model, path, overrides={"eval_rank": 4})``
equals a LoRA made of the factors truncated to rank 4.
"""

from __future__ import annotations

from torch import nn

from ...core.build import per_linear
from ...core.registry import MethodSpec, Mixing, register_method
from ...core.slot import require_state, slot_sites
from ...core.unit import Placements
from .config import DyLoRAConfig
from .layer import DyLoRALinear

__all__ = ["DyLoRAConfig", "DyLoRALinear"]

DEFAULT_ROLES = ["q|qkv", "v"]


def build(model: nn.Module, config: DyLoRAConfig) -> Placements:
    def make(path: str, module: nn.Module, fan_in: int, fan_out: int, transposed: bool):
        return DyLoRALinear(fan_in, fan_out, config, transposed)

    return per_linear(model, config, DEFAULT_ROLES, make)


def draw_rank(model: nn.Module, name: str, step: int, total: int) -> None:
    """The step hook: after ``step`` steps, set the rank of the next one (step index ``step``)."""
    units = [slot[name] for _, _, slot in slot_sites(model) if name in slot and isinstance(slot[name], DyLoRALinear)]
    if units:
        rank = require_state(model).configs[name].rank_for_step(step)
        for unit in units:
            unit.train_rank.fill_(rank)


register_method(MethodSpec(
    "dylora", DyLoRAConfig, build, size_option="r", mergeable=True, identity_at_init=True,
    summary="LoRA trained over a range of ranks (a rank drawn per step); any rank <= r chosen at load",
    default_lr=2e-3, mixing=Mixing("batched"), step_hook=draw_rank,
    peft_refusal="peft has no DyLoRA adapter type (its LoRA trains one fixed rank)",
))
