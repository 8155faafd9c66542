"""VB-LoRA's units: the shared trainable vector bank (one unit on the model) and each adapted
layer's logits, which pick and mix bank vectors into the layer's LoRA factors."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ...core.build import first_input
from ...core.config import DeltaConfig, check
from ...core.rows import as_rows, gathered, per_delta_post
from ...core.unit import DeltaUnit
from ...core.weight_delta import WeightDelta
from ...errors import DeltaStateError

_LOGITS = ("vblora_logits_A", "vblora_logits_B")


@dataclass(frozen=True)
class VBLoRAConfig(DeltaConfig):
    """VB-LoRA on linear layers: LoRA factors assembled from a shared bank of vectors.

    Args:
        r: rank of each layer's update ``B A``.
        num_vectors: vectors in the shared bank.
        vector_length: length of each bank vector; it must divide the input and output width
            of every target (checked at attach). The default, 64, divides the widths of
            MiniLM (384, 1536) and SmolLM2 (576, 192, 1536); peft's 256 divides neither.
        topk: bank vectors mixed into each sub-vector (the paper finds 2 best).
        dropout: dropout on the branch's input during training (peft's ``vblora_dropout``).
        init_vector_bank_bound: the bank starts uniform in ``[-bound, bound]``.
        init_logits_std: the logits start normal with this standard deviation.
        save_only_topk_weights: the saved delta keeps, per sub-vector, only the chosen bank
            indices and their mixing weights (as peft does): far smaller, exact for inference
            and merging, but the loaded delta can no longer be trained.
    """

    method = "vblora"

    r: int = field(default=4, metadata={"aliases": ("rank",)})
    num_vectors: int = 256
    vector_length: int = 64
    topk: int = 2
    dropout: float = 0.0
    init_vector_bank_bound: float = 0.02
    init_logits_std: float = 0.1
    save_only_topk_weights: bool = False

    def validate(self) -> None:
        for name in ("r", "num_vectors", "vector_length", "topk"):
            value = getattr(self, name)
            check(isinstance(value, int) and value > 0, f"VB-LoRA {name} must be a positive integer, got {value!r}")
        check(self.topk <= self.num_vectors, f"VB-LoRA topk ({self.topk}) must be at most num_vectors "
                                             f"({self.num_vectors}); lower topk or enlarge the bank")
        check(0.0 <= self.dropout < 1.0, f"VB-LoRA dropout must be in [0, 1), got {self.dropout!r}")
        check(math.isfinite(self.init_vector_bank_bound) and self.init_vector_bank_bound > 0,
              f"VB-LoRA init_vector_bank_bound must be a positive number (a zero bank gets no gradient), "
              f"got {self.init_vector_bank_bound!r}")
        check(math.isfinite(self.init_logits_std) and self.init_logits_std >= 0,
              f"VB-LoRA init_logits_std must be a number >= 0, got {self.init_logits_std!r}")


def index_dtype(num_vectors: int) -> torch.dtype:
    """The smallest integer type peft stores top-k bank indices in."""
    for dtype, limit in ((torch.uint8, 2 ** 8), (torch.int16, 2 ** 15), (torch.int32, 2 ** 31)):
        if num_vectors < limit:
            return dtype
    return torch.int64


class VectorBank(DeltaUnit):
    """The ``(num_vectors, vector_length)`` bank one VB-LoRA delta shares across its layers
    (installed on the model itself); trained with the layers' logits."""

    def __init__(self, config: VBLoRAConfig):
        super().__init__()
        bound = config.init_vector_bank_bound
        self.vblora_vector_bank = nn.Parameter(torch.empty(config.num_vectors, config.vector_length).uniform_(-bound, bound))

    def merge_params(self, module, params):
        return {}  # the model's own weights are changed by the per-layer units

    def fingerprint_module(self, module, model):
        return None  # the adapted layers carry the base's identity

    @classmethod
    def mixed_post(cls, units, module, args, kwargs, output, routing):
        return output  # holds the bank only; the model's output is not changed here

    def extra_repr(self) -> str:
        return f"bank={tuple(self.vblora_vector_bank.shape)}"


def mix(logits: torch.Tensor, bank: torch.Tensor, topk: int) -> torch.Tensor:
    """Each sub-vector: the softmax over its ``topk`` largest logits weighting those bank vectors.
    ``logits: (..., num_vectors)`` -> ``(..., vector_length)``."""
    top, indices = logits.topk(topk, dim=-1)
    return torch.einsum("...k,...kl->...l", torch.softmax(top, dim=-1), bank[indices])


