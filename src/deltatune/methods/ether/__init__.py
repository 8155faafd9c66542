"""ETHER and ETHER+: finetuning by hyperplane reflections.

Bini, Roth, Akata and Khoreva, 2024, "ETHER: Efficient Finetuning of Large-Scale Models with
Hyperplane Reflections" (arXiv:2405.20271). ETHER multiplies each adapted weight ``W``
(out, in) by a block-diagonal Householder reflection over its input features,
``W H``, ``H = diag(I - 2 u_i u_i^T / |u_i|^2)``: a transformation at a fixed distance from
the identity, so the model changes from the start. ETHER+ relaxes the reflection to
``H+ = I - u u^T / |u|^2 + v v^T / |v|^2`` and applies it on both sides, ``H~+ W H+``; with
``v = u`` at start it is the identity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from ...core.build import linear_shape, per_module
from ...core.config import DeltaConfig, check
from ...core.registry import MethodSpec, Mixing, register_method
from ...core.roles import default_targets
from ...core.unit import Placements
from ...errors import ConfigError
from .layer import ETHERLinear

__all__ = ["ETHERConfig", "ETHERLinear"]

DEFAULT_ROLES = ["q|qkv", "v"]


@dataclass(frozen=True)
class ETHERConfig(DeltaConfig):
    """Hyperplane-reflection finetuning of linear weights.

    Args:
        variant: ``"ether"`` (one reflection per block on the input side, ``W H``; not the
            identity at start) or ``"ether_plus"`` (relaxed reflections on both sides,
            ``H~ W H``; the identity at start).
        blocks: diagonal blocks of each reflection; must divide the input width (and, for
            ``ether_plus``, the output width) of every target. The parameter count does not
            depend on it; more blocks are cheaper to apply and act more locally.
    """

    method = "ether"

    variant: Literal["ether", "ether_plus"] = "ether"
    blocks: int = 4

    def validate(self) -> None:
        check(self.variant in ("ether", "ether_plus"), f"ETHER variant must be 'ether' or 'ether_plus', got {self.variant!r}")
        check(self.blocks > 0, f"ETHER blocks must be a positive integer, got {self.blocks!r}")


def _make_unit(config: ETHERConfig):
    plus = config.variant == "ether_plus"

    def make(path: str, module: nn.Module):
        shape = linear_shape(module)
        if shape is None:
            return f"{type(module).__name__} is not a Linear or Conv1D layer"
        fan_in, fan_out = shape[0], shape[1]
        widths = {"input": fan_in, "output": fan_out} if plus else {"input": fan_in}
        for side, width in widths.items():
            if width % config.blocks or width < config.blocks:
                raise ConfigError(
                    f"ether: blocks={config.blocks} does not divide the {side} width {width} of {path!r} "
                    f"({type(module).__name__}, weight shape {tuple(module.weight.shape)}); choose blocks dividing "
                    f"{' and '.join(str(w) for w in widths.values())}, or leave this module out of targets")
        return ETHERLinear(fan_in, fan_out, shape[2], config.blocks, plus)

    return make


def build(model: nn.Module, config: ETHERConfig) -> Placements:
    return per_module(model, config, lambda: default_targets(model, DEFAULT_ROLES, config.method), _make_unit(config))


register_method(MethodSpec(
    "ether", ETHERConfig, build, mergeable=True, identity_at_init=False,
    summary="block-diagonal hyperplane reflections multiplying linear weights (ETHER; ETHER+ both sides)",
    default_lr=5e-3,
    mixing=Mixing("per_delta", reason="a reflection multiplies the weight; each delta runs on its own rows"),
    peft_refusal=(
        "peft has no ETHER adapter. Its HRA is a relative that does not match: HRA chains r Householder "
        "reflections across the whole input width and starts at the identity (pairs of equal vectors), while "
        "ETHER uses one reflection per diagonal block and is not the identity at start, and ETHER+ relaxes the "
        "reflection (I - uu^T + vv^T) and applies it on both sides of the weight; no HRA config computes either")))
