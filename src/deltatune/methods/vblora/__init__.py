"""VB-LoRA: LoRA factors assembled from one trainable vector bank shared by all layers.

Li, Han, Chen, Wang, Wang & Wang, 2024, "VB-LoRA: Extreme Parameter Efficient Fine-Tuning
with Vector Banks" (arXiv:2405.15179). With a bank ``V: (N, L)`` and, per adapted layer,
logits ``s`` over the bank for every length-``L`` piece of its factors::

    h = W x + B A x,    piece = sum_{i in topk(s)} softmax(s_topk)_i V_i

``A: (r, in)`` is ``r x in/L`` pieces (each row the concatenation of its pieces), ``B: (out, r)``
is ``out/L x r`` pieces (each column likewise), as in peft. ``L`` must divide every target's
input and output width. The bank lives in one unit on the model (path ``""``) that every
layer unit refers to; it trains with the logits.
"""

from __future__ import annotations

from torch import nn

from ...core.build import per_linear, with_shared
from ...core.registry import MethodSpec, Mixing, register_method
from ...core.unit import Placements
from ...errors import TargetError
from .layer import VBLoRAConfig, VBLoRALinear, VectorBank, mix
from .peft import VBLoRACodec

__all__ = ["VBLoRAConfig", "VBLoRALinear", "VectorBank", "mix"]

DEFAULT_ROLES = ["q|qkv", "v"]


def build(model: nn.Module, config: VBLoRAConfig) -> Placements:
    length = config.vector_length

    def make(path: str, module: nn.Module, fan_in: int, fan_out: int, transposed: bool):
        if fan_in % length or fan_out % length:
            raise TargetError(
                f"vblora cannot adapt {path!r} ({type(module).__name__}, in={fan_in}, out={fan_out}): vector_length="
                f"{length} must divide both widths; choose a vector_length that divides every target's widths, or "
                f"exclude this module")
        return VBLoRALinear(fan_in, fan_out, config, transposed)

    layers = per_linear(model, config, DEFAULT_ROLES, make)
    bank = VectorBank(config)
    for placement in layers:
        placement.unit.share(bank)
    return with_shared(model, bank, layers)


register_method(MethodSpec(
    "vblora", VBLoRAConfig, build, size_option="num_vectors", mergeable=True, identity_at_init=False,
    summary="LoRA factors whose pieces are top-k mixes of one shared trainable vector bank",
    default_lr=1e-2, mixing=Mixing("batched"), peft=VBLoRACodec()))
