"""``full``: full fine-tuning, the reference every delta method is measured against.

Not a delta: every base parameter trains and the result is a whole model folder. It is
registered so that ``deltatune train --method full`` and ``deltatune demo --compare`` list it
with its learning rate; attaching it says what to do instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ...core.config import DeltaConfig
from ...core.registry import MethodSpec, register_method
from ...core.unit import Placements
from ...errors import NotApplicableError


@dataclass(frozen=True)
class FullConfig(DeltaConfig):
    """Full fine-tuning: no options; the training job unfreezes the whole model."""

    method = "full"


def build(model: nn.Module, config: FullConfig) -> Placements:
    raise NotApplicableError(
        "full fine-tuning trains every base parameter, so it is not a delta that attaches to a frozen base; "
        "run it with `deltatune train --method full`, or attach a delta method such as dense (a full weight "
        "difference per module)"
    )


register_method(MethodSpec(
    "full", FullConfig, build, mergeable=False, identity_at_init=True,
    summary="full fine-tuning of every base parameter (reference; writes a whole model, not a delta)",
    default_lr=5e-5, targeted=False, trains_base=True, reference="ceiling",
    peft_refusal="full fine-tuning is a whole model, not an adapter",
    fsdp_refusal="it writes a whole transformers model (save_pretrained), which deltatune does not gather from "
                 "FSDP shards yet"))
