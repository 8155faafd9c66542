"""LoKr's configuration (the LyCORIS options it shares with LoHa, plus the Kronecker factorisation)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ...core.config import check
from ..loha.config import LycorisConfig


@dataclass(frozen=True)
class LoKrConfig(LycorisConfig):
    """LoKr: ``dW = (alpha / r) * kron(W1, W2)`` on Linear and GPT-2 ``Conv1D`` layers.

    Each width is split in two factors (:func:`~deltatune.methods.lokr.layer.factorization`):
    ``out = out_l * out_k``, ``in = in_m * in_n``; ``W1`` is ``(out_l, in_m)`` and ``W2`` is
    ``(out_k, in_n)``. ``W2`` is the rank-``r`` product ``W2a W2b`` when ``r < max(out_k, in_n) / 2``,
    else a full matrix; ``W1`` likewise only with ``decompose_both`` (as peft decides).

    Args:
        decompose_both: also make ``W1`` a rank-``r`` product where ``r < max(out_l, in_m) / 2``.
        decompose_factor: ``-1`` splits each width into the two divisors nearest its square root
            (the smaller first); a positive ``f`` that divides the width gives ``(f, width / f)``,
            otherwise the divisor pair whose smaller member is nearest ``f`` from below.
        rank_dropout_scale: with ``rank_dropout``, divide the kept rows by the kept fraction
            (peft's default for LoKr: off).
        init: ``"zero"`` (``W1``, or ``W1a``, zero: ``dW = 0`` at start; peft's ``init_weights=True``),
            ``"lycoris"`` (``W2``, or ``W2b``, zero instead, as the LyCORIS repository does) or
            ``"random"`` (nothing zero: not the identity; peft's ``init_weights=False``).
    """

    method = "lokr"

    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False
    init: Literal["zero", "lycoris", "random"] = "zero"

    def validate(self) -> None:
        super().validate()
        check(self.decompose_factor == -1 or self.decompose_factor > 0,
              f"LoKrConfig: decompose_factor must be -1 (near the square root) or a positive integer, "
              f"got {self.decompose_factor!r}")
        check(self.init in ("zero", "lycoris", "random"),
              f"LoKrConfig: init must be 'zero', 'lycoris' or 'random', got {self.init!r}")
