"""(IA)3: learned vectors that rescale keys, values and feed-forward activations.

Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning" (arXiv:2205.05638).
"""

from __future__ import annotations

from torch import nn

from ...core.build import linear_shape, per_module
from ...core.registry import MethodSpec, Mixing, register_method
from ...core.targeting import pattern_matches
from ...core.unit import Placements
from ...errors import TargetError
from ...core.roles import default_targets
from .layer import IA3Config, IA3Input, IA3Output
from .peft import IA3Codec

__all__ = ["IA3Config", "IA3Input", "IA3Output"]

DEFAULT_ROLES = ["k|qkv", "v", "ffn_down"]
FEEDFORWARD_ROLES = ["ffn_down"]


def build(model: nn.Module, config: IA3Config) -> Placements:
    feedforward = config.feedforward
    if feedforward is None and config.targets is None and not config.target_types:
        feedforward = default_targets(model, FEEDFORWARD_ROLES, config.method)
    feedforward = feedforward or ()

    def make(path: str, module: nn.Module):
        shape = linear_shape(module)
        if shape is None:
            return f"{type(module).__name__} is not a Linear or Conv1D layer"
        fan_in, fan_out, transposed = shape
        if any(pattern_matches(p, path) for p in feedforward):
            return IA3Input(fan_in, transposed)
        return IA3Output(fan_out, transposed)

    placements = per_module(model, config, lambda: default_targets(model, DEFAULT_ROLES, config.method), make)
    for pattern in feedforward:
        if not any(pattern_matches(pattern, p.path) for p in placements):
            raise TargetError(f"ia3 feedforward pattern {pattern!r} matches none of the targets {[p.path for p in placements][:4]}...")
    placements.resolved = config.replace(feedforward=tuple(feedforward))
    return placements


register_method(MethodSpec("ia3", IA3Config, build, mergeable=True, identity_at_init=True,
                           summary="learned scaling of keys, values and feed-forward activations",
                           default_lr=1e-2, mixing=Mixing("batched"), peft=IA3Codec()))
