"""EigenLoRAx bases: the principal subspace of several low-rank deltas of one base, per module.

For deltas ``i = 1..N`` with updates ``dW_i = B_i A_i`` (``(out, in)``, from each unit's declared
:meth:`~deltatune.core.unit.DeltaUnit.low_rank_update`) at one module, the output-side
components are the top ``k`` left singular vectors of ``[dW_1, ..., dW_N]`` (the eigenvectors of
``sum_i dW_i dW_i^T``) and the input-side ones the top ``k`` right singular vectors of
``[dW_1; ...; dW_N]`` (of ``sum_i dW_i^T dW_i``). They are computed from the factors, never
forming a ``dW``: with ``A_i = R_i^T Q_i^T`` (QR of ``A_i^T``), ``dW_i dW_i^T = (B_i R_i^T)(B_i R_i^T)^T``,
so the output side is the SVD of the ``(out, sum r_i)`` stack ``[B_1 R_1^T, ...]``; the input
side likewise from the QR of ``B_i``. This is the paper's principal subspace of the adapters'
factors, taken on each factor balanced by the other (so it does not depend on how a method
splits its update between ``B`` and ``A``, nor on LoRA's ``alpha / r``), and uncentred (a LoRA
factor's sign is arbitrary: ``B A = (-B)(-A)``, so a mean has no meaning).

``augment`` random orthonormal directions, orthogonal to the principal ones, may follow them
(the paper's augmentation when the recycled subspace is too small for a new task).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from ..core.inject import delete, list_deltas
from ..core.slot import get_state, slot_sites
from ..errors import ConfigError, FingerprintError, NotApplicableError
from ..io.artifact import load
from ..io.atomic import atomic_path
from ..methods.eigenlora import EigenBasis, SiteBasis, weight_digest

__all__ = ["eigen_basis", "principal_directions", "save_basis"]

#: a singular value below this fraction of the largest counts as zero (the deltas span fewer directions)
RANK_TOLERANCE = 1e-6


def principal_directions(factors: Sequence[tuple[torch.Tensor, torch.Tensor]], k: int,
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top ``k`` output- and input-side directions of the updates ``B_i @ A_i``.

    Args:
        factors: ``(B_i (out, r_i), A_i (r_i, in))`` per delta.
        k: directions kept per side.

    Returns:
        ``(U (out, k), s_U (k,), V (in, k), s_V (k,))``: orthonormal columns and the singular
        values of ``[dW_1, ..., dW_N]`` and of ``[dW_1; ...; dW_N]`` (the square roots of the
        eigenvalues of ``sum_i dW_i dW_i^T`` and of ``sum_i dW_i^T dW_i``).

    Raises:
        NotApplicableError: the updates span fewer than ``k`` directions.
    """
    outputs, inputs = [], []
    for B, A in factors:
        B, A = B.double(), A.double()
        _, r_a = torch.linalg.qr(A.T)  # A = R^T Q^T
        _, r_b = torch.linalg.qr(B)  # B = Q R
        outputs.append(B @ r_a.T)
        inputs.append(A.T @ r_b.T)
    U, s_u, _ = torch.linalg.svd(torch.cat(outputs, dim=1), full_matrices=False)
    V, s_v, _ = torch.linalg.svd(torch.cat(inputs, dim=1), full_matrices=False)
    spanned = min(_spanned(s_u), _spanned(s_v))
    if k > spanned:
        raise NotApplicableError(f"k={k} exceeds the {spanned} directions the deltas' updates span here "
                                 f"(sum of their ranks {sum(B.shape[1] for B, _ in factors)}); lower k, or add "
                                 f"random directions with augment")
    return U[:, :k].float(), s_u[:k].float(), V[:, :k].float(), s_v[:k].float()


def _spanned(values: torch.Tensor) -> int:
    """How many singular values are not zero (relative to the largest)."""
    if not values.numel() or values[0] <= 0:
        return 0
    return int((values > RANK_TOLERANCE * values[0]).sum())


