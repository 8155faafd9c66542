"""Compacter and Compacter++: bottleneck adapters whose projections are sums of Kronecker products.

Karimi Mahabadi, Henderson & Ruder, 2021, "Compacter: Efficient Low-Rank Hypercomplex Adapter
Layers" (arXiv:2106.04647). Each projection of a bottleneck adapter is a parameterised
hypercomplex multiplication (PHM) layer::

    W = sum_{i=1..n} A_i ⊗ B_i        A_i: (n, n), shared by every adapter layer ("slow" weights)
                                      B_i: (out / n, in / n), per layer, B_i = s_i t_i^T of rank r

and the adapter adds ``s * (W_up act(W_down h + b_down) + b_up)`` to the module's output
(:class:`~deltatune.methods.adapter.Bottleneck`). Compacter puts an adapter after the attention
block and after the feed-forward block (Houlsby's places); Compacter++ only after the
feed-forward block (Pfeiffer's place).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ...core.build import per_module, with_shared
from ...core.config import DeltaConfig, check
from ...core.registry import MethodSpec, Mixing, register_method
from ...core.roles import default_targets
from ...core.unit import DeltaUnit, Placements
from ...errors import NotApplicableError
from ..adapter import ACTIVATIONS, PLACEMENT_ROLES, Bottleneck, io_features


#: variant -> where its adapters go (a placement of :mod:`deltatune.methods.adapter`)
VARIANT_PLACEMENTS = {"compacter": "houlsby", "compacter++": "pfeiffer"}


@dataclass(frozen=True)
class CompacterConfig(DeltaConfig):
    """Compacter / Compacter++ adapters (the option names follow adapter-hub's ``CompacterConfig``).

    Args:
        variant: ``"compacter"`` (after the attention output and the feed-forward block) or
            ``"compacter++"`` (after the feed-forward block only).
        phm_dim: ``n``, the number of Kronecker summands and the size of each ``A_i``; it
            must divide the adapted width and the bottleneck.
        reduction_factor: bottleneck = adapted width // reduction_factor (when ``bottleneck`` is 0).
        bottleneck: width of the bottleneck; ``0`` derives it from ``reduction_factor``.
        phm_rank: rank ``r`` of each per-layer ``B_i = s_i t_i^T`` (with ``factorized_phm_W``).
        factorized_phm_W: store each ``B_i`` as the low-rank product ``s_i t_i^T`` (Compacter);
            ``False`` stores the full ``B_i`` (PHM-Adapter).
        shared_phm_rule: one set of ``A_i`` for every adapter layer and both projections
            (Compacter); ``False`` gives each projection its own.
        factorized_phm_rule: store each ``A_i`` as a rank-one product (column x row).
        phm_c_init: initialisation of the ``A_i``: ``"normal"`` (std ``phm_init_range``) or
            ``"uniform"`` (on [-1, 1]).
        phm_init_range: standard deviation of the ``A_i`` for ``phm_c_init="normal"``.
        non_linearity: the bottleneck's activation, one of ``relu gelu tanh silu swish``.
        scaling: factor on the adapter's output.
    """

    method = "compacter"

    variant: Literal["compacter", "compacter++"] = "compacter"
    phm_dim: int = 4
    reduction_factor: int = 32
    bottleneck: int = 0
    phm_rank: int = 1
    factorized_phm_W: bool = True
    shared_phm_rule: bool = True
    factorized_phm_rule: bool = False
    phm_c_init: Literal["normal", "uniform"] = "normal"
    phm_init_range: float = 1e-2
    non_linearity: str = "gelu"
    scaling: float = 1.0

    def validate(self) -> None:
        check(self.variant in VARIANT_PLACEMENTS,
              f"compacter variant must be one of {sorted(VARIANT_PLACEMENTS)}, got {self.variant!r}")
        check(self.phm_dim > 0, f"compacter phm_dim must be a positive integer, got {self.phm_dim!r}")
        check(self.reduction_factor > 0,
              f"compacter reduction_factor must be a positive integer, got {self.reduction_factor!r}")
        check(self.bottleneck >= 0,
              f"compacter bottleneck must be >= 0 (0: width // reduction_factor), got {self.bottleneck!r}")
        check(self.phm_rank > 0, f"compacter phm_rank must be a positive integer, got {self.phm_rank!r}")
        check(self.phm_c_init in ("normal", "uniform"),
              f"compacter phm_c_init must be 'normal' or 'uniform', got {self.phm_c_init!r}")
        check(self.phm_init_range > 0, f"compacter phm_init_range must be positive, got {self.phm_init_range!r}")
        check(self.non_linearity in ACTIVATIONS,
              f"compacter non_linearity must be one of {sorted(ACTIVATIONS)}, got {self.non_linearity!r}")


def kronecker_sum(rule: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``sum_i rule[i] ⊗ blocks[i]``: ``rule`` ``(n, n, n)``, ``blocks`` ``(n, p, q)`` -> ``(n p, n q)``."""
    n, p, q = blocks.shape
    return torch.einsum("iab,ipq->apbq", rule, blocks).reshape(n * p, n * q)


class PHMRule(DeltaUnit):
    """The ``n`` matrices ``A_i`` (``n x n``) of a PHM product, stored ``(n, n, n)``, or as
    ``(n, n, 1) @ (n, 1, n)`` when factorised. At path ``""`` when every adapter layer shares it;
    it changes no module's output itself."""

    def __init__(self, config: CompacterConfig):
        super().__init__()
        n = config.phm_dim
        shapes = {"rule_left": (n, n, 1), "rule_right": (n, 1, n)} if config.factorized_phm_rule else {"rule": (n, n, n)}
        for name, shape in shapes.items():
            value = torch.empty(shape)
            if config.phm_c_init == "normal":
                nn.init.normal_(value, std=config.phm_init_range)
            else:
                nn.init.uniform_(value, -1.0, 1.0)
            setattr(self, name, nn.Parameter(value))

    def matrices(self) -> torch.Tensor:
        """The ``A_i`` stacked, ``(n, n, n)``."""
        return torch.bmm(self.rule_left, self.rule_right) if hasattr(self, "rule_left") else self.rule

    @classmethod
    def mixed_post(cls, units, module, args, kwargs, output, routing):
        return output  # holds the A_i only; the model's output is not changed here

    def fingerprint_module(self, module, model):
        return None  # the adapted modules carry the base's identity


def _blocks(n: int, rows: int, cols: int, config: CompacterConfig, zero: bool) -> dict[str, nn.Parameter]:
    """Per-layer ``B_i`` (``rows x cols`` each): ``{"left": s (n, rows, r), "right": t (n, r, cols)}``
    when factorised, else ``{"blocks": (n, rows, cols)}``; Glorot-uniform per matrix, and the
    right factor (or the blocks) zero when ``zero`` (the up-projection starts at zero)."""
    shapes = ({"left": (n, rows, config.phm_rank), "right": (n, config.phm_rank, cols)}
              if config.factorized_phm_W else {"blocks": (n, rows, cols)})
    out = {}
    for name, shape in shapes.items():
        value = torch.empty(shape)
        for matrix in value:
            nn.init.xavier_uniform_(matrix)
        if zero and name != "left":
            value.zero_()
        out[name] = nn.Parameter(value)
    return out


class CompacterAdapter(Bottleneck):
    """One layer's Compacter: ``W_down = sum_i A_i ⊗ B_i^down``, ``W_up = sum_i A_i ⊗ B_i^up``
    (``A_i`` from the shared :class:`PHMRule`, or this layer's own two rules)."""

    stacks_cacheable = False  # its weights read the shared A_i, which are not its own parameters

    def __init__(self, width: int, bottleneck: int, config: CompacterConfig, shared: PHMRule | None):
        super().__init__(False, config.non_linearity, config.scaling)
        n = config.phm_dim
        for name, value in _blocks(n, bottleneck // n, width // n, config, zero=False).items():
            setattr(self, f"down_{name}", value)
        for name, value in _blocks(n, width // n, bottleneck // n, config, zero=True).items():
            setattr(self, f"up_{name}", value)
        self.down_b = nn.Parameter(torch.zeros(bottleneck))
        self.up_b = nn.Parameter(torch.zeros(width))
        if shared is None:
            self.down_rule, self.up_rule = PHMRule(config), PHMRule(config)
        else:
            self._shared = weakref.ref(shared)  # a plain reference would count (and save) it once per layer

    def rules(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``A_i`` of the down- and the up-projection, each ``(n, n, n)``."""
        if hasattr(self, "_shared"):
            matrices = self._shared().matrices()
            return matrices, matrices
        return self.down_rule.matrices(), self.up_rule.matrices()

    def _projection(self, side: str, rule: torch.Tensor) -> torch.Tensor:
        if hasattr(self, f"{side}_blocks"):
            return kronecker_sum(rule, getattr(self, f"{side}_blocks"))
        return kronecker_sum(rule, torch.bmm(getattr(self, f"{side}_left"), getattr(self, f"{side}_right")))

    def down_weight(self) -> torch.Tensor:
        return self._projection("down", self.rules()[0])

    def up_weight(self) -> torch.Tensor:
        return self._projection("up", self.rules()[1])

    def down_bias(self) -> torch.Tensor:
        return self.down_b

    def up_bias(self) -> torch.Tensor:
        return self.up_b


def build(model: nn.Module, config: CompacterConfig) -> Placements:
    shared = PHMRule(config) if config.shared_phm_rule else None
    n = config.phm_dim

    def make(path: str, module: nn.Module):
        dims = io_features(module)
        if dims is None:
            return f"{type(module).__name__} has no linear layer to read its width from"
        width = dims[1]
        where = f"compacter cannot adapt {path} ({type(module).__name__}, {dims[0]} -> {width})"
        # a derived bottleneck is rounded down to a multiple of phm_dim (576 // 32 = 18 -> 16 for phm_dim 4)
        bottleneck = config.bottleneck or width // config.reduction_factor // n * n
        if width % n == 0 and bottleneck == 0:
            raise NotApplicableError(f"{where}: its width {width} // reduction_factor {config.reduction_factor} is a "
                                     f"bottleneck of {width // config.reduction_factor}, below phm_dim {n}; lower "
                                     f"reduction_factor or set bottleneck")
        if width % n or bottleneck % n:
            raise NotApplicableError(
                f"{where}: phm_dim {n} must divide its output width {width} and the bottleneck {bottleneck} "
                f"(bottleneck={config.bottleneck}, reduction_factor={config.reduction_factor}); choose a phm_dim "
                f"dividing both, or set bottleneck"
            )
        return CompacterAdapter(width, bottleneck, config, shared)

    roles = PLACEMENT_ROLES[VARIANT_PLACEMENTS[config.variant]]
    placements = per_module(model, config, lambda: default_targets(model, roles, config.method), make)
    return with_shared(model, shared, placements)


register_method(MethodSpec(
    "compacter", CompacterConfig, build, size_option="reduction_factor", mergeable=False, identity_at_init=True,
    merge_refusal="a bottleneck adapter applies a non-linearity to the layer's output",
    summary="bottleneck adapters whose projections are Kronecker sums with shared slow weights (Compacter, Compacter++)",
    default_lr=1e-2, mixing=Mixing("batched"),
    peft_refusal="peft has no Compacter (it is adapter-hub's format)"))
