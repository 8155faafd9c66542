"""Post-hoc LoRA: the best low-rank delta that turns a base into (close to) its full fine-tune.

Each adapted layer's change ``W_finetuned - W_base`` is factored by a truncated SVD, which is
the optimal rank-k approximation in Frobenius norm (Eckart–Young); with ``energy`` each layer
gets the smallest rank that keeps that fraction of its change's squared norm, so ranks differ
per layer and are recorded in ``LoRAConfig.rank_pattern``.

Example:
    >>> model, report = extract_lora(base, finetuned, energy=0.9, modules_to_save=["classifier"])
    >>> print(report)                     # per-layer rank, energy kept, relative error
    >>> dt.save(model, "runs/extracted")
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..core.build import linear_shape, weight_as_out_in
from ..core.inject import attach
from ..core.params import base_parameters, delta_parameters, parameter_owners, tensor_key, tied_elsewhere
from ..core.quantized import dense
from ..core.saved_module import SavedModule
from ..core.slot import slot_sites
from ..core.targeting import base_modules, select_modules
from ..errors import ConfigError, TargetError
from ..io.meaning import inferred, remember
from ..methods.lora import LoRAConfig
from .lowrank import check_rank_or_energy, low_rank


@dataclass(frozen=True)
class LayerExtraction:
    """One layer of an extracted LoRA.

    Attributes:
        path: the module's path.
        shape: its weight change as ``(out, in)``.
        rank: rank of its LoRA.
        energy_kept: kept fraction of ``||W_finetuned - W_base||_F²``.
        relative_error: ``||ΔW - ΔW_LoRA||_F / ||ΔW||_F``.
        delta_norm: ``||ΔW||_F``.
    """

    path: str
    shape: tuple[int, int]
    rank: int
    energy_kept: float
    relative_error: float
    delta_norm: float


@dataclass(frozen=True)
class ExtractReport:
    """What :func:`extract_lora` extracted; ``print(report)`` shows a table.

    Attributes:
        name: the delta's name on the base.
        layers: the LoRA layers.
        carried: modules copied whole from the fine-tune (``modules_to_save``).
        unchanged: candidate layers whose weight did not change (left out).
        uncovered: changed parameters the delta does not reproduce (biases, norms, embeddings,
            heads not carried); pass their modules as ``modules_to_save`` to carry them.
    """

    name: str
    layers: tuple[LayerExtraction, ...]
    carried: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()
    uncovered: tuple[str, ...] = ()

    @property
    def lora_parameters(self) -> int:
        """Parameters of the LoRA factors, ``rank * (out + in)`` summed over layers."""
        return sum(layer.rank * sum(layer.shape) for layer in self.layers)

    @property
    def dense_parameters(self) -> int:
        """Parameters of the dense weight changes the LoRA stands for."""
        return sum(layer.shape[0] * layer.shape[1] for layer in self.layers)

    @property
    def energy_kept(self) -> float:
        """Kept fraction of the squared norm of all layers' changes together."""
        total = sum(layer.delta_norm**2 for layer in self.layers)
        return sum(layer.energy_kept * layer.delta_norm**2 for layer in self.layers) / total if total else 1.0

    @property
    def relative_error(self) -> float:
        """``||ΔW - ΔW_LoRA||_F / ||ΔW||_F`` over all layers together."""
        total = sum(layer.delta_norm**2 for layer in self.layers)
        residual = sum((layer.relative_error * layer.delta_norm) ** 2 for layer in self.layers)
        return math.sqrt(residual / total) if total else 0.0

    def __str__(self) -> str:
        header = ("module", "shape", "rank", "energy kept", "rel. error")
        rows = [(layer.path, f"{layer.shape[0]}x{layer.shape[1]}", str(layer.rank), f"{layer.energy_kept:.4f}",
                 f"{layer.relative_error:.4f}") for layer in self.layers]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

        def line(row: tuple[str, ...]) -> str:
            return "  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))

        share = 100 * self.lora_parameters / self.dense_parameters if self.dense_parameters else 0.0
        overall = (f"overall: energy kept {self.energy_kept:.4f}, relative error {self.relative_error:.4f}, "
                   f"{self.lora_parameters:,} LoRA parameters for {self.dense_parameters:,} changed weights ({share:.2f}%)")
        out = [f"extracted LoRA {self.name!r}: {len(self.layers)} layers", line(header), *map(line, rows), overall]
        if self.carried:
            out.append(f"carried whole (modules_to_save): {', '.join(self.carried)}")
        if self.unchanged:
            out.append(f"unchanged, left out: {', '.join(self.unchanged)}")
        if self.uncovered:
            names = ", ".join(self.uncovered[:6]) + (f", ... ({len(self.uncovered)} in all)" if len(self.uncovered) > 6 else "")
            out.append(f"changed but not in the delta: {names}; carry their modules with modules_to_save")
        return "\n".join(out)


