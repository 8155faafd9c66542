"""Fusion: the trainable attention of AdapterFusion over several frozen deltas.

Pfeiffer et al., 2021, "AdapterFusion: Non-Destructive Task Composition for Transfer
Learning" (arXiv:2005.00247). A fusion delta sits at the modules of the deltas it fuses and
runs inside a :class:`~deltatune.compose.Fuse` block; it trains on a new task while the
fused deltas stay frozen (``dt.set_trainable(model, fusion_name)``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from torch import nn

from ...core.build import per_module
from ...core.config import DeltaConfig, check
from ...core.registry import MethodSpec, register_method
from ...core.slot import get_state
from ...core.unit import Placements
from ...errors import NotApplicableError, TargetError
from ..adapter import io_features
from .layer import FusionAttention

__all__ = ["FusionAttention", "FusionConfig"]


@dataclass(frozen=True)
class FusionConfig(DeltaConfig):
    """A fusion over existing deltas.

    Args:
        fused: the names of the deltas it fuses (attached before the fusion).
        temperature: divides the attention scores; above 1 keeps the mix softer.

    With ``targets=None`` the fusion goes to the modules where the fused deltas act, which
    must be the same for all of them.
    """

    method = "fusion"

    fused: tuple[str, ...] = ()
    temperature: float = 1.0

    def validate(self) -> None:
        check(all(isinstance(n, str) and n for n in self.fused),
              f"fusion fused must be delta names, got {list(self.fused)!r}")
        check(len(set(self.fused)) == len(self.fused), f"fusion fused names a delta twice: {list(self.fused)}")
        check(isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature > 0,
              f"fusion temperature must be a positive number, got {self.temperature!r}")


def _fused_sites(model: nn.Module, config: FusionConfig) -> tuple[str, ...]:
    """Exact patterns for the modules where every fused delta acts."""
    state = get_state(model)
    missing = [n for n in config.fused if state is None or n not in state.configs]
    if missing:
        raise NotApplicableError(
            f"fusion over {list(config.fused)} needs those deltas on the model first; {missing} are missing "
            f"(attach or load them, then attach the fusion)"
        )
    sites = {n: set(state.sites[n]) for n in config.fused}
    first = config.fused[0]
    for name in config.fused[1:]:
        if sites[name] != sites[first]:
            only = sorted(sites[name] ^ sites[first])[:3]
            raise TargetError(
                f"fused deltas {first!r} and {name!r} act at different modules (e.g. {only}); fuse deltas attached "
                f"with the same targets, or give the fusion explicit targets"
            )
    if "" in sites[first]:
        raise NotApplicableError(f"delta {first!r} acts on the whole model, not on a module; it cannot be fused")
    return tuple("re:" + re.escape(path) for path in sorted(sites[first]))


def build(model: nn.Module, config: FusionConfig) -> Placements:
    if not config.fused:
        raise NotApplicableError(
            "a fusion fuses existing deltas: name them, e.g. FusionConfig(fused=('sentiment', 'topic'))"
        )
    if config.targets is None and not config.target_types:
        config = config.replace(targets=_fused_sites(model, config))

    def make(path: str, module: nn.Module):
        dims = io_features(module)
        if dims is None:
            return f"{type(module).__name__} has no linear layer to read its output width from"
        return FusionAttention(dims[1], float(config.temperature))

    return per_module(model, config, lambda: (), make)


register_method(MethodSpec(
    "fusion", FusionConfig, build, mergeable=False, identity_at_init=True,
    merge_refusal="it attends over several adapters' outputs per token",
    summary="AdapterFusion attention over frozen deltas (runs in a Fuse block)", fuses=True,
    peft_refusal="peft has no AdapterFusion"))