class VBLoRALinear(WeightDelta):
    """``y = W x + b_0 + B A dropout(x)`` (Li et al., 2024) with every length-``L`` piece of
    ``A``'s rows and ``B``'s columns a top-k mix of bank vectors: logits ``(r, in/L, N)`` for
    ``A: (r, in)`` and ``(out/L, r, N)`` for ``B: (out, r)``."""

    def __init__(self, fan_in: int, fan_out: int, config: VBLoRAConfig, transposed: bool = False):
        super().__init__(fan_in, fan_out, transposed)
        length, vectors, std = config.vector_length, config.num_vectors, config.init_logits_std
        self.r, self.topk, self.num_vectors = config.r, config.topk, vectors
        self.save_only_topk_weights = config.save_only_topk_weights
        self.vblora_logits_A = nn.Parameter(torch.empty(config.r, fan_in // length, vectors).normal_(0, std))
        self.vblora_logits_B = nn.Parameter(torch.empty(fan_out // length, config.r, vectors).normal_(0, std))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        #: loaded from a top-k-only file: logits outside the top k are -inf, so it cannot train
        self.topk_only = False
        # a plain tuple, so the bank is not registered twice (it belongs to the unit at the model)
        self._shared: tuple[VectorBank, ...] = ()
        self._factors: tuple | None = None

    def share(self, bank: VectorBank) -> None:
        """Use ``bank`` (the delta's shared unit) for the bank vectors."""
        self._shared = (bank,)

    @property
    def bank(self) -> torch.Tensor:
        return self._shared[0].vblora_vector_bank

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, A)``: ``B: (out, r)``, ``A: (r, in)``; cached without grad until a tensor changes."""
        bank, logits_A, logits_B = self.bank, self.vblora_logits_A, self.vblora_logits_B
        if torch.is_grad_enabled():
            return self._assemble(bank)
        key = tuple((t._version, t.data_ptr()) for t in (bank, logits_A, logits_B))
        if self._factors is None or self._factors[0] != key:
            self._factors = (key, self._assemble(bank))
        return self._factors[1]

    def _assemble(self, bank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lora_A = mix(self.vblora_logits_A, bank, self.topk).reshape(self.r, -1)
        lora_B = mix(self.vblora_logits_B, bank, self.topk).transpose(1, 2).reshape(-1, self.r)
        return lora_B, lora_A

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        lora_B, lora_A = self.factors()
        return (lora_B @ lora_A).float()

    def _check_trainable(self) -> None:
        if self.topk_only and self.training and torch.is_grad_enabled():
            raise DeltaStateError("this VB-LoRA delta was loaded from a file saved with save_only_topk_weights=True "
                                  "(only the chosen bank indices and weights), so it runs and merges but cannot be "
                                  "trained further; train from a file saved with save_only_topk_weights=False")

    def forward_post(self, module, args, kwargs, output):
        self._check_trainable()
        lora_B, lora_A = self.factors()
        x = first_input(args, kwargs).to(lora_A.dtype)
        if self.dropout is not None:
            x = self.dropout(x)
        return output + F.linear(F.linear(x, lora_A), lora_B).to(output.dtype)

    @classmethod
    def mixed_post(cls, units, module, args, kwargs, output, routing):
        """Two batched products over each row's own ``A^T`` and ``B^T`` (ranks padded with
        zeros; zeros for the base's rows); dropout while training runs per delta."""
        present = [u for u in units if u is not None]
        if present[0].training and any(u.dropout is not None for u in present):
            return per_delta_post(units, module, args, kwargs, output, routing)
        for unit in present:
            unit._check_trainable()
        batch = routing.index.numel()
        lora_A_t = gathered(units, routing.index, lambda u: u.factors()[1].T, 0.0)  # (batch, in, r)
        lora_B_t = gathered(units, routing.index, lambda u: u.factors()[0].T, 0.0)  # (batch, r, out)
        x = as_rows(first_input(args, kwargs), batch).to(lora_A_t.dtype)
        change = torch.bmm(torch.bmm(x, lora_A_t), lora_B_t)
        return (as_rows(output, batch) + change.to(output.dtype)).view(output.shape)

    def low_rank_update(self):
        lora_B, lora_A = self.factors()
        return lora_B.detach(), lora_A.detach(), self.transposed

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        if not self.save_only_topk_weights:
            return super().saved_tensors()
        out = {}
        for name in _LOGITS:  # peft's layout: indices, and the weights of all but the last
            top, indices = getattr(self, name).detach().topk(self.topk, dim=-1)
            out[f"{name}_topk_indices"] = indices.to(index_dtype(self.num_vectors))
            out[f"{name}_topk_weights"] = torch.softmax(top, dim=-1)[..., :-1].contiguous()
        return out

    def load_saved(self, tensors: dict[str, torch.Tensor]) -> None:
        if not self.save_only_topk_weights:
            return super().load_saved(tensors)
        with torch.no_grad():
            for name in _LOGITS:
                indices = tensors[f"{name}_topk_indices"].long()
                weights = tensors[f"{name}_topk_weights"]
                weights = torch.cat([weights, 1 - weights.sum(-1, keepdim=True)], dim=-1)
                logits = getattr(self, name)
                logits.fill_(-math.inf).scatter_(-1, indices.to(logits.device), weights.log().to(logits))
        self.topk_only = True

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, logits_A={tuple(self.vblora_logits_A.shape)}"
