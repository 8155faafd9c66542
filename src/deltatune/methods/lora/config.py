"""LoRA's configuration (Hu et al., 2021, arXiv:2106.09685) with the rsLoRA option, and DoRA's."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from ...core.config import DeltaConfig, check
from ...errors import ConfigError


@dataclass(frozen=True)
class LoRAConfig(DeltaConfig):
    """Low-rank adaptation: ``W x + (alpha / r) * B A x`` with ``B`` zero at start.

    Args:
        r: rank of the update.
        alpha: scale numerator; the update is multiplied by ``alpha / r``
            (``alpha / sqrt(r)`` with ``use_rslora``).
        dropout: dropout on the LoRA branch's input during training.
        use_rslora: rank-stabilised scaling (Kalajdzievski, 2023, arXiv:2312.03732).
        init: ``"kaiming"`` (A uniform as in ``nn.Linear``, B zero) or ``"gaussian"``
            (A normal with std ``1/r``, B zero).
        rank_pattern: rank per module path (the full dotted name), overriding ``r`` there;
            such a module's scaling is ``alpha / its rank``, as in peft. Extracted LoRAs
            (``deltatune.algebra.extract``) use it for per-layer ranks.
    """

    method = "lora"

    r: int = field(default=8, metadata={"aliases": ("rank",)})
    alpha: float = 16.0
    dropout: float = 0.0
    use_rslora: bool = False
    init: Literal["kaiming", "gaussian"] = "kaiming"
    rank_pattern: dict[str, int] | None = field(default=None, hash=False)

    def validate(self) -> None:
        check(isinstance(self.r, int) and self.r > 0, f"LoRA rank r must be a positive integer, got {self.r!r}")
        check(self.rank_pattern is None or (isinstance(self.rank_pattern, dict) and all(
            isinstance(k, str) and isinstance(v, int) and v > 0 for k, v in self.rank_pattern.items())),
            f"LoRA rank_pattern must map module paths to positive integer ranks, got {self.rank_pattern!r}")
        check(self.alpha > 0, f"LoRA alpha must be positive, got {self.alpha!r}")
        check(0.0 <= self.dropout < 1.0, f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        check(self.init in ("kaiming", "gaussian"), f"LoRA init must be 'kaiming' or 'gaussian', got {self.init!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeltaConfig:
        """Also reads files from before DoRA was its own method, which recorded ``use_dora``."""
        data = dict(data)
        if data.pop("use_dora", False) and data.get("method") != "dora":
            raise ConfigError("this LoRA config has use_dora=true: it describes a DoRA delta; save it as method "
                              "'dora' (DoRAConfig)")
        return super().from_dict(data)

    def for_module(self, path: str) -> LoRAConfig:
        """The config of the unit at module ``path``: ``r`` replaced by its ``rank_pattern`` entry."""
        rank = (self.rank_pattern or {}).get(path, self.r)
        return self if rank == self.r else dataclasses.replace(self, r=rank)


@dataclass(frozen=True)
class DoRAConfig(LoRAConfig):
    """LoRA with weight decomposition (DoRA, Liu et al., 2024, arXiv:2402.09353): a learned
    magnitude per output times the normalised direction ``W + s B A``. Its own method, ``dora``;
    every LoRA option applies."""

    method = "dora"
