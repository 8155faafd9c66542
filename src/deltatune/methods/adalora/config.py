"""AdaLoRA's configuration (Zhang et al., 2023, arXiv:2303.10512), with peft 0.21.2's
``AdaLoraConfig`` defaults."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from ...core.config import DeltaConfig, check


@dataclass(frozen=True)
class AdaLoRAConfig(DeltaConfig):
    """Adaptive budget allocation: ``W x + s * P diag(lambda) Q x`` per module, with the
    least important singular values masked until ``target_r`` per module remain on average.

    Args:
        init_r: initial rank of every module's update (``lambda`` has ``init_r`` entries).
        target_r: the average rank per module left when the allocation ends; the total
            budget is ``target_r`` times the number of adapted modules.
        alpha: scale numerator; the update is multiplied by ``alpha / init_r`` (peft's
            ``lora_alpha / (ranknum + 1e-5)``, which keeps ``init_r`` after ranks shrink).
        dropout: dropout on the branch's input during training.
        tinit: steps of warm-up before the budget starts to shrink.
        tfinal: steps at the end trained with the final ranks fixed.
        delta_t: steps between two allocations while the budget shrinks (peft's ``deltaT``).
        beta1: smoothing of the sensitivity ``|w * grad|`` (exponential moving average).
        beta2: smoothing of its uncertainty ``|sensitivity - smoothed sensitivity|``.
        orth_reg_weight: weight of the orthogonality penalty on ``P`` and ``Q`` added to the loss.
        init: ``"orthonormal"`` (``P`` and ``Q`` normal with std ``1/sqrt(out)`` and
            ``1/sqrt(in)``: near the orthonormal factors the penalty asks for, so ``lambda``
            trains from the first step) or ``"peft"`` (std 0.02, as peft and the authors' code).
        total_step: steps of the schedule; ``None`` takes the training run's step count.
        rank_pattern: rank kept per module path (the full dotted name) after an allocation,
            where it differs from ``init_r``; a saved delta records it so it reloads with
            those ranks (the scale stays ``alpha / init_r``).
    """

    method = "adalora"

    init_r: int = 12
    target_r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = field(default=1, metadata={"aliases": ("deltaT",)})
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    init: Literal["orthonormal", "peft"] = "orthonormal"
    total_step: int | None = None
    rank_pattern: dict[str, int] | None = field(default=None, hash=False)

    def validate(self) -> None:
        check(self.init_r > 0, f"AdaLoRA init_r must be a positive integer, got {self.init_r!r}")
        check(0 < self.target_r <= self.init_r,
              f"AdaLoRA target_r must be in [1, init_r={self.init_r}], got {self.target_r!r}; lower target_r or "
              f"raise init_r")
        check(self.alpha > 0, f"AdaLoRA alpha must be positive, got {self.alpha!r}")
        check(0.0 <= self.dropout < 1.0, f"AdaLoRA dropout must be in [0, 1), got {self.dropout!r}")
        check(self.tinit >= 0, f"AdaLoRA tinit must be >= 0, got {self.tinit!r}")
        check(self.tfinal >= 0, f"AdaLoRA tfinal must be >= 0, got {self.tfinal!r}")
        check(self.delta_t > 0, f"AdaLoRA delta_t must be a positive number of steps, got {self.delta_t!r}")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            check(0.0 < value < 1.0, f"AdaLoRA {name} must be in (0, 1), got {value!r}")
        check(self.orth_reg_weight >= 0, f"AdaLoRA orth_reg_weight must be >= 0, got {self.orth_reg_weight!r}")
        check(self.init in ("orthonormal", "peft"), f"AdaLoRA init must be 'orthonormal' or 'peft', got {self.init!r}")
        check(self.total_step is None or self.total_step > 0,
              f"AdaLoRA total_step must be a positive number of steps or None (the run's), got {self.total_step!r}")
        if self.total_step is not None:
            check(self.tinit < self.total_step - self.tfinal,
                  f"AdaLoRA tinit={self.tinit} and tfinal={self.tfinal} leave no steps to allocate ranks in "
                  f"total_step={self.total_step}; lower tinit/tfinal or raise total_step")
        check(self.rank_pattern is None or all(isinstance(k, str) and isinstance(v, int) and 0 <= v <= self.init_r
                                               for k, v in self.rank_pattern.items()),
              f"AdaLoRA rank_pattern must map module paths to ranks in [0, init_r={self.init_r}], "
              f"got {self.rank_pattern!r}")

    @property
    def scaling(self) -> float:
        """``alpha / init_r``, written as peft computes it."""
        return self.alpha / (self.init_r + 1e-5)

    def rank_at(self, path: str) -> int:
        """The rank of the unit at module ``path``: its ``rank_pattern`` entry, else ``init_r``."""
        return (self.rank_pattern or {}).get(path, self.init_r)

    def with_ranks(self, ranks: dict[str, int]) -> AdaLoRAConfig:
        """This config recording ``ranks`` (module path -> rank) where they differ from ``init_r``."""
        pattern = {path: rank for path, rank in sorted(ranks.items()) if rank != self.init_r}
        return dataclasses.replace(self, rank_pattern=pattern or None)
