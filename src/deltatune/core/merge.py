"""Folding deltas into the base weights and taking them out again, exactly.

A quantised base weight (:mod:`.quantized`) is merged by dequantising it, adding the delta
and quantising the sum again in the same format; the rounding that adds is measured per
weight (``state.requantization``) and can be bounded (``max_error``). Unmerge puts the original
quantised parameter back, so it is exact there too. :func:`fold` makes a float model instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import DeltaStateError, MergeError
from .inject import remove_all
from .params import base_parameters, parameter_owners, tensor_key, tied_elsewhere
from .quantized import dense, format_of, replace_parameter, requantize, to_float
from .registry import get_method
from .slot import DeltaSlot, require_state, slot_sites
from .targeting import base_modules


def _own_params(module: nn.Module) -> dict[str, nn.Parameter]:
    """The module's parameters by relative name, deltatune's own excluded."""
    return dict(base_parameters(module))


def require_mergeable(model: nn.Module, name: str, consequence: str) -> None:
    """Raise :class:`MergeError` (ending with ``consequence``) unless delta ``name`` changes weights."""
    state = require_state(model)
    state.require(name)
    spec = get_method(state.configs[name].method)
    if not spec.mergeable:
        why = f" ({spec.merge_refusal})" if spec.merge_refusal else ""
        raise MergeError(f"delta {name!r} ({spec.name}) changes activations, not weights{why}, so {consequence}")


def _plan(model: nn.Module, names: Sequence[str]) -> list[tuple[str, nn.Module, DeltaSlot, dict[str, torch.Tensor]]]:
    """New parameter values for every module touched by ``names``; nothing is changed yet."""
    for name in names:
        require_mergeable(model, name, "it cannot be merged; keep it unmerged (it still runs), or use a weight "
                                       "method such as lora, ia3 or bitfit")
    plan = []
    owners = parameter_owners(model)
    for path, module, slot in slot_sites(model):
        units = [(n, slot[n]) for n in names if n in slot]
        if not units:
            continue
        tied = tied_elsewhere(model, path, owners)
        current = {k: dense(p.detach()) for k, p in _own_params(module).items()}
        new: dict[str, torch.Tensor] = {}
        for name, unit in sorted(units, key=lambda item: type(item[1]).merge_order):
            with torch.no_grad():
                changed = unit.merge_params(module, {**current, **new})
            for key, value in changed.items():
                if key in tied:
                    raise MergeError(
                        f"{tensor_key(path, key)} is tied to {', '.join(tied[key])}: merging delta {name!r} would change "
                        f"those too, which the unmerged delta leaves alone. Keep it unmerged, or untie the weights "
                        f"(load the model with tie_word_embeddings=False) before attaching. Nothing was changed."
                    )
                if key not in current:
                    raise MergeError(f"{type(unit).__name__} returned unknown parameter {key!r} for {path!r}")
                if not torch.isfinite(value).all():
                    raise MergeError(
                        f"merging delta {name!r} into {path or '<model>'}.{key} gives NaN or inf; "
                        f"the delta's tensors are probably diverged. Nothing was changed."
                    )
                new[key] = value.to(current[key].dtype)
        plan.append((path, module, slot, new))
    return plan


def _requantized(plan, max_error: float | None) -> dict[tuple[int, str], tuple[nn.Parameter, float]]:
    """For every quantised weight in ``plan``: its merged value in its own format, and the rounding
    error that adds as a fraction of the merged change ``||Q(W + dW) - (W + dW)|| / ||dW||``."""
    done = {}
    for path, module, _, new in plan:
        params = _own_params(module)
        for key, value in new.items():
            if format_of(params[key]) is None:
                continue
            made = requantize(value, params[key])
            change = (value - dense(params[key])).norm()
            rounding = (dense(made) - value).norm()
            error = float(rounding / change) if change > 0 else 0.0 if rounding == 0 else float("inf")
            if max_error is not None and error > max_error:
                raise MergeError(
                    f"merging into the quantised {tensor_key(path, key)} loses {error:.3g} of the delta's change to "
                    f"re-quantisation (||Q(W+dW) - (W+dW)|| / ||dW||), above max_error={max_error:g}. Keep the delta "
                    f"unmerged (it still runs), fold it into a float model (fold), or raise max_error. Nothing was changed."
                )
            done[id(module), key] = (made, error)
    return done


def merge(model: nn.Module, names: str | Sequence[str] | None = None, *, max_error: float | None = None) -> tuple[str, ...]:
    """Fold deltas (default: the active ones) into the base weights, reversibly.

    The forward pass then costs what the base costs. The original values are kept, so
    :func:`unmerge` restores the base bit for bit. A quantised weight gets ``W + dW`` quantised
    again; ``model``'s ``requantization`` (:func:`requantization_errors`) says what that rounding
    cost each weight, and ``max_error`` refuses the merge when any weight loses more than that
    fraction of its change.

    Returns:
        the merged delta names.

    Raises:
        MergeError: a delta cannot be merged, merging would give NaN/inf, or re-quantising would
            lose more than ``max_error`` (nothing changes).
    """
    state = require_state(model)
    wanted = state.active if names is None else (names,) if isinstance(names, str) else tuple(names)
    if state.merged:
        raise DeltaStateError(f"deltas {list(state.merged)} are already merged; call unmerge(model) first")
    if not wanted:
        raise DeltaStateError("no delta to merge: none is active and none was named")
    plan = _plan(model, wanted)
    quantised = _requantized(plan, max_error)
    state.requantization = {}
    for path, module, slot, new in plan:
        params = _own_params(module)
        with torch.no_grad():
            for key, value in new.items():
                if (id(module), key) in quantised:  # keep the quantised parameter itself; put a new one in
                    slot._originals[key] = params[key]
                    made, state.requantization[tensor_key(path, key)] = quantised[id(module), key]
                    replace_parameter(module, key, made)
                else:
                    slot._originals[key] = params[key].detach().clone()
                    params[key].copy_(value)
    state.merged = wanted
    state.set_active(tuple(dict.fromkeys((*state.active, *wanted))))
    return wanted


def requantization_errors(model: nn.Module) -> dict[str, float]:
    """While deltas are merged into a quantised base: for every re-quantised weight, the share of
    the merged change lost to rounding, ``||Q(W + dW) - (W + dW)|| / ||dW||`` (empty otherwise)."""
    return dict(require_state(model).requantization)


def unmerge(model: nn.Module) -> tuple[str, ...]:
    """Restore the exact base weights saved by :func:`merge`; returns the names unmerged."""
    state = require_state(model)
    for _, module, slot in slot_sites(model):
        params = _own_params(module)
        with torch.no_grad():
            for key, original in slot._originals.items():
                if format_of(original) is not None:
                    replace_parameter(module, key, original)
                else:
                    params[key].copy_(original)
        slot._originals.clear()
    unmerged, state.merged, state.requantization = state.merged, (), {}
    state.changed()
    return unmerged


def fold(model: nn.Module, names: str | Sequence[str] | None = None) -> nn.Module:
    """Merge deltas for good and strip deltatune from the model ("merge and drop").

    Returns the same model object, now a plain base model with the deltas folded into its
    weights: no slots, no hooks, no deltatune code left in it. A quantised base comes out as a
    float model (every quantised weight dequantised, the deltas added exactly), which
    ``save_pretrained`` can write and any library can load; quantise it again when loading.
    """
    state = require_state(model)
    if state.merged:
        unmerge(model)
    wanted = state.active if names is None else (names,) if isinstance(names, str) else tuple(names)
    plan = _plan(model, wanted) if wanted else []
    dequantize_all(model)
    for _, module, _, new in plan:
        params = _own_params(module)
        with torch.no_grad():
            for key, value in new.items():
                params[key].copy_(value)
    remove_all(model)
    return model


def dequantize_all(model: nn.Module) -> None:
    """Replace every quantised base parameter of ``model`` by its float32 value."""
    for _, module in base_modules(model):
        to_float(module)
