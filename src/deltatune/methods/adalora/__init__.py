"""AdaLoRA (Zhang, Chen, Bukharin, Karampatziakis, He, Cheng, Chen and Zhao, 2023, "Adaptive
Budget Allocation for Parameter-Efficient Fine-Tuning", arXiv:2303.10512).

Each adapted weight gets an update in the form of a singular value decomposition,
``dW = s * P diag(lambda) Q`` with ``P`` ``(out x r)``, ``lambda`` ``(r)`` zero at start,
``Q`` ``(r x in)`` and ``s = alpha / init_r``; the loss gets an orthogonality penalty on ``P``
and ``Q``. During training the budget of singular values shrinks on a cubic schedule from
``init_r`` to ``target_r`` per module on average, and the least important ``lambda`` (by
smoothed sensitivity times uncertainty) are masked to zero, so modules that matter keep
more rank (``allocator.py``). A saved delta keeps only the triplets the allocation kept and
records their number per module (``rank_pattern``). peft's ``AdaLoraConfig`` (0.21.2) is the
reference for defaults, scaling and the allocation step.
"""

from __future__ import annotations

from torch import nn

from ...core.build import per_linear
from ...core.registry import MethodSpec, Mixing, register_method
from ...core.unit import Placements
from ...errors import TargetError
from .allocator import allocate, kept_ranks, penalty
from .config import AdaLoRAConfig
from .layer import AdaLoRALinear
from .peft import AdaLoraCodec

__all__ = ["AdaLoRAConfig", "AdaLoRALinear"]

DEFAULT_ROLES = ["q|qkv", "v"]


def build(model: nn.Module, config: AdaLoRAConfig) -> Placements:
    def make(path: str, module: nn.Module, fan_in: int, fan_out: int, transposed: bool):
        return AdaLoRALinear(fan_in, fan_out, config.rank_at(path), config, transposed)

    placements = per_linear(model, config, DEFAULT_ROLES, make)
    unknown = sorted(set(config.rank_pattern or {}) - {p.path for p in placements})
    if unknown:
        raise TargetError(f"adalora rank_pattern names {unknown[:3]}, which the delta does not adapt in "
                          f"{type(model).__name__}; rank_pattern keys are full paths of adapted modules")
    return placements


register_method(MethodSpec(
    "adalora", AdaLoRAConfig, build, size_option="init_r", mergeable=True, identity_at_init=True,
    summary="SVD-shaped low-rank update whose rank budget is reallocated by importance during training",
    default_lr=1e-2, mixing=Mixing("batched"), step_hook=allocate, loss_term=penalty, saved_config=kept_ranks,
    peft=AdaLoraCodec(),
    fsdp_refusal="its orthogonality penalty and rank allocation read whole P, E, Q matrices and their gradients "
                 "between forward passes, where FSDP holds only each rank's shard",
))
