"""The configuration of a mixture of LoRA experts (MoLA, arXiv:2402.08562; SiRA, arXiv:2311.09179)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ...core.config import DeltaConfig, check


@dataclass(frozen=True)
class MoLoRAConfig(DeltaConfig):
    """Per adapted linear layer, ``E`` LoRA experts and a token-level top-k router:
    ``W x + sum over the k chosen e of g_e(x) * (alpha / r) * B_e A_e x``.

    Args:
        r: rank of every expert.
        alpha: scale numerator; each expert's update is multiplied by ``alpha / r``.
        num_experts: experts per adapted layer (when ``experts_per_layer`` is not given).
        top_k: experts each token uses; their router probabilities, renormalised to sum to
            one, weight their outputs.
        renormalize: renormalise the chosen experts' probabilities to sum to one (MoLA,
            Mixtral); ``False`` weights each chosen expert by its plain router probability (the
            Switch Transformer's form: with ``top_k=1`` renormalised gates are always 1, so only
            the balancing loss would train the router).
        experts_per_layer: experts per depth group, lowest layers first: the transformer blocks
            of each stack (encoder, decoder) are split into this many equal groups by depth
            (block ``i`` of ``n`` is in group ``i * len // n``), so ``2,4,6,8`` gives the
            lowest quarter 2 experts and the highest 8 (MoLA's "higher layers need more
            experts"). Overrides ``num_experts``; ``None``: ``num_experts`` everywhere.
        aux_loss_coef: weight of the load-balancing loss ``E * sum_e f_e * P_e`` (``f_e``: the
            share of routed (token, slot) pairs sent to expert ``e``, ``P_e``: its mean router
            probability), averaged over layers and added to the training loss; 0 for none.
        capacity_factor: SiRA's capacity limit: each expert takes at most
            ``ceil(capacity_factor * tokens * top_k / E)`` tokens of a forward pass (first
            choices before second choices, then earlier tokens first); a token over the limit
            loses that expert. ``None``: no limit.
        dropout: dropout on the experts' input during training (the router sees the input as it is).
    """

    method = "molora"

    r: int = 8
    alpha: float = 16.0
    num_experts: int = 4
    top_k: int = 2
    renormalize: bool = True
    experts_per_layer: tuple[int, ...] | None = None
    aux_loss_coef: float = 0.01
    capacity_factor: float | None = None
    dropout: float = 0.0

    def validate(self) -> None:
        check(isinstance(self.r, int) and self.r > 0, f"molora rank r must be a positive integer, got {self.r!r}")
        check(self.alpha > 0, f"molora alpha must be positive, got {self.alpha!r}")
        check(isinstance(self.num_experts, int) and self.num_experts > 0,
              f"molora num_experts must be a positive integer, got {self.num_experts!r}")
        check(isinstance(self.top_k, int) and self.top_k > 0,
              f"molora top_k must be a positive integer, got {self.top_k!r}")
        check(self.experts_per_layer is None or (len(self.experts_per_layer) > 0 and all(
            isinstance(e, int) and e > 0 for e in self.experts_per_layer)),
            f"molora experts_per_layer must list positive integers (experts per depth group, e.g. 2,4,6,8), "
            f"got {self.experts_per_layer!r}")
        fewest = min(self.experts_per_layer) if self.experts_per_layer else self.num_experts
        where = "experts_per_layer's smallest entry" if self.experts_per_layer else "num_experts"
        check(self.top_k <= fewest, f"molora top_k={self.top_k} is larger than {where} ({fewest}); lower top_k "
                                    f"or give every layer at least {self.top_k} experts")
        check(self.aux_loss_coef >= 0 and math.isfinite(self.aux_loss_coef),
              f"molora aux_loss_coef must be a finite number >= 0, got {self.aux_loss_coef!r}")
        check(self.capacity_factor is None or (self.capacity_factor > 0 and math.isfinite(self.capacity_factor)),
              f"molora capacity_factor must be a positive number (or None for no limit), got {self.capacity_factor!r}")
        check(0.0 <= self.dropout < 1.0, f"molora dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def experts_at(self, position: int, blocks: int) -> int:
        """Experts of a layer in block ``position`` of a stack of ``blocks`` blocks."""
        if self.experts_per_layer is None:
            return self.num_experts
        return self.experts_per_layer[position * len(self.experts_per_layer) // blocks]
