"""Finding and counting parameters: base versus delta, trainable versus frozen."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from .slot import require_state, slot_sites
from .targeting import base_modules


def tensor_key(path: str, name: str) -> str:
    """The portable name of a delta tensor: its site's module path, then its own name."""
    return f"{path}.{name}" if path else name


def base_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """The model's own parameters, without any delta's."""
    seen: set[int] = set()
    for path, module in base_modules(model):
        for name, param in module.named_parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                yield tensor_key(path, name), param


def delta_parameters(model: nn.Module, name: str) -> Iterator[tuple[str, nn.Parameter]]:
    """The parameters of one delta, under portable names (``<module path>.<tensor>``)."""
    for path, _, slot in slot_sites(model):
        if name in slot:
            for param_name, param in slot[name].named_parameters():
                yield tensor_key(path, param_name), param


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Parameters of the whole model (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for param in model.parameters():
        if id(param) in seen or (trainable_only and not param.requires_grad):
            continue
        seen.add(id(param))
        total += param.numel()
    return total


def set_trainable(model: nn.Module, names: list[str] | tuple[str, ...] | str) -> None:
    """Make exactly the named deltas trainable; the base and every other delta freeze."""
    state = require_state(model)
    wanted = (names,) if isinstance(names, str) else tuple(names)
    for name in wanted:
        state.require(name)
    for _, param in base_parameters(model):
        param.requires_grad_(False)
    for name in state.configs:
        for _, param in delta_parameters(model, name):
            param.requires_grad_(name in wanted)


def parameter_owners(model: nn.Module) -> dict[int, list[str]]:
    """For every base parameter (by ``id``), the names it is reachable under."""
    owners: dict[int, list[str]] = {}
    for module_path, module in base_modules(model):
        for name, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append(tensor_key(module_path, name))
    return owners


def tied_elsewhere(model: nn.Module, path: str, owners: dict[int, list[str]] | None = None) -> dict[str, list[str]]:
    """Parameters of module ``path`` that modules outside it share (tied weights), by name.

    Pass ``owners`` from :func:`parameter_owners` when asking about many modules.
    """
    owners = parameter_owners(model) if owners is None else owners
    inside = path + "." if path else ""
    out = {}
    for key, param in base_parameters(model.get_submodule(path)):
        others = [o for o in owners.get(id(param), []) if path and not o.startswith(inside)]
        if others:
            out[key] = others
    return out
