"""Extra modules that train fully and travel with a delta (peft's ``modules_to_save``)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import TargetError
from .slot import SLOT_ATTR, DeltaSlot
from .unit import DeltaUnit


_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")


def plain_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` without deltatune's slot and hooks on it."""
    for name, sub in module.named_modules():
        if name and name.split(".")[0] != SLOT_ATTR and isinstance(sub, DeltaSlot):
            raise TargetError(
                f"cannot train a copy of {type(module).__name__}: deltas are attached inside it at {name!r}"
            )
    slot = module._modules.pop(SLOT_ATTR, None)
    hooks = {attr: getattr(module, attr) for attr in _HOOK_DICTS}
    wrapper = module.__dict__.pop("forward", None) if isinstance(slot, DeltaSlot) else None
    try:
        for attr in _HOOK_DICTS:
            setattr(module, attr, type(hooks[attr])())
        if wrapper is not None and wrapper.inner is not None:
            module.__dict__["forward"] = wrapper.inner
        return copy.deepcopy(module)
    finally:
        for attr, value in hooks.items():
            setattr(module, attr, value)
        if wrapper is not None:
            module.__dict__["forward"] = wrapper
        if slot is not None:
            module._modules[SLOT_ATTR] = slot


class SavedModule(DeltaUnit):
    """A trainable copy of a module (a new classifier head) that replaces its output.

    Each delta gets its own copy, so two deltas can carry two heads on one base.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.copy = plain_copy(module)
        self.copy.requires_grad_(True)

    def forward_post(self, module, args, kwargs, output):
        return self.copy(*args, **kwargs)

    def run(self, module, own, args, kwargs):
        return self.copy(*args, **kwargs)  # the copy replaces the module: no need to run it too

    def merge_params(self, module: nn.Module, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.copy.named_parameters()}

    def fingerprint_module(self, module: nn.Module, model: nn.Module) -> None:
        return None  # a new head is random at load time; it is not part of the base's identity
