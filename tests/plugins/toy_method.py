"""A toy delta method that lives outside deltatune: it registers through the plugin
mechanism (``deltatune --plugin toy_method`` or ``$DELTATUNE_PLUGINS``) with no change to src/.

``toy``: a rank-one update ``y = W x + b + s * u (v . x)`` on linear layers, ``u`` zero at
start (so the model is unchanged at init) and mergeable as ``W + s u v^T``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from deltatune import DeltaConfig, DeltaUnit, MethodSpec, Mixing, register_method
from deltatune.core.build import first_input, linear_shape, per_module, weight_as_out_in
from deltatune.core.config import check
from deltatune.core.roles import default_targets


@dataclass(frozen=True)
class ToyConfig(DeltaConfig):
    """A rank-one update.

    Args:
        scale: factor on the update.
    """

    method = "toy"

    scale: float = field(default=1.0, metadata={"help": "factor s on the rank-one update u v^T"})

    def validate(self) -> None:
        check(self.scale > 0, f"toy scale must be positive, got {self.scale!r}")


class RankOne(DeltaUnit):
    def __init__(self, fan_in: int, fan_out: int, scale: float, transposed: bool) -> None:
        super().__init__()
        self.scale, self.transposed = scale, transposed
        self.u = nn.Parameter(torch.zeros(fan_out))
        self.v = nn.Parameter(torch.randn(fan_in) / fan_in ** 0.5)

    def forward_post(self, module, args, kwargs, output):
        x = first_input(args, kwargs)
        return output + self.scale * (x @ self.v).unsqueeze(-1) * self.u

    def merge_params(self, module, params):
        change = self.scale * torch.outer(self.u, self.v)
        return {"weight": params["weight"] + (change.T if self.transposed else change)}


def build(model: nn.Module, config: ToyConfig):
    def make(path: str, module: nn.Module):
        shape = linear_shape(module)
        if shape is None:
            return f"{type(module).__name__} is not a linear layer"
        weight_as_out_in(module, shape[2])  # the toy reads nothing else of the base
        return RankOne(shape[0], shape[1], config.scale, shape[2])

    return per_module(model, config, lambda: default_targets(model, ["q|qkv", "v"], config.method), make)


#: (step, total) of every call of the per-step hook, by delta name
STEPS_SEEN: dict[str, list[tuple[int, int]]] = {}


def record_step(model: nn.Module, name: str, step: int, total: int) -> None:
    STEPS_SEEN.setdefault(name, []).append((step, total))


register_method(MethodSpec("toy", ToyConfig, build, mergeable=True, identity_at_init=True,
                           summary="rank-one update u v^T (a plugin's toy method)", default_lr=5e-3,
                           mixing=Mixing("per_delta"), step_hook=record_step, peft_refusal="it is a toy"))
