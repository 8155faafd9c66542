"""Tied-LoRA: one low-rank pair shared by all layers of a kind, scaled per layer.

Renduchintala, Konuk & Kuchaiev, 2024, "Tied-LoRA: Enhancing parameter efficiency of LoRA
with Weight Tying" (NAACL 2024, arXiv:2311.09578). For every adapted module ``l`` of a kind
(same role and shape, see :mod:`.sharing`):

    dW_l = (alpha / r) * diag(v_l) B diag(u_l) A

with ``A: (r, in)`` and ``B: (out, r)`` shared by the kind's modules and ``u_l: (r)``,
``v_l: (out)`` the layer's own scaling vectors. ``trainable`` says which of ``A``, ``B``,
``u``, ``v`` train (the paper's variants); a frozen ``A`` or ``B`` stays random and is saved
with the delta, a frozen ``u`` or ``v`` is all ones and is not stored. ``B`` starts at zero
when it trains (``u``, ``v`` at one), else ``v`` starts at zero, so a new delta changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ...core.build import linear_shape, per_module, with_shared
from ...core.config import DeltaConfig, check
from ...core.registry import MethodSpec, Mixing, register_method
from ...core.roles import default_targets
from ...core.unit import Placements
from .sharing import LowRankFactors, ModuleKinds, SharedLowRankLinear, SharedTable

__all__ = ["TiedLoRAConfig", "TiedLoRALinear", "SharedTable"]

DEFAULT_ROLES = ["q|qkv", "v"]
FACTORS = "ABuv"


@dataclass(frozen=True)
class TiedLoRAConfig(DeltaConfig):
    """Tied-LoRA: ``dW_l = (alpha / r) diag(v_l) B diag(u_l) A`` with ``A``, ``B`` shared by
    all adapted modules of one kind (role and shape).

    Args:
        r: rank of the shared pair.
        alpha: scale numerator; the update is multiplied by ``alpha / r``.
        trainable: which of ``A``, ``B`` (shared) and ``u``, ``v`` (per layer) train, as
            letters: ``"ABuv"`` (all four, the paper's best configuration, TL6), ``"ABu"``,
            ``"uv"`` (frozen random ``A``, ``B`` as in VeRA), ... ``B`` or ``v`` must train.
    """

    method = "tiedlora"

    r: int = field(default=8, metadata={"aliases": ("rank",)})
    alpha: float = 16.0
    trainable: str = "ABuv"

    def validate(self) -> None:
        check(self.r > 0, f"tiedlora rank r must be a positive integer, got {self.r!r}")
        check(self.alpha > 0, f"tiedlora alpha must be positive, got {self.alpha!r}")
        letters = list(self.trainable)
        check(bool(letters) and set(letters) <= set(FACTORS) and len(set(letters)) == len(letters),
              f"tiedlora trainable must be distinct letters from {FACTORS!r} (A, B shared; u, v per layer), "
              f"got {self.trainable!r}; e.g. 'ABuv' (all), 'ABu' or 'uv'")
        check("B" in letters or "v" in letters,
              f"tiedlora trainable={self.trainable!r} trains neither B nor v: the update starts at zero through "
              f"one of them and would stay zero; add 'B' or 'v'")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


class TiedLoRALinear(SharedLowRankLinear):
    """One module's ``(alpha / r) diag(v) B diag(u) A``; ``A`` and ``B`` belong to the kind's
    :class:`~.sharing.LowRankFactors` in the delta's :class:`~.sharing.SharedTable`."""

    def __init__(self, shared: LowRankFactors, fan_in: int, fan_out: int, transposed: bool, config: TiedLoRAConfig):
        super().__init__(fan_in, fan_out, transposed)
        self._shared = (shared,)  # a plain reference: the table owns (and counts, saves) the pair
        self.scaling = config.scaling
        self.u = nn.Parameter(torch.ones(config.r)) if "u" in config.trainable else None
        v_start = torch.ones if "B" in config.trainable else torch.zeros
        self.v = nn.Parameter(v_start(fan_out)) if "v" in config.trainable else None

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        shared = self._shared[0]
        A = shared.A if self.u is None else shared.A * self.u.unsqueeze(1)
        out_scale = self.scaling if self.v is None else (self.v * self.scaling).unsqueeze(1)
        return shared.B * out_scale, A

    def extra_repr(self) -> str:
        return super().extra_repr() + f", scaling={self.scaling:g}"


def build(model: nn.Module, config: TiedLoRAConfig) -> Placements:
    kinds = ModuleKinds(model)
    table = SharedTable()
    train = config.trainable

    def make(path: str, module: nn.Module):
        shape = linear_shape(module)
        if shape is None:
            weight = getattr(module, "weight", None)
            size = f" with weight {list(weight.shape)}" if isinstance(weight, torch.Tensor) else ""
            return f"{type(module).__name__}{size} is not a Linear or Conv1D layer (tiedlora adapts linear weights)"
        fan_in, fan_out, transposed = shape
        kind = kinds.kind(path, fan_in, fan_out)
        shared = table.group(kind, lambda: LowRankFactors(
            fan_in, fan_out, config.r, train_A="A" in train, train_B="B" in train, zero_B="B" in train))
        return TiedLoRALinear(shared, fan_in, fan_out, transposed, config)

    placements = per_module(model, config, lambda: default_targets(model, DEFAULT_ROLES, config.method), make)
    return with_shared(model, table, placements)


register_method(MethodSpec(
    "tiedlora", TiedLoRAConfig, build, size_option="r", mergeable=True, identity_at_init=True,
    summary="one low-rank pair B A per kind of module shared by all layers, scaled per layer (Tied-LoRA)",
    default_lr=5e-3, mixing=Mixing("batched"),
    peft_refusal="peft has no adapter whose low-rank factors are shared across layers (Tied-LoRA)"))
