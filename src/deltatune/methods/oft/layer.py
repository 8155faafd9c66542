"""The OFT unit: a block-diagonal orthogonal ``R`` on a linear module's input features.

peft 0.21.2's convention, kept so adapters exchange exactly: the input row vector is rotated
block by block, ``x' = x R`` (``R = diag(R_1, ..., R_r)``), so the module computes
``W x' + b``, i.e. the weight ``W R^T``. Each block is built from a skew-symmetric ``Q``
(stored as its strict upper triangle, row-major) by the Cayley transform
``R = (I - Q)(I + Q)^-1``, or with ``use_cayley_neumann`` by the series
``I + 2Q + 2Q^2 + ... + Q^(t-1)`` (which approximates ``(I + Q)(I - Q)^-1``, the transpose:
peft's two parameterisations rotate opposite ways for the same ``Q``; each is orthogonal).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...core.build import first_input, replace_first_input
from ...core.weight_delta import WeightDelta


def skew_symmetric(upper: torch.Tensor, size: int) -> torch.Tensor:
    """``(k, size, size)`` skew-symmetric matrices from their ``(k, size(size-1)/2)`` strict
    upper triangles (row-major)."""
    rows, cols = torch.triu_indices(size, size, 1, device=upper.device)
    matrix = upper.new_zeros(upper.shape[0], size, size)
    matrix[:, rows, cols] = upper
    return matrix - matrix.transpose(-2, -1)


def cayley(q: torch.Tensor, neumann_terms: int | None) -> torch.Tensor:
    """The orthogonal blocks of skew-symmetric ``q`` (``(k, n, n)``), exactly as peft forms them:
    ``(I - Q)(I + Q)^-1``, or with ``neumann_terms`` the series ``I + 2Q + 2Q^2 + ... + Q^(t-1)``
    (peft's loop: the last power enters once; three terms give the four-term sum)."""
    eye = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype).expand_as(q)
    if neumann_terms is None:
        return torch.linalg.solve(eye + q, eye - q, left=False)
    rotation = eye + 2 * q
    if neumann_terms > 2:
        power = q @ q
        rotation = rotation + 2 * power
        for _ in range(3, neumann_terms - 1):
            power = power @ q
            rotation = rotation + 2 * power
        rotation = rotation + power @ q
    return rotation


def coft_projection(upper: torch.Tensor, size: int, eps: float) -> torch.Tensor:
    """Constrained OFT: each block's ``Q`` scaled back onto the Frobenius ball of radius
    ``eps / sqrt(k)`` (``k`` stored blocks) when it lies outside; the upper triangles returned."""
    norm = torch.linalg.matrix_norm(skew_symmetric(upper, size)).unsqueeze(-1)
    radius = eps / math.sqrt(upper.shape[0])
    return torch.where(norm <= radius, upper, radius * (upper / norm))


class OFTLinear(WeightDelta):
    """OFT on a Linear or GPT-2 ``Conv1D`` layer: ``W`` becomes ``W R^T``.

    Args:
        fan_in, fan_out, transposed: the module's shape and weight layout.
        blocks: diagonal blocks of ``R`` (``fan_in = blocks * block_size``).
        block_size: size of each block.
        block_share: one block's parameters for all blocks.
        neumann_terms: terms of the Cayley-Neumann series, ``None`` for the exact transform.
        coft_eps: the COFT radius, ``None`` without the constraint.
        module_dropout: training-time share of blocks replaced by the identity.
    """

    def __init__(self, fan_in: int, fan_out: int, transposed: bool, blocks: int, block_size: int, *,
                 block_share: bool = False, neumann_terms: int | None = None, coft_eps: float | None = None,
                 module_dropout: float = 0.0):
        super().__init__(fan_in, fan_out, transposed)
        self.blocks, self.block_size = blocks, block_size
        self.neumann_terms, self.coft_eps, self.module_dropout = neumann_terms, coft_eps, module_dropout
        stored = 1 if block_share else blocks
        #: strict upper triangles of the skew-symmetric blocks (peft's ``oft_R`` layout); zero: R = I
        self.skew = nn.Parameter(torch.zeros(stored, block_size * (block_size - 1) // 2))

    def project(self) -> None:
        """Move the parameters onto the COFT ball in place (after an optimizer step)."""
        if self.coft_eps is not None:
            with torch.no_grad():
                self.skew.copy_(coft_projection(self.skew, self.block_size, self.coft_eps))

    def rotation(self, drop: bool = False) -> torch.Tensor:
        """The ``(blocks, n, n)`` orthogonal blocks (float32); ``drop``: apply module dropout."""
        upper = self.skew.float()
        if self.coft_eps is not None:
            # the value on the ball, the gradient of the parameter itself (peft projects in place)
            upper = upper + (coft_projection(upper.detach(), self.block_size, self.coft_eps) - upper.detach())
        blocks = cayley(skew_symmetric(upper, self.block_size), self.neumann_terms)
        blocks = blocks.expand(self.blocks, -1, -1)
        if drop and self.module_dropout > 0 and self.skew.shape[0] > 1:
            blocks = self._drop_blocks(blocks)
        return blocks

    def _drop_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        dropped = int(self.module_dropout * self.blocks)
        mask = torch.zeros(self.blocks, device=blocks.device, dtype=blocks.dtype)
        mask[torch.randperm(self.blocks, device=blocks.device)[:dropped]] = 1
        mask = mask.view(-1, 1, 1)
        eye = torch.eye(self.block_size, device=blocks.device, dtype=blocks.dtype)
        return (1 - mask) * blocks + mask * eye

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        rotation = self.rotation()  # merging and task vectors never drop blocks
        blocked = weight.reshape(weight.shape[0], self.blocks, self.block_size)
        rotated = torch.einsum("ojc,jkc->ojk", blocked, rotation).reshape(weight.shape)
        return rotated - weight

    def rotate_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x R``, block by block, in float32."""
        x = x.float()
        blocked = x.reshape(*x.shape[:-1], self.blocks, self.block_size)
        return torch.einsum("...jk,jkc->...jc", blocked, self.rotation(drop=self.training)).reshape(x.shape)

    def forward_post(self, module, args, kwargs, output):
        # W x' - W x without forming W R^T: the input is rotated instead
        x = first_input(args, kwargs)
        change = self.rotate_input(x) - x.float()
        return output + F.linear(change, self.base_weight(module).float()).to(output.dtype)

    def run(self, module, own, args, kwargs):
        # alone at the module: one matmul, W (x R) + b, instead of the base call plus W (x R - x)
        x = first_input(args, kwargs)
        if x.dtype != torch.float32:
            return super().run(module, own, args, kwargs)
        args, kwargs = replace_first_input(args, kwargs, self.rotate_input(x))
        return own(*args, **kwargs)

    def extra_repr(self) -> str:
        shared = ", block_share" if self.skew.shape[0] == 1 and self.blocks > 1 else ""
        return f"{super().extra_repr()}, blocks={self.blocks}, block_size={self.block_size}{shared}"
