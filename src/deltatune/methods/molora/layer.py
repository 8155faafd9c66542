"""The mixture-of-LoRA-experts unit for linear layers (``nn.Linear``, GPT-2 ``Conv1D``) and its
routing functions: top-k choice, SiRA's capacity limit and the load-balancing loss."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...core.build import first_input
from ...core.unit import DeltaUnit
from ...errors import MergeError
from .config import MoLoRAConfig

#: why a molora delta has no weight form (merge, fold, task vectors)
NOT_A_WEIGHT_CHANGE = ("a molora delta changes activations, not weights: its router picks experts per token from the "
                       "input, so no single weight change equals it; it cannot be merged, folded or turned into a task "
                       "vector (keep it unmerged)")


def top_k_routing(logits: torch.Tensor, top_k: int, renormalize: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each token's ``top_k`` experts from its router logits ``(tokens, E)``.

    Returns:
        ``(probs, chosen, gates)``: the softmax over all experts ``(tokens, E)``; the chosen
        experts ``(tokens, top_k)``, most probable first (ties as ``torch.topk`` breaks them);
        their probabilities ``(tokens, top_k)``, renormalised to sum to one over the chosen
        unless ``renormalize`` is false.
    """
    probs = logits.softmax(dim=-1)
    top, chosen = probs.topk(top_k, dim=-1)
    return probs, chosen, top / top.sum(dim=-1, keepdim=True) if renormalize else top


