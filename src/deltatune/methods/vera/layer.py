"""VeRA's units: the shared frozen projections (one unit on the model) and the per-layer
scaling vectors (one unit per adapted Linear / GPT-2 ``Conv1D``)."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ...core.build import first_input
from ...core.config import DeltaConfig, check
from ...core.rows import as_rows, gathered, per_delta_post
from ...core.slot import get_slot
from ...core.unit import DeltaUnit
from ...core.weight_delta import WeightDelta


@dataclass(frozen=True)
class VeRAConfig(DeltaConfig):
    """VeRA on linear layers: ``dW = diag(b) B diag(d) A`` with ``A``, ``B`` frozen and shared.

    Args:
        r: rows of the shared ``A`` (columns of ``B``); VeRA trains only ``r + out`` numbers
            per layer, so it takes far larger values than a LoRA rank (the paper uses 256-1024).
        projection_prng_key: seed of the generator that draws ``A`` and ``B`` (Kaiming
            uniform, ``A`` first), as peft's ``projection_prng_key``.
        save_projection: store ``A`` and ``B`` in the saved delta; ``False`` stores only the
            seed and draws them again on load (smaller files; exact on the same torch).
        dropout: dropout on the VeRA branch's input during training (peft's ``vera_dropout``).
        d_initial: the starting value of every entry of ``d`` (``b`` starts at zero).
    """

    method = "vera"

    r: int = field(default=256, metadata={"aliases": ("rank",)})
    projection_prng_key: int = 0
    save_projection: bool = True
    dropout: float = 0.0
    d_initial: float = 0.1

    def validate(self) -> None:
        check(isinstance(self.r, int) and self.r > 0, f"VeRA r must be a positive integer, got {self.r!r}")
        check(0 <= self.projection_prng_key < 2 ** 63,
              f"VeRA projection_prng_key must be an integer in [0, 2**63), got {self.projection_prng_key!r}")
        check(0.0 <= self.dropout < 1.0, f"VeRA dropout must be in [0, 1), got {self.dropout!r}")
        check(math.isfinite(self.d_initial), f"VeRA d_initial must be a finite number, got {self.d_initial!r}")


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Kaiming-uniform values (fan in: ``shape[1]``, gain ``sqrt(2)``) drawn from ``generator``."""
    bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(shape[1]))
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def draw_projections(r: int, max_in: int, max_out: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``A: (r, max_in)`` then ``B: (max_out, r)`` from a CPU generator seeded with ``seed``."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    vera_A = _kaiming_uniform((r, max_in), generator)
    vera_B = _kaiming_uniform((max_out, r), generator)
    return vera_A, vera_B


class VeRAProjections(DeltaUnit):
    """The frozen ``A: (r, max_in)`` and ``B: (max_out, r)`` one VeRA delta shares across its
    layers (installed on the model itself); each layer uses ``A[:, :in]`` and ``B[:out, :]``."""

    def __init__(self, r: int, max_in: int, max_out: int, config: VeRAConfig):
        super().__init__()
        self.save_projection = config.save_projection
        vera_A, vera_B = draw_projections(r, max_in, max_out, config.projection_prng_key)
        self.register_buffer("vera_A", vera_A)
        self.register_buffer("vera_B", vera_B)
        #: (versions, device, digest) of the projections' values, see :meth:`digest`
        self._digest: tuple | None = None

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        if not self.save_projection:
            return {}  # drawn again from projection_prng_key on load
        return {"vera_A": self.vera_A.detach(), "vera_B": self.vera_B.detach()}

    def load_saved(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, value in tensors.items():
                getattr(self, name).copy_(value)

    def digest(self) -> str:
        """A hash of the projections' values: equal digests let deltas share one batched kernel."""
        key = (self.vera_A._version, self.vera_B._version, self.vera_A.data_ptr(), self.vera_B.data_ptr())
        if self._digest is None or self._digest[0] != key:
            hasher = hashlib.sha256()
            for tensor in (self.vera_A, self.vera_B):
                hasher.update(repr((tuple(tensor.shape), tensor.dtype)).encode())
                hasher.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
            self._digest = (key, hasher.hexdigest())
        return self._digest[1]

    def merge_params(self, module, params):
        return {}  # the model's own weights are changed by the per-layer units

    def fingerprint_module(self, module, model):
        return None  # the adapted layers carry the base's identity

    @classmethod
    def mixed_post(cls, units, module, args, kwargs, output, routing):
        return output  # holds tensors only; the model's output is not changed here

    def extra_repr(self) -> str:
        return f"A={tuple(self.vera_A.shape)}, B={tuple(self.vera_B.shape)}"


class VeRALinear(WeightDelta):
    """``y = W x + b_0 + diag(b) B diag(d) A dropout(x)`` (Kopiczko et al., 2023) with ``A``
    and ``B`` sliced from the delta's :class:`VeRAProjections`; ``d`` starts at
    ``d_initial``, ``b`` at zero."""

    def __init__(self, fan_in: int, fan_out: int, config: VeRAConfig, transposed: bool = False):
        super().__init__(fan_in, fan_out, transposed)
        self.r = config.r
        self.vera_lambda_b = nn.Parameter(torch.zeros(fan_out))
        self.vera_lambda_d = nn.Parameter(torch.full((config.r,), float(config.d_initial)))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        # a plain tuple, so the shared unit is not registered as a child (its tensors belong
        # to the unit at the model) and a deep copy of the model keeps the sharing
        self._shared: tuple[VeRAProjections, ...] = ()

    def share(self, projections: VeRAProjections) -> None:
        """Use ``projections`` (the delta's shared unit) for ``A`` and ``B``."""
        self._shared = (projections,)

    @property
    def projections(self) -> VeRAProjections:
        return self._shared[0]

    def sliced(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's ``A: (r, in)`` and ``B: (out, r)``."""
        shared = self.projections
        return shared.vera_A[:, :self.fan_in], shared.vera_B[:self.fan_out, :]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(diag(b) B, diag(d) A)``: the update as a low-rank product."""
        vera_A, vera_B = self.sliced()
        return self.vera_lambda_b.unsqueeze(1) * vera_B, self.vera_lambda_d.unsqueeze(1) * vera_A

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        left, right = self.factors()
        return (left @ right).float()

    def forward_post(self, module, args, kwargs, output):
        x = first_input(args, kwargs).to(self.vera_lambda_d.dtype)
        if self.dropout is not None:
            x = self.dropout(x)
        vera_A, vera_B = self.sliced()
        hidden = F.linear(x, vera_A) * self.vera_lambda_d
        return output + (F.linear(hidden, vera_B) * self.vera_lambda_b).to(output.dtype)

    @classmethod
    def mixed_post(cls, units, module, args, kwargs, output, routing):
        """One batched kernel when every routed delta has the same projections: ``x A^T`` once
        for the whole batch, then each row's own ``d`` and ``b`` (zeros for the base's rows);
        deltas with different projections, or dropout while training, run per delta."""
        present = [u for u in units if u is not None]
        dropping = present[0].training and any(u.dropout is not None for u in present)
        if dropping or len({u.projections.digest() for u in present}) > 1:
            return per_delta_post(units, module, args, kwargs, output, routing)
        batch = routing.index.numel()
        cache = get_slot(module).mixed_cache
        lambda_d = gathered(units, routing.index, lambda u: u.vera_lambda_d, 0.0, cache, "vera_lambda_d")
        lambda_b = gathered(units, routing.index, lambda u: u.vera_lambda_b, 0.0, cache, "vera_lambda_b")
        vera_A, vera_B = present[0].sliced()
        x = as_rows(first_input(args, kwargs), batch).to(lambda_d.dtype)
        hidden = F.linear(x, vera_A) * lambda_d.unsqueeze(1)
        change = F.linear(hidden, vera_B) * lambda_b.unsqueeze(1)
        return (as_rows(output, batch) + change.to(output.dtype)).view(output.shape)

    def low_rank_update(self):
        left, right = self.factors()
        return left.detach(), right.detach(), self.transposed

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}"
