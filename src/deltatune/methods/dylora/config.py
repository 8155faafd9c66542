"""DyLoRA's configuration (Valipour et al., 2022, arXiv:2210.07558)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from ...core.config import DeltaConfig, check


@dataclass(frozen=True)
class DyLoRAConfig(DeltaConfig):
    """LoRA trained for every rank from ``r_min`` to ``r`` at once: each step uses the first
    ``b`` rows of ``A`` and columns of ``B`` (scaled ``alpha / b``) for a ``b`` drawn anew.

    Args:
        r: the largest rank (the factors' size).
        r_min: the smallest rank drawn during training.
        alpha: scale numerator; rank ``b`` is scaled ``alpha / b``.
        dropout: dropout on the branch's input during training.
        eval_rank: the rank used outside training, merged and saved as the delta's meaning;
            ``None`` for ``r``. Choose another at load time with
            ``dt.load(model, path, overrides={"eval_rank": 4})``.
        seed: the seed of the rank drawn at each step (``b`` depends on it and the step
            number only, so a resumed run draws the same ranks).
    """

    method = "dylora"

    r: int = 8
    r_min: int = 1
    alpha: float = 16.0
    dropout: float = 0.0
    eval_rank: int | None = None
    seed: int = 0

    def validate(self) -> None:
        check(self.r > 0, f"DyLoRA rank r must be a positive integer, got {self.r!r}")
        check(0 < self.r_min <= self.r, f"DyLoRA r_min must be in [1, r={self.r}], got {self.r_min!r}")
        check(self.alpha > 0, f"DyLoRA alpha must be positive, got {self.alpha!r}")
        check(0.0 <= self.dropout < 1.0, f"DyLoRA dropout must be in [0, 1), got {self.dropout!r}")
        check(self.eval_rank is None or 0 < self.eval_rank <= self.r,
              f"DyLoRA eval_rank must be in [1, r={self.r}] or None (r), got {self.eval_rank!r}")

    @property
    def rank(self) -> int:
        """The rank used outside training."""
        return self.r if self.eval_rank is None else self.eval_rank

    def rank_for_step(self, step: int) -> int:
        """The rank ``b`` drawn for training step ``step`` (0-based), uniform in ``[r_min, r]``:
        a function of ``seed`` and ``step`` only (not of torch's global generator)."""
        return random.Random(self.seed * 1_000_003 + step).randint(self.r_min, self.r)