def expert_capacity(tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """SiRA's limit: the most tokens one expert takes in a forward pass of ``tokens`` tokens."""
    return math.ceil(capacity_factor * tokens * top_k / num_experts)


def capacity_keep(chosen: torch.Tensor, num_experts: int, capacity_factor: float) -> torch.Tensor:
    """Which routed (token, slot) pairs an expert keeps under the capacity limit ``(tokens, top_k)``.

    Pairs queue for their expert slot by slot (every token's first choice before any second
    choice), tokens in order within a slot; an expert keeps the first
    :func:`expert_capacity` pairs of its queue and drops the rest.
    """
    tokens, top_k = chosen.shape
    capacity = expert_capacity(tokens, top_k, num_experts, capacity_factor)
    queue = F.one_hot(chosen.T.reshape(-1), num_experts)  # (top_k * tokens, E), slot-major
    place = (queue.cumsum(dim=0) * queue).sum(dim=-1)  # 1-based place in its expert's queue
    return (place <= capacity).view(top_k, tokens).T


def balancing_loss(probs: torch.Tensor, chosen: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch / Mixtral load balancing: ``E * sum_e f_e * P_e``, with ``f_e`` the share of the
    routed (token, slot) pairs that chose expert ``e`` (before any capacity drop) and ``P_e`` the
    mean router probability of ``e`` over the tokens. 1 when both are uniform."""
    share = torch.bincount(chosen.reshape(-1), minlength=num_experts).to(probs.dtype) / chosen.numel()
    return num_experts * (share * probs.mean(dim=0)).sum()


class MoLoRALinear(DeltaUnit):
    """``y = W x + b + s * sum_{e in topk(x)} g_e(x) B_e A_e dropout(x)`` with ``s = alpha / r``,
    router ``R: (E, in)``, ``A: (E, r, in)``, ``B: (E, out, r)`` (zero at start).

    While training, each forward pass keeps its load-balancing loss (:attr:`aux_loss`, taken by
    the method's loss term) and adds its routing to the expert-load counters (:meth:`load`).
    """

    def __init__(self, in_features: int, out_features: int, num_experts: int, config: MoLoRAConfig,
                 fan_in_fan_out: bool = False):
        super().__init__()
        self.num_experts, self.rank, self.top_k = num_experts, config.r, config.top_k
        self.renormalize = config.renormalize
        self.scaling = config.scaling
        self.capacity_factor = config.capacity_factor
        self.fan_in_fan_out = fan_in_fan_out
        self.router = nn.Parameter(torch.empty(num_experts, in_features))
        self.lora_A = nn.Parameter(torch.empty(num_experts, config.r, in_features))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, out_features, config.r))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        nn.init.kaiming_uniform_(self.router, a=math.sqrt(5))  # as nn.Linear: logits of order one
        for expert in self.lora_A.data:
            nn.init.kaiming_uniform_(expert, a=math.sqrt(5))  # each expert as a LoRA A
        #: the load-balancing loss of the last training forward pass (``None`` once taken)
        self.aux_loss: torch.Tensor | None = None
        self._routed: torch.Tensor | None = None  # (E,) tokens routed to each expert while training
        self._dropped: torch.Tensor | None = None  # () routed pairs dropped by the capacity limit
        self._tokens = 0

    def gate_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Each token's weight on each expert ``(tokens, E)``: its (renormalised) router
        probability for a chosen expert it keeps, zero elsewhere. ``x``: ``(tokens, in)``."""
        probs, chosen, gates = top_k_routing(F.linear(x, self.router), self.top_k, self.renormalize)
        keep = None
        if self.capacity_factor is not None:
            keep = capacity_keep(chosen, self.num_experts, self.capacity_factor)
            gates = gates * keep
        if self.training:
            self._record(probs, chosen, keep)
        return torch.zeros_like(probs).scatter(1, chosen, gates)

    def _record(self, probs: torch.Tensor, chosen: torch.Tensor, keep: torch.Tensor | None) -> None:
        self.aux_loss = balancing_loss(probs, chosen, self.num_experts)
        with torch.no_grad():
            routed = torch.bincount(chosen.reshape(-1), minlength=self.num_experts)
            dropped = (~keep).sum() if keep is not None else routed.new_zeros(())
            if self._routed is not None:
                routed, dropped = routed + self._routed.to(routed.device), dropped + self._dropped.to(routed.device)
            self._routed, self._dropped = routed, dropped
            self._tokens += chosen.shape[0]

    def load(self) -> dict:
        """The expert load of the training forward passes so far: ``tokens`` routed, ``load``
        (per expert, the fraction of those tokens that chose it; it sums to ``top_k``) and,
        with a capacity limit, ``dropped`` (the fraction of routed pairs over the limit)."""
        routed = self._routed.tolist() if self._routed is not None else [0] * self.num_experts
        out = {"tokens": self._tokens, "load": [round(n / max(1, self._tokens), 6) for n in routed]}
        if self.capacity_factor is not None:
            dropped = int(self._dropped) if self._dropped is not None else 0
            out["dropped"] = round(dropped / max(1, self._tokens * self.top_k), 6)
        return out

    def expert_update(self, x: torch.Tensor) -> torch.Tensor:
        """``s * sum_e w_e(x) B_e A_e x`` for ``x`` ``(..., in)``: one rank-``E r`` product whose
        hidden units are scaled by their expert's gate weight (zero for experts not used)."""
        flat = x.reshape(-1, x.shape[-1]).to(self.lora_A.dtype)
        weights = self.gate_weights(flat)
        experts, rank, fan_in = self.lora_A.shape
        dropped = flat if self.dropout is None else self.dropout(flat)
        hidden = F.linear(dropped, self.lora_A.reshape(experts * rank, fan_in)).view(-1, experts, rank)
        hidden = (hidden * weights.unsqueeze(-1)).reshape(-1, experts * rank)
        up = self.lora_B.permute(1, 0, 2).reshape(-1, experts * rank)  # (out, E r): [B_1 ... B_E]
        return (F.linear(hidden, up) * self.scaling).view(*x.shape[:-1], -1)

    def forward_post(self, module, args, kwargs, output):
        return output + self.expert_update(first_input(args, kwargs)).to(output.dtype)

    def merge_params(self, module, params):
        raise MergeError(NOT_A_WEIGHT_CHANGE)
