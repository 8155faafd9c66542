"""Extra modules that train fully and travel with a delta (peft's ``modules_to_save``)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from ..errors import TargetError
from .quantized import dense, format_of
from .slot import SLOT_ATTR, DeltaSlot
from .unit import DeltaUnit


_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")


def plain_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` without deltatune's slot and hooks on it; a quantised weight
    is copied as its float32 value (the copy trains)."""
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
        floats = {id(p): nn.Parameter(dense(p)) for p in module.parameters() if format_of(p) is not None}
        return copy.deepcopy(module, memo=floats)
    finally:
        for attr, value in hooks.items():
            setattr(module, attr, value)
        if wrapper is not None:
            module.__dict__["forward"] = wrapper
        if slot is not None:
            module._modules[SLOT_ATTR] = slot


def _cast(tree: Any, dtype: torch.dtype) -> Any:
    return tree_map(lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t, tree)


class SavedModule(DeltaUnit):
    """A trainable copy of a module (a new classifier head) that replaces its output.

    Each delta gets its own copy, so two deltas can carry two heads on one base. The copy
    trains in float32 like every delta tensor: on a bfloat16 or float16 base its inputs are
    cast up and its outputs back down to the base's precision.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.copy = plain_copy(module)
        low = [p.dtype for p in self.copy.parameters() if p.dtype in (torch.bfloat16, torch.float16)]
        #: the base's precision, when below float32
        self.compute_dtype = low[0] if low else None
        if self.compute_dtype is not None:
            self.copy.float()
        self.copy.requires_grad_(True)

    def _call(self, args, kwargs):
        if self.compute_dtype is None:
            return self.copy(*args, **kwargs)
        return _cast(self.copy(*_cast(args, torch.float32), **_cast(kwargs, torch.float32)), self.compute_dtype)

    def forward_post(self, module, args, kwargs, output):
        return self._call(args, kwargs)

    def run(self, module, own, args, kwargs):
        return self._call(args, kwargs)  # the copy replaces the module: no need to run it too

    def merge_params(self, module: nn.Module, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.copy.named_parameters()}

    def fingerprint_module(self, module: nn.Module, model: nn.Module) -> None:
        return None  # a new head is random at load time; it is not part of the base's identity