def extract_lora(
    base: nn.Module,
    finetuned: nn.Module,
    rank: int | None = None,
    energy: float | None = None,
    *,
    targets: Sequence[str] | None = None,
    modules_to_save: Sequence[str] = (),
    name: str = "extracted",
    randomized: bool = False,
    seed: int = 0,
) -> tuple[nn.Module, ExtractReport]:
    """Attach to ``base`` a LoRA approximating ``finetuned - base`` (both the same architecture).

    Args:
        base: the model that was fine-tuned; the LoRA is attached to it in place.
        finetuned: the fully fine-tuned model; it is not changed.
        rank: the rank of every layer's LoRA (lower where a layer is smaller).
        energy: per layer, the smallest rank keeping this fraction of the change's squared
            Frobenius norm, in (0, 1].
        targets: module patterns (as in ``LoRAConfig.targets``) to extract; default: every
            Linear and Conv1D layer whose weight changed.
        modules_to_save: patterns of modules to copy whole from the fine-tune (a new
            classifier head); they are not factored.
        name: the delta's name on ``base``.
        randomized: use a randomised SVD (faster on large layers, slightly above the optimum).
        seed: seed of the randomised SVD.

    The delta means what the fine-tune does: its task, and its config's label names when its
    classification head is carried (``modules_to_save``); :func:`deltatune.save` writes them.

    Returns:
        ``(base, report)``: the base with the delta attached and active, and an :class:`ExtractReport`.

    Raises:
        ConfigError: not exactly one of rank/energy, or the two models' parameters differ in names or shapes.
        TargetError: a target matched nothing or a non-linear module, or no layer changed.
    """
    check_rank_or_energy(rank, energy)
    base_params, tuned_params = dict(base_parameters(base)), dict(base_parameters(finetuned))
    _check_same_architecture(base, finetuned, base_params, tuned_params)
    carried = _top_level([path for path, _ in select_modules(base, tuple(modules_to_save))]) if modules_to_save else []
    layers, unchanged = [], []
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for path, module, transposed in _candidates(base, targets, carried):
        before = weight_as_out_in(module, transposed).detach().to(torch.float64)
        after = weight_as_out_in(finetuned.get_submodule(path), transposed).detach().to(before.device, torch.float64)
        if torch.equal(before, after):
            unchanged.append(path)
            continue
        change = after - before
        approx = low_rank(change, rank, energy, randomized=randomized, seed=seed)
        factors[path] = (approx.B, approx.A)
        layers.append(LayerExtraction(path, tuple(change.shape), approx.rank, approx.energy_kept,
                                      approx.relative_error, float(torch.linalg.norm(change))))
    if not layers:
        raise TargetError(f"no {'targeted' if targets else 'Linear or Conv1D'} layer of {type(base).__name__} changed "
                          f"between the base and the fine-tune; nothing to extract (are the two models the same?)")
    config = _lora_config(layers, rank, carried)
    attach(base, config, name=name)
    _load_factors(base, name, config, factors)
    _load_carried(base, finetuned, name)
    meaning = inferred(finetuned, carried)  # the fine-tune's label names, when its head is carried
    remember(base, name, meaning if meaning.known else None)
    covered = {tensor_key(layer.path, "weight") for layer in layers}
    uncovered = tuple(key for key, param in base_params.items()
                      if key not in covered and not any(key.startswith(path + ".") for path in carried)
                      and not torch.equal(dense(param.detach()), dense(tuned_params[key].detach()).to(param.device)))
    return base, ExtractReport(name, tuple(layers), tuple(carried), tuple(unchanged), uncovered)


def _check_same_architecture(base: nn.Module, finetuned: nn.Module, base_params: dict, tuned_params: dict) -> None:
    differ = sorted(set(base_params) ^ set(tuned_params))
    differ += [k for k in base_params if k in tuned_params and base_params[k].shape != tuned_params[k].shape]
    if differ:
        raise ConfigError(
            f"the fine-tuned {type(finetuned).__name__} does not have the base {type(base).__name__}'s parameters "
            f"(first difference: {differ[0]!r}); extract from a fine-tune of this very base architecture"
        )


def _top_level(paths: list[str]) -> list[str]:
    """The paths not inside another listed path (a carried module's children come with it)."""
    return [p for p in paths if not any(p.startswith(other + ".") for other in paths)]


def _candidates(base: nn.Module, targets: Sequence[str] | None, carried: list[str]):
    """``(path, module, fan_in_fan_out)`` of the layers to factor."""
    selected = select_modules(base, tuple(targets)) if targets else base_modules(base)
    owners = parameter_owners(base)
    out = []
    for path, module in selected:
        shape = linear_shape(module)
        if shape is None:
            if targets:
                raise TargetError(f"target {path!r} is a {type(module).__name__}; extraction factors Linear and Conv1D "
                                  f"layers only (carry other modules with modules_to_save)")
            continue
        if any(path == c or path.startswith(c + ".") for c in carried) or "weight" in tied_elsewhere(base, path, owners):
            continue  # carried whole, or a weight shared with an embedding: reported as uncovered if changed
        out.append((path, module, shape[2]))
    return out


def _lora_config(layers: list[LayerExtraction], rank: int | None, carried: list[str]) -> LoRAConfig:
    """``r``: the requested or most common rank, ``alpha = r`` (scaling 1); other ranks go into ``rank_pattern``."""
    common = rank if rank is not None else Counter(layer.rank for layer in layers).most_common(1)[0][0]
    pattern = {layer.path: layer.rank for layer in layers if layer.rank != common}
    return LoRAConfig(r=common, alpha=float(common), targets=_exact(layer.path for layer in layers),
                      modules_to_save=_exact(carried), rank_pattern=pattern or None)


def _exact(paths) -> tuple[str, ...]:
    """Target patterns that select exactly these module paths."""
    return tuple("re:" + re.escape(path) for path in paths)


def _load_factors(model: nn.Module, name: str, config: LoRAConfig,
                  factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    params = dict(delta_parameters(model, name))
    with torch.no_grad():
        for path, (b, a) in factors.items():
            scaling = config.for_module(path).scaling  # the unit multiplies B A by it; divide it out of B
            params[tensor_key(path, "lora_A")].copy_(a)
            params[tensor_key(path, "lora_B")].copy_(b / scaling)


def _load_carried(model: nn.Module, finetuned: nn.Module, name: str) -> None:
    for path, _, slot in slot_sites(model):
        if name in slot and isinstance(slot[name], SavedModule):
            slot[name].copy.load_state_dict(finetuned.get_submodule(path).state_dict())
