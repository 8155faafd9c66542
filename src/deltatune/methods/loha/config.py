"""Configurations of LoHa, and the options it shares with LoKr (the LyCORIS family as peft has it)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from ...core.config import DeltaConfig, check


@dataclass(frozen=True)
class LycorisConfig(DeltaConfig):
    """Options shared by the products of low-rank factors (LoHa, LoKr); not a method itself.

    Args:
        r: rank of each low-rank factor.
        alpha: scale numerator; ``dW`` is multiplied by ``alpha / r`` (as in peft, also where
            no factor is low rank).
        rank_dropout: during training, each output row of ``dW`` is dropped with this
            probability (a fresh mask per call, shared by the batch), as in LyCORIS and peft.
        module_dropout: during training, the whole delta of a module is skipped with this
            probability per call.
        rank_pattern: rank per module path (the full dotted name), overriding ``r`` there; that
            module's scaling is ``its alpha / its rank``.
        alpha_pattern: alpha per module path, overriding ``alpha`` there.
    """

    r: int = field(default=8, metadata={"aliases": ("rank",)})
    alpha: float = 8.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    rank_pattern: dict[str, int] | None = field(default=None, hash=False)
    alpha_pattern: dict[str, float] | None = field(default=None, hash=False)

    def validate(self) -> None:
        name = type(self).__name__
        check(isinstance(self.r, int) and self.r > 0, f"{name}: rank r must be a positive integer, got {self.r!r}")
        check(self.alpha > 0, f"{name}: alpha must be positive, got {self.alpha!r}")
        for option in ("rank_dropout", "module_dropout"):
            value = getattr(self, option)
            check(0.0 <= value < 1.0, f"{name}: {option} is a probability in [0, 1), got {value!r}")
        check(self.rank_pattern is None or all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                               for v in self.rank_pattern.values()),
              f"{name}: rank_pattern must map module paths to positive integer ranks, got {self.rank_pattern!r}")
        check(self.alpha_pattern is None or all(v > 0 for v in self.alpha_pattern.values()),
              f"{name}: alpha_pattern must map module paths to positive alphas, got {self.alpha_pattern!r}")

    def for_module(self, path: str) -> LycorisConfig:
        """The config of the unit at module ``path``: ``r`` and ``alpha`` from the patterns."""
        r = (self.rank_pattern or {}).get(path, self.r)
        alpha = (self.alpha_pattern or {}).get(path, self.alpha)
        return self if (r, alpha) == (self.r, self.alpha) else dataclasses.replace(self, r=r, alpha=alpha)

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


@dataclass(frozen=True)
class LoHaConfig(LycorisConfig):
    """LoHa: ``dW = (alpha / r) * (W1a W1b) * (W2a W2b)`` (element-wise product of two rank-``r``
    products) on Linear and GPT-2 ``Conv1D`` layers.

    Args:
        init: ``"zero"`` (``W1a``, ``W1b``, ``W2a`` Kaiming-uniform, ``W2b`` zero, so ``dW = 0``
            at start; peft's ``init_weights=True``) or ``"random"`` (all four Kaiming-uniform,
            not the identity; peft's ``init_weights=False``).
    """

    method = "loha"

    init: Literal["zero", "random"] = "zero"

    def validate(self) -> None:
        super().validate()
        check(self.init in ("zero", "random"), f"LoHaConfig: init must be 'zero' or 'random', got {self.init!r}")
