"""ReFT's units: the low-rank edit of hidden states at chosen token positions, and the
recorder of each call's attention mask, from which the edits learn which positions hold
real tokens."""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch import nn

from ...core.rows import as_rows, gathered
from ...core.slot import get_slot
from ...core.unit import DeltaUnit
from ...errors import DeltaStateError


def orthonormal_rows(vectors: torch.Tensor) -> torch.Tensor:
    """``R`` (r, d) with orthonormal rows, from ``r`` Householder vectors stored as ``(d, r)``.

    ``R^T`` is the first ``r`` columns of ``H_1 ... H_r`` with ``H_i = I - tau_i v_i v_i^T``,
    ``v_i = e_i +`` (column ``i`` below its diagonal) and ``tau_i = 2 / |v_i|^2``: each ``H_i``
    is an exact reflection, so ``R R^T = I`` for any value of ``vectors`` (the map torch's
    ``parametrizations.orthogonal`` uses for non-square matrices, without its stored base).
    """
    lower = vectors.tril(-1)
    tau = 2.0 / (1.0 + lower.pow(2).sum(0))
    return torch.linalg.householder_product(lower, tau).mT


class LoreftEdit(nn.Module):
    """``h -> R^T (W h + b - R h)``: ``R`` (r, d) with orthonormal rows, ``W`` (r, d), ``b`` (r).

    At initialisation ``R`` is a random orthonormal projection and ``W = R``, ``b = 0``, so
    the edit is zero.
    """

    def __init__(self, width: int, r: int) -> None:
        super().__init__()
        self.householder = nn.Parameter(torch.randn(width, r))
        with torch.no_grad():
            start = orthonormal_rows(self.householder)
        self.weight = nn.Parameter(start.clone())
        self.bias = nn.Parameter(torch.zeros(r))

    @property
    def rotation(self) -> torch.Tensor:
        """``R``: (r, d), orthonormal rows."""
        return orthonormal_rows(self.householder)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(up, down, bias)`` with edit ``up^T (down h + bias)``: ``(R, W - R, b)``."""
        rotation = self.rotation
        return rotation, self.weight - rotation, self.bias


class DireftEdit(nn.Module):
    """``h -> W2^T (W1 h + b)``: ``W1``, ``W2`` (r, d), ``b`` (r), no orthogonality.

    At initialisation ``W2`` has random orthonormal rows (pyreft's start) and ``W1 = 0``,
    ``b = 0``, so the edit is zero.
    """

    def __init__(self, width: int, r: int) -> None:
        super().__init__()
        self.up = nn.Parameter(nn.init.orthogonal_(torch.empty(r, width)))
        self.down = nn.Parameter(torch.zeros(r, width))
        self.bias = nn.Parameter(torch.zeros(r))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.up, self.down, self.bias


EDITS = {"loreft": LoreftEdit, "direft": DireftEdit}

_PARAMETERS: dict[type, list[str]] = {}


def call_argument(module: nn.Module, args: tuple, kwargs: dict, name: str) -> Any:
    """The argument ``name`` of a call of ``module`` (keyword or positional), else ``None``."""
    if name in kwargs:
        return kwargs[name]
    cls = type(module)
    if cls not in _PARAMETERS:
        try:
            _PARAMETERS[cls] = list(inspect.signature(cls.forward).parameters)[1:]
        except (TypeError, ValueError):
            _PARAMETERS[cls] = []
    names = _PARAMETERS[cls]
    index = names.index(name) if name in names else len(args)
    return args[index] if index < len(args) else None


def _cached_length(cache: Any) -> int:
    """Tokens already in a key/value cache (``past_key_values``), 0 for none."""
    if cache is None:
        return 0
    length = getattr(cache, "get_seq_length", None)
    if callable(length):
        return int(length())
    try:  # legacy tuples: per layer (key, value) of (batch, heads, tokens, head_dim)
        return int(cache[0][0].shape[-2])
    except (TypeError, IndexError, AttributeError, KeyError):
        return 0


class TokenMask:
    """The attention masks of the calls in progress, for the edits of one delta.

    While a source module runs (the model, or an encoder-decoder's encoder or decoder), it holds
    that call's 2-D ``attention_mask`` and the length of its key/value cache: a forward
    pre-hook on the source records them and a forward hook that always runs (errors included)
    drops them, so they live exactly as long as the call. The hooks are installed when the
    delta's first edit is attached and removed when its last one is detached.
    """

    def __init__(self, sources: list[str]) -> None:
        self.sources = list(sources)
        self._calls: dict[str, list[tuple[torch.Tensor | None, int]]] = {s: [] for s in self.sources}
        self._handles: list[Any] = []
        self._users = 0

    def current(self, source: str) -> tuple[torch.Tensor | None, int] | None:
        """``(mask or None, cached tokens)`` of the call of ``source`` in progress, else ``None``."""
        calls = self._calls[source]
        return calls[-1] if calls else None

    def _record(self, source: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = call_argument(module, args, kwargs, "attention_mask")
        mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        cached = _cached_length(call_argument(module, args, kwargs, "past_key_values"))
        self._calls[source].append((mask, cached))

    def _drop(self, source: str, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._calls[source]:
            self._calls[source].pop()

    def attach(self, model: nn.Module) -> None:
        self._users += 1
        if self._users > 1:
            return
        for source in self.sources:
            part = model.get_submodule(source)
            self._handles += [
                part.register_forward_pre_hook(functools.partial(self._record, source), with_kwargs=True),
                part.register_forward_hook(functools.partial(self._drop, source), with_kwargs=True, always_call=True),
            ]

    def detach(self) -> None:
        self._users -= 1
        if self._users == 0:
            for handle in self._handles:
                handle.remove()
            self._handles = []


def select_positions(real: torch.Tensor, prefix: torch.Tensor, suffix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``prefix`` and the last ``suffix`` real tokens of each row, each ``(batch, tokens)`` bool.

    ``real`` (batch, tokens) marks real tokens; ``prefix`` / ``suffix`` (batch,) are the counts
    asked per row. In a row of fewer than ``prefix + suffix`` real tokens the two sets overlap.
    """
    count = real.sum(1, keepdim=True)
    rank = real.long().cumsum(1) - 1  # a real token's index among the row's real tokens
    return real & (rank < prefix.unsqueeze(1)), real & (rank >= count - suffix.unsqueeze(1))


class ReftIntervention(DeltaUnit):
    """``h + edit(h)`` at the first ``prefix_positions`` and last ``suffix_positions`` real
    tokens of each row of a module's output (a block's hidden states).

    ``edits`` holds one edit (tied weights, or only one kind of position) or two (prefix,
    suffix). The positions come from the attention mask its delta's :class:`TokenMask` holds, so
    a padded row (left or right) is edited exactly as the same row alone.
    """

    def __init__(self, width: int, r: int, variant: str, prefix_positions: int, suffix_positions: int,
                 tied_weights: bool, tokens: TokenMask, source: str, where: str) -> None:
        super().__init__()
        self.width, self.where, self.source = width, where, source
        self.prefix_positions, self.suffix_positions = prefix_positions, suffix_positions
        count = 1 if tied_weights or not (prefix_positions and suffix_positions) else 2
        self.edits = nn.ModuleList(EDITS[variant](width, r) for _ in range(count))
        self.tokens = tokens

    def edit_factors(self, kind: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(up, down, bias)`` of the prefix (``kind`` 0) or suffix (1) edit."""
        return self.edits[min(kind, len(self.edits) - 1)].factors()

    def real_tokens(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """``(batch, tokens)`` bool marking real tokens of ``hidden`` (batch, tokens, width), or
        ``None`` when this call continues a key/value cache (generation edits the prompt only).
        A module output without a token axis (batch, width) is one real token per row."""
        batch, length = hidden.shape[0], hidden.shape[1] if hidden.dim() > 2 else 1
        if hidden.dim() == 2:
            return hidden.new_ones(batch, 1, dtype=torch.bool)
        call = self.tokens.current(self.source)
        mask, cached = call if call is not None else (None, 0)
        if mask is None:
            return None if cached else hidden.new_ones(batch, length, dtype=torch.bool)
        if mask.shape[1] > length:  # the mask covers cached tokens too: a later step of generation
            return None
        if mask.shape != (batch, length):
            raise DeltaStateError(
                f"reft at {self.where!r}: the attention mask of the call has shape {tuple(mask.shape)} but the "
                f"hidden states have {batch} rows of {length} tokens; reft needs one mask entry per token"
            )
        return mask.to(hidden.device) != 0

    def attached(self, module: nn.Module, model: nn.Module) -> None:
        self.tokens.attach(model)

    def detached(self, module: nn.Module, model: nn.Module) -> None:
        self.tokens.detach()

    def forward_post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        hidden = _hidden(output)
        rows = self._rows(hidden)
        real = self.real_tokens(hidden)
        if real is None:
            return output
        batch = rows.shape[0]
        counts = (torch.full((batch,), self.prefix_positions, device=real.device),
                  torch.full((batch,), self.suffix_positions, device=real.device))
        selected = select_positions(real, *counts)
        x = rows.to(self.edits[0].bias.dtype)
        change = None
        kinds = [(0, selected[0] | selected[1])] if len(self.edits) == 1 else [(0, selected[0]), (1, selected[1])]
        for kind, where in kinds:
            up, down, bias = self.edit_factors(kind)
            term = ((x @ down.T + bias) @ up) * where.unsqueeze(-1).to(x.dtype)
            change = term if change is None else change + term
        return _with_hidden(output, (rows + change.to(rows.dtype)).view(hidden.shape))

    def _rows(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` as (batch, tokens, width); a (batch, width) output is one token per row."""
        if not isinstance(hidden, torch.Tensor) or hidden.dim() not in (2, 3) or hidden.shape[-1] != self.width:
            shape = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
            raise DeltaStateError(f"reft at {self.where!r} edits (batch, tokens, {self.width}) or (batch, {self.width}) "
                                  f"hidden states, but the module returned {shape}")
        return hidden.unsqueeze(1) if hidden.dim() == 2 else hidden

    @classmethod
    def mixed_post(cls, units, module, args, kwargs, output, routing):
        """Each row with its own delta's edits: the edits' factors gathered per row (ranks
        padded with zeros, zeros for the base) and applied with batched products."""
        present = [u for u in units if u is not None]
        hidden = _hidden(output)
        rows = as_rows(present[0]._rows(hidden), routing.index.numel())
        real = present[0].real_tokens(hidden)
        if real is None:
            return output
        index = routing.index.to(real.device)

        def count(attribute: str) -> torch.Tensor:
            asked = [getattr(u, attribute) if u is not None else 0 for u in units] + [0]
            return torch.tensor(asked, device=real.device)[index]

        first, last = select_positions(real, count("prefix_positions"), count("suffix_positions"))
        single = torch.tensor([u is not None and len(u.edits) == 1 for u in units] + [False], device=real.device)
        single = single[index].unsqueeze(1)  # rows whose delta has one edit: it acts once on both sets
        selected = (torch.where(single, first | last, first), last & ~single)
        cache = get_slot(module).mixed_cache
        x = rows.to(present[0].edits[0].bias.dtype)
        result = x
        factors: dict[tuple[int, int], tuple] = {}  # each unit's factors formed once per call (R is a product)

        def factor(unit: ReftIntervention, kind: int, i: int) -> torch.Tensor:
            if (id(unit), kind) not in factors:
                factors[(id(unit), kind)] = unit.edit_factors(kind)
            return factors[(id(unit), kind)][i]

        for kind in (0, 1):
            parts = [gathered(units, routing.index, lambda u, k=kind, i=i: factor(u, k, i), 0.0, cache, f"{kind}.{i}")
                     for i in range(3)]
            up, down, bias = parts  # (batch, r, d), (batch, r, d), (batch, r)
            term = torch.bmm(torch.baddbmm(bias.unsqueeze(1), x, down.mT), up)
            result = result + term * selected[kind].unsqueeze(-1).to(x.dtype)
        return _with_hidden(output, result.to(rows.dtype).view(hidden.shape))


def _hidden(output: Any) -> Any:
    """The hidden states in a module's output: the output, or a tuple's first element."""
    return output[0] if isinstance(output, tuple) else output


def _with_hidden(output: Any, hidden: torch.Tensor) -> Any:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

