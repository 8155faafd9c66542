"""VeRA: per-layer scaling vectors around one pair of frozen random matrices shared by all layers.

Kopiczko, Blankevoort & Asano, 2023, "VeRA: Vector-based Random Matrix Adaptation"
(arXiv:2310.11454). For a layer with weight ``W: (out, in)``::

    h = W x + diag(b) B diag(d) A x,     A: (r, in), B: (out, r) frozen; d: (r,), b: (out,) trained

``A`` and ``B`` are drawn once per delta (Kaiming uniform, from ``projection_prng_key``) at
the largest input and output widths among the targets; each layer uses the leading
``[:, :in]`` / ``[:out, :]`` slices, as peft does. ``b`` starts at zero, so a new delta is
the identity. The shared matrices live in one unit on the model (path ``""``) that every
layer unit refers to, and are saved with the delta unless ``save_projection=False``.
"""

from __future__ import annotations

from torch import nn

from ...core.build import per_linear, with_shared
from ...core.registry import MethodSpec, Mixing, register_method
from ...core.unit import Placements
from .layer import VeRAConfig, VeRALinear, VeRAProjections, draw_projections
from .peft import VeraCodec

__all__ = ["VeRAConfig", "VeRALinear", "VeRAProjections", "draw_projections"]

DEFAULT_ROLES = ["q|qkv", "v"]


def build(model: nn.Module, config: VeRAConfig) -> Placements:
    def make(path: str, module: nn.Module, fan_in: int, fan_out: int, transposed: bool):
        return VeRALinear(fan_in, fan_out, config, transposed)

    layers = per_linear(model, config, DEFAULT_ROLES, make)
    units = [p.unit for p in layers]
    shared = VeRAProjections(config.r, max(u.fan_in for u in units), max(u.fan_out for u in units), config)
    for unit in units:
        unit.share(shared)
    return with_shared(model, shared, layers)


register_method(MethodSpec(
    "vera", VeRAConfig, build, size_option="r", mergeable=True, identity_at_init=True,
    summary="trained scaling vectors b, d around frozen random matrices shared by all layers: diag(b) B diag(d) A",
    default_lr=1e-2, mixing=Mixing("batched"), peft=VeraCodec()))
