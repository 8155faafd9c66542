"""Low-rank weight changes built from tensors that several layers share.

Tied-LoRA and MSPLoRA (which imports this module) share factors across the layers of one
*kind*: the adapted modules with the same role (``core.roles``: ``q``, ``v``, ``ffn_down``,
...) and the same shape, or the same shape alone where a module has no role. The shared
tensors live in one :class:`SharedTable` unit on the model itself (path ``""``), one per
delta, so two deltas never share anything; each adapted module gets a
:class:`SharedLowRankLinear` unit that holds its own tensors and refers to the table's.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ...core.build import first_input
from ...core.roles import ROLES, find_roles
from ...core.rows import as_rows, gathered
from ...core.unit import DeltaUnit
from ...core.weight_delta import WeightDelta


class ModuleKinds:
    """The kind (role and shape) and the layer number of each linear module of a model.

    The layer number is the position of the module's transformer block in the model (the
    blocks of an encoder, then those of a decoder); a module outside the blocks is numbered
    by its order among the modules of its kind seen so far.
    """

    def __init__(self, model: nn.Module):
        found = find_roles(model)
        self._role: dict[str, str] = {}
        for role in ROLES:  # a path has one role; the first in ROLES' order wins
            for path in found.roles.get(role, ()):
                self._role.setdefault(path, role)
        self._block = {block: i for i, block in enumerate(found.blocks)}
        self._block_of = found.block_of
        self._seen: dict[str, int] = defaultdict(int)

    def kind(self, path: str, fan_in: int, fan_out: int) -> str:
        """``"<role>_<in>x<out>"`` (``"linear_<in>x<out>"`` without a role): a valid tensor-name part."""
        return f"{self._role.get(path, 'linear')}_{fan_in}x{fan_out}"

    def layer(self, path: str, kind: str) -> int:
        """The layer number of module ``path`` (call once per module, in model order)."""
        block = self._block_of.get(path)
        seen = self._seen[kind]
        self._seen[kind] += 1
        return self._block[block] if block is not None else seen


class LowRankFactors(nn.Module):
    """A pair ``A: (r, in)``, ``B: (out, r)``; a factor that does not train is a buffer
    (frozen, and saved with the delta like the trained ones).

    ``A`` starts as LoRA's (Kaiming-uniform); ``B`` starts at zero, or Kaiming-uniform when
    ``zero_B`` is false (a frozen random ``B``, whose layer scaling starts at zero instead).
    """

    def __init__(self, fan_in: int, fan_out: int, rank: int, *, train_A: bool = True, train_B: bool = True,
                 zero_B: bool = True):
        super().__init__()
        A = torch.empty(rank, fan_in)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        B = torch.zeros(fan_out, rank)
        if not zero_B:
            nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        self._hold("A", A, train_A)
        self._hold("B", B, train_B)

    def _hold(self, name: str, value: torch.Tensor, trainable: bool) -> None:
        if trainable:
            self.register_parameter(name, nn.Parameter(value))
        else:
            self.register_buffer(name, value)

    def extra_repr(self) -> str:
        return f"in={self.A.shape[1]}, out={self.B.shape[0]}, r={self.A.shape[0]}"


class SharedTable(DeltaUnit):
    """One delta's shared tensors, installed on the model itself (path ``""``): named groups
    (:class:`LowRankFactors`) that the delta's per-module units refer to. It changes no output
    and no weight itself; frozen factors (buffers) are saved with the trained ones."""

    def __init__(self) -> None:
        super().__init__()
        self.groups = nn.ModuleDict()

    def group(self, key: str, make: Callable[[], nn.Module]) -> nn.Module:
        """The group called ``key``, made by ``make()`` on first use."""
        if key not in self.groups:
            self.groups[key] = make()
        return self.groups[key]

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        return {name: t.detach() for name, t in (*self.named_parameters(), *self.named_buffers())}

    def load_saved(self, tensors: dict[str, torch.Tensor]) -> None:
        own = {**dict(self.named_parameters()), **dict(self.named_buffers())}
        with torch.no_grad():
            for name, value in tensors.items():
                own[name].copy_(value)

    def merge_params(self, module, params):
        return {}  # the per-module units carry the weight changes

    def fingerprint_module(self, module, model):
        return None  # the adapted modules carry the base's identity


class SharedLowRankLinear(WeightDelta):
    """A linear module's change ``dW = B A`` (scaling folded into ``B``), where ``B`` and ``A``
    are built by :meth:`factors` from tensors shared with other layers and the unit's own.

    Unmerged it runs as two thin products (``dW`` is never formed); merging and task vectors
    use the same factors.
    """

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, A)``: ``(out, k)`` and ``(k, in)`` with ``dW = B @ A`` (gradients flow)."""
        raise NotImplementedError

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        B, A = self.factors()
        return B @ A

    def forward_post(self, module, args, kwargs, output):
        B, A = self.factors()
        x = first_input(args, kwargs)
        return output + F.linear(F.linear(x.to(A.dtype), A), B).to(output.dtype)

    def low_rank_update(self):
        B, A = self.factors()
        return B.detach(), A.detach(), self.transposed

    @classmethod
    def mixed_post(cls, units, module, args, kwargs, output, routing):
        """Each row through its own delta's factors: two batched products over the per-row
        gathered ``A^T`` and ``B^T`` (ranks padded with zeros; base rows get zeros). Not cached:
        the factors depend on the shared tensors, which the stacking cache does not watch."""
        batch = routing.index.numel()
        pairs = {id(u): u.factors() for u in units if u is not None}
        A_t = gathered(units, routing.index, lambda u: pairs[id(u)][1].T, 0.0)  # (batch, in, k)
        B_t = gathered(units, routing.index, lambda u: pairs[id(u)][0].T, 0.0)  # (batch, k, out)
        x = as_rows(first_input(args, kwargs), batch).to(A_t.dtype)
        result = torch.baddbmm(as_rows(output, batch).to(A_t.dtype), torch.bmm(x, A_t), B_t)
        return result.view(output.shape).to(output.dtype)
