"""LoKr in peft's LOKR adapter format."""

from __future__ import annotations

from ..loha.peft import LycorisCodec
from .config import LoKrConfig
from .layer import LoKrLinear


class LoKrCodec(LycorisCodec):
    """LoKr on Linear layers (peft's LOKR does not adapt GPT-2 ``Conv1D``). Whether each factor
    is full or low rank follows from ``r`` and the widths on both sides, so the tensors match."""

    peft_type = "LOKR"
    unit_class = LoKrLinear
    config_class = LoKrConfig
    tensor_names = {"lokr_w1": "w1", "lokr_w1_a": "w1_a", "lokr_w1_b": "w1_b",
                    "lokr_w2": "w2", "lokr_w2_a": "w2_a", "lokr_w2_b": "w2_b"}
    inits = {"zero": True, "lycoris": "lycoris", "random": False}
    same_fields = ("rank_dropout", "module_dropout", "decompose_both", "decompose_factor", "rank_dropout_scale")
    understood = LycorisCodec.common_understood | {"decompose_both", "decompose_factor", "rank_dropout_scale"}
    exported_fields = frozenset({"r", "alpha", "init", "rank_pattern", "alpha_pattern", *same_fields})
    carried = ("r", "alpha", "init", "rank_pattern", "alpha_pattern", *same_fields)
