"""OFT: orthogonal finetuning by block-diagonal rotations of the weights' input side.

Qiu et al., 2023, "Controlling Text-to-Image Diffusion by Orthogonal Finetuning"
(arXiv:2306.07280). Each adapted weight ``W`` (out, in)
becomes ``W R^T`` with ``R = diag(R_1, ..., R_r)`` orthogonal, each block the Cayley transform
of a skew-symmetric ``Q_i`` that starts at zero (so ``R = I`` and the model is unchanged at
first). Layout, formulas and options follow peft 0.21.2's OFT, so adapters exchange both ways.
"""

from __future__ import annotations

from torch import nn

from ...core.build import per_linear
from ...core.registry import MethodSpec, Mixing, register_method
from ...core.slot import slot_sites
from ...core.unit import Placements
from ...errors import ConfigError
from .config import DEFAULT_BLOCK_SIZE, OFTConfig
from .layer import OFTLinear
from .peft import OFTCodec

__all__ = ["OFTConfig", "OFTLinear"]

DEFAULT_ROLES = ["q|qkv", "v"]


def _make_unit(config: OFTConfig):
    def make(path: str, module: nn.Module, fan_in: int, fan_out: int, transposed: bool):
        layout = config.blocks_for(fan_in)
        asked = f"r={config.r} blocks" if config.r is not None else f"block_size={config.block_size or DEFAULT_BLOCK_SIZE}"
        where = f"{path!r} ({type(module).__name__}, weight shape {tuple(module.weight.shape)}, {fan_in} input features)"
        if layout is None:
            raise ConfigError(f"oft: {asked} does not divide the input width of {where}; choose r or block_size "
                              f"dividing {fan_in}, or leave this module out of targets")
        blocks, size = layout
        if size < 2:
            raise ConfigError(f"oft: {asked} gives blocks of size 1 at {where}, which have no parameters; "
                              f"use fewer, larger blocks")
        return OFTLinear(fan_in, fan_out, transposed, blocks, size, block_share=config.block_share,
                         neumann_terms=config.num_cayley_neumann_terms if config.use_cayley_neumann else None,
                         coft_eps=config.eps if config.coft else None, module_dropout=config.module_dropout)

    return make


def build(model: nn.Module, config: OFTConfig) -> Placements:
    return per_linear(model, config, DEFAULT_ROLES, _make_unit(config))


def project_after_step(model: nn.Module, name: str, step: int, total: int) -> None:
    """Constrained OFT: put every block of delta ``name`` back on its ball after an optimizer step."""
    for _, _, slot in slot_sites(model):
        unit = slot[name] if name in slot else None
        if isinstance(unit, OFTLinear):
            unit.project()


register_method(MethodSpec(
    "oft", OFTConfig, build, mergeable=True, identity_at_init=True,
    summary="block-diagonal orthogonal rotation (Cayley transform) of linear weights' input side",
    default_lr=5e-3,
    mixing=Mixing("per_delta", reason="a rotation of the input multiplies the weight; each delta runs on its own rows"),
    step_hook=project_after_step, peft=OFTCodec()))
