"""Arrow routing: each token, at each adapted module, through the LoRAs whose prototype it aligns with.

Ostapenko et al., 2024, "Towards Modular LLMs by Building and Reusing a Library of LoRAs"
(arXiv:2405.11157). At a module where delta ``i`` changes the weight by ``B_i A_i``, its
prototype ``v_i`` is the top right singular vector of ``B_i A_i`` (a direction in the
module's input space; its sign is arbitrary). A token whose input there is ``h`` scores
``|<v_i, h>|`` for every delta; the ``top_k`` best get softmax weights over their scores and
the module's output gains ``sum_i w_i B_i A_i h``.

Which deltas can be routed so is declared by their units: a unit whose
:meth:`~deltatune.core.unit.DeltaUnit.low_rank_update` gives factors takes part in the
per-token mix. A delta's trained module copies (its classifier head, ``modules_to_save``)
cannot be mixed per token; each row runs through the head of the delta it was routed to most,
summed over its tokens and the layers before the head. Any other unit is refused by name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..core.build import first_input
from ..core.plan import Plan
from ..core.rows import Routing, group_by_class, run_mixed_post
from ..core.saved_module import SavedModule
from ..core.slot import DeltaSlot, require_state, slot_sites
from ..errors import DeltaStateError, NotApplicableError


def prototype(B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """The top right singular vector of ``B @ A`` (``B``: ``(out, r)``, ``A``: ``(r, in)``), found
    from the ``r x in`` matrix ``R A`` where ``B = Q R``, never forming ``B @ A``."""
    _, R = torch.linalg.qr(B.float())
    return torch.linalg.svd(R @ A.float(), full_matrices=False).Vh[0]


@dataclass
class _AtSlot:
    """What Arrow needs at one module: the low-rank deltas (positions in the routed names), their
    prototypes and factors; the row-routed units (heads), aligned with the names."""

    positions: torch.Tensor
    prototypes: torch.Tensor  # (n, in)
    factors: list[tuple[torch.Tensor, torch.Tensor]]
    per_row: list


class ArrowRouting(Plan):
    """The plan that routes every token of every batch by Arrow over the deltas ``names``.

    ``votes`` holds, per row, the routing weights summed over the row's tokens (those of
    ``token_mask`` when it is given) and over the modules run so far; :attr:`choice` is each
    row's most-voted delta.
    """

    refuses_routing = ("Arrow routing is in force on this model; per-row delta_ids cannot run inside it: leave the "
                       "route_auto block first")

    def __init__(self, names: Sequence[str], top_k: int = 1, token_mask: torch.Tensor | None = None,
                 trace: bool = False) -> None:
        self.routed = tuple(names)
        self.top_k = top_k
        self.token_mask = token_mask
        self.votes: torch.Tensor | None = None
        #: with ``trace``: each module call's per-row weights ``(batch, len(names))``, in call order
        self.trace: list[torch.Tensor] | None = [] if trace else None

    @property
    def choice(self) -> list[str]:
        """Each row's most-voted delta (after a forward pass)."""
        if self.votes is None:
            raise DeltaStateError("Arrow has routed no tokens yet; run the model on the batch first")
        return [self.routed[i] for i in self.votes.argmax(-1).tolist()]

    def names(self) -> tuple[str, ...]:
        return self.routed

    def resolve(self, slot: DeltaSlot) -> _AtSlot:
        positions, prototypes, factors = [], [], []
        per_row: list = [None] * len(self.routed)
        for position, name in enumerate(self.routed):
            unit = slot._modules.get(name)
            if unit is None:
                continue
            update = unit.low_rank_update()
            if update is not None:
                B, A, _ = update  # B @ A maps the module's input to its output change in either layout
                positions.append(position)
                prototypes.append(prototype(B, A))
                factors.append((A.detach(), B.detach()))
            else:  # check_arrow let only module copies through
                per_row[position] = unit
        stacked = torch.stack(prototypes) if prototypes else torch.empty(0)
        return _AtSlot(torch.tensor(positions, dtype=torch.long), stacked, factors, per_row)

    def forward(self, slot, module, own, args, kwargs):
        at = slot.resolved(self)
        output = own(*args, **kwargs)
        if any(u is not None for u in at.per_row):
            output = self._per_row(at, module, args, kwargs, output)
        if at.factors:
            output = self._mix(at, first_input(args, kwargs), output)
        return output

    def _mix(self, at: _AtSlot, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(x) or not x.is_floating_point():
            raise NotApplicableError("Arrow scores a module's input vectors, but a routed delta adapts a module whose "
                                     "input is not a float tensor (an embedding's token ids); route deltas that adapt "
                                     "linear layers only")
        h = x.to(at.prototypes.dtype)
        scores = (h @ at.prototypes.to(h.device).T).abs()  # (..., n)
        k = min(self.top_k, scores.shape[-1])
        best = scores.topk(k, dim=-1)
        weights = torch.zeros_like(scores).scatter(-1, best.indices, torch.softmax(best.values, dim=-1))
        change = torch.zeros(output.shape, dtype=h.dtype, device=h.device)
        for j, (A, B) in enumerate(at.factors):
            change = change + weights[..., j:j + 1] * ((h @ A.T.to(h.device)) @ B.T.to(h.device))
        self._vote(at.positions, weights)
        return output + change.to(output.dtype)

    def _vote(self, positions: torch.Tensor, weights: torch.Tensor) -> None:
        batch = weights.shape[0] if weights.dim() > 1 else 1
        per_token = weights.reshape(batch, -1, weights.shape[-1]).detach().float()
        mask = self.token_mask
        if mask is not None and tuple(mask.shape) == tuple(per_token.shape[:2]):
            mask = mask.to(per_token.device, per_token.dtype).unsqueeze(-1)
            per_row = (per_token * mask).sum(1) / mask.sum(1).clamp(min=1)
        else:
            per_row = per_token.mean(1)
        if self.votes is None or self.votes.shape[0] != batch:
            self.votes = torch.zeros(batch, len(self.routed), device=per_row.device)
        share = torch.zeros_like(self.votes)
        share[:, positions.to(per_row.device)] = per_row
        self.votes += share
        if self.trace is not None:
            self.trace.append(share)

    def _per_row(self, at: _AtSlot, module: nn.Module, args: tuple, kwargs: dict, output):
        if self.votes is None:
            raise DeltaStateError(f"{type(module).__name__} carries the routed deltas' own copies (their heads), which "
                                  f"Arrow assigns per row from the routing at the layers before; this one runs before "
                                  f"any routed layer, so Arrow cannot choose its copy")
        routing = Routing(self.routed, self.votes.argmax(-1).cpu())
        return run_mixed_post(group_by_class(at.per_row), module, args, kwargs, output, routing)


def check_arrow(model: nn.Module, names: Sequence[str]) -> None:
    """Refuse, by delta and method, deltas whose change is not low-rank at every module.

    Raises:
        NotApplicableError: a delta with a unit that gives no low-rank factors (and is not a
            trained module copy such as its head), or one that acts nowhere Arrow can route.
    """
    state = require_state(model)
    routable = dict.fromkeys(names, False)
    for _, _, slot in slot_sites(model):
        for name in names:
            unit = slot._modules.get(name)
            if unit is None or isinstance(unit, SavedModule):
                continue
            if unit.low_rank_update() is None:
                method = state.configs[name].method
                raise NotApplicableError(
                    f"Arrow routes deltas whose change at every module is a low-rank product B @ A; delta {name!r} "
                    f"({method}, {type(unit).__name__}) is not one; leave it out of the routed deltas, or use "
                    f"router='centroid', which routes whole rows to any delta")
            routable[name] = True
    idle = [name for name, found in routable.items() if not found]
    if idle:
        raise NotApplicableError(f"delta {idle[0]!r} has no low-rank change at any module, so Arrow has nothing to "
                                 f"route to it; use router='centroid' for it")


@contextlib.contextmanager
def arrow(model: nn.Module, names: Sequence[str], top_k: int = 1, token_mask: torch.Tensor | None = None,
          trace: bool = False) -> Iterator[ArrowRouting]:
    """Route every token through the deltas ``names`` by Arrow inside the block (``trace``: keep
    each module's per-row routing weights in ``plan.trace``).

    Example:
        >>> with arrow(model, ["sentiment", "spam", "topic"], top_k=2, token_mask=batch["attention_mask"]) as plan:
        ...     logits = model(**batch).logits
        >>> plan.choice     # each row's most-voted delta
    """
    if not names:
        raise DeltaStateError("Arrow needs at least one delta to route to")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise DeltaStateError(f"Arrow's top_k must be a positive integer, got {top_k!r}")
    state = require_state(model)
    for name in names:
        state.require(name)
    merged = [name for name in names if name in state.merged]
    if merged:
        raise DeltaStateError(f"delta {merged[0]!r} is merged into the base weights; unmerge(model) before routing")
    if state.override is not None and state.override.refuses_routing:
        raise DeltaStateError(state.override.refuses_routing)
    check_arrow(model, names)
    plan = ArrowRouting(names, top_k, token_mask, trace)
    previous = state.override
    state.set_override(plan)
    try:
        yield plan
    finally:
        state.set_override(previous)
