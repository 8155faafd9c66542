"""Hot swap on a live model: replace a delta's tensors in place, and a bounded cache of loaded deltas.

:func:`replace` copies a saved delta's tensors into the units already on the model when the
saved delta has the live one's config, sites and tensor shapes, so no module is rebuilt and
every reference to the units stays valid; otherwise it deletes the live delta and loads the
saved one. Either way it is atomic: on any error the live delta is left as it was.

:class:`DeltaCache` loads deltas on demand and deletes the least recently used beyond a bound
(a count, bytes, or both), never one that is pinned, active or routed. Its methods hold a
lock, so request handlers on several threads can share one cache.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .core.inject import delete, install, list_deltas, saved_config, set_active
from .core.params import delta_parameters, tensor_key
from .core.slot import get_state, require_state, slot_sites
from .core.unit import DeltaUnit, Placement
from .errors import ConfigError, DeltaStateError
from .io.artifact import Check, check_fingerprint, load, read_meta, read_tensors
from .io.meaning import from_meta, remember, remembered


@dataclass(frozen=True)
class SwapResult:
    """What :func:`replace` did.

    Attributes:
        name: the delta's name on the model.
        in_place: ``True`` when the tensors were copied into the existing units.
        reason: why it deleted and reloaded instead (``None`` when in place).
    """

    name: str
    in_place: bool
    reason: str | None = None


def _live_tensors(model: nn.Module, name: str) -> dict[str, tuple[DeltaUnit, str, torch.Tensor]]:
    """``<site>.<tensor>`` -> (unit, the unit's own tensor name, current value) of delta ``name``."""
    live = {}
    for path, _, slot in slot_sites(model):
        if name in slot:
            unit = slot[name]
            for key, value in unit.saved_tensors().items():
                live[tensor_key(path, key)] = (unit, key, value)
    return live


def _mismatch(model: nn.Module, name: str, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> str | None:
    """Why the saved delta cannot be copied into the live one's units, or ``None`` if it can."""
    state = require_state(model)
    live_config = json.loads(json.dumps(saved_config(model, name).to_dict()))
    if live_config != meta["config"]:
        changed = sorted(k for k in set(live_config) | set(meta["config"]) if live_config.get(k) != meta["config"].get(k))
        return f"the config differs in {changed}"
    if list(state.sites[name]) != list(meta["sites"]) or list(state.saved_modules[name]) != list(meta.get("modules_to_save", [])):
        return "the delta sits on other modules"
    live = _live_tensors(model, name)
    if set(live) != set(tensors):
        return f"the tensors differ: {sorted(set(live) ^ set(tensors))[:3]}"
    for key, (_, _, value) in live.items():
        if tensors[key].shape != value.shape:
            return f"tensor {key!r} has shape {list(tensors[key].shape)}, the live one {list(value.shape)}"
    return None


def _copy_in(live: dict[str, tuple[DeltaUnit, str, torch.Tensor]], tensors: dict[str, torch.Tensor]) -> None:
    by_unit: dict[int, tuple[DeltaUnit, dict[str, torch.Tensor]]] = {}
    for key, (unit, local, value) in live.items():
        by_unit.setdefault(id(unit), (unit, {}))[1][local] = tensors[key].to(device=value.device, dtype=value.dtype)
    for unit, values in by_unit.values():
        unit.load_saved(values)


def replace(model: nn.Module, name: str, directory: str | Path, *, check: Check = "base") -> SwapResult:
    """Swap the saved delta in ``directory`` in for the live delta ``name``.

    In place (same unit objects, no new modules) when config, sites and tensor shapes match;
    otherwise the live delta is deleted and the saved one loaded under ``name``. The active
    set is kept. Files and the base fingerprint are checked before anything changes. The
    delta then means what the new files say (their label names and task).

    Args:
        model: the model holding delta ``name``.
        name: the live delta to replace.
        directory: a folder written by :func:`deltatune.save`.
        check: the base-fingerprint check, as for :func:`deltatune.load`.

    Returns:
        a :class:`SwapResult` saying whether it went in place, and why not.

    Raises:
        DeltaStateError: no delta ``name``, or it is merged into the base.
        DeltaFileError / FingerprintError: the files are bad or belong to another base
            (the live delta is then unchanged).

    Example:
        >>> result = replace(model, "sentiment", "runs/sentiment-v2")
        >>> result.in_place
        True
    """
    state = require_state(model)
    state.require(name)
    if name in state.merged:
        raise DeltaStateError(f"delta {name!r} is merged into the base weights; unmerge(model) before replacing it")
    meta = read_meta(directory)
    tensors = read_tensors(directory, meta)
    check_fingerprint(model, meta, check)
    reason = _mismatch(model, name, meta, tensors)
    if reason is None:
        live = _live_tensors(model, name)
        before = {key: value.clone() for key, (_, _, value) in live.items()}
        try:
            _copy_in(live, tensors)
        except BaseException:
            _copy_in(live, before)
            raise
        state.changed()
        remember(model, name, from_meta(meta))
        return SwapResult(name, True)
    _reload(model, name, directory, check)
    return SwapResult(name, False, reason)


def _reload(model: nn.Module, name: str, directory: str | Path, check: Check) -> None:
    """Delete delta ``name`` and load ``directory`` under its name; on failure put the old units back."""
    state = require_state(model)
    active = state.active
    config = state.configs[name]
    units = [Placement(path, slot[name], type(module).__name__) for path, module, slot in slot_sites(model) if name in slot]
    meaning = remembered(model, name)
    delete(model, name)
    try:
        load(model, directory, name, check=check, activate=False)
    except BaseException:
        install(model, name, config, units, activate=False)
        remember(model, name, meaning)
        set_active(model, active)
        raise
    set_active(model, active)


def delta_bytes(model: nn.Module, name: str) -> int:
    """Memory held by delta ``name``'s parameters, in bytes."""
    return sum(p.numel() * p.element_size() for _, p in delta_parameters(model, name))


@dataclass(frozen=True)
class CacheStats:
    """Counters of a :class:`DeltaCache` and the bytes its deltas hold now."""

    hits: int
    misses: int
    evictions: int
    bytes: int
    deltas: int


class DeltaCache:
    """Deltas loaded on demand onto one model, the least recently used deleted beyond a bound.

    Args:
        model: the live base model.
        max_deltas: at most this many deltas loaded by the cache (``None``: no count bound).
        max_bytes: at most this many bytes of their parameters (``None``: no byte bound).
        check: the base-fingerprint check used when loading.

    Pinned deltas, the active ones and those routed in a mixed batch are never evicted; while
    they alone exceed the bound the cache stays over it, and the next :meth:`get` evicts again.
    Deltas attached to the model by other means are left alone and not counted.

    Example:
        >>> cache = DeltaCache(model, max_deltas=8)
        >>> with dt.using(model, cache.get("spam", "deltas/spam")):
        ...     logits = model(**batch).logits
    """

    def __init__(self, model: nn.Module, max_deltas: int | None = None, max_bytes: int | None = None,
                 *, check: Check = "base") -> None:
        for label, bound in (("max_deltas", max_deltas), ("max_bytes", max_bytes)):
            if bound is not None and (not isinstance(bound, int) or bound < 1):
                raise ConfigError(f"{label} must be a positive integer or None, got {bound!r}")
        self.model, self.max_deltas, self.max_bytes, self.check = model, max_deltas, max_bytes, check
        self._sizes: OrderedDict[str, int] = OrderedDict()  # least recently used first
        self._pinned: set[str] = set()
        self._lock = threading.RLock()
        self._hits = self._misses = self._evictions = 0

    def get(self, name: str, directory: str | Path | None = None) -> str:
        """Delta ``name``, loaded from ``directory`` if not loaded yet; marks it most recently used.

        Returns:
            ``name`` (load does not activate it: use ``dt.using`` or ``delta_ids``).

        Raises:
            DeltaStateError: not loaded and no directory given; a delta of that name was attached
                outside the cache; or the delta alone is larger than ``max_bytes``.
            DeltaFileError / FingerprintError: as for :func:`deltatune.load`.
        """
        with self._lock:
            self._forget_deleted()
            if name in self._sizes:
                self._hits += 1
                self._sizes.move_to_end(name)
                return name
            if name in list_deltas(self.model):
                raise DeltaStateError(f"delta {name!r} was attached to the model outside this cache; delete it first "
                                      f"or load under another name")
            if directory is None:
                raise DeltaStateError(f"delta {name!r} is not loaded; pass the folder to load it from")
            self._misses += 1
            load(self.model, directory, name, check=self.check, activate=False)
            size = delta_bytes(self.model, name)
            if self.max_bytes is not None and size > self.max_bytes:
                delete(self.model, name)
                raise DeltaStateError(f"delta {name!r} holds {size} bytes, more than the cache's max_bytes "
                                      f"{self.max_bytes}; raise max_bytes")
            self._sizes[name] = size
            self._shrink(keep=name)
            return name

    def replace(self, name: str, directory: str | Path) -> SwapResult:
        """:func:`replace` a delta the cache holds, updating its size and marking it used."""
        with self._lock:
            if name not in self._sizes:
                raise DeltaStateError(f"delta {name!r} is not in the cache; get() it first")
            result = replace(self.model, name, directory, check=self.check)
            self._sizes[name] = delta_bytes(self.model, name)
            self._sizes.move_to_end(name)
            self._shrink(keep=name)
            return result

    def pin(self, name: str) -> None:
        """Never evict delta ``name`` (until :meth:`unpin`)."""
        with self._lock:
            if name not in self._sizes:
                raise DeltaStateError(f"delta {name!r} is not in the cache; get() it before pinning")
            self._pinned.add(name)

    def unpin(self, name: str) -> None:
        with self._lock:
            self._pinned.discard(name)
            self._shrink()

    def evict(self, name: str) -> None:
        """Delete delta ``name`` from the model now.

        Raises:
            DeltaStateError: it is not in the cache, or it is pinned, active or routed.
        """
        with self._lock:
            if name not in self._sizes:
                raise DeltaStateError(f"delta {name!r} is not in the cache; loaded: {list(self._sizes)}")
            if name in self._protected():
                raise DeltaStateError(f"delta {name!r} is pinned, active or routed; unpin or deactivate it first")
            self._drop(name)

    def loaded(self) -> list[str]:
        """The cache's deltas, least recently used first."""
        with self._lock:
            self._forget_deleted()
            return list(self._sizes)

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self._hits, self._misses, self._evictions, sum(self._sizes.values()), len(self._sizes))

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._sizes

    def _protected(self) -> set[str]:
        state = get_state(self.model)
        protected = set(self._pinned)
        if state is not None:
            protected.update(state.in_play())
        return protected

    def _over(self) -> bool:
        return ((self.max_deltas is not None and len(self._sizes) > self.max_deltas)
                or (self.max_bytes is not None and sum(self._sizes.values()) > self.max_bytes))

    def _shrink(self, keep: str | None = None) -> None:
        while self._over():
            protected = self._protected()
            victim = next((n for n in self._sizes if n != keep and n not in protected), None)
            if victim is None:
                return
            self._drop(victim)

    def _drop(self, name: str) -> None:
        delete(self.model, name)
        del self._sizes[name]
        self._pinned.discard(name)
        self._evictions += 1

    def _forget_deleted(self) -> None:
        """Stop tracking deltas deleted from the model behind the cache's back."""
        present = set(list_deltas(self.model))
        for name in [n for n in self._sizes if n not in present]:
            del self._sizes[name]
            self._pinned.discard(name)
