"""ReFT: representation finetuning, an edit of hidden states at a few token positions.

Wu, Arora, Wang, Geiger, Jurafsky, Manning, Potts, 2024, "ReFT: Representation Finetuning for
Language Models" (arXiv:2404.03592). The base stays frozen; at the output of chosen blocks
(default: every transformer block) and at the first ``prefix_positions`` and last
``suffix_positions`` real tokens of each row, the hidden state ``h`` becomes

- LoReFT: ``h + R^T (W h + b - R h)``, ``R`` (r x d) with orthonormal rows, ``W`` (r x d), ``b`` (r);
- DiReFT: ``h + W2^T (W1 h + b)``, the same shapes without orthogonality.

``R`` is a product of Householder reflections (exactly orthonormal for any parameter value).
Deltatune starts from a zero edit (``W = R``, ``b = 0``; DiReFT ``W1 = 0``, ``b = 0``) where
pyreft starts from random weights. The edit is not a weight change, so it cannot be merged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from torch import nn

from ...core.build import linear_shape, per_module
from ...core.config import DeltaConfig, check
from ...core.registry import MethodSpec, Mixing, register_method
from ...core.roles import find_roles
from ...core.unit import Placements
from ...errors import NotApplicableError, TargetError
from .layer import EDITS, ReftIntervention, TokenMask


@dataclass(frozen=True)
class ReftConfig(DeltaConfig):
    """Representation finetuning (LoReFT or DiReFT) on block outputs.

    Args:
        r: rank of the edit (rows of ``R`` / ``W``); at most the hidden width.
        variant: ``"loreft"`` (``h + R^T (W h + b - R h)``, ``R`` orthonormal rows) or
            ``"direft"`` (``h + W2^T (W1 h + b)``, no orthogonality).
        prefix_positions: how many of each row's first real tokens are edited.
        suffix_positions: how many of each row's last real tokens are edited. In a row of
            fewer real tokens than both together, a token in both sets gets both edits (added).
        tied_weights: one edit for prefix and suffix positions, applied once per token (else
            one edit each).
    """

    method = "reft"

    r: int = 4
    variant: Literal["loreft", "direft"] = "loreft"
    prefix_positions: int = 7
    suffix_positions: int = 7
    tied_weights: bool = False

    def validate(self) -> None:
        check(self.r > 0, f"reft r must be a positive integer, got {self.r!r}")
        check(self.variant in EDITS, f"reft variant must be one of {sorted(EDITS)}, got {self.variant!r}")
        check(self.prefix_positions >= 0,
              f"reft prefix_positions must be >= 0, got {self.prefix_positions!r}")
        check(self.suffix_positions >= 0,
              f"reft suffix_positions must be >= 0, got {self.suffix_positions!r}")
        check(self.prefix_positions + self.suffix_positions > 0,
              "reft prefix_positions and suffix_positions are both 0, so no position would be edited; "
              "set at least one of them above 0")


def mask_sources(model: nn.Module) -> list[str]:
    """Paths of the modules whose calls carry the attention mask of the tokens their blocks
    see: the model itself, and for an encoder-decoder model its encoder and decoder (the
    decoder receives the decoder's mask as ``attention_mask``)."""
    sources = [""]
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        paths = {id(m): p for p, m in model.named_modules()}
        for getter in ("get_encoder", "get_decoder"):
            get = getattr(model, getter, None)
            part = get() if callable(get) else None
            if isinstance(part, nn.Module) and paths.get(id(part)):
                sources.append(paths[id(part)])
    return sources


def _source_of(path: str, sources: list[str]) -> str:
    """The innermost source holding ``path``."""
    return max((s for s in sources if not s or path == s or path.startswith(s + ".")), key=len)


def build(model: nn.Module, config: ReftConfig) -> Placements:
    found = find_roles(model)

    def every_block() -> tuple[str, ...]:
        if not found.blocks:
            raise TargetError(
                f"reft has no default targets for {type(model).__name__}: it edits the output of every transformer "
                f"block (an nn.ModuleList of layers holding an attention sub-module) and found none; pass "
                f"targets=[...] or target_types=[...] naming the modules whose outputs to edit"
            )
        return tuple("re:" + re.escape(block) for block in found.blocks)

    sources = mask_sources(model)
    tokens = TokenMask(sources)

    def make(path: str, module: nn.Module):
        shape = linear_shape(module)
        width = shape[1] if shape is not None else found.hidden
        if width is None:
            return f"{type(module).__name__} has no output width deltatune can read (not a Linear/Conv1D, no hidden size)"
        if config.r > width:
            raise NotApplicableError(
                f"reft cannot edit {path!r} ({type(module).__name__}, output width {width}): r={config.r} exceeds "
                f"the width (LoReFT's r x {width} projection has at most {width} orthonormal rows, and no edit of "
                f"that space needs a higher rank); lower r or exclude the module"
            )
        return ReftIntervention(width, config.r, config.variant, config.prefix_positions, config.suffix_positions,
                                config.tied_weights, tokens, _source_of(path, sources), path)

    return per_module(model, config, every_block, make)


register_method(MethodSpec(
    "reft", ReftConfig, build, size_option="r", mergeable=False, identity_at_init=True,
    merge_refusal="it edits the hidden states of chosen token positions only, through a low-rank subspace",
    summary="representation finetuning (LoReFT / DiReFT): low-rank edits of block outputs at the first and last "
            "tokens",
    # MiniLM movie reviews, 60 steps of 32 rows, head included: loss 0.694 -> 0.676 at 2e-3,
    # 0.689 -> 0.598 at 1e-2, flat at 5e-4 (a plain adapter at 1e-3: 0.69 -> 0.57)
    default_lr=1e-2, mixing=Mixing("batched"),
    peft_refusal="peft has no representation-finetuning method (pyreft saves its interventions in its own format)"))
