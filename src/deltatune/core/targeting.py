"""Choosing the modules a delta adapts: name patterns, module types, layer indices."""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Iterable, Sequence

from torch import nn

from ..errors import TargetError
from .slot import DeltaSlot

_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def pattern_matches(pattern: str, name: str) -> bool:
    """Whether a target pattern selects the module called ``name``.

    ``re:<regex>`` must match the whole name; any other pattern is a glob that may match the
    whole name or any dotted suffix (``"query"`` selects ``"encoder.layer.0.attention.self.query"``).
    """
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)


def layer_index(name: str) -> int | None:
    """The first numeric component of a dotted module name (``h.3.attn`` -> 3), if any."""
    found = _LAYER_INDEX.search(name)
    return int(found.group(1)) if found else None


def is_type(module: nn.Module, type_names: Iterable[str]) -> bool:
    """Whether the module's class, or one of its bases, is named in ``type_names``."""
    wanted = set(type_names)
    return any(cls.__name__ in wanted for cls in type(module).__mro__)


def base_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``named_modules`` without deltatune's own slots and what they hold."""
    out = []
    slot_prefixes: list[str] = []
    for name, module in model.named_modules():
        if any(name == p or name.startswith(p + ".") for p in slot_prefixes):
            continue
        if isinstance(module, DeltaSlot):
            slot_prefixes.append(name)
            continue
        out.append((name, module))
    return out


def _similar_names(pattern: str, names: Sequence[str]) -> list[str]:
    core = pattern[3:] if pattern.startswith("re:") else pattern
    core = re.sub(r"[\\^$*?\[\]()+|{}]", "", core).split(".")[-1] or core
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names if n and not n.rsplit(".", 1)[-1].isdigit()})
    close = difflib.get_close_matches(core, leaves, n=6, cutoff=0.3)
    return close or leaves[:12]


def no_match_message(pattern: str, model: nn.Module, names: Sequence[str], what: str = "target pattern") -> str:
    """An error message for a pattern that selected nothing, with names that do exist."""
    similar = ", ".join(repr(n) for n in _similar_names(pattern, names))
    example = next((n for n in reversed(names) if "." in n), names[-1] if names else "")
    return (
        f"{what} {pattern!r} matched no module of {type(model).__name__}; "
        f"module names ending in {similar} exist (full names look like {example!r}). "
        f"Use a suffix such as 'query', a glob such as '*.attention.*', or 're:<regex>'."
    )


def select_modules(
    model: nn.Module,
    patterns: Sequence[str] | None,
    type_names: Sequence[str] = (),
    layers: Sequence[int] | None = None,
    exclude: Sequence[str] = (),
) -> list[tuple[str, nn.Module]]:
    """Modules of ``model`` selected by patterns AND types AND layers, minus ``exclude``.

    Every pattern in ``patterns`` must match at least one module (before the type, layer and
    exclude filters), or :class:`TargetError` says which one did not and what exists instead.
    With no patterns and no types, nothing is selected.

    Raises:
        TargetError: a pattern matched nothing, or the filters left nothing.
    """
    candidates = base_modules(model)
    names = [n for n, _ in candidates]
    if patterns:
        for pattern in patterns:
            if not any(pattern_matches(pattern, n) for n in names):
                raise TargetError(no_match_message(pattern, model, names))
    elif not type_names:
        return []
    if type_names and not any(is_type(m, type_names) for _, m in candidates):
        present = sorted({type(m).__name__ for _, m in candidates})
        raise TargetError(
            f"target types {list(type_names)} match no module of {type(model).__name__}; "
            f"types present: {', '.join(present)}"
        )
    selected = []
    for name, module in candidates:
        if not name:
            continue
        if patterns and not any(pattern_matches(p, name) for p in patterns):
            continue
        if type_names and not is_type(module, type_names):
            continue
        if layers is not None and layer_index(name) not in set(layers):
            continue
        if any(pattern_matches(p, name) for p in exclude):
            continue
        selected.append((name, module))
    if not selected:
        raise TargetError(
            f"targets {list(patterns or [])} with types {list(type_names)}, layers {layers} and "
            f"exclude {list(exclude)} leave no module of {type(model).__name__} to adapt; "
            f"widen the selection"
        )
    return selected
