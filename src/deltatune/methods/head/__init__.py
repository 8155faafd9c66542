"""``head``: a delta that is only a trained copy of the model's prediction head.

The baseline every method should beat: the frozen base with a new head trained on top.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ...core.registry import MethodSpec, register_method
from ...core.config import DeltaConfig
from ...core.targeting import base_modules
from ...core.unit import Placements
from ...errors import NotApplicableError

HEAD_NAMES = ("classifier", "score")


def find_head(model: nn.Module) -> str | None:
    """The path of a sequence-classification head (``classifier`` or ``score``), if any."""
    for path, _ in base_modules(model):
        if path in HEAD_NAMES:
            return path
    return None


@dataclass(frozen=True)
class HeadConfig(DeltaConfig):
    """Train only the head; ``modules_to_save`` defaults to the model's classifier head."""

    method = "head"


def build(model: nn.Module, config: HeadConfig) -> Placements:
    if config.targets is not None or config.target_types:
        raise NotApplicableError("the head method trains modules_to_save only; it takes no targets")
    if not config.modules_to_save:
        head = find_head(model)
        if head is None:
            raise NotApplicableError(
                f"{type(model).__name__} has no classification head named {' or '.join(HEAD_NAMES)}; "
                f"pass modules_to_save=[...]"
            )
        return Placements(resolved=config.replace(modules_to_save=(head,)), items=())
    return Placements()


register_method(MethodSpec(
    "head", HeadConfig, build, mergeable=True, identity_at_init=True,
    summary="only a trained copy of the prediction head (baseline)", default_lr=1e-2, targeted=False, reference="floor",
    peft_refusal="peft saves modules_to_save only alongside an adapter, and a head-only delta has none"))
