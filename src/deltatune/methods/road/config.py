"""The RoAd config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ...core.config import DeltaConfig, check
from .layer import SIZE_PER_OUTPUT


@dataclass(frozen=True)
class RoadConfig(DeltaConfig):
    """RoAd on Linear and GPT-2 ``Conv1D`` layers.

    Args:
        variant: ``road_1`` (one angle and scale per output pair: ``out / 2`` of each),
            ``road_2`` (per output element: ``out``) or ``road_4`` (separate angle and scale
            for the cosine and the sine entry: ``2 out``).
        group_size: outputs are paired within groups of this many (element ``j`` with
            ``j + group_size / 2``); even, and a divisor of every target's output width.
    """

    method = "road"

    variant: Literal["road_1", "road_2", "road_4"] = "road_1"
    group_size: int = 64

    def validate(self) -> None:
        check(self.variant in SIZE_PER_OUTPUT,
              f"RoadConfig: field 'variant' must be one of {sorted(SIZE_PER_OUTPUT)}, got {self.variant!r}")
        check(self.group_size > 0 and self.group_size % 2 == 0,
              f"RoadConfig: field 'group_size' must be a positive even number (pairs are formed within a group), "
              f"got {self.group_size}")