def orthogonal_complement(directions: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` random orthonormal columns orthogonal to ``directions`` (orthonormal columns)."""
    width = directions.shape[0]
    if directions.shape[1] + count > width:
        raise NotApplicableError(f"k + augment = {directions.shape[1] + count} directions do not fit a width of "
                                 f"{width}; lower augment")
    draw = torch.randn(width, count, generator=generator, dtype=torch.float64)
    basis = directions.double()
    for _ in range(2):  # projecting twice keeps the new columns orthogonal to float64 accuracy
        draw = draw - basis @ (basis.T @ draw)
    q, r = torch.linalg.qr(draw)
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return (q * signs).float()


def _updates(model: nn.Module, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, bool]]:
    """Delta ``name``'s low-rank update at each module it adapts.

    Raises:
        NotApplicableError: some unit declares no low-rank update (the delta is not LoRA-like).
    """
    state = get_state(model)
    adapted = set(state.sites[name])
    config = state.configs[name]
    updates = {}
    for path, _, slot in slot_sites(model):
        if path not in adapted or name not in slot:
            continue
        update = slot[name].low_rank_update()
        if update is None:
            raise NotApplicableError(
                f"delta {name!r} ({config.method}) has no low-rank update at {path!r}: an eigenlora basis is built "
                f"from low-rank deltas (lora, loraxs, eigenlora, ...); leave {name!r} out of the sources")
        B, A, transposed = update
        updates[path] = (B.detach().float().cpu(), A.detach().float().cpu(), transposed)
    return updates


def eigen_basis(model: nn.Module, sources: Sequence[str | Path], k: int, *, augment: int = 0,
                seed: int = 0) -> EigenBasis:
    """The EigenLoRAx basis of ``sources`` (delta folders, or names of deltas on ``model``) on ``model``.

    Folders are loaded onto ``model`` without their heads (their base is checked) and removed
    again; the model is left as it was.

    Args:
        model: the base every source was trained on.
        sources: two or more low-rank deltas: folders, or names of deltas attached to ``model``.
        k: principal directions kept per side of each module.
        augment: random orthonormal directions added after them (orthogonal to them).
        seed: seed of those random directions.

    Raises:
        ConfigError: fewer than two sources, or a bad ``k`` / ``augment``.
        FingerprintError: a source folder was made for another base.
        NotApplicableError: a source is not a low-rank delta; ``k`` exceeds what the updates span.
        TargetError: the sources adapt different modules.
    """
    from ..errors import TargetError

    if len(sources) < 2:
        raise ConfigError(f"an eigenlora basis needs two or more source deltas, got {len(sources)}; pass the "
                          f"folders of LoRA deltas trained on other tasks of this base")
    if not isinstance(k, int) or k < 1 or not isinstance(augment, int) or augment < 0:
        raise ConfigError(f"eigen_basis takes k >= 1 and augment >= 0, got k={k!r}, augment={augment!r}")
    attached = set(list_deltas(model))
    loaded, per_source = [], {}
    try:
        for source in sources:
            if str(source) in attached:
                name = str(source)
            else:
                name = next(f"eigenbasis_source_{i}" for i in range(len(attached) + len(sources) + 1)
                            if f"eigenbasis_source_{i}" not in attached | set(loaded))
                try:
                    load(model, source, name, check="base", activate=False, saved_modules=False)
                except FingerprintError as error:
                    raise FingerprintError(f"eigenlora basis sources must all be deltas of this base; {source}: "
                                           f"{error}") from None
                loaded.append(name)
            per_source[str(source)] = _updates(model, name)
        paths = {s: set(u) for s, u in per_source.items()}
        first = next(iter(paths))
        for source, sites in paths.items():
            if sites != paths[first]:
                only = sorted(sites ^ paths[first])[:3]
                raise TargetError(f"eigenlora basis sources adapt different modules: {first} and {source} differ at "
                                  f"{only}; build the basis from deltas trained with the same targets")
        generator = torch.Generator().manual_seed(seed)
        sites = {}
        for path in sorted(paths[first]):
            module = model.get_submodule(path)
            factors = [(u[path][0], u[path][1]) for u in per_source.values()]
            try:
                U, s_u, V, s_v = principal_directions(factors, k)
            except NotApplicableError as error:
                raise NotApplicableError(f"eigenlora basis at {path!r}: {error}") from None
            up = torch.cat([U, orthogonal_complement(U, augment, generator)], dim=1)
            down = torch.cat([V, orthogonal_complement(V, augment, generator)], dim=1).T
            sites[path] = SiteBasis(up.contiguous(), down.contiguous(), s_u, s_v, weight_digest(module))
    finally:
        for name in loaded:
            delete(model, name)
    return EigenBasis(sites, k, augment, [str(s) for s in sources], seed)


def save_basis(basis: EigenBasis, path: str | Path) -> Path:
    """Write ``basis`` to ``path`` (one safetensors file, written atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(basis.tensors(), str(tmp), metadata=basis.metadata())
    return path
