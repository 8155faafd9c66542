"""OFT's configuration (Qiu et al., 2023, "Controlling Text-to-Image Diffusion by Orthogonal
Finetuning", arXiv:2306.07280)."""

from __future__ import annotations

from dataclasses import dataclass

from ...core.config import DeltaConfig, check

#: the block size used when neither ``r`` nor ``block_size`` is given (peft's default)
DEFAULT_BLOCK_SIZE = 32


@dataclass(frozen=True)
class OFTConfig(DeltaConfig):
    """Orthogonal finetuning: each adapted weight becomes ``W R^T``, ``R`` block-diagonal and
    orthogonal (the Cayley transform of skew-symmetric blocks that start at zero, so ``R = I``).

    Give the blocks either by count or by size (``r * block_size`` = the module's input width);
    with neither, blocks of 32. A size that does not divide a target's input width is refused
    when the delta is attached.

    Args:
        r: number of diagonal blocks per adapted module (the block size is its input width / r).
        block_size: size of each diagonal block (the number of blocks is the input width / it).
        use_cayley_neumann: replace the Cayley transform's matrix inverse by a truncated Neumann
            series (faster, only approximately orthogonal), as peft's option of that name.
        num_cayley_neumann_terms: terms of that series (at least 2).
        coft: constrained OFT: keep each block's skew-symmetric matrix within a Frobenius ball of
            radius ``eps / sqrt(blocks)`` around zero (projected after each optimizer step).
        eps: the radius of that ball (only with ``coft``).
        block_share: one block's parameters shared by all diagonal blocks of a module.
        module_dropout: during training, the share of a module's blocks set to the identity at
            each forward (multiplicative dropout; no effect with ``block_share`` or one block).
    """

    method = "oft"

    r: int | None = None
    block_size: int | None = None
    use_cayley_neumann: bool = False
    num_cayley_neumann_terms: int = 5
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    module_dropout: float = 0.0

    def validate(self) -> None:
        check(self.r is None or self.block_size is None,
              f"OFT takes the blocks by count (r={self.r}) or by size (block_size={self.block_size}), not both: "
              f"r * block_size is the module's input width; drop one of them")
        check(self.r is None or self.r > 0, f"OFT r (the number of blocks) must be a positive integer, got {self.r!r}")
        check(self.block_size is None or self.block_size > 0,
              f"OFT block_size must be a positive integer, got {self.block_size!r}")
        check(self.num_cayley_neumann_terms >= 2,
              f"OFT num_cayley_neumann_terms must be at least 2 (one term is the identity and would train nothing), "
              f"got {self.num_cayley_neumann_terms!r}")
        check(self.eps > 0, f"OFT eps (the COFT radius) must be positive, got {self.eps!r}")
        check(0.0 <= self.module_dropout < 1.0, f"OFT module_dropout must be in [0, 1), got {self.module_dropout!r}")

    def blocks_for(self, fan_in: int) -> tuple[int, int] | None:
        """``(blocks, block size)`` for a module with ``fan_in`` input features, or ``None`` when
        the configured count or size does not divide it."""
        if self.r is not None:
            return (self.r, fan_in // self.r) if fan_in % self.r == 0 and self.r <= fan_in else None
        size = self.block_size or DEFAULT_BLOCK_SIZE
        return (fan_in // size, size) if fan_in % size == 0 and size <= fan_in else None
